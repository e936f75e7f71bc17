"""Turn a folder of runs into the paper's Table 1: ours beside the paper's, Markdown, CSV, PNG.

    python -m cht.report runs/    # prints the table; writes runs/table.md, table.csv, table.png

Every run directory below the folder that holds a ``result.json`` and a ``config.json`` counts
(a config.json written before a setting existed has that setting at its old value,
``cht.config.complete``). Runs are grouped by their whole configuration: every experiment
setting of ``config.json`` (``cht.config.EXPERIMENT_KEYS``: dataset, method, sparsity,
distribution, width, epochs, optimizer, lr, batch size, schedule, ...) except the seed. A group
is one cell, ``mean ± standard error`` of the final test accuracy over its seeds, with the mean
FLOPs fractions of ``result.json`` (inference / training, docs/algorithm.md section 9) where
every run has them; runs that differ in any setting are never pooled.

Groups are shown in sections by their *setting*: how they differ from the defaults of
``run.py`` for their dataset and method (``epochs 10, width 0.125``); the defaults are the
paper's recipe (docs/algorithm.md section 6). Only that section shows the paper's numbers,
beside ours, for CIFAR-10 and CIFAR-100. Within a section a row is a method at a sparsity under
a layer-wise distribution (section 8: ``SET (ERK)``, ``CH3-L3n (ERK, dense first layer)``; the
paper's uniform one unnamed), sorted by sparsity, then method; rows extend to whatever
sparsities the runs have.

``--topology LAYER ...`` adds a table of the topology each sparse row grew (docs/algorithm.md
section 7): ``channel_cv`` and ``empty_kernels`` of those layers at the run's last evolution
step, read from ``evolution.jsonl``, mean ± s.e. over the seeds:

    python -m cht.report runs/ --topology features.3 features.40
"""
import argparse
import csv
import io
import json
import math
import os
import sys

from cht import rundir
from cht.config import EXPERIMENT_KEYS, ConfigError, complete, make_config

# docs/algorithm.md section 6 (the paper's Table 1): top-1 %, (mean, standard error)
PAPER = {
    ("dense", 0.0): {"cifar10": (92.14, 0.06), "cifar100": (72.58, 0.11)},
    ("set", 0.5): {"cifar10": (92.08, 0.10), "cifar100": (71.86, 0.12)},
    ("ch2", 0.5): {"cifar10": (92.04, 0.21), "cifar100": (72.08, 0.06)},
    ("ch3", 0.5): {"cifar10": (92.32, 0.06), "cifar100": (72.14, 0.06)},
    ("set", 0.7): {"cifar10": (91.63, 0.07), "cifar100": (71.03, 0.13)},
    ("ch2", 0.7): {"cifar10": (91.73, 0.15), "cifar100": (70.89, 0.23)},
    ("ch3", 0.7): {"cifar10": (92.04, 0.05), "cifar100": (70.75, 0.00)},
}
METHOD_NAMES = {"dense": "Dense", "static": "Static", "set": "SET", "ch2": "CH2-L3n", "ch3": "CH3-L3n",
                "rigl": "RigL"}
METHOD_ORDER = list(METHOD_NAMES)
DATASET_ORDER = ("cifar10", "cifar100", "fashion-mnist", "mnist")
PAPER_SETTING = "the paper's recipe"
LAYOUT_KEYS = ("distribution", "dense_first_layer")     # part of a row (docs/algorithm.md section 8)
SETTING_KEYS = [k for k in EXPERIMENT_KEYS if k not in ("dataset", "method", "sparsity", "seed") + LAYOUT_KEYS]
FLOPS_KEYS = ("flops_inference", "flops_training")   # result.json: fractions of dense (algorithm section 9)
TOPOLOGY_KEYS = ("channel_cv", "empty_kernels")      # evolution.jsonl: measures of algorithm section 7


def find_runs(folder):
    """``[(config, result, path)]`` of every finished run below ``folder``."""
    runs = []
    for path, _, files in sorted(os.walk(folder)):
        if "result.json" in files and "config.json" in files:
            with open(os.path.join(path, "config.json")) as f:
                cfg = complete(json.load(f))
            with open(os.path.join(path, "result.json")) as f:
                res = json.load(f)
            runs.append((cfg, res, path))
    return runs


def mean_se(values):
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for a single value)."""
    n = len(values)
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0)


def defaults_for(dataset, method, sparsity):
    """The config ``run.py`` makes for this dataset, method and sparsity with no other flag."""
    given = dict(dataset=dataset, method=method)
    if method != "dense":
        given["sparsity"] = sparsity
    return make_config(**given)


def _fmt(v):
    return f"{v:g}" if isinstance(v, float) else str(v)


def layout_of(cfg):
    """How the sparsity is shared among the layers, for a row's name: "" for the paper's uniform
    distribution, else e.g. "ERK", "dense first layer", "ERK, dense first layer"."""
    parts = [] if cfg["distribution"] == "uniform" else [cfg["distribution"].upper()]
    return ", ".join(parts + (["dense first layer"] if cfg["dense_first_layer"] else []))


def setting_of(cfg):
    """``(settings, label)``: the values of ``SETTING_KEYS`` (a key missing from an older
    config.json takes its default) and how they differ from the defaults, e.g. ``epochs 10,
    width 0.125`` (``PAPER_SETTING`` when they do not)."""
    try:
        base = defaults_for(cfg["dataset"], cfg["method"], float(cfg["sparsity"]))
    except (ConfigError, KeyError):
        base = {}
    values = {k: cfg.get(k, base.get(k)) for k in SETTING_KEYS}
    diff = [f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in values.items() if k not in base or v != base[k]]
    return values, (", ".join(diff) or PAPER_SETTING)


def summarise(runs):
    """One group per whole configuration (all but the seed), sorted for the table.

    Returns ``[dict(dataset, method, sparsity, layout, setting, settings, mean, se, seeds, accs,
    paths, configs, results, flops)]``; ``flops``: the mean of ``FLOPS_KEYS`` over the runs when
    every result.json has them (a number), else None.
    """
    groups = {}
    for cfg, res, path in runs:
        values, label = setting_of(cfg)
        sparsity, layout = round(float(cfg["sparsity"]), 6), layout_of(cfg)
        key = (label, cfg["dataset"], cfg["method"], sparsity, layout, tuple(sorted(values.items(), key=str)))
        g = groups.setdefault(key, dict(dataset=cfg["dataset"], method=cfg["method"], sparsity=sparsity,
                                        layout=layout, setting=label, settings=values, seeds=[], accs=[], paths=[],
                                        configs=[], results=[]))
        g["seeds"].append(cfg["seed"])
        g["configs"].append(cfg)
        g["results"].append(res)
        g["accs"].append(float(res["test_acc"]))
        g["paths"].append(path)
    out = []
    for g in groups.values():
        g["mean"], g["se"] = mean_se(g["accs"])
        have = all(isinstance(r.get(k), (int, float)) for r in g["results"] for k in FLOPS_KEYS)
        g["flops"] = [sum(r[k] for r in g["results"]) / len(g["results"]) for k in FLOPS_KEYS] if have else None
        out.append(g)
    return sorted(out, key=lambda g: (_setting_order(g["setting"]),) + _row_order(_row(g))
                  + (_dataset_order(g["dataset"]),))


def _row(g):
    """A group's row of the table: ``(method, sparsity, layout)``."""
    return g["method"], g["sparsity"], g["layout"]


def _setting_order(label):
    return (label != PAPER_SETTING, label)


def _row_order(row):
    method, sparsity, layout = row
    return sparsity, METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method, layout


def _row_name(row):
    method, _, layout = row
    return METHOD_NAMES.get(method, method) + (f" ({layout})" if layout else "")


def _dataset_order(d):
    return (DATASET_ORDER.index(d) if d in DATASET_ORDER else len(DATASET_ORDER), d)


def sections(groups):
    """``[(setting, datasets, paper_datasets, rows, cells)]``: one table per setting.

    ``rows``: ``(method, sparsity, layout)`` in the paper's order;
    ``cells[(method, sparsity, layout, dataset)]``: the group (one per key: a setting's label
    spells out every value that is not the default).
    """
    out = []
    for label in sorted({g["setting"] for g in groups}, key=_setting_order):
        mine = [g for g in groups if g["setting"] == label]
        datasets = sorted({g["dataset"] for g in mine}, key=_dataset_order)
        paper = [d for d in datasets if label == PAPER_SETTING and any(d in v for v in PAPER.values())]
        cells = {_row(g) + (g["dataset"],): g for g in mine}
        rows = {_row(g) for g in mine}
        rows |= {k + ("",) for k, v in PAPER.items() if any(d in v for d in paper)}
        out.append((label, datasets, paper, sorted(rows, key=_row_order), cells))
    return out


def _cell(g):
    if not g:
        return "—"
    flops = f", FLOPs {g['flops'][0]:.2f} / {g['flops'][1]:.2f}" if g["flops"] else ""
    return f"{g['mean']:.2f} ± {g['se']:.2f} (n={len(g['accs'])}){flops}"


def _paper_numbers(row, dataset):
    """The paper's (mean, s.e.) for a row ``(method, sparsity, layout)``, or None (the paper has
    the uniform distribution only)."""
    method, sparsity, layout = row
    return None if layout else PAPER.get((method, sparsity), {}).get(dataset)


def _paper(row, dataset):
    p = _paper_numbers(row, dataset)
    return f"{p[0]:.2f} ± {p[1]:.2f}" if p else "—"


def markdown(groups):
    """The tables, one per setting, in Markdown: final test accuracy (%), mean ± s.e. (n seeds)."""
    out = []
    for label, datasets, paper, rows, cells in sections(groups):
        head = ["sparsity", "method"] + [f"{d} (ours)" if d in paper else d for d in datasets] + \
               [f"{d} (paper)" for d in paper]
        out += [f"### {label}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for row in rows:
            line = [f"{row[1] * 100:g}%", _row_name(row)]
            line += [_cell(cells.get(row + (d,))) for d in datasets] + [_paper(row, d) for d in paper]
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    return "\n".join(out)


def last_topology(path, layers):
    """``{layer: {key: value} or None}``: ``TOPOLOGY_KEYS`` of each of ``layers`` (``features.3``
    or ``features.3.weight``) in its last evolution record in the run directory ``path``; None
    when the run has no record of that layer (a dense run)."""
    last = {}
    for r in rundir.RunDir(path).read_evolution():
        last[r.get("layer")] = r
    out = {}
    for layer in layers:
        r = last.get(layer if layer.endswith(".weight") else layer + ".weight")
        out[layer] = {k: r[k] for k in TOPOLOGY_KEYS} if r and all(k in r for k in TOPOLOGY_KEYS) else None
    return out


class UnknownLayer(ValueError):
    """A layer of ``--topology`` that no run of the report evolved."""


def topology(groups, layers):
    """``[(group, {(layer, key): (mean, se)})]`` for the groups whose every run has records of
    every layer in ``layers`` (the sparse ones), at each run's last evolution step. Raises
    ``UnknownLayer`` for a layer that no run has a record of."""
    out, seen = [], set()
    for g in groups:
        per_run = [last_topology(p, layers) for p in g["paths"]]
        found = {layer: [run[layer] for run in per_run] for layer in layers}
        seen |= {layer for layer, vs in found.items() if any(v is not None for v in vs)}
        if all(v is not None for vs in found.values() for v in vs):
            out.append((g, {(layer, k): mean_se([v[k] for v in vs]) for layer, vs in found.items()
                            for k in TOPOLOGY_KEYS}))
    missing = [layer for layer in layers if layer not in seen]
    if missing:
        raise UnknownLayer(f"no run has evolution records of layer {missing[0]} (names like features.3)")
    return out


def topology_markdown(groups, layers):
    """The topology table in Markdown, one per setting: a row per sparse group, its accuracy,
    then ``channel_cv`` and ``empty_kernels`` of each layer (mean ± s.e.)."""
    rows = topology(groups, layers)
    out = []
    for label in sorted({g["setting"] for g, _ in rows}, key=_setting_order):
        datasets = sorted({g["dataset"] for g, _ in rows if g["setting"] == label}, key=_dataset_order)
        head = ["dataset"] * (len(datasets) > 1) + ["sparsity", "method", "test accuracy %"] + \
               [f"{layer} {k}" for layer in layers for k in TOPOLOGY_KEYS]
        out += [f"### Topology at the last evolution step: {label}", "", "| " + " | ".join(head) + " |",
                "|" + " --- |" * len(head)]
        for g, measures in rows:
            if g["setting"] == label:
                line = [g["dataset"]] * (len(datasets) > 1) + [f"{g['sparsity'] * 100:g}%", _row_name(_row(g)),
                                                               f"{g['mean']:.2f} ± {g['se']:.2f} (n={len(g['accs'])})"]
                line += [f"{measures[(layer, k)][0]:.3f} ± {measures[(layer, k)][1]:.3f}"
                         for layer in layers for k in TOPOLOGY_KEYS]
                out.append("| " + " | ".join(line) + " |")
        out.append("")
    return "\n".join(out)


def csv_text(groups):
    """One row per group with every setting in its own column (and the paper's numbers where
    the setting is the paper's recipe)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["setting", "dataset", "method", "sparsity"] + list(LAYOUT_KEYS) +
               ["n", "mean", "se", "seeds", "paper_mean", "paper_se"] + list(FLOPS_KEYS) + SETTING_KEYS)
    for g in groups:
        p = _paper_numbers(_row(g), g["dataset"]) if g["setting"] == PAPER_SETTING else None
        w.writerow([g["setting"], g["dataset"], g["method"], g["sparsity"]] + [g["configs"][0][k] for k in LAYOUT_KEYS]
                   + [len(g["accs"]), f"{g['mean']:.4f}", f"{g['se']:.4f}", " ".join(map(str, g["seeds"]))] +
                   (list(p) if p else ["", ""]) +
                   ([f"{f:.4f}" for f in g["flops"]] if g["flops"] else ["", ""]) +
                   ["" if g["settings"][k] is None else g["settings"][k] for k in SETTING_KEYS])
    return buf.getvalue()


def panels(groups):
    """``[(setting, [(dataset, series)])]``: per setting, one panel per dataset of final test
    accuracy against sparsity, one series per method and distribution (``SET (ERK)``),
    ``(name, sparsities, means, colour, s.e.)``."""
    from cht.study.plots import PALETTE
    out = []
    for label, datasets, _, rows, cells in sections(groups):
        lines = sorted({(m, layout) for m, _, layout in rows}, key=lambda ml: _row_order((ml[0], 0.0, ml[1])))
        mine = []
        for d in datasets:
            series = []
            for i, (method, layout) in enumerate(lines):
                gs = [cells[r + (d,)] for r in rows if (r[0], r[2]) == (method, layout) and r + (d,) in cells]
                if gs:
                    series.append((_row_name((method, 0.0, layout)), [g["sparsity"] for g in gs],
                                   [g["mean"] for g in gs], PALETTE[i % len(PALETTE)], [g["se"] for g in gs]))
            mine.append((d, series))
        out.append((label, mine))
    return out


def draw(groups, path, command):
    """``table.png``: per setting a heading, then its panels two per row (Pillow); a last line
    names ``command`` (what made the picture) and the devices the runs trained on."""
    from PIL import Image, ImageDraw

    from cht.study.plots import font, line_panel
    fnt = font(13)
    W, H, HEAD = 560, 380, 26          # a panel; a setting's heading
    parts = panels(groups)
    cols = min(2, max(len(p) for _, p in parts))
    height = sum(HEAD + H * math.ceil(len(p) / cols) for _, p in parts) + 24
    img = Image.new("RGB", (W * cols, height), "white")
    d = ImageDraw.Draw(img)
    y = 0
    for label, items in parts:
        d.text((8, y + 6), f"setting: {label}", fill="black", font=fnt)
        y += HEAD
        for i, (dataset, series) in enumerate(items):
            x0, y0 = W * (i % cols), y + H * (i // cols)
            line_panel(d, (x0, y0, x0 + W, y0 + H), series, f"{dataset}: final test accuracy, mean ± s.e.",
                       "sparsity (dense at 0)", "%", fnt, legend_width=80, xspan=(0.0,))
        y += H * math.ceil(len(items) / cols)
    d.text((8, y + 4), f"{command}; {_hardware(groups)}", fill="black", font=fnt)
    rundir.write_atomic(path, lambda f: img.save(f, format="PNG"))


def _hardware(groups):
    """Where the runs were made, from their config.json: the devices (results do not depend on
    the number of CPU worker threads, which config.json does not record)."""
    cfgs = [c for g in groups for c in g["configs"]]
    devices = {c.get("device", "cpu") for c in cfgs}
    return f"{sum(len(g['accs']) for g in groups)} runs, device {'/'.join(sorted(devices))}"


def write(folder, prefix=None, command=None, layers=()):
    """Write ``<prefix>.md``, ``.csv`` and ``.png`` (default prefix ``folder/table``) for the
    finished runs below ``folder``; ``command`` (named in the picture) defaults to
    ``python -m cht.report folder``; ``layers``: the topology table of those layers follows the
    accuracy tables in the Markdown. Returns ``(markdown, [paths], number of runs)``; no files
    when there is no finished run. Each file is written atomically (``cht.rundir.write_atomic``:
    a temporary name of its own, then a rename), so two reports writing at once never mix;
    a failed write raises ``cht.rundir.WriteError``."""
    runs = find_runs(folder)
    if not runs:
        return "", [], 0
    groups = summarise(runs)
    prefix = prefix or os.path.join(folder, "table")
    md = markdown(groups)
    if layers:
        md += "\n" + topology_markdown(groups, layers)
    rundir.write_atomic(prefix + ".md", md)
    rundir.write_atomic(prefix + ".csv", csv_text(groups))
    draw(groups, prefix + ".png", command or f"python -m cht.report {folder}")
    return md, [prefix + ".md", prefix + ".csv", prefix + ".png"], len(runs)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m cht.report",
                                description="Summarise run directories in the layout of the paper's Table 1.")
    p.add_argument("folder", help="a folder holding run directories (searched recursively)")
    p.add_argument("--out", default=None, help="prefix of the files written (default: FOLDER/table)")
    p.add_argument("--topology", nargs="+", default=(), metavar="LAYER",
                   help="add channel_cv and empty_kernels of these layers (e.g. features.3) at the last evolution step")
    args = p.parse_args(argv)
    if not os.path.isdir(args.folder):
        print(f"cht.report: error: {args.folder} is not a folder", file=sys.stderr)
        return 2
    try:
        md, paths, n = write(args.folder, args.out, layers=args.topology)
    except rundir.WriteError as e:
        print(f"cht.report: error: {e}", file=sys.stderr)
        return 1
    except (rundir.CorruptFile, UnknownLayer) as e:
        print(f"cht.report: error: {e}", file=sys.stderr)
        return 2
    if not n:
        print(f"cht.report: error: no finished run (result.json + config.json) below {args.folder}", file=sys.stderr)
        return 2
    print(md, end="")
    print(f"{n} runs; wrote {', '.join(paths)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
