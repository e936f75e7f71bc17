"""cht.report: groups by whole configuration, the paper's numbers only beside its recipe, any
sparsity, CSV columns, table.png."""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from cht import report
from cht.config import make_config


def add_run(folder, name, acc, dataset="cifar10", method="ch3", sparsity=0.5, seed=14, drop=(), flops=None,
            **settings):
    d = os.path.join(folder, name)
    os.makedirs(d)
    cfg = make_config(dataset=dataset, method=method, seed=seed, **({} if method == "dense" else
                                                                    {"sparsity": sparsity}), **settings)
    for k in drop:                       # a config.json written before that setting existed
        del cfg[k]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    res = {"test_acc": acc, "best_test_acc": acc, "epochs": cfg["epochs"], "seconds": 1.0}
    if flops:
        res.update(flops_inference=flops[0], flops_training=flops[1])
    json.dump(res, open(os.path.join(d, "result.json"), "w"))


@pytest.fixture
def runs(tmp_path):
    f = str(tmp_path)
    add_run(f, "p14", 92.0, seed=14)                                   # the paper's recipe
    add_run(f, "p15", 92.5, seed=15, drop=("zeta",))
    add_run(f, "short14", 80.0, seed=14, epochs=10, flops=(0.5, 0.6))  # same cell, another recipe
    add_run(f, "short15", 81.0, seed=15, epochs=10, flops=(0.7, 0.8))
    add_run(f, "w14", 70.0, seed=14, epochs=10, width=0.25)            # and another
    add_run(f, "dense", 93.0, method="dense", epochs=10)
    add_run(f, "s90", 60.0, sparsity=0.9, epochs=10)                   # a sparsity the paper has not
    add_run(f, "fm", 88.0, dataset="fashion-mnist", epochs=10)
    return f


def test_groups_never_pool_different_settings(runs):
    groups = report.summarise(report.find_runs(runs))
    cells = {(g["setting"], g["dataset"], g["method"], g["sparsity"]): g for g in groups}
    assert len(groups) == len(cells) == 6
    paper = cells[(report.PAPER_SETTING, "cifar10", "ch3", 0.5)]
    assert sorted(paper["accs"]) == [92.0, 92.5] and paper["seeds"] == [14, 15]   # a missing key is its default
    assert paper["mean"] == pytest.approx(92.25) and paper["se"] == pytest.approx(0.25)
    assert sorted(cells[("epochs 10", "cifar10", "ch3", 0.5)]["accs"]) == [80.0, 81.0]
    assert cells[("epochs 10, width 0.25", "cifar10", "ch3", 0.5)]["accs"] == [70.0]
    assert cells[("epochs 10", "cifar10", "dense", 0.0)]["accs"] == [93.0]


def test_the_papers_numbers_only_beside_its_recipe(runs):
    md = report.markdown(report.summarise(report.find_runs(runs)))
    tables = {part.split("\n", 1)[0]: part for part in md.split("### ")[1:]}
    assert set(tables) == {report.PAPER_SETTING, "epochs 10", "epochs 10, width 0.25"}
    paper = tables[report.PAPER_SETTING]
    assert "| 50% | CH3-L3n | 92.25 ± 0.25 (n=2) | 92.32 ± 0.06 |" in paper
    assert "| 0% | Dense | — | 92.14 ± 0.06 |" in paper and "cifar100" not in paper
    short = tables["epochs 10"]
    assert "paper" not in short and "92.32" not in short and "92.14" not in short
    assert "| 50% | CH3-L3n | 80.50 ± 0.50 (n=2), FLOPs 0.60 / 0.70 | 88.00 ± 0.00 (n=1) |" in short
    assert "| 90% | CH3-L3n | 60.00 ± 0.00 (n=1) | — |" in short                  # any sparsity
    lines = [l for l in short.splitlines() if l.startswith("| ") and "%" in l.split("|")[1]]
    assert [l.split("|")[1].strip() for l in lines] == ["0%", "50%", "90%"]


def test_csv_holds_every_setting(runs):
    rows = list(csv.DictReader(report.csv_text(report.summarise(report.find_runs(runs))).splitlines()))
    assert len(rows) == 6
    paper = [r for r in rows if r["setting"] == report.PAPER_SETTING][0]
    assert (paper["paper_mean"], paper["paper_se"], paper["n"], paper["seeds"]) == ("92.32", "0.06", "2", "14 15")
    for r in rows:
        assert r["epochs"] == ("100" if r["setting"] == report.PAPER_SETTING else "10")
        assert r["width"] == ("0.25" if "width" in r["setting"] else "1.0")
        assert r["optimizer"] == "adam" and r["lr"] == "0.01" and r["scheduler"] == "linear-linear"
        assert r["paper_mean"] == "" or r["setting"] == report.PAPER_SETTING
        short = (r["setting"], r["dataset"], r["method"], r["sparsity"]) == ("epochs 10", "cifar10", "ch3", "0.5")
        assert (r["flops_inference"], r["flops_training"]) == (("0.6000", "0.7000") if short else ("", ""))


def test_table_png_one_panel_per_dataset_with_error_bars(runs, tmp_path):
    groups = report.summarise(report.find_runs(runs))
    parts = report.panels(groups)
    assert [(label, [d for d, _ in items]) for label, items in parts] == [
        (report.PAPER_SETTING, ["cifar10"]), ("epochs 10", ["cifar10", "fashion-mnist"]),
        ("epochs 10, width 0.25", ["cifar10"])]
    series = dict((s[0], s[1:]) for s in parts[1][1][0][1])
    assert series["CH3-L3n"][0] == [0.5, 0.9] and series["CH3-L3n"][1] == pytest.approx([80.5, 60.0])
    assert series["CH3-L3n"][3] == pytest.approx([0.5, 0.0]) and series["Dense"][0] == [0.0]
    md, paths, n = report.write(runs, str(tmp_path / "t"))
    assert n == 8 and [os.path.basename(p) for p in paths] == ["t.md", "t.csv", "t.png"]
    img = np.asarray(Image.open(paths[2]).convert("RGB"))
    assert img.shape[1] == 2 * 560 and img.shape[0] > 3 * 380


def test_report_command(runs, tmp_path, capsys):
    assert report.main([runs]) == 0
    out = capsys.readouterr().out
    assert out == open(os.path.join(runs, "table.md")).read()
    assert all(os.path.exists(os.path.join(runs, f"table.{e}")) for e in ("md", "csv", "png"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty)]) == 2 and capsys.readouterr().err.count("\n") == 1
    assert report.main([str(tmp_path / "missing")]) == 2 and os.listdir(empty) == []


def test_error_bars_span_mean_plus_minus_se():
    """One panel, axes fixed by a second series: the bars add pixels of their series' colour,
    vertically around the point, ±se tall."""
    from PIL import ImageDraw
    from cht.study.plots import font, line_panel
    red, grey = (214, 39, 40), (127, 127, 127)

    def pixels(se):
        img = Image.new("RGB", (400, 300), "white")
        line_panel(ImageDraw.Draw(img), (0, 0, 400, 300), [("a", [0.5], [90.0], red, [se]),
                                                           ("b", [0.0, 1.0], [80.0, 100.0], grey)],
                   "t", "x", "%", font(11))
        ys, xs = np.nonzero((np.asarray(img) == red).all(axis=2))
        return ys[xs < 300]                                    # the plotting area (legend at the right)
    dot, bar = pixels(0.0), pixels(5.0)
    assert len(bar) > len(dot) + 20
    span = lambda ys: ys.max() - ys.min()
    # 20 % over ~230 px of axis: 10 % (±5) is ~115 px; the dot alone is 7 px
    assert span(dot) < 10 and 90 < span(bar) < 140


def test_distributions_are_rows_of_their_own(tmp_path):
    f = str(tmp_path)
    add_run(f, "u14", 90.0, sparsity=0.9, epochs=10, flops=(0.1, 0.11))
    add_run(f, "u15", 91.0, sparsity=0.9, epochs=10, seed=15, drop=("distribution", "dense_first_layer"),
            flops=(0.1, 0.13))                                               # older config.json: uniform
    add_run(f, "e14", 92.0, sparsity=0.9, epochs=10, distribution="erk", flops=(0.2, 0.3))
    add_run(f, "ed14", 93.0, sparsity=0.9, epochs=10, distribution="erk", dense_first_layer=True,
            flops=(0.25, None))                                              # training FLOPs unknown
    add_run(f, "p14", 94.0, sparsity=0.5, distribution="erk")                # the paper's recipe, but ERK
    groups = report.summarise(report.find_runs(f))
    assert [(g["setting"], g["sparsity"], g["layout"], g["seeds"]) for g in groups] == [
        (report.PAPER_SETTING, 0.5, "ERK", [14]), ("epochs 10", 0.9, "", [14, 15]), ("epochs 10", 0.9, "ERK", [14]),
        ("epochs 10", 0.9, "ERK, dense first layer", [14])]
    md = report.markdown(groups)
    assert "| 90% | CH3-L3n | 90.50 ± 0.50 (n=2), FLOPs 0.10 / 0.12 |" in md
    assert "| 90% | CH3-L3n (ERK) | 92.00 ± 0.00 (n=1), FLOPs 0.20 / 0.30 |" in md
    assert "| 90% | CH3-L3n (ERK, dense first layer) | 93.00 ± 0.00 (n=1) |" in md
    # the paper's numbers stand beside its own (uniform) rows only
    assert "| 50% | CH3-L3n (ERK) | 94.00 ± 0.00 (n=1) | — |" in md and "| 50% | CH3-L3n | — | 92.32 ± 0.06 |" in md
    rows = {(r["setting"], r["distribution"], r["dense_first_layer"]): r
            for r in csv.DictReader(report.csv_text(groups).splitlines())}
    assert rows[(report.PAPER_SETTING, "erk", "False")]["paper_mean"] == ""
    assert rows[("epochs 10", "erk", "True")]["flops_training"] == ""
    names = [s[0] for _, items in report.panels(groups) for _, series in items for s in series]
    assert names == ["CH3-L3n (ERK)", "CH3-L3n", "CH3-L3n (ERK)", "CH3-L3n (ERK, dense first layer)"]


def test_files_are_written_through_temporary_files_of_their_own(runs, tmp_path, monkeypatch):
    from cht import rundir
    names = []
    real = rundir.temporary_name
    monkeypatch.setattr(rundir, "temporary_name", lambda path: names.append(real(path)) or names[-1])
    report.write(runs, str(tmp_path / "t"))
    assert [os.path.basename(n).rsplit(".", 2)[0] for n in names] == ["t.md", "t.csv", "t.png"]
    assert len(set(names)) == 3 and not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_a_failed_write_is_one_line_and_status_1(runs, tmp_path, capsys):
    prefix = str(tmp_path / "no-such-folder" / "t")
    assert report.main([runs, "--out", prefix]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cht.report: error: cannot write ") and "Traceback" not in err


def write_evolution(folder, name, records):
    with open(os.path.join(folder, name, "evolution.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_topology_table_reads_the_last_evolution_step(tmp_path, capsys):
    f = str(tmp_path)
    add_run(f, "dense", 93.0, method="dense", epochs=10)
    write_evolution(f, "dense", [])
    for seed, (cv, empty) in zip((14, 15), ((0.2, 0.1), (0.4, 0.3))):
        name = f"ch3-{seed}"
        add_run(f, name, 90.0 + seed - 14, method="ch3", sparsity=0.7, seed=seed, epochs=10)
        write_evolution(f, name, [
            dict(epoch=1, layer="features.3.weight", channel_cv=9.0, empty_kernels=9.0),   # an earlier step
            dict(epoch=1, layer="features.40.weight", channel_cv=9.0, empty_kernels=9.0),
            dict(epoch=2, layer="features.3.weight", channel_cv=cv, empty_kernels=empty),
            dict(epoch=2, layer="features.40.weight", channel_cv=cv / 2, empty_kernels=empty / 2)])
    groups = report.summarise(report.find_runs(f))
    rows = report.topology(groups, ["features.3", "features.40.weight"])
    assert [g["method"] for g, _ in rows] == ["ch3"]                     # the dense run has no record
    m = rows[0][1]
    assert m[("features.3", "channel_cv")] == pytest.approx((0.3, 0.1))
    assert m[("features.3", "empty_kernels")] == pytest.approx((0.2, 0.1))
    assert m[("features.40.weight", "channel_cv")] == pytest.approx((0.15, 0.05))
    assert report.main([f, "--topology", "features.3", "features.40"]) == 0
    out = capsys.readouterr().out
    assert "| 70% | CH3-L3n | 90.50 ± 0.50 (n=2) | 0.300 ± 0.100 | 0.200 ± 0.100 | 0.150 ± 0.050 | 0.100 ± 0.050 |" in out
    assert "Topology at the last evolution step" in open(os.path.join(f, "table.md")).read()
    assert report.main([f, "--topology", "features.2"]) == 2            # a layer no run evolved
    assert capsys.readouterr().err.count("\n") == 1
