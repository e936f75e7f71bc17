"""Boolean masks of sparse conv layers (CHT_SPEC.md section 1).

Legend: ``C_out, C_in, kh, kw`` the weight's shape, ``F = C_in*kh*kw`` the fan-in of one
filter, ``S`` the target sparsity, ``k`` the active entries per filter, ``M`` a mask.

A mask ``M`` (bool, the weight's shape) holds exactly ``k`` True entries in every filter
``M[o]``. The framework knows nothing about masks; the trainer keeps the invariants

    W * ~M == 0,   grad * ~M == 0 before the step,   optimizer state * ~M == 0

by calling, per batch: backward, ``apply_to_grads()``, ``optimizer.step()``,
``apply_to_weights()``; and ``apply_to_optimizer(opt)`` whenever masks change outside
``cht.evolution.evolve`` (which keeps the state itself).

Random draws are made with NumPy on the host, so a seed gives the same masks on CPU and GPU;
the masks themselves live on the device of their weight.
"""
import math
from dataclasses import dataclass

import numpy as np

from minicnn import backend
from minicnn.layers import Conv2d

# per-entry optimizer state (PyTorch names: SGD, Adam) that must be 0 on inactive entries
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")


def per_filter_count(fan_in, sparsity):
    """Active entries per filter: ``k = max(1, floor((1 - S) * fan_in + 0.5))``."""
    return max(1, math.floor((1.0 - sparsity) * fan_in + 0.5))


def random_mask(shape, sparsity, rng):
    """A bool mask of ``shape`` (C_out, ...) with a uniformly random ``k``-subset per filter.

    One row of random keys per filter; the ``k`` smallest keys of a row are its active entries
    (argsort of i.i.d. keys is a uniform random permutation). Returns a NumPy array.
    """
    C_out, F = shape[0], int(np.prod(shape[1:]))
    k = per_filter_count(F, sparsity)
    order = np.argsort(rng.random((C_out, F)), axis=1)        # (C_out, F) a permutation per row
    M = np.zeros((C_out, F), dtype=bool)
    np.put_along_axis(M, order[:, :k], True, axis=1)
    return M.reshape(shape)


def zero_inactive_state(optimizer, param, keep):
    """Multiply every per-entry optimizer state array of ``param`` by ``keep`` (bool) in place.

    ``optimizer.state[param]`` is created lazily by the optimizer; absent state is already 0.
    Scalars such as Adam's ``step`` are left alone.
    """
    if optimizer is None:
        return
    st = optimizer.state.get(param)
    if not st:
        return
    for key in STATE_KEYS:
        buf = st.get(key)
        if buf is not None and tuple(buf.shape) == tuple(keep.shape):
            buf *= keep


def kernel_counts(mask):
    """``n[o, c]``: active entries of filter ``o`` on input channel ``c``, int ``(C_out, C_in)``.

    ``mask``: bool ``(C_out, C_in, kh, kw)``, NumPy or CuPy (the result is on its device).
    """
    return mask.reshape(mask.shape[0], mask.shape[1], -1).sum(axis=2)   # sum over kh*kw


def topology_measures(mask):
    """How a layer's links spread over its input channels (docs/algorithm.md section 7).

    With ``n = kernel_counts(mask)`` and ``deg[c] = sum over o of n[o, c]``::

        channel_cv    = std(deg) / mean(deg)      population std; 0 when links are spread evenly
        empty_kernels = mean over (o, c) of [n[o, c] == 0]
        unused_inputs = number of c with deg[c] == 0   (input channels no filter reads)

    ``mean(deg) > 0`` always: every filter holds ``k >= 1`` entries. Returns a dict of Python
    numbers (floats, and an int for ``unused_inputs``).
    """
    n = kernel_counts(mask)                                    # (C_out, C_in)
    deg = n.sum(axis=0)                                        # (C_in,) links per input channel
    return {"channel_cv": float(deg.std() / deg.mean()),
            "empty_kernels": float((n == 0).mean()),
            "unused_inputs": int((deg == 0).sum())}


@dataclass
class SparseLayer:
    """One sparse conv layer: its module, weight Parameter, mask and ever-active record.

    ``mask`` and ``ever_active`` are bool arrays of the weight's shape on the weight's device;
    ``k`` is the active count of every filter; ``name`` the weight's state_dict key.
    """
    name: str
    module: object
    param: object
    mask: object
    ever_active: object
    k: int


class SparseConvMasks:
    """Masks of every Conv2d weight of a model, all at the same sparsity ``S`` (section 1).

    Built from ``model.named_modules()``: every Conv2d's ``weight`` gets a random mask of
    ``k = per_filter_count(C_in*kh*kw, S)`` entries per filter, drawn from ``rng`` (a NumPy
    Generator) layer by layer in module order, and the weights are masked at once.
    Biases, BatchNorm and Linear parameters stay dense. ``S = 0`` is refused: the dense
    method has no masks.

    Attributes:
        sparsity: S.
        layers: list of SparseLayer, in module order.
    """

    def __init__(self, model, sparsity, rng):
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
        self.sparsity = float(sparsity)
        key_of = {id(p): key for key, p in model.named_parameters()}   # Parameter -> state_dict key
        self.layers = []
        for _, module in model.named_modules():
            if not isinstance(module, Conv2d):
                continue
            p = module.weight
            M = random_mask(p.data.shape, sparsity, rng)
            dev = backend.device_of(p.data)
            self.layers.append(SparseLayer(
                name=key_of[id(p)], module=module, param=p,
                mask=backend.to_device(M, dev), ever_active=backend.to_device(M.copy(), dev),
                k=per_filter_count(int(np.prod(M.shape[1:])), sparsity)))
        if not self.layers:
            raise ValueError("the model has no Conv2d layer to sparsify")
        self.apply_to_weights()

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def _sync(self, layer):
        """Follow the weight to its device (the model may have been moved after creation)."""
        dev = backend.device_of(layer.param.data)
        if backend.device_of(layer.mask) != dev:
            layer.mask = backend.to_device(layer.mask, dev)
            layer.ever_active = backend.to_device(layer.ever_active, dev)
        return layer.mask

    # -- the invariants -------------------------------------------------------------------
    def apply_to_weights(self):
        """``W *= M`` in place for every sparse weight."""
        for l in self.layers:
            l.param.data *= self._sync(l)

    def apply_to_grads(self):
        """``grad *= M`` in place: the gradient of an inactive entry is never applied."""
        for l in self.layers:
            l.param.grad *= self._sync(l)

    def apply_to_optimizer(self, optimizer):
        """Zero the optimizer state (momentum_buffer, exp_avg, exp_avg_sq) of inactive entries."""
        for l in self.layers:
            zero_inactive_state(optimizer, l.param, self._sync(l))

    def snapshot_grads(self):
        """``{weight key: host copy of grad}``: the dense gradients RigL regrows from.

        Call after ``backward`` and before ``apply_to_grads`` on the last batch before evolution.
        """
        return {l.name: backend.to_numpy(l.param.grad).copy() for l in self.layers}

    # -- statistics -----------------------------------------------------------------------
    def density(self):
        """Active fraction over all sparse weights, a Python float."""
        active = sum(int(l.mask.sum()) for l in self.layers)
        return active / sum(l.mask.size for l in self.layers)

    def itop_rate(self):
        """In-time over-parameterisation rate: fraction of sparse entries ever active."""
        ever = sum(int(l.ever_active.sum()) for l in self.layers)
        return ever / sum(l.mask.size for l in self.layers)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self):
        """``{"mask.<key>": bool array, "itop.<key>": bool array}`` as host NumPy arrays.

        ``<key>`` is the weight's state_dict key (``mask.features.0.weight``); ``itop.<key>``
        is the ever-active record.
        """
        out = {}
        for l in self.layers:
            out[f"mask.{l.name}"] = backend.to_numpy(l.mask).astype(bool)
            out[f"itop.{l.name}"] = backend.to_numpy(l.ever_active).astype(bool)
        return out

    def load_state_dict(self, state):
        """Restore masks (and ever-active records) in place; keys without these prefixes are ignored.

        Every ``mask.<key>`` must be present with the weight's shape and ``k`` entries per filter;
        a missing ``itop.<key>`` restarts the record at the loaded mask. The weights are then
        masked (a no-op for a consistent checkpoint).
        """
        for l in self.layers:
            key = f"mask.{l.name}"
            if key not in state:
                raise KeyError(f"load_state_dict: missing {key}")
            M = np.asarray(backend.to_numpy(state[key])).astype(bool)
            if M.shape != tuple(l.mask.shape):
                raise ValueError(f"load_state_dict: {key} has shape {M.shape}, expected {tuple(l.mask.shape)}")
            counts = M.reshape(M.shape[0], -1).sum(axis=1)
            if not (counts == l.k).all():
                raise ValueError(f"load_state_dict: {key} must hold {l.k} active entries per filter")
            ever = state.get(f"itop.{l.name}")
            ever = M if ever is None else np.asarray(backend.to_numpy(ever)).astype(bool) | M
            dev = backend.device_of(l.param.data)
            l.mask = backend.to_device(M.copy(), dev)
            l.ever_active = backend.to_device(ever.copy(), dev)
        self.apply_to_weights()
