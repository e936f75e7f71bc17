#!/usr/bin/env python
"""Train and evaluate VGG16, dense or with a sparse conv method, as in the CHT-Conv paper.

    python run.py --dataset cifar10 --method ch3 --sparsity 0.5
    python run.py --dataset cifar100 --method set --sparsity 0.7 --seeds 14 15 16
    python run.py --resume runs/cifar10-ch3-s0.5-w1/seed-14

Every flag has a default (the dataset's preset, docs/algorithm.md section 6). A user mistake exits
with status 2 and one line on stderr, writing nothing. The run directory receives config.json,
metrics.csv, evolution.jsonl, checkpoint.npz (every epoch, atomically) and result.json
(cht/rundir.py); a failed write (a full disk) stops the run with one line and exit status 1,
the last good checkpoint intact, and SIGTERM stops it as Ctrl-C does.
"""
import argparse
import contextlib
import json
import os
import signal
import sys

from cht.config import (DATASETS, DEVICES, EXPERIMENT_KEYS, METHODS, OPTIMIZERS, SCHEDULERS,
                        ConfigError, applies, check_applies, check_train_size, complete, layout_suffix,
                        make_config)
from cht.density import DISTRIBUTIONS

USAGE_ERROR = 2


class UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UsageError(message)


def build_parser():
    p = Parser(description="Train VGG16 (dense, static, SET, CHT-Conv CH2/CH3, RigL) on CIFAR-10/100 "
                           "or (Fashion-)MNIST. Defaults follow the dataset's preset "
                           "(CIFAR-10, MNIST, Fashion-MNIST: Adam 0.01, Linear-Linear, 100 epochs; "
                           "CIFAR-100: SGD 0.1 momentum 0.9 wd 5e-4, Linear-Cos, 240 epochs).")
    a = p.add_argument
    a("--dataset", choices=DATASETS, default=None, help="dataset (default: cifar10)")
    a("--method", choices=METHODS, default=None, help="regrowth method; dense has no masks (default: ch3)")
    a("--sparsity", type=float, default=None,
      help="fraction of zero conv weights, in [0, 1) (default: 0.5)" + only("sparsity"))
    add_training_flags(p)
    a("--seed", type=int, default=None, help="random seed (default: 14)")
    a("--seeds", type=int, nargs="+", default=None,
      help="run several seeds one after another and print mean ± standard error")
    a("--out", default=None,
      help="run directory (several seeds: one subfolder seed-N each) (default: runs/<dataset>-<method>-s<S>-w<width>)")
    a("--resume", metavar="DIR", default=None,
      help="continue an interrupted run from its checkpoint (or, before its first checkpoint, start it from "
           "its config.json); other flags must match its config.json")
    return p


def add_training_flags(p):
    """The flags that set how one run trains, on any parser (``python -m cht.sweep`` passes them
    through to every run): all but the dataset, method, sparsity, seeds and run directory."""
    a = p.add_argument
    a("--epochs", type=int, default=None, help="epochs (default: preset)")
    a("--batch-size", type=int, default=None, help="batch size, at least 2 for BatchNorm (default: 128)")
    a("--optimizer", choices=OPTIMIZERS, default=None, help="optimizer (default: preset)")
    a("--lr", type=float, default=None, help="peak learning rate (default: preset)")
    a("--momentum", type=float, default=None, help="SGD momentum (default: 0.9)" + only("momentum"))
    a("--weight-decay", type=float, default=None, help="L2 weight decay (default: preset)")
    a("--scheduler", choices=SCHEDULERS, default=None, help="learning-rate schedule (default: preset)")
    a("--warmup-epochs", type=int, default=None, help="linear warm-up epochs from 0.1 x lr (default: 5)")
    a("--update-interval", type=int, default=None, help="evolve every N epochs (default: 1)" + only("update_interval"))
    a("--zeta", type=float, default=None, help="removal fraction, cosine-decayed (default: 0.3)" + only("zeta"))
    a("--evolve-until", type=float, default=None,
      help="no evolution at or after this fraction of the epochs (default: 0.75)" + only("evolve_until"))
    a("--early-stop", type=float, default=None, metavar="T",
      help="no more evolution after the first step at which every sparse layer's overlap is >= T (default: off)"
           + only("early_stop"))
    a("--distribution", choices=DISTRIBUTIONS, default=None,
      help="how the sparsity is shared among the conv layers: uniform (every layer at S, the paper's) or erk "
           "(Erdős–Rényi-Kernel: small layers denser) (default: uniform)" + only("distribution"))
    a("--dense-first-layer", action="store_true", default=None,
      help="keep the first conv layer dense, outside the sparsity budget" + only("dense_first_layer"))
    a("--width", type=float, default=None, help="VGG16 channel multiplier; 0.25 for quick CPU runs (default: 1.0)")
    a("--limit-train", type=int, default=None, help="use only the first N (at least 2) training examples")
    a("--limit-test", type=int, default=None, help="use only the first N test examples")
    a("--data-dir", default=None, help="where datasets live (default: ./datasets)")
    a("--download", action="store_true", default=None, help="download missing dataset files")
    a("--device", choices=DEVICES, default=None, help="cpu (NumPy) or gpu (CuPy) (default: cpu)")


def only(key):
    """The help text's note on the methods and optimizers a flag does not apply to."""
    not_for = [m for m in METHODS if not applies(m, key)] + [o for o in OPTIMIZERS if not applies(None, key, o)]
    return f"; not with {', '.join(not_for)}" if not_for else ""


def given_settings(args):
    """The settings the user gave on the command line, under config keys."""
    keys = set(EXPERIMENT_KEYS) | {"data_dir", "download", "device"}
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def check_writable(path, name="--out"):
    """Raise UsageError unless ``path`` can be created (or is a writable folder), writing nothing."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{name} {path}: cannot write there ({probe} is not a writable folder)")
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        raise UsageError(f"{name} {path}: already holds a run; continue it with --resume {path} "
                         f"or choose another {name}")


def load_data(cfg, data_dir_given):
    """The run's data (``cht.trainer.load_data``); the system's copy is searched for only when
    neither ``--data-dir`` nor ``--download`` was given. Raises DatasetError."""
    from cht.trainer import load_data as load

    return load(cfg, search=not data_dir_given and not cfg["download"])


def default_out(cfg):
    layout = "" if cfg["method"] == "dense" else layout_suffix(cfg["distribution"], cfg["dense_first_layer"])
    return os.path.join("runs", f"{cfg['dataset']}-{cfg['method']}-s{cfg['sparsity']:g}{layout}-w{cfg['width']:g}")


def start_run(cfg, out, dataset):
    """A new run: create the directory, write the config, train. Returns the result dict."""
    from cht import rundir
    from cht.trainer import Trainer, TrainingError

    check_writable(out)
    try:
        made = rundir.make_dirs(out)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create it ({e.strerror or e})")
    started = False
    try:
        with hold(out):
            check_writable(out)          # again: another process may have started it meanwhile
            trainer = Trainer(cfg, dataset, out)
            try:
                trainer.write_config()
            except rundir.WriteError as e:
                raise TrainingError(f"{e}; nothing of this run was kept: free space, then start it again") from None
            started = True
            print(f"run {out}: {cfg['dataset']} {cfg['method']} sparsity {cfg['sparsity']:g} seed {cfg['seed']}",
                  file=sys.stderr)
            with in_run(out):
                return trainer.fit()
    finally:
        if not started:
            rundir.remove_dirs(made)  # write_config removed its files and hold its lock: nothing is left


@contextlib.contextmanager
def hold(out):
    """Hold the lock of run directory ``out`` (cht/runlock.py); a UsageError naming its holder if taken."""
    from cht.runlock import LockHeld, RunLock
    try:
        lock = RunLock(out).acquire()
    except LockHeld as e:
        raise UsageError(f"{e}; wait for it to finish, or stop it")
    try:
        yield lock
    finally:
        lock.release()


def resume_run(args):
    """Continue the run in ``args.resume`` from its checkpoint. Returns the result dict."""
    from cht import rundir
    from cht.trainer import Trainer

    out = args.resume
    if not os.path.isdir(out):
        raise UsageError(f"--resume {out}: not a folder (a run directory holds config.json, checkpoint.npz, ...)")
    if args.seeds is not None:
        raise UsageError("--resume continues one run; --seeds cannot be combined with it")
    if args.out is not None:
        raise UsageError(f"--resume {out} continues the run in {out}; --out cannot be combined with it")
    files = rundir.RunDir(out)
    try:
        saved = complete(files.read_config())   # a config.json of an older version lacks some settings
    except rundir.CorruptFile as e:
        raise UsageError(f"--resume {out}: {e}")
    missing = [k for k in EXPERIMENT_KEYS if k not in saved]
    try:
        if missing:
            raise ConfigError(f"lacks {missing[0]!r}")
        make_config(**saved)
    except (ConfigError, TypeError) as e:
        raise UsageError(f"--resume {out}: {files.path(rundir.CONFIG)}: not a run's config ({e})")
    given = given_settings(args)
    try:
        check_applies(saved, given)
        wanted = make_config(**{**saved, **given})
    except ConfigError as e:
        raise UsageError(str(e))
    differ = [k for k in EXPERIMENT_KEYS if k in given and wanted[k] != saved.get(k)]
    if differ:
        k = differ[0]
        raise UsageError(f"--resume {out}: --{k.replace('_', '-')} {given[k]} differs from the run's "
                         f"{saved.get(k)!r} (a resumed run keeps its configuration)")
    cfg = {**saved, **{k: wanted[k] for k in ("data_dir", "download", "device")}}
    prepare_device(cfg)
    with hold(out):
        dataset = load_data(cfg, "data_dir" in given)
        trainer = Trainer(cfg, dataset, out)
        with in_run(out):
            if not os.path.exists(files.path(rundir.CHECKPOINT)):
                # stopped before its first epoch ended: the run starts again from its settings, as new
                print(f"starting {out} from its config.json (no checkpoint yet)", file=sys.stderr)
                trainer.write_config()
                return trainer.fit()
            try:
                trainer.load_checkpoint()
            except rundir.CorruptFile as e:
                raise UsageError(f"--resume {out}: {e}")
            if trainer.epoch >= cfg["epochs"]:
                print(f"run {out} is already complete ({trainer.epoch} epochs)", file=sys.stderr)
                return trainer.write_result()
            print(f"resuming {out} after epoch {trainer.epoch}", file=sys.stderr)
            return trainer.fit()


@contextlib.contextmanager
def in_run(out):
    """Training in the run directory ``out``: a failed write becomes one line that says how to
    go on; an interruption learns where the run lives (for ``entry``'s message)."""
    from cht.rundir import CHECKPOINT, WriteError
    from cht.trainer import TrainingError

    try:
        yield
    except WriteError as e:
        kept = ("the last good checkpoint is intact" if os.path.exists(os.path.join(out, CHECKPOINT))
                else "no checkpoint yet")
        raise TrainingError(f"{e} ({kept}); free space, then continue with: python run.py --resume {out}") from None
    except KeyboardInterrupt as e:
        e.run_dir = out
        raise


def prepare_device(cfg):
    from minicnn import backend
    try:
        backend.use(cfg["device"])
    except RuntimeError as e:
        raise UsageError(str(e))


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.resume is not None:
        result = resume_run(args)
        print(json.dumps(result))
        return 0
    if args.seed is not None and args.seeds is not None:
        raise UsageError("give --seed or --seeds, not both")
    seeds = args.seeds or [args.seed]
    repeated = [s for i, s in enumerate(seeds) if s in seeds[:i]]
    if repeated:
        raise UsageError(f"--seeds: {repeated[0]} is given twice")
    given = given_settings(args)
    try:
        cfgs = [make_config(**{**given, "seed": s}) for s in seeds]
        check_applies(cfgs[0], given)
    except ConfigError as e:
        raise UsageError(str(e))
    prepare_device(cfgs[0])
    base = args.out or default_out(cfgs[0])
    outs = [base] if args.out and len(seeds) == 1 else [os.path.join(base, f"seed-{c['seed']}") for c in cfgs]
    for out in outs:
        check_writable(out)
    dataset = load_data(cfgs[0], args.data_dir is not None)
    try:
        check_train_size(cfgs[0], len(dataset[0]))
    except ConfigError as e:
        raise UsageError(str(e))
    accs = []
    for cfg, out in zip(cfgs, outs):
        result = start_run(cfg, out, dataset)
        accs.append(result["test_acc"])
        print(json.dumps({"out": out, **result}))
    if len(accs) > 1:
        from cht.report import mean_se
        m, se = mean_se(accs)
        print(f"test accuracy over seeds {' '.join(map(str, seeds))}: {m:.2f} ± {se:.2f} %")
    return 0


def entry(argv=None):
    """``main`` with user mistakes turned into one line and exit status 2, a stopped run into one
    line and status 1, Ctrl-C and SIGTERM into one line and 130 / 143."""
    from data import DatasetError
    from cht.runlock import Terminated, stop_on_sigterm
    from cht.trainer import TrainingError

    term = stop_on_sigterm()    # SIGTERM stops a run as Ctrl-C does: lock released, checkpoint intact
    try:
        return main(argv)
    except (UsageError, DatasetError) as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except TrainingError as e:
        print(f"{_fresh_line()}run.py: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        what, code = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        print(f"{_fresh_line()}run.py: {what}; continue with: python run.py --resume "
              f"{getattr(e, 'run_dir', '<run directory>')} (its checkpoint.npz holds the last finished "
              f"epoch)", file=sys.stderr)
        return code
    finally:
        if term is not None:
            signal.signal(signal.SIGTERM, term)


def _fresh_line():
    """A newline that ends an in-place progress line on a terminal (nothing in a log file)."""
    return "\n" if sys.stderr.isatty() else ""


if __name__ == "__main__":
    sys.exit(entry())
