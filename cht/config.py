"""Experiment settings: the per-dataset presets of docs/algorithm.md section 6 and their checks.

A config is a plain dict (saved as ``config.json`` in the run directory). ``make_config``
fills every setting the user did not give from the dataset's preset and the defaults, and
checks every value, raising ``ConfigError`` with a one-line message for a bad one.
"""
import math

from cht.density import DISTRIBUTIONS

DATASETS = ("cifar10", "cifar100", "fashion-mnist", "mnist")
METHODS = ("dense", "static", "set", "ch2", "ch3", "rigl")
OPTIMIZERS = ("sgd", "adam")
SCHEDULERS = ("linear-linear", "linear-cos", "constant")
DEVICES = ("cpu", "gpu")

# docs/algorithm.md section 6 (the paper's Table 2). Fashion-MNIST and MNIST use the CIFAR-10 recipe.
_CIFAR10 = dict(optimizer="adam", lr=0.01, momentum=0.9, weight_decay=0.0, batch_size=128,
                epochs=100, scheduler="linear-linear")
PRESETS = {
    "cifar10": _CIFAR10,
    "cifar100": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=128,
                     epochs=240, scheduler="linear-cos"),
    "fashion-mnist": _CIFAR10,
    "mnist": _CIFAR10,
}

# Settings shared by every dataset (docs/algorithm.md sections 5 and 6).
DEFAULTS = dict(dataset="cifar10", method="ch3", sparsity=None, warmup_epochs=5, update_interval=1,
                zeta=0.3, evolve_until=0.75, early_stop=None, distribution="uniform", dense_first_layer=False,
                width=1.0, seed=14, limit_train=None, limit_test=None, data_dir="datasets", download=False,
                device="cpu")

DEFAULT_SPARSITY = 0.5  # for the sparse methods; dense always trains at sparsity 0

# Settings that define the experiment (a --resume must not change them). The rest (where the
# data lives, the device, whether to download) may differ between the two halves of a run.
EXPERIMENT_KEYS = ("dataset", "method", "sparsity", "epochs", "batch_size", "optimizer", "lr",
                   "momentum", "weight_decay", "scheduler", "warmup_epochs", "update_interval",
                   "zeta", "evolve_until", "early_stop", "distribution", "dense_first_layer", "width", "seed",
                   "limit_train", "limit_test")

# Experiment settings that config.json files written before they existed lack, with the value
# such a run had. ``complete`` fills them in wherever a config.json is read back (--resume, the
# sweep, the report), so older run directories still resume and report.
LATER_KEYS = {"early_stop": None, "distribution": "uniform", "dense_first_layer": False}
# What config.json holds beside the settings: values computed from them (the achieved densities
# of docs/algorithm.md section 8), written for the reader, never read back as a setting.
DERIVED_KEYS = ("densities",)


# The flags (config keys) that only some methods use, and the methods that use each: method ->
# the method-dependent flags that apply to it. Every other flag applies to every method. A flag
# given to a method outside its row is a mistake (``check_applies``); the sweep passes each run
# only the flags of its row. Dense trains every weight (no masks: sparsity 0, no distribution);
# static keeps its first masks (no evolution).
MASK_FLAGS = ("sparsity", "distribution", "dense_first_layer")
EVOLUTION_FLAGS = ("update_interval", "zeta", "evolve_until", "early_stop")
METHOD_FLAGS = {
    "dense": (),
    "static": MASK_FLAGS,
    "set": MASK_FLAGS + EVOLUTION_FLAGS,
    "ch2": MASK_FLAGS + EVOLUTION_FLAGS,
    "ch3": MASK_FLAGS + EVOLUTION_FLAGS,
    "rigl": MASK_FLAGS + EVOLUTION_FLAGS,
}
METHOD_DEPENDENT = tuple(sorted({k for keys in METHOD_FLAGS.values() for k in keys}))
# The same for the optimizer: Adam has no momentum flag (its betas are fixed).
OPTIMIZER_FLAGS = {"sgd": ("momentum",), "adam": ()}
OPTIMIZER_DEPENDENT = tuple(sorted({k for keys in OPTIMIZER_FLAGS.values() for k in keys}))

# BatchNorm needs two values per channel in training (a batch of one has no variance). The
# loader drops a lone last example, so a batch of one comes only from a batch size or a
# training set of one.
MIN_BATCH = 2


class ConfigError(ValueError):
    """A bad setting; the message is one line naming the flag."""


def make_config(**given):
    """The full config from the settings given (None = not given). Raises ConfigError."""
    cfg = dict(DEFAULTS)
    cfg.update({k: v for k, v in given.items() if v is not None})
    if cfg["dataset"] not in PRESETS:
        raise ConfigError(f"--dataset: unknown dataset {cfg['dataset']!r}; choose from {', '.join(DATASETS)}")
    for key, value in PRESETS[cfg["dataset"]].items():
        if given.get(key) is None:
            cfg[key] = value
    if cfg["sparsity"] is None:
        cfg["sparsity"] = DEFAULT_SPARSITY
    check(cfg)
    if cfg["method"] == "dense":
        cfg["sparsity"] = 0.0  # dense trains every weight (check() refused a --sparsity given with it)
    return cfg


def complete(saved):
    """The settings of a config read back from a config.json: the ``LATER_KEYS`` it lacks at
    their values, without the ``DERIVED_KEYS``."""
    return {**LATER_KEYS, **{k: v for k, v in saved.items() if k not in DERIVED_KEYS}}


def layout_suffix(distribution="uniform", dense_first_layer=False):
    """The run-folder suffix of a layer-wise distribution other than the default (section 8):
    "" (uniform), "-erk", "-dense-first", "-erk-dense-first"."""
    return ("" if distribution == "uniform" else f"-{distribution}") + ("-dense-first" if dense_first_layer else "")


def applies(method, key, optimizer=None):
    """Whether the flag (config key) ``key`` means something for ``method`` (``METHOD_FLAGS``)
    and ``optimizer`` (``OPTIMIZER_FLAGS``); None for either leaves it out of the question."""
    for_method = method is None or key not in METHOD_DEPENDENT or key in METHOD_FLAGS[method]
    for_optimizer = optimizer is None or key not in OPTIMIZER_DEPENDENT or key in OPTIMIZER_FLAGS[optimizer]
    return for_method and for_optimizer


def check_applies(cfg, given):
    """Raise ConfigError for the first flag in ``given`` ({config key: value}, the flags the user
    gave) that does not apply to the method and optimizer of ``cfg`` (the full config). Dense
    with ``--sparsity 0`` says only what dense is."""
    method, optimizer = cfg["method"], cfg["optimizer"]
    for key, value in given.items():
        if applies(method, key, optimizer) or (method == "dense" and key == "sparsity" and value == 0):
            continue
        flag = f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}")
        if not applies(method, key, None):
            why = {"dense": "dense has no masks", "static": "static masks never evolve"}.get(method, "")
            raise ConfigError(f"{flag} does not apply to --method {method}" + (f" ({why})" if why else ""))
        raise ConfigError(f"{flag} does not apply to --optimizer {optimizer} (only "
                          f"{', '.join(o for o in OPTIMIZER_FLAGS if key in OPTIMIZER_FLAGS[o])} uses it)")


def check_train_size(cfg, n_train):
    """Raise ConfigError unless every training batch of ``n_train`` examples has two or more."""
    if n_train < MIN_BATCH:
        raise ConfigError(f"--dataset {cfg['dataset']}: {n_train} training example(s) after --limit-train; "
                          f"BatchNorm needs at least {MIN_BATCH} per batch in training")


def check(cfg):
    """Raise ConfigError for the first bad value of ``cfg``."""
    def need(ok, flag, what):
        if not ok:
            raise ConfigError(f"--{flag.replace('_', '-')}: {what}, got {cfg[flag]!r}")

    def finite(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    need(cfg["dataset"] in DATASETS, "dataset", f"choose from {', '.join(DATASETS)}")
    need(cfg["method"] in METHODS, "method", f"choose from {', '.join(METHODS)}")
    need(cfg["optimizer"] in OPTIMIZERS, "optimizer", f"choose from {', '.join(OPTIMIZERS)}")
    need(cfg["scheduler"] in SCHEDULERS, "scheduler", f"choose from {', '.join(SCHEDULERS)}")
    need(cfg["device"] in DEVICES, "device", "choose from cpu, gpu")
    need(finite(cfg["sparsity"]) and 0.0 <= cfg["sparsity"] < 1.0, "sparsity", "must lie in [0, 1)")
    need(finite(cfg["lr"]) and cfg["lr"] > 0, "lr", "must be a positive number")
    need(finite(cfg["momentum"]) and 0.0 <= cfg["momentum"] < 1.0, "momentum", "must lie in [0, 1)")
    need(finite(cfg["weight_decay"]) and cfg["weight_decay"] >= 0, "weight_decay", "must be >= 0")
    need(finite(cfg["zeta"]) and 0.0 < cfg["zeta"] <= 1.0, "zeta", "must lie in (0, 1]")
    need(finite(cfg["evolve_until"]) and 0.0 < cfg["evolve_until"] <= 1.0, "evolve_until", "must lie in (0, 1]")
    need(cfg["early_stop"] is None or (finite(cfg["early_stop"]) and 0.0 < cfg["early_stop"] <= 1.0),
         "early_stop", "must lie in (0, 1]")
    need(cfg["distribution"] in DISTRIBUTIONS, "distribution", f"choose from {', '.join(DISTRIBUTIONS)}")
    need(isinstance(cfg["dense_first_layer"], bool), "dense_first_layer", "must be true or false")
    need(finite(cfg["width"]) and 0.0 < cfg["width"] <= 8.0, "width", "must lie in (0, 8]")
    for key in ("epochs", "update_interval"):
        need(_whole(cfg[key]) and cfg[key] >= 1, key, "must be a whole number >= 1")
    bn = f"must be a whole number >= {MIN_BATCH} (BatchNorm needs {MIN_BATCH} values per channel in training)"
    need(_whole(cfg["batch_size"]) and cfg["batch_size"] >= MIN_BATCH, "batch_size", bn)
    need(_whole(cfg["warmup_epochs"]) and cfg["warmup_epochs"] >= 0, "warmup_epochs",
         "must be a whole number >= 0")
    need(_whole(cfg["seed"]) and 0 <= cfg["seed"] < 2**32, "seed", "must be a whole number in [0, 2^32)")
    need(cfg["limit_train"] is None or (_whole(cfg["limit_train"]) and cfg["limit_train"] >= MIN_BATCH),
         "limit_train", bn)
    need(cfg["limit_test"] is None or (_whole(cfg["limit_test"]) and cfg["limit_test"] >= 1), "limit_test",
         "must be a whole number >= 1")
    need(isinstance(cfg["data_dir"], str) and cfg["data_dir"] != "", "data_dir", "must name a folder")
    need(isinstance(cfg["download"], bool), "download", "must be true or false")


def _whole(v):
    return isinstance(v, int) and not isinstance(v, bool)
