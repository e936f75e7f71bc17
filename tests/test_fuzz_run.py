"""Random run.py command lines: each one runs, or exits 2 with one line and writes nothing.

300 command lines (seeded) are built from good, bad and boundary values of every flag, a flag
present with probability 1/4 and a good value with probability 3/4, on top of a base command
line for tiny generated data (MNIST format, 24 training examples, VGG16 at 1/16 width) that the
random flags override. Each runs in this process, from a scratch folder as the working
directory (the default ``--out`` lands there). Outcomes:

- "runs": exit status 0. A command line of one or two epochs trains to the end; one of more
  epochs (up to 10**9) is proved to run by its first finished epoch: the test stops it right
  after the first checkpoint.
- "diverged": a huge learning rate or weight decay is a valid setting; its run stops on a
  non-finite loss with one line and exit status 1.
- "refused": exit status 2, exactly one line on stderr, and no file or folder under the scratch
  folder (data, run directories, the working directory) created, changed or removed.

Widths above 1/16 are left out (width 8, the largest allowed, would not fit in memory here),
and ``--download`` is combined only with a folder that holds the data, so nothing is fetched.
Runs in about half a minute on 2 cores.
"""
import os
import random
import shutil
import urllib.error
import urllib.request

import pytest

import run
from cht import trainer as trainer_mod
from cht.config import METHODS
from runtools import tiny_data, tree

N_CASES, SEED = 300, 20240


class Reached(BaseException):
    """Raised after a run's first checkpoint: it runs (not an Exception: run.py lets it through)."""


def flag_values(ws):
    """``{flag: (good values, bad values)}``; a value is a list of arguments (``[]``: a bare flag)."""
    one = lambda *vs: [[v] for v in vs]
    return {
        "--dataset": (one("mnist"), one("imagenet", "", "MNIST", "cifar10")),  # no cifar10 files here
        "--method": (one(*METHODS), one("magic", "")),
        "--sparsity": (one("0", "0.5", "0.99", "1e-9"), one("1", "-0.1", "nan", "inf", "x", "")),
        "--epochs": (one("1", "2", "3", "1000000000"), one("0", "-1", "1.5", "x", "")),
        "--batch-size": (one("2", "3", "8", "1000000000"), one("1", "0", "-2", "2.5", "x")),
        "--optimizer": (one("sgd", "adam"), one("rmsprop", "")),
        "--lr": (one("1e-12", "0.01", "0.5", "1e30"), one("0", "-1", "nan", "inf", "x")),
        "--momentum": (one("0", "0.9", "0.999999"), one("1", "-0.1", "nan", "x")),
        "--weight-decay": (one("0", "5e-4", "1e3"), one("-1", "nan", "inf", "x")),
        "--scheduler": (one("linear-linear", "linear-cos", "constant"), one("step", "")),
        "--warmup-epochs": (one("0", "1", "1000000000"), one("-1", "x", "1.5")),
        "--update-interval": (one("1", "2", "1000000000"), one("0", "-1", "x")),
        "--zeta": (one("1e-9", "0.3", "1"), one("0", "1.01", "-0.3", "nan", "x")),
        "--evolve-until": (one("1e-9", "0.75", "1"), one("0", "1.5", "nan", "x")),
        "--early-stop": (one("1e-9", "0.9", "1"), one("0", "1.01", "-1", "nan", "x")),
        "--distribution": (one("uniform", "erk"), one("erdos-renyi", "ERK", "")),
        "--dense-first-layer": ([[]], []),
        "--width": (one("0.0625", "1e-9"), one("0", "-1", "8.0001", "nan", "inf", "x")),
        "--seed": (one("0", "14", "4294967295"), one("-1", "4294967296", "x", "1.5")),
        "--seeds": ([["0"], ["3", "4"]], [["14", "14"], ["-1"], [], ["x"]]),
        "--limit-train": (one("2", "3", "1000000000000"), one("1", "0", "-1", "x")),
        "--limit-test": (one("1", "8", "1000000000000"), one("0", "-1", "x")),
        "--data-dir": (one(ws["data"]), one(ws["missing"], ws["file"], "")),
        "--download": ([[]], []),
        "--device": (one("cpu"), one("tpu", "gpu")),  # gpu: refused without CuPy, runs with it
        "--out": (one("NEW", os.path.join("NEW", "a", "b")),
                  one(ws["finished"], ws["file"], os.path.join(ws["file"], "run"), "")),
        "--resume": (one("FINISHED"), one(ws["missing"], ws["file"], ws["empty"], ws["corrupt"])),
    }


def command_line(rng, values, base):
    """``(argv, fresh)``: a random command line; ``fresh``: whether it resumes a fresh copy."""
    argv, fresh = list(base), False
    for flag, (good, bad) in values.items():
        p = 0.08 if flag == "--resume" else 0.25
        if rng.random() >= p:
            continue
        pool = good if (rng.random() < 0.75 or not bad) else bad
        value = list(rng.choice(pool))
        if flag == "--download" and "--data-dir" in argv[len(base):]:
            continue  # only with the folder that holds the data: nothing to fetch
        if value == ["NEW"] or value[:1] == [os.path.join("NEW", "a", "b")]:
            value = [value[0].replace("NEW", f"new-{rng.randrange(10**9)}")]
        if value == ["FINISHED"]:
            fresh = True
        argv += [flag] + value
    return argv, fresh


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    ws = {"root": str(tmp_path)}
    ws["data"] = tiny_data(tmp_path / "data", n_train=24, n_test=8)
    ws["missing"] = str(tmp_path / "missing")
    ws["file"] = str(tmp_path / "a-file")
    open(ws["file"], "w").write("not a folder\n")
    ws["empty"] = str(tmp_path / "empty")
    os.mkdir(ws["empty"])
    ws["base"] = ["--dataset", "mnist", "--data-dir", ws["data"], "--width", "0.0625", "--epochs", "1",
                  "--batch-size", "8", "--warmup-epochs", "1", "--limit-test", "8",
                  "--optimizer", "sgd"]   # --momentum applies (a random --optimizer adam refuses it)
    ws["finished"] = str(tmp_path / "finished")
    assert run.entry(ws["base"] + ["--method", "set", "--out", ws["finished"]]) == 0
    ws["corrupt"] = str(tmp_path / "corrupt")
    shutil.copytree(ws["finished"], ws["corrupt"])
    with open(os.path.join(ws["corrupt"], "checkpoint.npz"), "r+b") as f:
        f.truncate(1000)
    monkeypatch.chdir(tmp_path / "empty")  # the working directory: the default --out goes here

    def offline(*a, **k):
        raise urllib.error.URLError("no network in this test")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return ws


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_random_command_lines_run_or_exit_2_with_one_line(workspace, capsys, monkeypatch):
    ws = workspace
    real_save = trainer_mod.Trainer.save_epoch

    def save_epoch(self, row, evolution):
        real_save(self, row, evolution)
        if self.cfg["epochs"] > 2:
            raise Reached

    monkeypatch.setattr(trainer_mod.Trainer, "save_epoch", save_epoch)
    rng = random.Random(SEED)
    values = flag_values(ws)
    flags = {a.option_strings[-1] for a in run.build_parser()._actions if a.dest != "help"}
    assert set(values) == flags  # every flag of run.py has its good and bad values here
    capsys.readouterr()
    outcomes = {"runs": 0, "diverged": 0, "refused": 0}
    for case in range(N_CASES):
        argv, fresh = command_line(rng, values, ws["base"])
        if fresh:
            copy = os.path.join(ws["root"], f"resume-{case}")
            shutil.copytree(ws["finished"], copy)
            argv[argv.index("FINISHED")] = copy
        before = tree(ws["root"])
        try:
            code = run.entry(argv)
        except Reached:
            code = 0
        err = capsys.readouterr().err
        where = f"case {case}: run.py {' '.join(argv)}\n{err}"
        if code == 2:
            outcomes["refused"] += 1
            assert err.count("\n") == 1 and err.startswith("run.py: error: "), where
            assert tree(ws["root"]) == before, where  # nothing written
        elif code == 1:
            outcomes["diverged"] += 1
            last = err.rstrip("\n").split("\n")[-1]
            assert last.startswith("run.py: stopped: non-finite loss") and "Traceback" not in err, where
        else:
            assert code == 0 and "Traceback" not in err, where
            outcomes["runs"] += 1
        for name in set(os.listdir(ws["root"])) - {p.split(os.sep)[0] for p in before}:
            shutil.rmtree(os.path.join(ws["root"], name))  # a new run directory
        shutil.rmtree(os.path.join(ws["empty"], "runs"), ignore_errors=True)  # the default --out
        for name in os.listdir(ws["empty"]):
            shutil.rmtree(os.path.join(ws["empty"], name))
    # both kinds of outcome are well represented (numbers for this seed)
    assert outcomes["runs"] >= N_CASES // 6 and outcomes["refused"] >= N_CASES // 3, outcomes
