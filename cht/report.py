"""Turn a folder of runs into the paper's Table 1: ours beside the paper's, Markdown and CSV.

    python -m cht.report runs/            # prints the table, writes runs/table.md and runs/table.csv

Every run directory below the folder that holds a ``result.json`` and a ``config.json`` counts;
runs of the same dataset, method and sparsity (different seeds) are pooled into
``mean ± standard error`` of the final test accuracy, with the seeds and epochs listed.
"""
import argparse
import csv
import io
import json
import math
import os
import sys

# CHT_SPEC.md section 6 (the paper's Table 1): top-1 %, (mean, standard error)
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


def find_runs(folder):
    """``[(config, result, path)]`` of every finished run below ``folder``."""
    runs = []
    for path, _, files in sorted(os.walk(folder)):
        if "result.json" in files and "config.json" in files:
            with open(os.path.join(path, "config.json")) as f:
                cfg = json.load(f)
            with open(os.path.join(path, "result.json")) as f:
                res = json.load(f)
            runs.append((cfg, res, path))
    return runs


def mean_se(values):
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for a single value)."""
    n = len(values)
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0)


def summarise(runs):
    """``{(method, sparsity): {dataset: dict(mean, se, seeds, epochs, width)}}``."""
    groups = {}
    for cfg, res, _ in runs:
        key = (cfg["method"], round(float(cfg["sparsity"]), 4))
        groups.setdefault(key, {}).setdefault(cfg["dataset"], []).append((cfg, res))
    table = {}
    for key, by_data in groups.items():
        for dataset, items in by_data.items():
            m, se = mean_se([r["test_acc"] for _, r in items])
            table.setdefault(key, {})[dataset] = dict(
                mean=m, se=se, seeds=sorted(c["seed"] for c, _ in items),
                epochs=sorted({r["epochs"] for _, r in items}), width=sorted({c["width"] for c, _ in items}))
    return table


def rows(table):
    """Table rows in the paper's order: sparsity ascending, then method."""
    keys = set(table) | set(PAPER)
    return sorted(keys, key=lambda k: (k[1], METHOD_ORDER.index(k[0]) if k[0] in METHOD_ORDER else 99))


def datasets_of(table):
    found = {d for cells in table.values() for d in cells}
    return [d for d in ("cifar10", "cifar100", "fashion-mnist", "mnist") if d in found or d in ("cifar10", "cifar100")]


def _cell(c):
    return f"{c['mean']:.2f} ± {c['se']:.2f} (n={len(c['seeds'])})" if c else "—"


def _paper(key, dataset):
    p = PAPER.get(key, {}).get(dataset)
    return f"{p[0]:.2f} ± {p[1]:.2f}" if p else "—"


def markdown(table):
    ds = datasets_of(table)
    head = ["sparsity", "method"] + [f"{d} (ours)" for d in ds] + [f"{d} (paper)" for d in ds if d.startswith("cifar")]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key in rows(table):
        cells = table.get(key, {})
        line = [f"{key[1] * 100:g}%", METHOD_NAMES.get(key[0], key[0])]
        line += [_cell(cells.get(d)) for d in ds]
        line += [_paper(key, d) for d in ds if d.startswith("cifar")]
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out) + "\n"


def csv_text(table):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["sparsity", "method", "dataset", "mean", "se", "n", "seeds", "epochs", "width",
                "paper_mean", "paper_se"])
    for key in rows(table):
        for d in datasets_of(table):
            c, p = table.get(key, {}).get(d), PAPER.get(key, {}).get(d)
            if c is None and p is None:
                continue
            w.writerow([key[1], key[0], d] +
                       ([f"{c['mean']:.4f}", f"{c['se']:.4f}", len(c["seeds"]), " ".join(map(str, c["seeds"])),
                         " ".join(map(str, c["epochs"])), " ".join(f"{x:g}" for x in c["width"])]
                        if c else ["", "", 0, "", "", ""]) +
                       ([p[0], p[1]] if p else ["", ""]))
    return buf.getvalue()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m cht.report",
                                description="Summarise run directories in the layout of the paper's Table 1.")
    p.add_argument("folder", help="a folder holding run directories (searched recursively)")
    p.add_argument("--out", default=None, help="prefix of the files written (default: FOLDER/table)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.folder):
        print(f"cht.report: error: {args.folder} is not a folder", file=sys.stderr)
        return 2
    runs = find_runs(args.folder)
    if not runs:
        print(f"cht.report: error: no finished run (result.json + config.json) below {args.folder}", file=sys.stderr)
        return 2
    table = summarise(runs)
    md, text = markdown(table), csv_text(table)
    prefix = args.out or os.path.join(args.folder, "table")
    with open(prefix + ".md", "w") as f:
        f.write(md)
    with open(prefix + ".csv", "w") as f:
        f.write(text)
    print(md, end="")
    print(f"{len(runs)} runs; wrote {prefix}.md and {prefix}.csv", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
