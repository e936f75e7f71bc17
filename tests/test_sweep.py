"""python -m cht.sweep end to end on tiny generated data: the grid, its report, reruns, a kill in
the middle, equality with run.py, the lock, failures, usage mistakes, and the Ray engine."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cht import runlock, sweep
from cht.runlock import LOCK_NAME, RunLock
from data.synthetic import write_idx_dataset
from test_runlock import assert_same_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--width", "0.0625", "--batch-size", "32", "--warmup-epochs", "1", "--epochs", "4", "--zeta", "0.2"]
GRID = ["--datasets", "mnist", "fashion-mnist", "--methods", "dense", "ch3", "--sparsities", "0.7",
        "--seeds", "14", "15", "--workers", "2"] + TRAIN
CELLS = ["fashion-mnist-ch3-0.7", "fashion-mnist-dense", "mnist-ch3-0.7", "mnist-dense"]
# Each run gets the threads the sweep gives it (one here, whatever this machine has), not the sweep's own.
ONE = ["--cpus-per-run", "1"]
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_idx_dataset(str(d / "mnist"), n_train=128, n_test=32, seed=0)
    write_idx_dataset(str(d / "fashion-mnist"), n_train=128, n_test=32, seed=1)
    return str(d)


def sweep_cmd(out, data_dir, grid=GRID):
    return [sys.executable, "-m", "cht.sweep", str(out)] + grid + ONE + ["--data-dir", data_dir]


def run_sweep(out, data_dir, grid=GRID, timeout=300):
    return subprocess.run(sweep_cmd(out, data_dir, grid), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def run_dirs(out):
    return sorted(os.path.join(out, c, s) for c in os.listdir(out) if os.path.isdir(os.path.join(out, c))
                  for s in os.listdir(os.path.join(out, c)))


@pytest.fixture(scope="module")
def grid(data_dir, tmp_path_factory):
    """The 2 x 2 x 2 grid (datasets x methods x seeds), run once without interruption."""
    out = tmp_path_factory.mktemp("grid") / "out"
    t0 = time.time()
    p = run_sweep(out, data_dir)
    return str(out), p, time.time() - t0


def test_a_grid_finishes_and_reports(grid):
    out, p, _ = grid
    assert p.returncode == 0, p.stderr
    assert sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))) == CELLS
    assert sorted(f for f in os.listdir(out) if f.startswith("table")) == ["table.csv", "table.md", "table.png"]
    for d in run_dirs(out):
        assert os.path.basename(d) in ("seed-14", "seed-15")
        assert {"config.json", "metrics.csv", "evolution.jsonl", "checkpoint.npz", "result.json", "run.log"} == \
            set(os.listdir(d))
        cfg = json.load(open(os.path.join(d, "config.json")))
        assert cfg["epochs"] == 4 and cfg["width"] == 0.0625 and "cpu_workers" not in cfg
        assert cfg["seed"] == int(d[-2:]) and cfg["dataset"] == os.path.basename(os.path.dirname(d)).split("-d")[0] \
            .rsplit("-ch3", 1)[0]
        # --zeta reaches the sparse runs only; a dense run gets no flag it would refuse
        assert cfg["zeta"] == (0.3 if cfg["method"] == "dense" else 0.2)
        header = open(os.path.join(d, "run.log")).readline()
        assert ("--zeta" in header) == (cfg["method"] == "ch3") and "--sparsity" not in header.replace(
            "--sparsity 0.7", "") and ("--sparsity 0.7" in header) == (cfg["method"] == "ch3")
    err = p.stderr
    for cell in CELLS:
        for seed in (14, 15):
            assert f"done    {cell} seed {seed}: test accuracy " in err
    assert "sweep: 8/8 runs done, 0 running, 0 left" in err and "ETA" in err
    accs = {}
    for d in run_dirs(out):
        accs.setdefault(os.path.basename(os.path.dirname(d)), []).append(
            json.load(open(os.path.join(d, "result.json")))["test_acc"])
    rows = list(csv.DictReader(open(os.path.join(out, "table.csv"))))
    assert len(rows) == 4 and all(r["n"] == "2" and r["seeds"] == "14 15" for r in rows)
    for r in rows:
        cell = f"{r['dataset']}-dense" if r["method"] == "dense" else f"{r['dataset']}-ch3-0.7"
        m, se = sweep.report.mean_se(accs[cell])
        assert abs(float(r["mean"]) - m) < 1e-3 and abs(float(r["se"]) - se) < 1e-3
        assert f"{m:.2f} ± {se:.2f} (n=2)" in p.stdout
    assert open(os.path.join(out, "table.md")).read() == p.stdout


def test_run_again_no_training_happens(grid, data_dir):
    out, _, first = grid
    before = {d: (open(os.path.join(d, "run.log")).read(), os.stat(os.path.join(d, "checkpoint.npz")).st_mtime_ns)
              for d in run_dirs(out)}
    t0 = time.time()
    p = run_sweep(out, data_dir)
    assert p.returncode == 0, p.stderr
    assert "8 runs; 8 finished, 0 to resume, 0 to start" in p.stderr and "done    " not in p.stderr
    assert {d: (open(os.path.join(d, "run.log")).read(), os.stat(os.path.join(d, "checkpoint.npz")).st_mtime_ns)
            for d in run_dirs(out)} == before
    assert time.time() - t0 < first


def test_a_run_of_the_sweep_equals_the_same_run_by_run_py(grid, data_dir, tmp_path):
    out = grid[0]
    mine = str(tmp_path / "by-hand")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    for cell, args in (("mnist-ch3-0.7", ["--method", "ch3", "--sparsity", "0.7"] + TRAIN),
                       ("fashion-mnist-dense", ["--method", "dense"] + TRAIN[:-2])):
        dataset = cell.split("-dense")[0].split("-ch3")[0]
        p = subprocess.run([sys.executable, "run.py", "--dataset", dataset, "--seed", "15", "--data-dir", data_dir,
                            "--out", os.path.join(mine, cell)] + args, cwd=ROOT, env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert_same_run(os.path.join(out, cell, "seed-15"), os.path.join(mine, cell))


def _wait(cond, proc, timeout=120, what=""):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"ended before {what}: {proc.communicate()}"
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)


def _mid_run(out):
    """Run directories with a checkpoint but no result yet."""
    if not os.path.isdir(out):
        return []
    return [d for d in run_dirs(out) if os.path.exists(os.path.join(d, "checkpoint.npz"))
            and not os.path.exists(os.path.join(d, "result.json"))]


def test_killed_sweep_started_again_finishes_equal(grid, data_dir, tmp_path):
    """SIGKILL to the sweep in the middle of a run: its runs stop (nothing keeps training, no lock
    is left held), and the same command again finishes every run with the final checkpoints of
    the uninterrupted grid, bit for bit."""
    out = str(tmp_path / "out")
    p = subprocess.Popen(sweep_cmd(out, data_dir), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait(lambda: _mid_run(out), p, what="a run in the middle")
    p.kill()
    p.wait()
    t0 = time.time()
    while any(runlock.holder(d) for d in run_dirs(out)):     # its run.py processes stop by themselves
        assert time.time() - t0 < 30, "run.py processes outlived the sweep"
        time.sleep(0.1)
    interrupted = [d for d in run_dirs(out) if not os.path.exists(os.path.join(d, "result.json"))]
    assert interrupted and not any(os.path.exists(os.path.join(d, LOCK_NAME)) for d in run_dirs(out))
    q = run_sweep(out, data_dir)
    assert q.returncode == 0, q.stderr
    assert "to resume" in q.stderr and "0 to resume" not in q.stderr
    for d in interrupted:
        log = open(os.path.join(d, "run.log")).read()
        assert log.count("\n== ") == 1 and ("resuming" in log or "from its config.json" in log)
    assert any("resuming" in open(os.path.join(d, "run.log")).read() for d in interrupted)
    for d in run_dirs(grid[0]):
        assert_same_run(d, d.replace(grid[0], out))


def test_a_held_run_is_left_to_its_holder(grid, data_dir, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    small = ["--datasets", "mnist", "--methods", "dense", "--seeds", "14", "15", "--workers", "2"] + TRAIN + ONE + \
        ["--data-dir", data_dir]
    held = os.path.join(out, "mnist-dense", "seed-15")
    os.makedirs(held)
    monkeypatch.setattr(sweep, "LOCK_WAIT", 1.0)
    with RunLock(held):
        code = sweep.main([out] + small)
        err = capsys.readouterr().err
        assert code == 1
        assert f"held    mnist-dense seed 15: being trained by pid {os.getpid()}" in err
        assert "sweep: 1 held by other processes" in err and "done    mnist-dense seed 14" in err
        assert os.listdir(held) == [LOCK_NAME]                   # nothing started there
    assert sweep.main([out] + small) == 0                         # once it lets go
    assert_same_run(os.path.join(grid[0], "mnist-dense", "seed-15"), held)


def test_two_sweeps_on_one_run_train_it_once(data_dir, tmp_path):
    out = str(tmp_path / "out")
    one = ["--datasets", "mnist", "--methods", "ch3", "--sparsities", "0.7", "--seeds", "14"] + TRAIN
    ps = [subprocess.Popen(sweep_cmd(out, data_dir, one), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in ps]
    assert [p.returncode for p in ps] == [0, 0], errs
    d = os.path.join(out, "mnist-ch3-0.7", "seed-14")
    log = open(os.path.join(d, "run.log")).read()
    assert log.count("epoch 1/4") == 1 and log.count("epoch 4/4") == 1
    assert [int(r["epoch"]) for r in csv.DictReader(open(os.path.join(d, "metrics.csv")))] == [1, 2, 3, 4]
    assert sum("(trained by another process)" in e for e in errs) == 1


def test_a_failed_run_is_reported_and_the_sweep_goes_on(grid, data_dir, tmp_path):
    out = str(tmp_path / "out")
    broken = os.path.join(out, "mnist-ch3-0.7", "seed-14")
    shutil.copytree(os.path.join(grid[0], "mnist-ch3-0.7", "seed-14"), broken)
    os.remove(os.path.join(broken, "result.json"))
    with open(os.path.join(broken, "checkpoint.npz"), "r+b") as f:
        f.truncate(100)                                          # a resume that cannot work
    p = run_sweep(out, data_dir, ["--datasets", "mnist", "--methods", "ch3", "--sparsities", "0.7",
                                  "--seeds", "14", "15"] + TRAIN)
    assert p.returncode == 1
    log = os.path.join(broken, "run.log")
    assert "FAILED  mnist-ch3-0.7 seed 14: exit status" in p.stderr and f"log: {log}" in p.stderr
    assert "done    mnist-ch3-0.7 seed 15" in p.stderr and os.path.exists(os.path.join(out, "table.md"))
    assert "checkpoint.npz" in open(log).read()


@pytest.mark.parametrize("args, words", [
    (["--datasets", "imagenet"], "--datasets"),
    (["--methods", "ch3", "magic"], "--methods"),
    (["--sparsities", "1.5"], "--sparsity"),
    (["--seeds", "14", "14"], "--seeds"),
    (["--sparsities", "0.5", "0.5"], "--sparsities"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--workers", "0"], "--workers"),
    (["--seed", "3"], "--seed"),
    (["--address", "auto"], "--address"),
    (["--engine", "ray", "--workers", "2"], "--workers"),
    (["--engine", "spark"], "--engine"),
    (["--preset", "table2"], "--preset"),
])
def test_usage_mistakes_exit_2_writing_nothing(args, words, data_dir, tmp_path, capsys):
    out = tmp_path / "never"
    code = sweep.entry([str(out), "--datasets", "mnist", "--data-dir", data_dir] + TRAIN + args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err and "Traceback" not in err, err
    assert not out.exists()


def test_usage_mistakes_about_places_write_nothing(grid, data_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert sweep.entry([str(out), "--datasets", "mnist", "--data-dir", str(tmp_path / "nodata")] + TRAIN) == 2
    assert "not found" in capsys.readouterr().err and not out.exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert sweep.entry([str(blocker / "out"), "--datasets", "mnist", "--data-dir", data_dir] + TRAIN) == 2
    assert "OUT" in capsys.readouterr().err
    # OUT holding runs of other settings: refused, nothing touched
    before = {d: os.stat(os.path.join(d, "config.json")).st_mtime_ns for d in run_dirs(grid[0])}
    code = sweep.entry([grid[0]] + GRID + ["--epochs", "5", "--data-dir", data_dir])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "epochs 4" in err and "5" in err
    assert before == {d: os.stat(os.path.join(d, "config.json")).st_mtime_ns for d in run_dirs(grid[0])}
    from minicnn import backend
    if not backend.gpu_available():
        assert sweep.entry([str(out), "--datasets", "mnist", "--data-dir", data_dir, "--device", "gpu"] + TRAIN) == 2
        assert "gpu" in capsys.readouterr().err and not out.exists()


def test_table1_preset_is_the_papers_42_runs(tmp_path):
    run_mod = sweep.load_run_module()
    args = sweep.build_parser(run_mod).parse_args([str(tmp_path / "t1"), "--preset", "table1"])
    runs = sweep.plan(args, run_mod)
    assert len(runs) == 42
    cells = {r.cell for r in runs}
    assert cells == {f"{d}-{m}-{s}" for d in ("cifar10", "cifar100") for m in ("set", "ch2", "ch3")
                     for s in ("0.5", "0.7")} | {"cifar10-dense", "cifar100-dense"}
    assert {r.seed for r in runs} == {14, 15, 16}
    assert all(r.cfg["epochs"] == (100 if r.dataset == "cifar10" else 240) and r.cfg["width"] == 1.0 for r in runs)
    assert not (tmp_path / "t1").exists()


def test_local_workers_share_the_cores_and_the_gpus():
    assert sweep.threads_per_run(1) == len(os.sched_getaffinity(0))
    assert sweep.threads_per_run(len(os.sched_getaffinity(0)) * 4) == 1
    assert sweep.threads_per_run(2, cpus_per_run=3) == 3
    env = sweep.run_env(3, gpu="1")
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "3" and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == ROOT


def _ray_importable():
    try:
        import ray  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _ray_importable(), reason="Ray is not installed here (pip install ray==2.60.0, "
                                                   "as .ci/run does): the Ray engine is not tested")
def test_ray_engine_survives_a_lost_worker(grid, data_dir, tmp_path):
    """A local Ray cluster of 2 CPUs; one Ray worker process killed (SIGKILL) during a run: Ray
    retries the task, the run continues from its checkpoint, and every run ends equal to the
    uninterrupted grid's."""
    out = str(tmp_path / "out")
    two = ["--datasets", "mnist", "--methods", "ch3", "--sparsities", "0.7", "--seeds", "14", "15", "--engine", "ray"] \
        + TRAIN
    cpus = sorted(os.sched_getaffinity(0))[:2]                      # the local Ray gets 2 CPUs
    p = subprocess.Popen(sweep_cmd(out, data_dir, two), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    _wait(lambda: [d for d in _mid_run(out) if runlock.holder(d)], p, timeout=240, what="a run in the middle")
    victim = [d for d in _mid_run(out) if runlock.holder(d)][0]
    trainer_pid = runlock.holder(victim)["pid"]
    with open(f"/proc/{trainer_pid}/stat") as f:
        worker = int(f.read().rsplit(")", 1)[1].split()[1])          # its parent: the Ray worker
    assert "ray::" in open(f"/proc/{worker}/cmdline").read().replace("\0", " ")
    os.kill(worker, signal.SIGKILL)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    assert "a local Ray with 1 node(s), 2 CPUs" in stderr
    log = open(os.path.join(victim, "run.log")).read()
    assert log.count("== ") == 2 and "resuming" in log                 # retried, from the checkpoint
    for d in run_dirs(out):
        assert_same_run(os.path.join(grid[0], os.path.relpath(d, out)), d)


def test_flags_reach_only_the_runs_they_apply_to_and_distributions_get_their_own_folder(tmp_path):
    run_mod = sweep.load_run_module()
    args = sweep.build_parser(run_mod).parse_args(
        [str(tmp_path / "g"), "--datasets", "cifar10", "cifar100", "--methods", "dense", "set", "--sparsities", "0.9",
         "--distribution", "erk", "--dense-first-layer", "--momentum", "0.5"])
    runs = {r.cell: r for r in sweep.plan(args, run_mod)}
    assert set(runs) == {"cifar10-dense", "cifar100-dense", "cifar10-set-0.9-erk-dense-first",
                         "cifar100-set-0.9-erk-dense-first"}
    for cell, r in runs.items():
        sgd = cell.startswith("cifar100")                            # cifar10's recipe is Adam: no momentum
        assert ("--momentum" in r.start_args) == sgd and r.cfg["momentum"] == (0.5 if sgd else 0.9)
        dense = r.method == "dense"
        assert ("--distribution" in r.start_args) == ("--dense-first-layer" in r.start_args) == (not dense)
        assert (r.cfg["distribution"], r.cfg["dense_first_layer"]) == (("uniform", False) if dense else ("erk", True))
        assert r.dir == os.path.join(str(tmp_path / "g"), cell, "seed-14")
    args = sweep.build_parser(run_mod).parse_args([str(tmp_path / "g"), "--methods", "ch3", "--sparsities", "0.9"])
    assert [r.cell for r in sweep.plan(args, run_mod)] == ["cifar10-ch3-0.9"]   # the default: no suffix


def test_uniform_and_erk_sweeps_share_one_folder(data_dir, tmp_path):
    """The README's 95% commands, tiny: the same OUT with and without --distribution erk; the
    runs land in their own folders and the table holds both, with their FLOPs."""
    out = tmp_path / "fmnist-95"
    grid = ["--datasets", "fashion-mnist", "--methods", "set", "ch3", "--sparsities", "0.95", "--seeds", "14",
            "--workers", "2", "--width", "0.0625", "--epochs", "2", "--batch-size", "32", "--warmup-epochs", "1",
            "--limit-train", "64"]
    p = run_sweep(out, data_dir, grid)
    assert p.returncode == 0, p.stderr
    p = run_sweep(out, data_dir, grid + ["--distribution", "erk"])
    assert p.returncode == 0, p.stderr
    assert "2 runs; 0 finished, 0 to resume, 2 to start" in p.stderr
    assert sorted(d for d in os.listdir(out) if os.path.isdir(out / d)) == [
        "fashion-mnist-ch3-0.95", "fashion-mnist-ch3-0.95-erk", "fashion-mnist-set-0.95", "fashion-mnist-set-0.95-erk"]
    for cell in os.listdir(out):
        if os.path.isdir(out / cell):
            cfg = json.load(open(out / cell / "seed-14" / "config.json"))
            assert cfg["distribution"] == ("erk" if cell.endswith("-erk") else "uniform")
    table = open(out / "table.md").read()
    rows = [l for l in table.splitlines() if l.startswith("| 95%")]
    assert [l.split("|")[2].strip() for l in rows] == ["SET", "SET (ERK)", "CH3-L3n", "CH3-L3n (ERK)"]
    assert all("(n=1), FLOPs 0." in l for l in rows)
