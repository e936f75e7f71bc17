"""The training loop of the paper's experiments: VGG16, dense or sparse, with evolution.

One epoch, in the order the code runs it (``Trainer.fit``):

    for each batch:   Trainer.train_step:
                      logits = model.forward(x)            # minicnn/models.py -> layers/conv.py GEMM
                      loss = CE(logits, y); model.backward(CE.backward())
                      masks.apply_to_grads()                 # inactive entries get no update
                      optimizer.step()
    test accuracy     (eval mode: BatchNorm uses its running statistics)
    evolution         cht.evolution.evolve: remove by |w|, score (set/ch2/ch3/rigl), regrow;
                      none after an early stop (docs/algorithm.md section 5.5)
    scheduler.step()  the learning rate of the next epoch
    log + checkpoint  metrics.csv, evolution.jsonl, then checkpoint.npz (Trainer.save_epoch;
                      cht/rundir.py: atomic, fault-safe)

Everything random comes from four NumPy Generators spawned from the seed (initial weights,
initial masks, data order and flips, evolution), and their states are checkpointed, so a run
resumed from ``checkpoint.npz`` ends with the same weights, masks and metrics, bit for bit on
the CPU, as one that was never interrupted.
"""
import math
import os
import sys
import time

import numpy as np

from minicnn import backend, no_grad, optim, schedulers
from minicnn.losses import CrossEntropyLoss
from minicnn.models import vgg16
from data import Loader, channel_stats, num_classes

from minicnn.layers import Conv2d
from cht import density, flops, rundir
from cht.config import EXPERIMENT_KEYS, complete
from cht.evolution import evolve, zeta_schedule
from cht.masks import SparseConvMasks

METRICS_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_acc", "seconds")
# one evolution.jsonl record per layer per step: cht.evolution.evolve's keys (with the topology
# measures of docs/algorithm.md section 7, whether the layer evolved and why not, the scoring's
# multiply-adds of section 9), then whether this step triggered the early stop (5.5)
EVOLUTION_KEYS = ("epoch", "layer", "removed", "regrown", "random_fill", "overlap", "density",
                  "itop", "seconds", "channel_cv", "empty_kernels", "unused_inputs", "evolved", "reason",
                  "score_macs", "early_stop")


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a failed write); the message is one line."""


def zeta_after(cfg, epoch):
    """Removal fraction of the evolution after ``epoch`` completed epochs, None for none
    (docs/algorithm.md section 5)."""
    return zeta_schedule(epoch, cfg["epochs"], cfg["zeta"], cfg["evolve_until"], cfg["update_interval"])


def build_model(cfg, in_channels, num_classes, rng):
    """The paper's VGG16 (docs/algorithm.md section 6) at the config's width, on its device.

    The first conv skips ``dx``: nothing upstream of the image needs it.
    """
    model = vgg16(num_classes=num_classes, in_channels=in_channels, width=cfg["width"], rng=rng)
    model.features[0].needs_input_grad = False
    return model.to(cfg["device"])


def build_optimizer(cfg, params):
    """SGD (momentum, weight decay) or Adam, with the config's hyper-parameters."""
    if cfg["optimizer"] == "sgd":
        return optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    return optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def load_data(cfg, search=True):
    """``(x_train, y_train, x_test, y_test)`` of a run as stored, cut to its limits.

    ``search``: when the config's ``data_dir`` does not hold the dataset, read the system's
    copy (``data.find_root``; Debian's ``dataset-fashion-mnist``, for one). With
    ``cfg["download"]`` missing files are fetched into ``data_dir``. Raises ``data.DatasetError``.
    """
    import data

    root = cfg["data_dir"]
    if search:
        root = data.find_root(cfg["dataset"], root) or root
    download = bool(cfg.get("download"))
    x, y = data.load(cfg["dataset"], root, "train", download=download)
    xt, yt = data.load(cfg["dataset"], root, "test", download=download)
    n, nt = cfg.get("limit_train") or len(x), cfg.get("limit_test") or len(xt)
    return x[:n], y[:n], xt[:nt], yt[:nt]


class Trainer:
    """Trains one seed of one configuration into a run directory.

    Args:
        cfg: a full config (``cht.config.make_config``; one read back from an older config.json
            gets the settings it lacks, ``cht.config.complete``).
        data: ``(x_train, y_train, x_test, y_test)``, uint8 NCHW images and int64 labels as
            ``data.load`` returns them (already cut to ``limit_train`` / ``limit_test``).
        out: the run directory (created by the caller).
        model: the network to train (on the config's device); default ``build_model``: VGG16
            with the dataset's class count (``data.num_classes``), initialised from the seed.
        log: where progress goes (default stderr); ``\\r`` updates only on a terminal.
    """

    def __init__(self, cfg, data, out, model=None, log=None):
        cfg = complete(cfg)
        self.cfg, self.out = cfg, out
        self.files = rundir.RunDir(out)
        self.log = log or sys.stderr
        x_train, y_train, x_test, y_test = data
        init_rng, mask_rng, data_rng, self.evo_rng = [
            np.random.default_rng(s) for s in np.random.SeedSequence(cfg["seed"]).spawn(4)]

        if model is None:
            model = build_model(cfg, x_train.shape[1], num_classes(cfg["dataset"]), init_rng)
        self.model = model
        self.masks = None   # dense: no masks; a sparse method at sparsity 0: masks of no layer
        if cfg["method"] != "dense":
            self.masks = SparseConvMasks(self.model, cfg["sparsity"], mask_rng, cfg["distribution"],
                                         cfg["dense_first_layer"])
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        self.scheduler = schedulers.build(cfg["scheduler"], self.optimizer, cfg["epochs"],
                                          warmup_epochs=cfg["warmup_epochs"])
        self.criterion = CrossEntropyLoss()

        mean, std = channel_stats(x_train)  # normalise with the training set's statistics
        pad = 32 if x_train.shape[-1] < 32 else None  # 28x28 -> 32x32 for VGG16's five pools
        # a last batch of one example has no batch variance (BatchNorm): drop it, as PyTorch users must
        lone = len(x_train) % cfg["batch_size"] == 1 and len(x_train) > 1
        self.train_loader = Loader(x_train, y_train, cfg["batch_size"], mean, std, train=True,
                                   pad_to=pad, seed=data_rng, device=cfg["device"], drop_last=lone)
        # the training batch size for testing too: the conv layers keep work buffers sized by it
        self.test_loader = Loader(x_test, y_test, cfg["batch_size"], mean, std, train=False,
                                  pad_to=pad, device=cfg["device"])
        self.input_shape = (x_train.shape[1],) + ((pad, pad) if pad else tuple(x_train.shape[2:]))   # (C, H, W)
        self.examples_per_epoch = min(len(x_train), len(self.train_loader) * cfg["batch_size"])
        self.epoch = 0  # completed epochs
        self.history = []  # metrics rows so far
        self.evolution_stopped_after = None  # the epoch whose evolution step triggered the early stop

    # -- one epoch ------------------------------------------------------------------------
    def train_step(self, xb, yb, keep_dense_grads=False):
        """One training step on the batch ``(xb, yb)``. Returns ``(loss, logits, dense_grads)``.

        forward, loss, backward, ``masks.apply_to_grads()`` (inactive weights get no update),
        ``optimizer.step()``. ``keep_dense_grads``: also return the conv gradients before
        masking (``masks.snapshot_grads()``; RigL regrows where ``|dL/dW|`` is largest,
        including at inactive entries); otherwise ``dense_grads`` is None. A non-finite loss
        raises TrainingError before anything is updated.
        """
        model, crit, masks = self.model, self.criterion, self.masks
        logits = model.forward(xb)                      # (B, classes)
        loss = crit.forward(logits, yb)                 # mean cross-entropy, a float
        if not math.isfinite(loss):
            raise TrainingError(f"non-finite loss ({loss}) in epoch {self.epoch + 1}; "
                                f"the last good checkpoint is in {self.out}")
        self.optimizer.zero_grad()
        model.backward(crit.backward())                 # accumulates every Parameter.grad
        dense_grads = None
        if masks is not None:
            if keep_dense_grads:
                dense_grads = masks.snapshot_grads()
            masks.apply_to_grads()                      # grad *= M: inactive weights stay 0
        self.optimizer.step()
        return loss, logits, dense_grads

    def train_epoch(self, keep_dense_grads=False):
        """One pass over the training set. Returns (mean loss, accuracy %, dense conv grads).

        ``keep_dense_grads``: the conv gradients of the last batch before masking (for RigL).
        """
        self.model.train()
        n_batches, seen, loss_sum, correct, dense_grads = len(self.train_loader), 0, 0.0, 0, None
        t0 = time.perf_counter()
        for i, (xb, yb) in enumerate(self.train_loader):
            loss, logits, dense_grads = self.train_step(xb, yb, keep_dense_grads and i == n_batches - 1)
            b = len(yb)
            seen += b
            loss_sum += loss * b
            correct = correct + (logits.argmax(axis=1) == yb).sum()   # stays on the device: no copy per batch
            self._progress(i + 1, n_batches, seen, loss_sum / seen, correct, t0)
        return loss_sum / seen, 100.0 * int(correct) / seen, dense_grads

    def evaluate(self):
        """Top-1 accuracy (%) on the test set, in eval mode."""
        self.model.eval()
        correct = total = 0
        for xb, yb in self.test_loader:
            with no_grad():    # no caches kept: only the activations in flight
                correct = correct + (self.model.forward(xb).argmax(axis=1) == yb).sum()   # on the device
            total += len(yb)
        return 100.0 * int(correct) / total

    def scheduled_zeta(self, epoch):
        """Removal fraction of the evolution after ``epoch`` completed epochs; None for none
        (the schedule says none, or evolution stopped early)."""
        if self.masks is None or self.evolution_stopped_after is not None:
            return None
        return zeta_after(self.cfg, epoch)

    def evolve(self, zeta_t, dense_grads):
        """The evolution step after the epoch just completed (none when ``zeta_t`` is None).

        Early stop (docs/algorithm.md section 5.5, off when ``cfg["early_stop"]`` is None):
        when every sparse layer that evolved at this step (one or more) has an overlap of at
        least ``T``, no step follows; its records say ``early_stop: true``. A layer that could
        not evolve (``evolved: false``) regrew nothing and does not count. Returns the
        evolution.jsonl records of the step.
        """
        if zeta_t is None:
            return []
        logs = evolve(self.masks, self.optimizer, self.cfg["method"], zeta_t, self.evo_rng, dense_grads,
                      epoch=self.epoch)
        T = self.cfg["early_stop"]
        evolved = [log for log in logs if log["evolved"]]
        stop = T is not None and bool(evolved) and all(log["overlap"] >= T for log in evolved)
        if stop:
            self.evolution_stopped_after = self.epoch
            self.log.write(f"evolution stops after epoch {self.epoch}: every evolving layer's overlap is at "
                           f"least {T:g} (--early-stop)\n")
        return [{**{k: log[k] for k in EVOLUTION_KEYS[:-1]}, "early_stop": stop} for log in logs]

    def fit(self, stop_after=None):
        """Train from ``self.epoch`` to the last epoch (or only ``stop_after`` more epochs).

        Returns the result dict written to ``result.json`` (None when ``stop_after`` ends the
        call before the last epoch).
        """
        cfg = self.cfg
        last = cfg["epochs"] if stop_after is None else min(cfg["epochs"], self.epoch + stop_after)
        while self.epoch < last:
            t0 = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            zeta_t = self.scheduled_zeta(self.epoch + 1)    # this epoch ends with an evolution step?
            rigl_grads = zeta_t is not None and cfg["method"] == "rigl"
            train_loss, train_acc, dense_grads = self.train_epoch(keep_dense_grads=rigl_grads)
            test_acc = self.evaluate()
            self.epoch += 1
            evolution = self.evolve(zeta_t, dense_grads)
            self.scheduler.step()
            row = dict(epoch=self.epoch, lr=lr, train_loss=train_loss, train_acc=train_acc,
                       test_acc=test_acc, seconds=time.perf_counter() - t0)
            self.history.append(row)
            self.save_epoch(row, evolution)
            self._epoch_line(row)
        if self.epoch < cfg["epochs"]:
            return None
        return self.write_result()

    # -- run directory (the files: cht/rundir.py) -------------------------------------------
    def path(self, name):
        return os.path.join(self.out, name)

    def write_config(self):
        """A new run's files: ``config.json`` (the settings and the achieved ``densities``), the
        metrics header, an empty evolution log."""
        self.files.write_new({**self.cfg, "densities": self.densities()}, METRICS_COLUMNS)

    def save_epoch(self, row, evolution):
        """The epoch's metrics row and evolution records appended to the logs, then its
        checkpoint; a failure leaves both as they were after the last epoch (``cht.rundir``)."""
        self.files.save_epoch([row[k] for k in METRICS_COLUMNS], evolution, self.checkpoint_state())

    def write_result(self):
        """``result.json``: accuracies, epochs, seconds, the early stop, the FLOPs fractions
        (``flops_fractions``) and the achieved densities. Returns it as a dict."""
        accs = [r["test_acc"] for r in self.history]
        f_inference, f_training = self.flops_fractions()
        result = dict(test_acc=accs[-1], best_test_acc=max(accs), epochs=self.epoch,
                      seconds=sum(r["seconds"] for r in self.history),
                      evolution_stopped_after=self.evolution_stopped_after,
                      flops_inference=f_inference, flops_training=f_training, densities=self.densities())
        self.files.write_json(rundir.RESULT, result)
        return result

    # -- what the run costs and holds (docs/algorithm.md sections 8 and 9) -----------------------
    def densities(self):
        """The achieved densities, ``{"global", "conv", "layers": {weight key: k / F}}``
        (``cht.density.achieved``); a dense run has 1.0 everywhere."""
        if self.masks is not None:
            return self.masks.achieved()
        convs = [m for _, m in self.model.named_modules() if isinstance(m, Conv2d)]
        return density.achieved(density.conv_densities(convs, 0.0))

    def flops_fractions(self):
        """``(flops_inference, flops_training)`` of the epochs trained, as fractions of a dense
        run of the same recipe (``cht.flops``).

        ``f_S`` comes from the masks in use (evolution keeps every filter's count, so it holds
        for the whole run). The evolution steps taken (RigL's dense gradients) and the CH
        scoring's multiply-adds come from ``evolution.jsonl``, which a resume keeps, so the count
        covers the epochs trained before it too. ``flops_training`` is None for a CH run whose
        records lack ``score_macs`` (written before the scoring was counted). Call it between
        training steps: it runs a forward pass of its own.
        """
        layers = flops.model_layers(self.model, self.input_shape)
        masks = {l.name: l.mask for l in self.masks} if self.masks is not None else {}
        f_S, f_D = flops.forward_macs(layers, masks), flops.forward_macs(layers)
        records = self.files.read_evolution()
        method = self.cfg["method"]
        training = None
        if method not in ("ch2", "ch3") or all("score_macs" in r for r in records):
            scoring = sum(r.get("score_macs", 0) for r in records)
            training = flops.training_fraction(method, f_S, f_D, self.epoch, self.examples_per_epoch,
                                               self.cfg["batch_size"], evolutions=len({r["epoch"] for r in records}),
                                               scoring_macs=scoring)
        return f_S / f_D, training

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_state(self):
        """Everything a resume needs, as ``{key: host array}`` plus ``"meta"``, a JSON-able dict.

        Keys: the model's state_dict under its own keys; ``mask.<weight key>`` (and the
        ever-active record ``itop.<weight key>``); ``optim.<index>.<name>`` for optimizer arrays;
        ``meta``: the epoch, metrics so far, config, optimizer scalars and hyper-parameters,
        scheduler state and the RNG states.
        """
        arrays = {k: backend.to_numpy(v) for k, v in self.model.state_dict().items()}
        if self.masks is not None:
            arrays.update(self.masks.state_dict())
        opt_arrays, opt_meta = self.optimizer.flat_state_dict()
        arrays.update({f"optim.{k}": v for k, v in opt_arrays.items()})
        arrays["meta"] = dict(epoch=self.epoch, history=self.history, config=self.cfg, optimizer=opt_meta,
                              evolution_stopped_after=self.evolution_stopped_after,
                              scheduler=self.scheduler.state_dict(),
                              rng=dict(data=self.train_loader.get_state(),
                                       evolution=self.evo_rng.bit_generator.state))
        return arrays

    def save_checkpoint(self):
        """Write ``checkpoint.npz`` atomically (a temporary file, fsync, then rename)."""
        self.files.write_checkpoint(self.checkpoint_state())

    def load_checkpoint(self):
        """Restore everything ``save_checkpoint`` wrote; the logs are cut back to its epoch.

        Raises ``rundir.CorruptFile`` (naming checkpoint.npz) for a file that cannot be read or
        does not fit this run: a missing or unknown key, a wrong shape or dtype, a meta record
        of another structure or another run's config.
        """
        arrays = self.files.read_checkpoint()
        try:
            self._check_checkpoint(arrays)
            self._restore(arrays)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            what = f"lacks {e.args[0]}" if isinstance(e, KeyError) else str(e).splitlines()[0]
            raise rundir.CorruptFile(self.path(rundir.CHECKPOINT), f"does not fit this run ({what})") from None
        self._rewrite_logs()

    def _check_checkpoint(self, arrays):
        """Raise KeyError / ValueError unless ``arrays`` (read back) is what this run writes."""
        ref = self.checkpoint_state()  # this Trainer's, before any step: no optimizer state yet
        meta, ref_meta = arrays["meta"], rundir.as_json(ref.pop("meta"))
        params = self.optimizer.params
        optim_names = {}  # parameter index -> names of its optimizer arrays
        for key, a in arrays.items():
            if key == "meta":
                continue
            if key.startswith("optim."):
                index, name = _optim_key(key, len(params))
                optim_names.setdefault(index, set()).add(name)
                shape, dtype = tuple(params[index].data.shape), np.dtype(params[index].data.dtype)
            elif key in ref:
                shape, dtype = ref[key].shape, ref[key].dtype
            else:
                raise ValueError(f"unknown array {key!r}")
            if a.shape != shape or a.dtype != dtype:
                raise ValueError(f"{key} is {a.dtype} {a.shape}, expected {dtype} {shape}")
        for key in ref:
            if key not in arrays:
                raise KeyError(repr(key))
        if len({frozenset(v) for v in optim_names.values()}) > 1 or 0 < len(optim_names) < len(params):
            raise ValueError("the optimizer state covers only some parameters")

        ref_meta["config"] = ref_meta["optimizer"]["scalars"] = None  # both checked below
        rundir.check_like(meta, ref_meta, "meta")
        epoch, history = meta["epoch"], meta["history"]
        if not (isinstance(epoch, int) and 0 <= epoch <= self.cfg["epochs"]):
            raise ValueError(f"meta.epoch is {epoch!r}, not a whole number in [0, {self.cfg['epochs']}]")
        if len(history) != epoch or not all(
                isinstance(r, dict) and all(_number(r.get(k)) for k in METRICS_COLUMNS) for r in history):
            raise ValueError(f"meta.history is not {epoch} rows of {', '.join(METRICS_COLUMNS)}")
        for key, value in meta["optimizer"]["scalars"].items():
            _optim_key(f"optim.{key}", len(params))
            if not _number(value):
                raise ValueError(f"optimizer scalar {key!r} is {value!r}, not a number")
        saved = complete(meta["config"]) if isinstance(meta["config"], dict) else None   # older: keys added later
        differ = [k for k in EXPERIMENT_KEYS if saved.get(k) != self.cfg.get(k)] if saved is not None else ["all"]
        if differ:
            raise ValueError(f"its config differs from config.json in {differ[0]!r}")

    def _restore(self, arrays):
        """Load the checked ``arrays`` of ``checkpoint.npz`` into the model, masks, optimizer,
        scheduler and RNGs."""
        meta = arrays.pop("meta")
        self.model.load_state_dict({k: v for k, v in arrays.items() if k in self.model.state_dict()})
        if self.masks is not None:
            self.masks.load_state_dict(arrays)
        self.optimizer.load_flat_state_dict(
            {k[len("optim."):]: v for k, v in arrays.items() if k.startswith("optim.")}, meta["optimizer"])
        self.scheduler.load_state_dict(meta["scheduler"])
        self.train_loader.set_state(meta["rng"]["data"])
        self.evo_rng.bit_generator.state = meta["rng"]["evolution"]
        self.epoch, self.history = meta["epoch"], meta["history"]
        self.evolution_stopped_after = meta.get("evolution_stopped_after")

    def _rewrite_logs(self):
        """Drop log lines written after the checkpoint (a fault or an interruption between the two)."""
        rows = [[row[k] for k in METRICS_COLUMNS] for row in self.history]
        self.files.rewrite_logs([METRICS_COLUMNS] + rows, self.epoch)

    # -- progress ---------------------------------------------------------------------------
    def _progress(self, i, n, seen, loss, correct, t0):
        """An in-place progress line on a terminal; nothing in a log file (nor a copy of the
        ``correct`` count from the GPU)."""
        if not self.log.isatty():
            return
        acc = 100.0 * int(correct) / seen
        rate = seen / max(time.perf_counter() - t0, 1e-9)
        eta = (n - i) * (time.perf_counter() - t0) / i
        self.log.write(f"\repoch {self.epoch + 1}/{self.cfg['epochs']} {i}/{n} loss {loss:.4f} "
                       f"acc {acc:5.2f}% {rate:,.0f} img/s ETA {hms(eta)}   ")
        self.log.flush()

    def _epoch_line(self, row):
        """One line per epoch: metrics, throughput and the time left for the run."""
        left = (self.cfg["epochs"] - self.epoch) * np.mean([r["seconds"] for r in self.history])
        rate = len(self.train_loader.x) / row["seconds"]
        density = f" density {self.masks.density():.3f}" if self.masks is not None else ""
        self.log.write(("\r" if self.log.isatty() else "") +
                       f"epoch {row['epoch']}/{self.cfg['epochs']} lr {row['lr']:.3g} "
                       f"loss {row['train_loss']:.4f} train {row['train_acc']:.2f}% test {row['test_acc']:.2f}%"
                       f"{density} {row['seconds']:.1f}s ({rate:,.0f} img/s) ETA {hms(left)}\n")
        self.log.flush()


def _optim_key(key, n_params):
    """``(index, name)`` of a checkpoint key ``optim.<index>.<name>``; ValueError if malformed."""
    _, index, name = (key.split(".", 2) + ["", ""])[:3]
    if not (index.isdigit() and int(index) < n_params and name):
        raise ValueError(f"unknown optimizer state {key!r}")
    return int(index), name


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def hms(seconds):
    """``3725.2 -> '1:02:05'``."""
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
