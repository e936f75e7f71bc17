"""run.py end to end on tiny generated MNIST-format data: files, resume, bad input, report."""
import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import run
from cht import trainer as trainer_mod
from cht.trainer import EVOLUTION_KEYS, METRICS_COLUMNS
from runtools import TINY, assert_same_run, read_evolution, read_metrics, run_cli, tiny_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("method", ["dense", "static", "set", "ch2", "ch3", "rigl"])
def test_every_method_writes_the_run_directory(method, data_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    sparsity = [] if method == "dense" else ["--sparsity", "0.5"]
    code, err = run_cli(TINY + ["--method", method, *sparsity, "--epochs", "3", "--data-dir", data_dir,
                                "--out", out], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "config.json", "evolution.jsonl", "metrics.csv",
                                       "result.json"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    for key in ("dataset", "method", "sparsity", "epochs", "batch_size", "optimizer", "lr", "momentum",
                "weight_decay", "scheduler", "warmup_epochs", "update_interval", "zeta", "evolve_until", "width",
                "seed", "limit_train", "limit_test", "data_dir", "download", "device"):
        assert key in cfg
    assert cfg["method"] == method and cfg["sparsity"] == (0.0 if method == "dense" else 0.5)
    with open(os.path.join(out, "metrics.csv")) as f:
        assert f.readline().strip() == ",".join(METRICS_COLUMNS)
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(0 <= float(r["test_acc"]) <= 100 and np.isfinite(float(r["train_loss"])) for r in rows)
    evo = read_evolution(out)
    if method in ("set", "ch2", "ch3", "rigl"):
        # 3 epochs, E_end = 2.25: evolution after epochs 1 and 2, one record per conv layer (13)
        assert [r["epoch"] for r in evo] == [1] * 13 + [2] * 13
        assert all(tuple(r) == EVOLUTION_KEYS for r in evo)
        assert all(r["removed"] == r["regrown"] and r["density"] == pytest.approx(0.5, abs=0.06) for r in evo)
        assert any(r["removed"] > 0 for r in evo)
    else:
        assert evo == []
    res = json.load(open(os.path.join(out, "result.json")))
    assert set(res) >= {"test_acc", "best_test_acc", "epochs", "seconds"}
    assert res["epochs"] == 3 and res["test_acc"] == float(rows[-1]["test_acc"])
    assert res["best_test_acc"] == max(float(r["test_acc"]) for r in rows)
    with np.load(os.path.join(out, "checkpoint.npz")) as z:
        keys = set(z.files)
    assert "features.0.weight" in keys and "classifier.7.bias" in keys and "features.1.running_var" in keys
    masks = {k for k in keys if k.startswith("mask.")}
    assert len(masks) == (0 if method == "dense" else 13)
    if masks:
        with np.load(os.path.join(out, "checkpoint.npz")) as z:
            for k in masks:
                w, m = z[k[len("mask."):]], z[k]
                assert m.dtype == bool and not np.any(w[~m])  # W * ~M == 0


def _interrupt_in_epoch(n):
    """A Trainer.evaluate that raises KeyboardInterrupt on its n-th call (mid-run, after training)."""
    real, calls = trainer_mod.Trainer.evaluate, {"n": 0}

    def evaluate(self):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self)
    return evaluate


@pytest.mark.parametrize("method", ["ch3", "rigl"])
def test_resume_equals_uninterrupted_run(method, data_dir, tmp_path, capsys, monkeypatch):
    args = TINY + ["--method", method, "--sparsity", "0.7", "--epochs", "4", "--data-dir", data_dir]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_cli(args + ["--out", a], capsys)[0] == 0

    monkeypatch.setattr(trainer_mod.Trainer, "evaluate", _interrupt_in_epoch(3))  # dies inside epoch 3
    code, err = run_cli(args + ["--out", b], capsys)
    assert code == 130 and "--resume" in err
    assert [int(r["epoch"]) for r in read_metrics(b)] == [1, 2]
    monkeypatch.undo()

    code, err = run_cli(["--resume", b], capsys)
    assert code == 0, err
    assert_same_run(a, b)
    with np.load(os.path.join(b, "checkpoint.npz")) as z:     # config.json's densities are no setting
        assert "densities" not in json.loads(str(z["meta"]))["config"]
    assert "densities" in json.load(open(os.path.join(b, "config.json")))


def test_resume_of_a_finished_run_and_a_wrong_config(data_dir, tmp_path, capsys):
    out = str(tmp_path / "r")
    args = TINY + ["--method", "set", "--epochs", "1", "--data-dir", data_dir, "--out", out]
    assert run_cli(args, capsys)[0] == 0
    assert run_cli(["--resume", out], capsys)[0] == 0            # already complete: reports it
    before = sorted(os.listdir(out)), open(os.path.join(out, "metrics.csv")).read()
    code, err = run_cli(["--resume", out, "--method", "ch3"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--method" in err
    assert (sorted(os.listdir(out)), open(os.path.join(out, "metrics.csv")).read()) == before
    code, err = run_cli(args, capsys)                           # same --out again
    assert code == 2 and "already holds a run" in err


@pytest.mark.parametrize("extra, words", [
    (["--dataset", "imagenet"], "--dataset"),
    (["--method", "magic"], "--method"),
    (["--sparsity", "1.0"], "--sparsity"),
    (["--sparsity", "-0.1"], "--sparsity"),
    (["--sparsity", "nan"], "--sparsity"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--batch-size", "ten"], "--batch-size"),
    (["--seed", "1", "--seeds", "2", "3"], "--seeds"),
    # a batch of one leaves BatchNorm one value per channel in training
    (["--batch-size", "1"], "--batch-size"),
    (["--limit-train", "1"], "--limit-train"),
    # flags that do not apply to the method
    (["--method", "dense", "--sparsity", "0.5"], "--sparsity 0.5 does not apply to --method dense"),
    (["--method", "dense", "--zeta", "0.3"], "--zeta"),
    (["--method", "dense", "--update-interval", "2"], "--update-interval"),
    (["--method", "dense", "--evolve-until", "0.5"], "--evolve-until"),
    (["--method", "dense", "--early-stop", "0.9"], "--early-stop"),
    (["--method", "static", "--early-stop", "0.9"], "--early-stop 0.9 does not apply to --method static"),
    (["--method", "static", "--zeta", "0.2"], "--zeta 0.2 does not apply to --method static"),
    (["--method", "static", "--update-interval", "1"], "--update-interval"),
    (["--method", "static", "--evolve-until", "1.0"], "--evolve-until"),
    (["--seeds", "14", "15", "14"], "--seeds: 14 is given twice"),
    (["--method", "dense", "--distribution", "erk"], "--distribution erk does not apply to --method dense"),
    (["--method", "dense", "--dense-first-layer"], "--dense-first-layer does not apply to --method dense ("),
    (["--distribution", "erdos"], "--distribution"),
    # the dataset's recipe uses Adam, which has no momentum
    (["--momentum", "0.5"], "--momentum 0.5 does not apply to --optimizer adam (only sgd uses it)"),
    (["--optimizer", "adam", "--momentum", "0.9"], "--momentum 0.9 does not apply to --optimizer adam"),
])
def test_bad_values_exit_2_with_one_line(extra, words, data_dir, tmp_path, capsys):
    out = tmp_path / "never"
    code, err = run_cli(TINY + ["--data-dir", data_dir, "--out", str(out)] + extra, capsys)
    assert code == 2 and err.count("\n") == 1 and words in err and "Traceback" not in err
    assert not out.exists()


def test_flags_that_apply_run(data_dir, tmp_path, capsys):
    """Dense at --sparsity 0 (what dense is), static with a sparsity, the smallest batches."""
    for i, extra in enumerate([["--method", "dense", "--sparsity", "0"],
                               ["--method", "static", "--sparsity", "0.7"],
                               ["--method", "set", "--batch-size", "2", "--limit-train", "3"],  # lone 3rd dropped
                               ["--method", "rigl", "--limit-train", "2"],
                               ["--method", "static", "--sparsity", "0"],          # every layer dense
                               ["--method", "set", "--distribution", "erk", "--dense-first-layer"],
                               ["--optimizer", "sgd", "--momentum", "0.5"]]):
        out = str(tmp_path / f"r{i}")
        code, err = run_cli(TINY + ["--epochs", "1", "--data-dir", data_dir, "--out", out] + extra, capsys)
        assert code == 0, (extra, err)


def test_a_training_set_of_one_example_is_refused(tmp_path, capsys):
    one = tiny_data(tmp_path / "one", n_train=1, n_test=4)
    out = tmp_path / "never"
    code, err = run_cli(TINY + ["--data-dir", one, "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "1 training example" in err and "Traceback" not in err
    assert not out.exists()


def test_resume_refuses_flags_that_do_not_apply_and_out(data_dir, tmp_path, capsys):
    out = str(tmp_path / "d")
    assert run_cli(TINY + ["--method", "dense", "--epochs", "1", "--data-dir", data_dir, "--out", out], capsys)[0] == 0
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    for extra, words in [(["--sparsity", "0.5"], "--sparsity"), (["--zeta", "0.3"], "--zeta"),
                         (["--out", out], "--out")]:
        code, err = run_cli(["--resume", out] + extra, capsys)
        assert code == 2 and err.count("\n") == 1 and words in err, (extra, err)
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def test_a_failed_download_leaves_nothing(data_dir, tmp_path, capsys, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root, out = tmp_path / "datasets", tmp_path / "never"
    code, err = run_cli(TINY + ["--dataset", "cifar10", "--download", "--data-dir", str(root), "--out", str(out)],
                        capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot download" in err
    assert not root.exists() and not out.exists()


def test_missing_dataset_unwritable_out_and_gpu(tmp_path, data_dir, capsys):
    out = tmp_path / "never"
    code, err = run_cli(TINY + ["--data-dir", str(tmp_path / "empty"), "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "not found" in err
    assert not out.exists() and not (tmp_path / "empty").exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run_cli(TINY + ["--data-dir", data_dir, "--out", str(blocker / "run")], capsys)
    assert code == 2 and err.count("\n") == 1 and "--out" in err
    from minicnn import backend
    if not backend.gpu_available():
        code, err = run_cli(TINY + ["--data-dir", data_dir, "--out", str(out), "--device", "gpu"], capsys)
        assert code == 2 and err.count("\n") == 1 and "gpu" in err.lower()
        assert not out.exists()


def test_cli_help_and_exit_status_in_a_subprocess(data_dir, tmp_path):
    p = subprocess.run([sys.executable, "run.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0
    for flag in ("--dataset", "--method", "--sparsity", "--epochs", "--batch-size", "--optimizer", "--lr",
                 "--momentum", "--weight-decay", "--scheduler", "--warmup-epochs", "--update-interval", "--zeta",
                 "--evolve-until", "--width", "--seed", "--seeds", "--limit-train", "--limit-test", "--data-dir",
                 "--download", "--device", "--out", "--resume"):
        assert flag in p.stdout
    p = subprocess.run([sys.executable, "run.py", "--sparsity", "2"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1


def test_seeds_report_mean_and_standard_error(data_dir, tmp_path, capsys):
    out = str(tmp_path / "runs")
    code = run.entry(TINY + ["--method", "static", "--epochs", "1", "--limit-train", "64", "--seeds", "14", "15",
                             "--data-dir", data_dir, "--out", out])
    printed = capsys.readouterr().out
    assert code == 0 and sorted(os.listdir(out)) == ["seed-14", "seed-15"]
    accs = [json.load(open(os.path.join(out, s, "result.json")))["test_acc"] for s in ("seed-14", "seed-15")]
    m, se = np.mean(accs), np.std(accs, ddof=1) / np.sqrt(2)
    assert f"{m:.2f} ± {se:.2f}" in printed

    from cht import report
    assert report.main([out]) == 0
    md = open(os.path.join(out, "table.md")).read()
    assert f"{m:.2f} ± {se:.2f} (n=2)" in md and "92.32" not in md   # the paper's only beside its recipe
    rows = list(csv.DictReader(open(os.path.join(out, "table.csv"))))
    mine = [r for r in rows if r["dataset"] == "mnist"]
    assert len(mine) == 1 and mine[0]["method"] == "static" and mine[0]["n"] == "2"


def test_a_lone_last_example_is_dropped_from_training(data_dir, tmp_path, capsys):
    """33 = 32 + 1: a batch of one has no batch variance; the run drops it and stays finite."""
    out = str(tmp_path / "r")
    code, err = run_cli(TINY + ["--method", "dense", "--epochs", "1", "--limit-train", "33", "--data-dir", data_dir,
                                "--out", out], capsys)
    assert code == 0, err
    with np.load(os.path.join(out, "checkpoint.npz")) as z:
        assert all(np.isfinite(z[k]).all() for k in z.files if k.endswith("running_var"))


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "r")
    real, calls = trainer_mod.CrossEntropyLoss.forward, {"n": 0}

    def forward(self, logits, labels):  # 96 examples / batch 32 = 3 batches per epoch; epoch 2 diverges
        calls["n"] += 1
        return float("nan") if calls["n"] == 5 else real(self, logits, labels)

    monkeypatch.setattr(trainer_mod.CrossEntropyLoss, "forward", forward)
    code, err = run_cli(TINY + ["--method", "ch3", "--epochs", "3", "--data-dir", data_dir, "--out", out], capsys)
    assert code == 1 and "non-finite loss" in err and "epoch 2" in err
    assert err.strip().splitlines()[-1].startswith("run.py: stopped:")
    with np.load(os.path.join(out, "checkpoint.npz")) as z:
        assert json.loads(str(z["meta"]))["epoch"] == 1 and all(np.isfinite(z[k]).all() for k in z.files if k != "meta")
    assert [int(r["epoch"]) for r in read_metrics(out)] == [1]
    assert not os.path.exists(os.path.join(out, "result.json"))
    monkeypatch.undo()
    assert run_cli(["--resume", out], capsys)[0] == 0            # and the run can go on from there


def test_default_run_folder_names_the_distribution():
    cfg = run.make_config(dataset="cifar10", method="ch3", sparsity=0.9, distribution="erk", dense_first_layer=True)
    assert run.default_out(cfg) == os.path.join("runs", "cifar10-ch3-s0.9-erk-dense-first-w1")
    assert run.default_out(run.make_config(dataset="cifar10", method="ch3", sparsity=0.9)) == \
        os.path.join("runs", "cifar10-ch3-s0.9-w1")


def make_older(out, drop):
    """Make the run directory ``out`` look written by a version without the settings ``drop``:
    gone from config.json and from the checkpoint's config, and the evolution records without
    the keys added with them (``evolved``, ``reason``, ``score_macs``)."""
    cfg = json.load(open(os.path.join(out, "config.json")))
    json.dump({k: v for k, v in cfg.items() if k not in drop + ("densities",)},
              open(os.path.join(out, "config.json"), "w"), indent=2)
    path = os.path.join(out, "checkpoint.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["config"] = {k: v for k, v in meta["config"].items() if k not in drop}
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    recs = read_evolution(out)
    with open(os.path.join(out, "evolution.jsonl"), "w") as f:
        f.writelines(json.dumps({k: v for k, v in r.items() if k not in ("evolved", "reason", "score_macs")}) + "\n"
                     for r in recs)


@pytest.mark.parametrize("method", ["set", "ch3"])
def test_a_run_directory_of_an_older_version_resumes_and_reports(method, data_dir, tmp_path, capsys, monkeypatch):
    """config.json and checkpoint without the later settings (the defaults then), evolution
    records without the later keys: --resume finishes it as the run it was; the FLOPs of training
    are unknown (null) where the scoring of the old records was never counted."""
    from cht import report, sweep
    args = TINY + ["--method", method, "--sparsity", "0.7", "--epochs", "4", "--data-dir", data_dir]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_cli(args + ["--out", a], capsys)[0] == 0
    monkeypatch.setattr(trainer_mod.Trainer, "evaluate", _interrupt_in_epoch(3))
    assert run_cli(args + ["--out", b], capsys)[0] == 130
    monkeypatch.undo()
    make_older(b, ("early_stop", "distribution", "dense_first_layer"))
    older = open(os.path.join(b, "config.json")).read()
    # the sweep takes it for the run it asks for (the same settings)
    run_mod = sweep.load_run_module()
    grid = sweep.build_parser(run_mod).parse_args(
        [str(tmp_path), "--datasets", "mnist", "--methods", method, "--sparsities", "0.7", "--epochs", "4",
         "--width", "0.125", "--batch-size", "32", "--warmup-epochs", "1", "--data-dir", data_dir])
    [r] = sweep.plan(grid, run_mod)
    sweep.check_existing(dataclasses.replace(r, dir=b))              # raises for other settings
    code, err = run_cli(["--resume", b], capsys)
    assert code == 0, err
    assert open(os.path.join(b, "config.json")).read() == older       # left as it was
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(read_metrics(a)) == strip(read_metrics(b))
    later = ("seconds", "evolved", "reason", "score_macs")
    assert [{k: v for k, v in r.items() if k not in later} for r in read_evolution(a)] == \
        [{k: v for k, v in r.items() if k not in later} for r in read_evolution(b)]
    ra, rb = (json.load(open(os.path.join(d, "result.json"))) for d in (a, b))
    assert rb["flops_inference"] == ra["flops_inference"] and rb["densities"] == ra["densities"]
    assert rb["flops_training"] == (None if method == "ch3" else ra["flops_training"])
    assert ra["flops_training"] is not None
    [(cfg, res, path)] = report.find_runs(b)
    assert cfg["distribution"] == "uniform" and cfg["dense_first_layer"] is False and cfg["early_stop"] is None
    [g] = report.summarise(report.find_runs(b))
    assert g["flops"] == (None if method == "ch3" else [ra["flops_inference"], ra["flops_training"]])
