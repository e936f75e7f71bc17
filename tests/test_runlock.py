"""The run-directory lock (cht/runlock.py) and run.py's use of it; run.py --resume before the
first checkpoint."""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import run
from cht import rundir, runlock, trainer as trainer_mod
from cht.runlock import LOCK_NAME, LockHeld, RunLock
from data.synthetic import write_idx_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "mnist", "--width", "0.0625", "--batch-size", "32", "--warmup-epochs", "1",
        "--method", "ch3", "--sparsity", "0.5"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_idx_dataset(str(d / "mnist"), n_train=96, n_test=32, seed=0)
    return str(d)


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(run_dir, **content):
    path = os.path.join(run_dir, LOCK_NAME)
    with open(path, "w") as f:
        json.dump({"started": time.time(), "token": "theirs", **content}, f)
    return path


def test_the_lock_names_its_holder_and_goes_away(tmp_path):
    lock = RunLock(str(tmp_path)).acquire()
    content = json.load(open(tmp_path / LOCK_NAME))
    assert content["pid"] == os.getpid() and content["host"] == socket.gethostname()
    with pytest.raises(LockHeld) as e:
        RunLock(str(tmp_path)).acquire()
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(e.value) and "\n" not in str(e.value)
    assert runlock.holder(str(tmp_path))["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists() and runlock.holder(str(tmp_path)) is None
    for exc in (RuntimeError, KeyboardInterrupt):          # released however the block ends
        with pytest.raises(exc):
            with RunLock(str(tmp_path)):
                assert (tmp_path / LOCK_NAME).exists()
                raise exc
        assert not (tmp_path / LOCK_NAME).exists()


def test_a_gone_holder_is_taken_over_a_live_one_is_not(tmp_path, capsys):
    host = socket.gethostname()
    write_lock(str(tmp_path), pid=dead_pid(), host=host)                   # this host, dead pid
    with RunLock(str(tmp_path)):
        assert json.load(open(tmp_path / LOCK_NAME))["pid"] == os.getpid()
    assert "taking over" in capsys.readouterr().err
    write_lock(str(tmp_path), pid=os.getpid(), host=host, proc_start=-5)   # a reused pid: not its process
    RunLock(str(tmp_path)).acquire().release()
    write_lock(str(tmp_path), pid=os.getppid(), host=host)                 # alive, however old
    os.utime(tmp_path / LOCK_NAME, (0, 0))
    with pytest.raises(LockHeld):
        RunLock(str(tmp_path)).acquire()
    # another host: its pid cannot be checked; judged by the heartbeat (the file's mtime)
    path = write_lock(str(tmp_path), pid=1, host="node-elsewhere")
    with pytest.raises(LockHeld) as e:
        RunLock(str(tmp_path)).acquire()
    assert "node-elsewhere" in str(e.value)
    old = time.time() - runlock.STALE_AFTER - 5
    os.utime(path, (old, old))
    assert runlock.holder(str(tmp_path)) is None
    with RunLock(str(tmp_path)):
        assert json.load(open(path))["host"] == host
    assert not os.path.exists(path)


def test_the_heartbeat_refreshes_the_lock_and_notices_a_takeover(tmp_path, capsys):
    lock = RunLock(str(tmp_path), heartbeat=0.05).acquire()
    path = tmp_path / LOCK_NAME
    os.utime(path, (0, 0))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5                          # refreshed
    lock.release()

    lock = RunLock(str(tmp_path), heartbeat=0.05).acquire()
    write_lock(str(tmp_path), pid=1, host="node-elsewhere")                # taken over meanwhile
    with pytest.raises(KeyboardInterrupt):                                 # the holder stops
        for _ in range(100):
            time.sleep(0.05)
    assert lock.lost and "lost the lock" in capsys.readouterr().err
    lock.release()
    assert json.load(open(path))["host"] == "node-elsewhere"               # not ours to remove


def test_a_takeover_stops_the_holder_even_where_ctrl_c_is_ignored(tmp_path, capsys):
    """A process started in the background by a script (``nohup python run.py ... &``) ignores
    SIGINT: the holder must stop all the same, and the handlers are left as they were."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        lock = RunLock(str(tmp_path), heartbeat=0.05).acquire()
        write_lock(str(tmp_path), pid=1, host="node-elsewhere")
        with pytest.raises(runlock.LockLost):
            for _ in range(100):
                time.sleep(0.05)
        lock.release()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(runlock.LOST_SIGNAL) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "lost the lock" in capsys.readouterr().err


def test_a_takeover_that_lost_the_race_leaves_the_winners_lock(tmp_path, monkeypatch):
    """Between judging a lock abandoned and moving it aside, another process took it over: what
    moved is the winner's fresh lock, so it goes back and this process is refused."""
    host = socket.gethostname()
    path = write_lock(str(tmp_path), pid=dead_pid(), host=host)
    real_rename = os.rename

    def rename(src, dst):
        write_lock(str(tmp_path), pid=os.getppid(), host=host, token="winner")
        real_rename(src, dst)
    monkeypatch.setattr(runlock.os, "rename", rename)
    with pytest.raises(LockHeld):
        RunLock(str(tmp_path)).acquire()
    monkeypatch.undo()
    assert json.load(open(path))["token"] == "winner" and os.listdir(tmp_path) == [LOCK_NAME]


def test_of_many_processes_taking_over_one_lock_exactly_one_wins(tmp_path):
    write_lock(str(tmp_path), pid=dead_pid(), host=socket.gethostname())
    code = ("import sys, time; from cht.runlock import RunLock, LockHeld\n"
            "try:\n    l = RunLock(sys.argv[1]).acquire()\nexcept LockHeld:\n    print('held'); sys.exit()\n"
            "print('won', flush=True); time.sleep(1.5); l.release()\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env) for _ in range(6)]
    said = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert said == ["held"] * 5 + ["won"]
    assert not (tmp_path / LOCK_NAME).exists() and not [f for f in os.listdir(tmp_path) if f != LOCK_NAME]


def test_run_py_refuses_a_directory_another_process_trains(data_dir, tmp_path, capsys):
    out = str(tmp_path / "r")
    assert run.entry(TINY + ["--epochs", "1", "--data-dir", data_dir, "--out", out]) == 0
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    capsys.readouterr()
    with RunLock(out):
        for args in (["--resume", out], TINY + ["--epochs", "1", "--data-dir", data_dir, "--out", out]):
            code = run.entry(args)
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1, err
            if "--resume" in args:
                assert f"pid {os.getpid()} on host {socket.gethostname()}" in err
        assert sorted(os.listdir(out)) == sorted(before) + [LOCK_NAME]
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before


def _run_py(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "run.py"] + args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_checkpoint(out, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(os.path.join(out, "checkpoint.npz")):
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    raise AssertionError("no checkpoint")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_run_py_killed_leaves_a_lock_the_next_one_takes(sig, data_dir, tmp_path):
    """SIGTERM: the run stops as on Ctrl-C, lock released. SIGKILL: the lock stays, names a dead
    pid, and the next --resume takes it over."""
    out = str(tmp_path / "r")
    p = _run_py(TINY + ["--epochs", "8", "--data-dir", data_dir, "--out", out])
    _wait_for_checkpoint(out, p)
    p.send_signal(sig)
    err = p.communicate(timeout=60)[1]
    assert os.path.exists(os.path.join(out, "checkpoint.npz"))
    if sig == signal.SIGTERM:
        assert p.returncode == 143 and "--resume" in err
        assert not os.path.exists(os.path.join(out, LOCK_NAME))
    else:
        assert json.load(open(os.path.join(out, LOCK_NAME)))["pid"] == p.pid
    q = _run_py(["--resume", out, "--epochs", "8"])
    q.wait(timeout=300)
    err = q.stderr.read()
    assert q.returncode == 0, err
    assert ("taking over" in err) == (sig == signal.SIGKILL)
    assert not os.path.exists(os.path.join(out, LOCK_NAME))


def read_rows(out, name):
    with open(os.path.join(out, name)) as f:
        rows = list(csv.DictReader(f)) if name.endswith(".csv") else [json.loads(l) for l in f if l.strip()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def assert_same_run(a, b):
    """Two run directories hold the same run: config, final checkpoint (bit for bit), logs."""
    assert json.load(open(os.path.join(a, "config.json"))) == json.load(open(os.path.join(b, "config.json")))
    with np.load(os.path.join(a, "checkpoint.npz")) as za, np.load(os.path.join(b, "checkpoint.npz")) as zb:
        assert set(za.files) == set(zb.files)
        for k in za.files:
            if k != "meta":
                assert za[k].dtype == zb[k].dtype and np.array_equal(za[k], zb[k]), k
    for name in ("metrics.csv", "evolution.jsonl"):
        assert read_rows(a, name) == read_rows(b, name), name
    ra, rb = (json.load(open(os.path.join(d, "result.json"))) for d in (a, b))
    assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}


@pytest.mark.parametrize("where", ["evaluate", "write_checkpoint"])
def test_resume_before_the_first_checkpoint_starts_from_config(where, data_dir, tmp_path, capsys, monkeypatch):
    """Stopped inside epoch 1 (``evaluate``) or while writing its checkpoint, after its logs
    (``write_checkpoint``, which undoes the epoch's log lines): --resume starts the run from
    config.json and ends equal to a fresh run."""
    args = TINY + ["--epochs", "3", "--data-dir", data_dir]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run.entry(args + ["--out", a]) == 0

    def interrupt(self, *x):
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer_mod.Trainer if where == "evaluate" else rundir.RunDir, where, interrupt)
    assert run.entry(args + ["--out", b]) == 130
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(b, "checkpoint.npz"))
    assert len(read_rows(b, "metrics.csv")) == 0
    capsys.readouterr()
    assert run.entry(["--resume", b]) == 0
    assert "from its config.json" in capsys.readouterr().err
    assert_same_run(a, b)
