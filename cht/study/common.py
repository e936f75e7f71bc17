"""What the study commands share: reading a run directory, replaying it, walking the layers.

A run directory (written by ``run.py``) holds ``config.json``; the training is deterministic
on the CPU given that config, so every study command rebuilds the run's ``Trainer`` in a
scratch folder and *replays* it up to the step it looks at. Nothing in the run directory is
changed except the files the command says it writes.
"""
import io
import json
import os
import tempfile

import numpy as np

from minicnn import backend


class StudyError(Exception):
    """A user mistake (missing run directory, unknown layer, ...): one line, exit status 2."""


def read_config(run_dir):
    """``config.json`` of ``run_dir`` as a dict. Raises StudyError."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise StudyError(f"{run_dir}: no such run directory")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise StudyError(f"{path}: not a readable run config ({e})")


def load_data(cfg):
    """The run's data as run.py reads it (``cht.trainer.load_data``). Raises StudyError."""
    import data
    from cht.trainer import load_data as load

    try:
        return load(dict(cfg, download=False))
    except data.DatasetError as e:
        raise StudyError(f"cannot read the {cfg['dataset']} dataset of this run: {e}")


class Replay:
    """The run's Trainer rebuilt in a scratch folder (a context manager that removes it).

    ``trainer`` trains exactly as the original run did (same seed, same data), so after
    ``to_epoch(e)`` its model, masks and optimizer are those of the run after epoch ``e``
    (bit for bit on the CPU).
    """

    def __init__(self, cfg, data=None, device="cpu"):
        from cht.trainer import Trainer

        cfg = dict(cfg, device=device)
        backend.use(device)
        self.tmp = tempfile.TemporaryDirectory(prefix="cht-study-")
        self.trainer = Trainer(cfg, data if data is not None else load_data(cfg), self.tmp.name,
                               log=io.StringIO())
        self.trainer.write_config()
        self.cfg = cfg

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.tmp.cleanup()

    def to_epoch(self, epoch):
        """Train (with evolution, schedule, everything) until ``epoch`` epochs are complete."""
        t = self.trainer
        if epoch > t.epoch:
            t.fit(stop_after=epoch - t.epoch)


def leaf_layers(model):
    """``[(name, module)]``: the model's layers in the order ``forward`` runs them.

    Works for ``Sequential`` (nested too) and for the VGG of ``minicnn.models`` (``features``
    then ``classifier``); names are the state_dict prefixes (``features.3``).
    """
    from minicnn.layers import Sequential

    def walk(m, prefix):
        if isinstance(m, Sequential):
            out = []
            for key, child in m.named_children():
                out += walk(child, f"{prefix}.{key}" if prefix else key)
            return out
        return [(prefix, m)]

    if isinstance(model, Sequential):
        return walk(model, "")
    children = dict(model.named_children())
    if set(children) == {"features", "classifier"}:
        return walk(children["features"], "features") + walk(children["classifier"], "classifier")
    raise StudyError(f"cannot walk the layers of a {type(model).__name__} (Sequential or VGG expected)")


def find_sparse_layer(masks, name):
    """The SparseLayer whose module is ``name`` (``features.3``) or whose weight key is ``name``."""
    names = [l.name for l in masks.layers]
    for l in masks.layers:
        if name in (l.name, l.name.rsplit(".", 1)[0]):
            return l
    raise StudyError(f"--layer {name}: not a sparse conv layer of this run; choose from "
                     + ", ".join(n.rsplit(".", 1)[0] for n in names))


def host(a):
    """A NumPy copy of a NumPy or CuPy array (for printing and saving)."""
    return np.array(backend.to_numpy(a))
