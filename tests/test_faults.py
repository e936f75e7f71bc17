"""Faults in the run directory: a full disk, failing writes, corrupt files, SIGTERM.

A full disk is made two ways. Where this process may mount a small tmpfs (root on Linux), a
real one is filled up until the second checkpoint no longer fits. Everywhere, the writes of
``cht/rundir.py`` are made to fail at a chosen file and a chosen write: the file's bytes go to
disk up to a limit and then OSError(ENOSPC) is raised, as a full disk does (or EIO from fsync).
After each fault the run must have stopped with one line and exit status 1, left no temporary
file and an intact last checkpoint, and ``--resume`` must end with the same run, bit for bit,
as one that never failed.
"""
import builtins
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import run
from cht import rundir
from runtools import assert_same_run, checkpoint_epoch, read_evolution, read_metrics, run_cli, tiny_data, tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3  # set evolves after epochs 1 and 2 (evolve_until 0.75 of 3 epochs)
# VGG16 at 1/16 width, three batches of 16: an epoch in a fraction of a second
SMALL = ["--dataset", "mnist", "--width", "0.0625", "--batch-size", "16", "--warmup-epochs", "1",
         "--limit-train", "48", "--limit-test", "16", "--method", "set"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"))


def args_for(data_dir, epochs=EPOCHS):
    return SMALL + ["--epochs", str(epochs), "--data-dir", data_dir]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run: what every faulted and resumed run must end as."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    assert run.entry(args_for(data_dir) + ["--out", out]) == 0
    return out


def stop_line(err):
    """The last line of stderr, after checking that it is the only line of the stop message."""
    assert "Traceback" not in err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("run.py: stopped: "), err
    return last


def target_of(base):
    """The run file a file name stands for: itself, or the file a temporary name
    (``rundir.temporary_name``: ``<name>.<12 hex digits>.tmp``) is written for."""
    return re.sub(r"\.[0-9a-f]{12}\.tmp$", "", base)


def no_temporary_files(out):
    return not os.path.isdir(out) or not [n for n in os.listdir(out) if n.endswith(".tmp")]


# -- the simulated fault ---------------------------------------------------------------------
class FailingFile:
    """A file whose writes put ``room`` more bytes on disk, then raise OSError(ENOSPC)."""

    def __init__(self, f, room):
        self._f, self._room = f, room

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) <= self._room:
            self._room -= len(data)
            return self._f.write(data)
        if self._room:
            self._f.write(data[:self._room])
            self._room = 0
            self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class Fault:
    """Fails the ``nth`` opening for writing of the run file ``name`` (its temporary files count:
    the whole-file writes go through them) in ``cht.rundir``: ``at="write"`` with ENOSPC after ``room``
    bytes, ``at="fsync"`` with EIO from its fsync. ``truncate_fails``: cutting a log back fails
    too (EIO), so a torn line stays."""

    def __init__(self, monkeypatch, name, nth, at="write", room=10, truncate_fails=False):
        self.name, self.nth, self.at, self.room, self.opened, self.fired = name, nth, at, room, 0, False
        self.fds = set()
        monkeypatch.setattr(rundir, "open", self.open, raising=False)
        real_fsync = os.fsync

        def fsync(fd):
            if fd in self.fds:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real_fsync(fd)

        def truncate(path, size):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "fsync", fsync)
        if truncate_fails:
            monkeypatch.setattr(os, "truncate", truncate)

    def open(self, path, mode="r", **kw):
        f = builtins.open(path, mode, **kw)
        base = os.path.basename(path)
        if ("w" in mode or "a" in mode) and target_of(base) == self.name:
            self.opened += 1
            if self.opened == self.nth:
                self.fired = True
                if self.at == "fsync":
                    self.fds.add(f.fileno())
                    return f
                return FailingFile(f, self.room)
        return f


# which opening of each file: write_new opens metrics.csv and evolution.jsonl once, each epoch
# appends to both, then writes the checkpoint; result.json after the last epoch
CASES = {
    "checkpoint-2": dict(name="checkpoint.npz", nth=2),                    # the second checkpoint
    "checkpoint-2-fsync": dict(name="checkpoint.npz", nth=2, at="fsync"),
    "checkpoint-3-at-once": dict(name="checkpoint.npz", nth=3, room=0),
    "checkpoint-2-logs-ahead": dict(name="checkpoint.npz", nth=2, truncate_fails=True),  # lines not undone
    "metrics-epoch-2": dict(name="metrics.csv", nth=3),
    "evolution-epoch-2": dict(name="evolution.jsonl", nth=3),
    "evolution-epoch-2-fsync": dict(name="evolution.jsonl", nth=3, at="fsync"),
    "evolution-torn": dict(name="evolution.jsonl", nth=3, truncate_fails=True),
    "metrics-torn": dict(name="metrics.csv", nth=3, room=5, truncate_fails=True),
    "result": dict(name="result.json", nth=1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_failed_write_stops_cleanly_and_resume_ends_equal(case, data_dir, reference, tmp_path, capsys,
                                                            monkeypatch):
    out = str(tmp_path / "run")
    fault = Fault(monkeypatch, **CASES[case])
    code, err = run_cli(args_for(data_dir) + ["--out", out], capsys)
    assert fault.fired and code == 1
    line = stop_line(err)
    assert f"cannot write {os.path.join(out, fault.name)}: " in line
    assert "free space, then continue with: python run.py --resume " + out in line
    assert "the last good checkpoint is intact" in line
    assert no_temporary_files(out)
    good = checkpoint_epoch(out)  # loads: intact
    if fault.name == "result.json":
        assert good == EPOCHS and not os.path.exists(os.path.join(out, "result.json"))
    else:
        failing_epoch = fault.nth if fault.name == "checkpoint.npz" else fault.nth - 1
        assert good == failing_epoch - 1
        if not CASES[case].get("truncate_fails"):
            # the epoch's lines are undone in both logs: they end at the last checkpoint
            assert [int(r["epoch"]) for r in read_metrics(out)] == list(range(1, good + 1))
            assert {r["epoch"] for r in read_evolution(out)} <= set(range(1, good + 1))
        elif fault.name == "checkpoint.npz":  # the lines could not be undone: one epoch ahead
            assert [int(r["epoch"]) for r in read_metrics(out)] == list(range(1, failing_epoch + 1))
    monkeypatch.undo()  # space again

    code, err = run_cli(["--resume", out], capsys)
    assert code == 0, err
    assert_same_run(reference, out)
    assert no_temporary_files(out)


@pytest.mark.parametrize("name, at", [("config.json", "write"), ("metrics.csv", "write"),
                                      ("evolution.jsonl", "fsync")])
def test_a_failed_write_of_a_new_run_keeps_nothing(name, at, data_dir, reference, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "new" / "run")
    Fault(monkeypatch, name, 1, at=at)
    code, err = run_cli(args_for(data_dir) + ["--out", out], capsys)
    assert code == 1
    line = stop_line(err)
    assert f"cannot write {os.path.join(out, name)}" in line and "start it again" in line
    assert not os.path.exists(tmp_path / "new")  # the folders it made are gone again
    monkeypatch.undo()
    assert run_cli(args_for(data_dir) + ["--out", out], capsys)[0] == 0
    assert_same_run(reference, out)


def test_the_first_checkpoint_failing_says_there_is_none_yet(data_dir, reference, tmp_path, capsys, monkeypatch):
    """--resume then starts the run from its config.json."""
    out = str(tmp_path / "run")
    Fault(monkeypatch, "checkpoint.npz", 1)
    code, err = run_cli(args_for(data_dir) + ["--out", out], capsys)
    assert code == 1 and "(no checkpoint yet)" in stop_line(err)
    assert sorted(os.listdir(out)) == ["config.json", "evolution.jsonl", "metrics.csv"]
    assert read_metrics(out) == [] and read_evolution(out) == []
    monkeypatch.undo()
    code, err = run_cli(["--resume", out], capsys)
    assert code == 0, err
    assert_same_run(reference, out)


def test_a_failed_write_while_resuming_keeps_the_logs(data_dir, reference, tmp_path, capsys, monkeypatch):
    """--resume rewrites the logs back to the checkpoint: a full disk there changes nothing."""
    out = str(tmp_path / "run")
    Fault(monkeypatch, "checkpoint.npz", 2)
    assert run_cli(args_for(data_dir) + ["--out", out], capsys)[0] == 1
    monkeypatch.undo()
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    Fault(monkeypatch, "metrics.csv", 1)
    code, err = run_cli(["--resume", out], capsys)
    assert code == 1 and "--resume " + out in stop_line(err)
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before
    monkeypatch.undo()
    assert run_cli(["--resume", out], capsys)[0] == 0
    assert_same_run(reference, out)


# -- a real full disk --------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 64 MiB mounted for this test (skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs: {e}")
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {p.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=20)


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_real_full_disk_during_the_second_checkpoint(data_dir, reference, small_disk, capsys):
    size = os.path.getsize(os.path.join(reference, "checkpoint.npz"))
    filler = os.path.join(small_disk, "filler")
    with open(filler, "wb") as f:  # leave room for the logs, one checkpoint and half of another
        f.write(b"\0" * (free_bytes(small_disk) - size - size // 2 - 64 * 1024))
    out = os.path.join(small_disk, "run")
    code, err = run_cli(args_for(data_dir) + ["--out", out], capsys)
    assert code == 1
    line = stop_line(err)
    assert "checkpoint.npz: No space left on device" in line and "--resume " + out in line
    assert no_temporary_files(out) and checkpoint_epoch(out) == 1
    os.remove(filler)  # space again
    code, err = run_cli(["--resume", out], capsys)
    assert code == 0, err
    assert_same_run(reference, out)


# -- corrupt files refused by --resume ----------------------------------------------------------
@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    """A finished 2-epoch SET run (masks, Adam state, scheduler, RNG states in its checkpoint,
    one evolution step in its log)."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    assert run.entry(args_for(data_dir, epochs=2) + ["--out", out]) == 0
    return out


def edit_checkpoint(edit=None, meta_text=None):
    """A corruption that rewrites checkpoint.npz after ``edit(arrays, meta)`` changed its content
    in place; ``meta_text``: the meta record's new text (False: none)."""
    def corrupt(path):
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
        if edit is not None:
            edit(arrays, meta)
        if meta_text is not False:
            arrays["meta"] = np.array(json.dumps(meta) if meta_text is None else meta_text)
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    return corrupt


def cut(fraction):
    def corrupt(path):
        data = open(path, "rb").read()
        open(path, "wb").write(data[:int(len(data) * fraction)])
    return corrupt


def flip_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # inside the stored weights: the zip's CRC no longer matches
    open(path, "wb").write(bytes(data))


def drop(d, *keys):
    for k in keys:
        d.pop(k)


def first_mask_with_an_extra_link(arrays, meta):
    k = next(k for k in arrays if k.startswith("mask."))
    m = arrays[k].copy()
    m.reshape(len(m), -1)[0][np.argmin(m.reshape(len(m), -1)[0])] = True
    arrays[k] = m


CHECKPOINT_CORRUPTIONS = {
    "truncated": (cut(0.5), "not a readable checkpoint"),
    "empty": (cut(0), "not a readable checkpoint"),
    "flipped byte": (flip_byte, "not a readable checkpoint"),
    "not a zip": (lambda p: open(p, "w").write("hello\n"), "not a readable checkpoint"),
    "no meta": (edit_checkpoint(meta_text=False), "no meta record"),
    "meta not JSON": (edit_checkpoint(meta_text='{"epoch": 1, '), "meta is not valid JSON"),
    "meta a list": (edit_checkpoint(meta_text="[1, 2]"), "meta is not a JSON object"),
    "meta lacks rng": (edit_checkpoint(lambda a, m: drop(m, "rng")), "meta lacks 'rng'"),
    "meta unknown key": (edit_checkpoint(lambda a, m: m.update(extra=1)), "meta has an unknown 'extra'"),
    "epoch beyond the run": (edit_checkpoint(lambda a, m: m.update(epoch=5)), "meta.epoch is 5"),
    "epoch a string": (edit_checkpoint(lambda a, m: m.update(epoch="1")), "meta.epoch is a string"),
    "history too short": (edit_checkpoint(lambda a, m: m.update(history=[])), "meta.history"),
    "history row": (edit_checkpoint(lambda a, m: drop(m["history"][0], "test_acc")), "meta.history"),
    "a weight missing": (edit_checkpoint(lambda a, m: drop(a, "features.0.weight")), "lacks 'features.0.weight'"),
    "a wrong shape": (edit_checkpoint(lambda a, m: a.update({"classifier.1.bias": np.zeros(3, np.float32)})),
                      "classifier.1.bias is float32 (3,)"),
    "a wrong dtype": (edit_checkpoint(lambda a, m: a.update({"features.1.weight": a["features.1.weight"].astype(
                      np.float64)})), "features.1.weight is float64"),
    "an unknown array": (edit_checkpoint(lambda a, m: a.update(stray=np.zeros(2))), "unknown array 'stray'"),
    "a mask with an extra link": (edit_checkpoint(first_mask_with_an_extra_link), "active entries per filter"),
    "optimizer state of some parameters": (
        edit_checkpoint(lambda a, m: drop(a, *[k for k in a if k.startswith("optim.0.")])),
        "optimizer state covers only some"),
    "a bad optimizer key": (edit_checkpoint(lambda a, m: a.update({"optim.999.exp_avg": np.zeros(1)})),
                            "unknown optimizer state"),
    "an optimizer scalar a string": (edit_checkpoint(lambda a, m: m["optimizer"]["scalars"].update({"0.step": "x"})),
                                     "optimizer scalar"),
    "another run's config": (edit_checkpoint(lambda a, m: m["config"].update(lr=0.5)), "differs from config.json in 'lr'"),
    "another RNG": (edit_checkpoint(lambda a, m: m["rng"]["data"].update(bit_generator="MT19937")), "does not fit"),
    "scheduler state": (edit_checkpoint(lambda a, m: drop(m["scheduler"], "last_epoch")), "meta.scheduler lacks"),
}


def resume_refused(finished, tmp_path, capsys, corrupt):
    """``--resume`` of a copy of ``finished`` that ``corrupt(out)`` damaged: exit status 2, one
    line, nothing written. Returns ``(out, stderr)``."""
    out = str(tmp_path / "run")
    shutil.copytree(finished, out)
    corrupt(out)
    before = tree(out)
    code, err = run_cli(["--resume", out], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("run.py: error: --resume ") and "Traceback" not in err
    assert tree(out) == before  # nothing written
    return out, err


def write_text(text):
    return lambda p: open(p, "w").write(text)


def edit_config(*drop_keys, **change):
    def corrupt(path):
        cfg = json.load(open(path))
        cfg.update(change)
        drop(cfg, *drop_keys)
        open(path, "w").write(json.dumps(cfg))
    return corrupt


CONFIG_CORRUPTIONS = {
    "truncated": (cut(0.5), "not valid JSON"),
    "empty": (cut(0), "not valid JSON"),
    "not UTF-8": (lambda p: open(p, "wb").write(b'{"\xff": 1}'), "not valid JSON"),
    "a list": (write_text("[1, 2]\n"), "not a JSON object"),
    "a folder": (lambda p: (os.remove(p), os.mkdir(p)), "cannot read it"),
    "missing": (os.remove, "not found"),
    "lacks epochs": (edit_config("epochs"), "lacks 'epochs'"),
    "a bad lr": (edit_config(lr=-1), "--lr"),
    "epochs a string": (edit_config(epochs="ten"), "--epochs"),
    "an unknown method": (edit_config(method="magic"), "--method"),
    "download a string": (edit_config(download="yes"), "--download"),
}


CORRUPTIONS = {"checkpoint.npz": CHECKPOINT_CORRUPTIONS, "config.json": CONFIG_CORRUPTIONS}


@pytest.mark.parametrize("name, case", [(n, c) for n in CORRUPTIONS for c in sorted(CORRUPTIONS[n])])
def test_a_corrupt_file_is_refused_by_resume(name, case, finished, tmp_path, capsys):
    corrupt, words = CORRUPTIONS[name][case]
    out, err = resume_refused(finished, tmp_path, capsys, lambda out: corrupt(os.path.join(out, name)))
    assert os.path.join(out, name) in err and words in err, err


def test_a_corrupt_line_inside_the_evolution_log_is_refused(finished, tmp_path, capsys):
    def corrupt(out):
        path = os.path.join(out, "evolution.jsonl")
        lines = open(path).read().splitlines(keepends=True)
        lines[2] = lines[2][:20] + "\n"
        open(path, "w").write("".join(lines))

    out, err = resume_refused(finished, tmp_path, capsys, corrupt)
    assert f"{os.path.join(out, 'evolution.jsonl')}: line 3 is not valid JSON" in err


def test_torn_last_lines_of_both_logs_do_not_break_resume(data_dir, reference, tmp_path, capsys, monkeypatch):
    """A crash in the middle of an append (no chance to cut it back): resume drops the torn lines."""
    out = str(tmp_path / "run")
    Fault(monkeypatch, "checkpoint.npz", 2)
    assert run_cli(args_for(data_dir) + ["--out", out], capsys)[0] == 1
    monkeypatch.undo()
    with open(os.path.join(out, "metrics.csv"), "a") as f:
        f.write("3,0.0093,1.2")
    with open(os.path.join(out, "evolution.jsonl"), "a") as f:
        f.write('{"epoch": 3, "layer": "features.0.weight", "remo')
    code, err = run_cli(["--resume", out], capsys)
    assert code == 0, err
    assert_same_run(reference, out)


@pytest.mark.parametrize("extra", [
    ["--scheduler", s, "--optimizer", o] for s in ("linear-linear", "linear-cos", "constant") for o in ("sgd", "adam")
] + [["--optimizer", "sgd", "--momentum", "0"], ["--method", "dense"], ["--method", "static"]])
def test_the_checks_accept_every_scheduler_optimizer_and_method(extra, data_dir, tmp_path, capsys, monkeypatch):
    """The checkpoint checks know the state of every optimizer, scheduler and method: resume goes on."""
    args = args_for(data_dir, epochs=2) + extra
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_cli(args + ["--out", a], capsys)[0] == 0
    Fault(monkeypatch, "checkpoint.npz", 2)
    assert run_cli(args + ["--out", b], capsys)[0] == 1
    monkeypatch.undo()
    code, err = run_cli(["--resume", b], capsys)
    assert code == 0, err
    assert_same_run(a, b)


# -- signals -----------------------------------------------------------------------------------
def test_sigterm_during_a_checkpoint_write(data_dir, reference, tmp_path, capsys, monkeypatch):
    """SIGTERM arriving in the middle of the second checkpoint: the temporary file goes, the first
    checkpoint stays, one line, exit status 143, and the run resumes to the same end."""
    out = str(tmp_path / "run")
    opened = {"n": 0}

    class Killed(FailingFile):
        def write(self, data):
            if not self._room:  # the first write (zipfile writes more while it closes)
                self._room = 1
                # without a handler SIGTERM would end the test process itself
                assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
                os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode
            return self._f.write(data)

    def open_(path, mode="r", **kw):
        f = builtins.open(path, mode, **kw)
        base = os.path.basename(path)
        if base != "checkpoint.npz" and target_of(base) == "checkpoint.npz":
            opened["n"] += 1
            if opened["n"] == 2:
                return Killed(f, 0)
        return f

    monkeypatch.setattr(rundir, "open", open_, raising=False)
    code, err = run_cli(args_for(data_dir) + ["--out", out], capsys)
    monkeypatch.undo()
    assert code == 143 and "Traceback" not in err
    assert err.rstrip("\n").split("\n")[-1].startswith(f"run.py: terminated (SIGTERM); continue with: "
                                                      f"python run.py --resume {out}")
    assert no_temporary_files(out) and checkpoint_epoch(out) == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # entry() put the old handler back
    assert run_cli(["--resume", out], capsys)[0] == 0
    assert_same_run(reference, out)


def test_sigterm_stops_a_training_process_like_ctrl_c(data_dir, tmp_path):
    """``kill`` on a real run.py process, in the middle of training."""
    out = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py")] + args_for(data_dir, epochs=200) +
                         ["--out", out], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        lines = []
        for line in p.stderr:  # wait for the first finished epoch
            lines.append(line)
            if line.startswith("epoch 1/200"):
                break
        p.send_signal(signal.SIGTERM)
        rest = p.stderr.read()
        code = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    err = "".join(lines) + rest
    assert code == 143 and "Traceback" not in err, err
    assert err.rstrip("\n").split("\n")[-1].startswith(f"run.py: terminated (SIGTERM); continue with: "
                                                      f"python run.py --resume {out}")
    assert no_temporary_files(out) and 1 <= checkpoint_epoch(out) < 200
    assert len(read_metrics(out)) >= checkpoint_epoch(out)
