"""Helpers for the tests that drive run.py: tiny generated data, the CLI in-process, run files."""
import csv
import json
import os

import numpy as np

import run
from data.synthetic import write_idx_dataset

# VGG16 at 1/8 width on 32x32-padded MNIST-format data: an epoch of 96 examples takes a moment
TINY = ["--dataset", "mnist", "--width", "0.125", "--batch-size", "32", "--warmup-epochs", "1"]


def tiny_data(folder, n_train=96, n_test=40):
    """Random MNIST-format files in ``folder/mnist``; returns ``folder`` (a --data-dir)."""
    write_idx_dataset(os.path.join(str(folder), "mnist"), n_train=n_train, n_test=n_test, seed=0)
    return str(folder)


def run_cli(args, capsys=None):
    """``run.entry(args)`` in this process: ``(exit status, captured stderr)``."""
    code = run.entry(args)
    err = capsys.readouterr().err if capsys else ""
    return code, err


def read_metrics(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def read_evolution(out):
    with open(os.path.join(out, "evolution.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


def checkpoint_epoch(out):
    with np.load(os.path.join(out, "checkpoint.npz")) as z:
        return json.loads(str(z["meta"]))["epoch"]


def assert_same_run(a, b):
    """The run directories ``a`` and ``b`` hold the same run: every checkpoint array bit for bit,
    the same metrics and evolution records (wall-clock seconds aside), the same result."""
    with np.load(os.path.join(a, "checkpoint.npz")) as za, np.load(os.path.join(b, "checkpoint.npz")) as zb:
        assert set(za.files) == set(zb.files)
        for k in za.files:
            if k != "meta":
                assert za[k].dtype == zb[k].dtype and np.array_equal(za[k], zb[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(read_metrics(a)) == strip(read_metrics(b))
    assert strip(read_evolution(a)) == strip(read_evolution(b))
    results = [os.path.join(d, "result.json") for d in (a, b)]
    if os.path.exists(results[0]):
        ra, rb = (json.load(open(r)) for r in results)
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}


def tree(folder):
    """``{relative path: (size, mtime_ns)}`` of every file under ``folder``, ``None`` for a folder
    (whose mtime a file made and removed again changes)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder)] = None
        for name in files:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = (st.st_size, st.st_mtime_ns)
    return out
