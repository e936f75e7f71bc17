"""Sweeps: a grid of runs (the paper's Table 1, or any other) fanned out over cores, GPUs or a
Ray cluster, resumable, ending with the table.

    python -m cht.sweep runs/table1 --preset table1 --device gpu              # 42 runs, one per GPU
    python -m cht.sweep runs/table1 --preset table1 --device gpu --engine ray --address auto
    python -m cht.sweep runs/fm --datasets fashion-mnist --methods dense set ch3 \\
        --sparsities 0.7 0.9 --seeds 14 15 16 --width 0.125 --epochs 10 --workers 2

Each run of the grid is one ``run.py`` process (``cht/sweep/child.py``) in its own directory,
``OUT/<dataset>-<method>-<sparsity>/seed-<seed>`` (dense: ``OUT/<dataset>-dense/seed-<seed>``;
a layer-wise distribution other than the default adds a suffix, ``-erk``, ``-dense-first``,
``-erk-dense-first``: ``OUT/cifar10-ch3-0.9-erk/seed-14``), with the flags ``run.py`` would be
given for it: the same config.json and the same results as ``run.py`` by hand. Its stdout and
stderr go to ``run.log`` in that directory. Every training flag of run.py passes through to the
runs it applies to (``--zeta`` to no dense or static run, ``--momentum`` only to SGD runs).

The same command again skips finished runs (a ``result.json``), resumes interrupted ones
(``run.py --resume``: from the last checkpoint, or from config.json before the first) and starts
the rest. A run directory trained by another live process (its lock, cht/runlock.py) is left
alone with a line saying so. The engines:

- ``local`` (:func:`run_local`): ``--workers N`` runs at a time on this machine; on the CPU each
  gets ``cores / N`` threads (``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``), with ``--device
  gpu`` each gets one visible GPU (``CUDA_VISIBLE_DEVICES``).
- ``ray`` (``cht/sweep/ray_engine.py``): each run a Ray task asking for one GPU or its CPUs;
  a task whose worker is lost is retried, and the retry continues from the checkpoint.

Exit status: 0 when every run of the grid has finished, 1 when one failed (its log is named)
or is still held by another process, 2 for a usage mistake (one line, nothing written), 130
when interrupted (the same command continues).
"""
import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from cht import config, report, runlock
from cht.trainer import hms
from cht.config import (DATASETS, DEFAULT_SPARSITY, DEFAULTS, EXPERIMENT_KEYS, METHODS, ConfigError, applies,
                        complete, layout_suffix, make_config)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_PY = os.path.join(ROOT, "run.py")
LOG_NAME = "run.log"

# The paper's Table 1 (docs/algorithm.md section 6): 2 datasets x (3 methods x 2 sparsities + dense) x 3 seeds.
PRESETS = {"table1": dict(datasets=["cifar10", "cifar100"], methods=["dense", "set", "ch2", "ch3"],
                          sparsities=[0.5, 0.7], seeds=[14, 15, 16])}

# How long a worker waits for a held run directory before it moves on: long enough for a lost
# holder's lock to go stale (another node) or for a stopping holder to let go (this host).
LOCK_WAIT = runlock.STALE_AFTER + 2 * runlock.HEARTBEAT
PROGRESS_EVERY = 300.0  # seconds between two overall lines when no run ends


class UsageError(Exception):
    """A user mistake: one line, exit status 2, nothing written."""


def load_run_module():
    """run.py, the command line whose flags and runs the sweep shares (beside the cht package)."""
    if not os.path.exists(RUN_PY):
        raise UsageError(f"run.py not found at {RUN_PY}: the sweep runs it from a source checkout "
                         f"(pip install -e .)")
    mod = sys.modules.get("run")
    if mod is not None and os.path.abspath(getattr(mod, "__file__", "")) == RUN_PY:
        return mod
    spec = importlib.util.spec_from_file_location("run", RUN_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- the grid --------------------------------------------------------------------------------
@dataclass
class Run:
    """One run of the grid: where it lives and the run.py arguments that make it."""
    dataset: str
    method: str
    sparsity: float
    seed: int
    dir: str                # absolute: a Ray task may run elsewhere
    start_args: list        # run.py arguments that start it (ending with --out dir)
    resume_args: list       # run.py arguments that continue it
    cfg: dict = field(repr=False, default=None)   # the experiment settings it must have
    cwd: str = None         # where run.py runs (relative paths among the flags are relative to it)

    @property
    def cell(self):
        return os.path.basename(os.path.dirname(self.dir))      # OUT/<cell>/seed-<seed>

    @property
    def label(self):
        return f"{self.cell} seed {self.seed}"

    @property
    def log(self):
        return os.path.join(self.dir, LOG_NAME)

    def finished(self):
        return os.path.exists(os.path.join(self.dir, "result.json"))


def cell_name(dataset, method, sparsity, distribution="uniform", dense_first_layer=False):
    """The folder of a cell: ``<dataset>-<method>-<sparsity>[suffix]`` (``cht.config.layout_suffix``:
    "-erk", "-dense-first"), dense ``<dataset>-dense``."""
    if method == "dense":
        return f"{dataset}-dense"
    return f"{dataset}-{method}-{sparsity:g}{layout_suffix(distribution, dense_first_layer)}"


def build_parser(run_mod):
    p = run_mod.Parser(
        prog="python -m cht.sweep",
        description="Train a grid of run.py runs (datasets x methods x sparsities x seeds) into OUT, "
                    "several at a time, locally or on Ray; rerun to resume; ends with OUT/table.md, "
                    "table.csv and table.png. Training flags pass through to every run they apply to.",
        allow_abbrev=False)   # --seed is no --seeds: one seed belongs to run.py, not to a grid
    a = p.add_argument
    a("out", metavar="OUT", help="the sweep's folder (on a filesystem every node sees, for Ray)")
    a("--preset", choices=sorted(PRESETS), default=None,
      help="table1: the paper's 42 runs (cifar10, cifar100 x dense, set, ch2, ch3 x 0.5, 0.7 x seeds 14 15 16); "
           "grid flags given beside it replace its lists")
    a("--datasets", nargs="+", choices=DATASETS, default=None, help="datasets (default: cifar10)")
    a("--methods", nargs="+", choices=METHODS, default=None, help="methods (default: ch3)")
    a("--sparsities", nargs="+", type=float, default=None,
      help=f"sparsities of the sparse methods; dense runs once per dataset (default: {DEFAULT_SPARSITY})")
    a("--seeds", nargs="+", type=int, default=None, help="seeds (default: 14)")
    run_mod.add_training_flags(p)
    a("--engine", choices=("local", "ray"), default="local", help="where the runs go (default: local)")
    a("--workers", type=int, default=None,
      help="local: runs at a time (default: 1 on the CPU, one per visible GPU with --device gpu)")
    a("--cpus-per-run", type=int, default=None,
      help="CPU threads of each run (default: local: the cores shared out over --workers; ray: 1)")
    a("--address", default=None,
      help="ray: the cluster, auto or HOST:PORT (default: a local Ray started for the sweep)")
    return p


def training_flags(run_mod):
    """``[(dest, flag, takes_value)]`` of run.py's training flags, in its order."""
    p = argparse.ArgumentParser(add_help=False)
    run_mod.add_training_flags(p)
    return [(a.dest, a.option_strings[0], a.nargs != 0) for a in p._actions]


def _arg(value):
    return repr(value) if isinstance(value, float) else str(value)   # repr: floats round-trip exactly


def plan(args, run_mod):
    """The runs of the grid, in order, with their settings checked. Raises UsageError."""
    preset = PRESETS.get(args.preset, {})
    datasets = args.datasets or preset.get("datasets") or [DEFAULTS["dataset"]]
    methods = args.methods or preset.get("methods") or [DEFAULTS["method"]]
    sparsities = args.sparsities or preset.get("sparsities") or [DEFAULT_SPARSITY]
    seeds = args.seeds or preset.get("seeds") or [DEFAULTS["seed"]]
    for flag, values in (("--datasets", datasets), ("--methods", methods), ("--seeds", seeds),
                         ("--sparsities", [f"{s:g}" for s in sparsities])):
        repeated = sorted({str(v) for v in values if list(map(str, values)).count(str(v)) > 1})
        if repeated:
            raise UsageError(f"{flag}: {' '.join(repeated)} given more than once")
    flags = [(dest, flag, takes) for dest, flag, takes in training_flags(run_mod)
             if getattr(args, dest) is not None]
    location = [(d, f, t) for d, f, t in flags if d in ("data_dir", "download", "device")]

    def argv(items):
        out = []
        for dest, flag, takes in items:
            out += [flag, _arg(getattr(args, dest))] if takes else [flag]
        return out

    runs = []
    for d in datasets:
        for m in methods:
            for s in ([0.0] if m == "dense" else sparsities):
                for seed in seeds:
                    opt = args.optimizer or config.PRESETS[d]["optimizer"]
                    mine = [f for f in flags if applies(m, f[0], opt)]   # run.py refuses the others
                    given = {dest: getattr(args, dest) for dest, _, _ in mine}
                    given.update(dataset=d, method=m, seed=seed, **({} if m == "dense" else {"sparsity": s}))
                    try:
                        cfg = make_config(**given)
                    except ConfigError as e:
                        raise UsageError(str(e))
                    cell = cell_name(d, m, s, cfg["distribution"], cfg["dense_first_layer"])
                    run_dir = os.path.join(os.path.abspath(args.out), cell, f"seed-{seed}")
                    start = ["--dataset", d, "--method", m] + ([] if m == "dense" else ["--sparsity", _arg(s)])
                    start += ["--seed", str(seed)] + argv(mine) + ["--out", run_dir]
                    runs.append(Run(d, m, s, seed, run_dir, start, ["--resume", run_dir] + argv(location), cfg,
                                    os.getcwd()))
    for r in runs:
        check_existing(r)
    return runs


def check_existing(r):
    """A run directory already there must hold this run (same settings); raises UsageError."""
    path = os.path.join(r.dir, "config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable ({e}); move that run directory away")
    saved = complete(saved)   # a config.json of an older version lacks some settings
    for k in EXPERIMENT_KEYS:
        if saved.get(k) != r.cfg[k]:
            raise UsageError(f"{r.dir} holds a run with {k.replace('_', ' ')} {saved.get(k)!r}, the sweep asks "
                             f"for {r.cfg[k]!r}: give another OUT")


def check_data(runs, args, run_mod):
    """Every dataset of an unfinished run loads (downloaded first with --download), once per dataset."""
    from data import DatasetError
    seen = set()
    for r in runs:
        if r.dataset in seen or r.finished():
            continue
        seen.add(r.dataset)
        try:
            run_mod.load_data(r.cfg, args.data_dir is not None)
        except DatasetError as e:
            raise UsageError(str(e))


def cores():
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_run(workers, cpus_per_run=None):
    """CPU threads for each of ``workers`` runs at a time: the cores shared out, at least one."""
    return cpus_per_run or max(1, cores() // workers)


def visible_gpus():
    """The GPU ids a run may be given: ``CUDA_VISIBLE_DEVICES`` if set, else those nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


# -- one run ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    """How a run ended: ``done`` (finished now or before), ``failed``, ``held`` (by another
    process), ``stopped`` (the sweep was interrupted)."""
    status: str
    run: Run
    test_acc: float = None
    seconds: float = None
    detail: str = ""
    trained: bool = False   # whether this sweep trained it (else: finished before or by another process)


def run_env(threads, gpu=None):
    """The environment of a run: the package importable, its thread budget, its GPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = str(threads)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def _result(r):
    with open(os.path.join(r.dir, "result.json")) as f:
        return json.load(f)


def run_one(r, env, lock_wait=None, stop=None, started=None):
    """Train run ``r`` to its end as a run.py process (start, or resume if its directory holds
    one), its output appended to ``r.log``. Returns an Outcome; raises nothing for a failed run.

    A directory held by another process is waited for up to ``lock_wait`` seconds (default
    LOCK_WAIT: a lost holder's lock goes stale, a stopping one lets go); if it is still held
    then, it is left to its holder: ``held``. ``stop``: a threading.Event; once set, nothing new
    starts. ``started(proc)``: called with each run.py process.
    """
    def done(trained):
        res = _result(r)
        return Outcome("done", r, res["test_acc"], res["seconds"], trained=trained)

    stopped = stop.is_set if stop is not None else lambda: False
    wait = LOCK_WAIT if lock_wait is None else lock_wait
    deadline = time.monotonic() + wait
    while True:
        if r.finished():
            return done(False)
        if stopped():
            return Outcome("stopped", r)
        holder = runlock.holder(r.dir)
        if holder is not None:
            if time.monotonic() >= deadline:
                return Outcome("held", r, detail=f"being trained by {runlock.describe(holder)}; left to it")
            time.sleep(0.5)
            continue
        os.makedirs(r.dir, exist_ok=True)
        args = r.resume_args if os.path.exists(os.path.join(r.dir, "config.json")) else r.start_args
        cmd = [sys.executable, "-m", "cht.sweep.child", str(os.getpid()), RUN_PY] + args
        with open(r.log, "a") as log:
            log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {socket.gethostname()}: "
                      f"python run.py {' '.join(args)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=r.cwd)
            if started is not None:
                started(proc)
            code = proc.wait()
        if code == 0:
            return done(True)
        if code == 2 and runlock.holder(r.dir) is not None:   # taken between our look and run.py's
            deadline = time.monotonic() + wait
            continue
        if r.finished():                                        # finished by another meanwhile
            return done(False)
        if stopped():
            return Outcome("stopped", r)
        return Outcome("failed", r, detail=f"exit status {code}; log: {r.log}")


# -- progress --------------------------------------------------------------------------------
class Progress:
    """A line per ended run and an overall line (done / running / left, ETA) on ``out``.

    The ETA comes from epochs: those still to train over the rate at which this sweep has
    trained them so far (runs of other lengths and resumed runs weigh what they cost).
    """

    def __init__(self, runs, out=None):
        self.runs, self.out = runs, out or sys.stderr
        self.t0 = time.monotonic()
        self.epochs0 = self.epochs_done()
        self.last = self.t0

    def epochs_done(self):
        n = 0
        for r in self.runs:
            try:
                with open(os.path.join(r.dir, "metrics.csv")) as f:
                    n += min(r.cfg["epochs"], max(0, sum(1 for line in f if line.strip()) - 1))
            except OSError:
                pass
        return n

    def line(self, text):
        self.out.write(text + "\n")
        self.out.flush()

    def ended(self, o):
        r = o.run
        if o.status == "done":
            by = "" if o.trained else " (trained by another process)"
            self.line(f"done    {r.label}: test accuracy {o.test_acc:.2f} % in {hms(o.seconds)}{by}")
        elif o.status == "failed":
            self.line(f"FAILED  {r.label}: {o.detail}")
        elif o.status == "held":
            self.line(f"held    {r.label}: {o.detail}")
        self.overall()

    def overall(self):
        done = sum(r.finished() for r in self.runs)
        running = sum(1 for r in self.runs if not r.finished() and runlock.holder(r.dir) is not None)
        left = len(self.runs) - done - running
        total = sum(r.cfg["epochs"] for r in self.runs)
        now, trained = time.monotonic(), self.epochs_done()
        rate = (trained - self.epochs0) / max(now - self.t0, 1e-9)      # epochs per second so far
        eta = "0:00:00" if done == len(self.runs) else hms((total - trained) / rate) if rate > 0 else "--"
        self.last = now
        self.line(f"sweep: {done}/{len(self.runs)} runs done, {running} running, {left} left; "
                  f"epochs {trained}/{total}; ETA {eta}")

    def tick(self):
        """An overall line when none was printed for PROGRESS_EVERY seconds."""
        if time.monotonic() - self.last >= PROGRESS_EVERY:
            self.overall()


# -- the local engine ------------------------------------------------------------------------
def run_local(runs, workers, threads, gpus, progress):
    """Train ``runs`` with ``workers`` at a time on this machine. Returns the outcomes.

    Each worker is a thread that starts run.py processes one after another; with ``gpus`` (a
    list of ids, one per worker) each process sees only its worker's GPU. Ctrl-C or SIGTERM
    stops every run at once (each keeps its last checkpoint) and raises KeyboardInterrupt.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
    import queue
    slots = queue.Queue()
    for w in range(workers):
        slots.put(run_env(threads, gpus[w] if gpus else None))
    stop, procs = threading.Event(), set()

    def started(p):
        procs.add(p)
        if stop.is_set():                     # started while the sweep was being stopped
            p.terminate()

    def job(r):
        env = slots.get()
        try:
            return run_one(r, env, stop=stop, started=started)
        finally:
            slots.put(env)

    outcomes = []
    pool = ThreadPoolExecutor(workers, thread_name_prefix="sweep")
    try:
        pending = {pool.submit(job, r) for r in runs}
        while pending:
            finished, pending = wait(pending, timeout=5.0, return_when=FIRST_COMPLETED)
            for f in finished:
                outcomes.append(f.result())
                progress.ended(outcomes[-1])
            progress.tick()
    except KeyboardInterrupt:
        stop.set()
        for p in list(procs):
            if p.poll() is None:
                p.terminate()                 # SIGTERM: the run stops at once, lock released
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return outcomes


# -- the command -----------------------------------------------------------------------------
def parse(argv, run_mod):
    """The command line, checked. Raises UsageError."""
    try:
        args = build_parser(run_mod).parse_args(argv)
        run_mod.check_writable(args.out, "OUT")
    except run_mod.UsageError as e:
        raise UsageError(str(e))
    for flag, n in (("--workers", args.workers), ("--cpus-per-run", args.cpus_per_run)):
        if n is not None and n < 1:
            raise UsageError(f"{flag}: must be a whole number >= 1, got {n}")
    if args.engine == "local" and args.address is not None:
        raise UsageError("--address applies to --engine ray")
    if args.engine == "ray" and args.workers is not None:
        raise UsageError("--workers applies to --engine local (Ray runs as many as the cluster's resources allow)")
    return args


def local_placement(args):
    """``(workers, threads per run, GPU ids or None)`` of the local engine. Raises UsageError."""
    if args.device != "gpu":
        workers = args.workers or 1
        return workers, threads_per_run(workers, args.cpus_per_run), None
    from minicnn import backend
    gpus = visible_gpus()
    if not gpus or not backend.gpu_available():
        raise UsageError("--device gpu needs CuPy and a visible CUDA GPU; none was found")
    if args.workers is not None and args.workers > len(gpus):
        raise UsageError(f"--workers {args.workers}: one run per GPU, and {len(gpus)} are visible")
    workers = args.workers or len(gpus)
    return workers, threads_per_run(workers, args.cpus_per_run), gpus[:workers]


def main(argv=None, out=None):
    """The command (module docstring); progress lines go to ``out`` (default stderr), the table
    to stdout. Returns the exit status; raises UsageError before anything is written."""
    run_mod = load_run_module()
    args = parse(argv, run_mod)
    runs = plan(args, run_mod)
    if args.engine == "local":
        workers, threads, gpus = local_placement(args)
    check_data(runs, args, run_mod)
    engine = None
    if args.engine == "ray":
        from cht.sweep import ray_engine
        engine = ray_engine.connect(args.address, args.device == "gpu", args.cpus_per_run or 1)
        where = engine.describe()
    else:
        where = f"{workers} at a time, {threads} CPU thread{'s' * (threads > 1)} each" + \
                (f", GPUs {','.join(gpus)}" if gpus else "")

    todo = [r for r in runs if not r.finished()]
    resume = sum(os.path.exists(os.path.join(r.dir, "config.json")) for r in todo)
    os.makedirs(args.out, exist_ok=True)
    progress = Progress(runs, out or sys.stderr)
    progress.line(f"sweep {args.out}: {len(runs)} runs; {len(runs) - len(todo)} finished, {resume} to resume, "
                  f"{len(todo) - resume} to start; {args.engine}: {where}")
    try:
        outcomes = run_local(todo, workers, threads, gpus, progress) if engine is None else engine.run(todo, progress)
    except KeyboardInterrupt:
        progress.line("sweep: interrupted; every run keeps its last checkpoint: the same command continues")
        return 130
    finally:
        if engine is not None:
            engine.close()

    command = " ".join(["python -m cht.sweep"] + list(sys.argv[1:] if argv is None else argv))
    md, paths, n = report.write(args.out, command=command)
    if n:
        print(md, end="")
        progress.line(f"sweep: table of {n} runs in {', '.join(paths)}")
    failed = [o for o in outcomes if o.status == "failed"]
    held = [r for r in runs if not r.finished() and r not in [o.run for o in failed]]
    if failed:
        progress.line(f"sweep: {len(failed)} failed: " + "; ".join(f"{o.run.label} (log {o.run.log})" for o in failed))
    if held:
        progress.line(f"sweep: {len(held)} held by other processes: the same command again continues them "
                      f"once they let go")
    return 1 if failed or held else 0


def entry(argv=None):
    """``main`` with usage mistakes turned into one line and exit status 2."""
    try:
        return main(argv)
    except UsageError as e:
        print(f"cht.sweep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:          # before any run started (checking the data, starting Ray)
        print("\ncht.sweep: interrupted", file=sys.stderr)
        return 130
