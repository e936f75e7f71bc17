"""Boolean masks of sparse conv layers (docs/algorithm.md sections 1 and 8).

Legend: ``C_out, C_in, kh, kw`` the weight's shape, ``F = C_in*kh*kw`` the fan-in of one
filter, ``S`` the requested sparsity, ``k`` the active entries per filter, ``M`` a mask.

A mask ``M`` (bool, the weight's shape) holds exactly ``k`` True entries in every filter
``M[o]``. The framework knows nothing about masks; the invariants

    W * ~M == 0,   grad * ~M == 0 before the step,   optimizer state * ~M == 0

hold from the start (the weights are masked when the masks are made or loaded:
``apply_to_weights()``), and the trainer keeps them with one call per batch: backward,
``apply_to_grads()``, ``optimizer.step()``. An inactive entry then has weight, gradient and
state 0, which SGD and Adam map to an update of exactly 0 (docs/algorithm.md section 1), so the
weights need no masking after the step. ``cht.evolution.evolve`` keeps the optimizer state
itself when it changes masks; code that changes masks otherwise calls
``apply_to_optimizer(opt)``.

Random draws are made with NumPy on the host, so a seed gives the same masks on CPU and GPU;
the masks themselves live on the device of their weight.
"""
import math
from dataclasses import dataclass

import numpy as np

from minicnn import backend
from minicnn.layers import Conv2d
from cht import density

# per-entry optimizer state (PyTorch names: SGD, Adam) that must be 0 on inactive entries
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")


def per_filter_count(fan_in, sparsity):
    """Active entries per filter: ``k = max(1, floor((1 - S) * fan_in + 0.5))``."""
    return density.filter_count(fan_in, 1.0 - sparsity)


def random_mask(shape, sparsity, rng):
    """A bool mask of ``shape`` with ``per_filter_count(F, sparsity)`` random entries per filter
    (``random_filter_mask``). Returns a NumPy array."""
    return random_filter_mask(shape, per_filter_count(math.prod(shape[1:]), sparsity), rng)


def random_filter_mask(shape, k, rng):
    """A bool mask of ``shape`` (C_out, ...) with a uniformly random ``k``-subset per filter.

    One row of random keys per filter; the ``k`` smallest keys of a row are its active entries
    (argsort of i.i.d. keys is a uniform random permutation). Returns a NumPy array.
    """
    C_out, F = shape[0], math.prod(shape[1:])
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
    """Masks of a model's Conv2d weights at sparsity ``S`` under a distribution (sections 1, 8).

    ``cht.density.layer_densities`` gives every Conv2d of ``model.named_modules()`` its count
    ``k`` per filter (``distribution``: "uniform", the paper's, or "erk"; ``dense_first_layer``
    keeps the first conv dense and out of the budget). A layer whose ``k`` equals its fan-in
    ``F`` is dense: it gets no mask (a full mask has no entry to regrow into) and is absent from
    ``layers``. Every other layer gets a random mask of ``k`` entries per filter, drawn from
    ``rng`` (a NumPy Generator) layer by layer in module order, and the weights are masked at
    once. Biases, BatchNorm and Linear parameters stay dense. ``S = 0`` leaves every layer
    dense (no sparse layer).

    Attributes:
        sparsity: S.
        distribution, dense_first_layer: as given.
        plan: ``cht.density.LayerDensity`` of every conv layer, in module order.
        layers: list of SparseLayer (the layers of ``plan`` that are not dense), in module order.
    """

    def __init__(self, model, sparsity, rng, distribution="uniform", dense_first_layer=False):
        self.sparsity, self.distribution = float(sparsity), distribution
        self.dense_first_layer = bool(dense_first_layer)
        key_of = {id(p): key for key, p in model.named_parameters()}   # Parameter -> state_dict key
        convs = [m for _, m in model.named_modules() if isinstance(m, Conv2d)]
        if not convs:
            raise ValueError("the model has no Conv2d layer to sparsify")
        self.plan = density.layer_densities([c.weight.data.shape for c in convs], sparsity, distribution,
                                            dense_first_layer, names=[key_of[id(c.weight)] for c in convs])
        self.layers = []
        for module, p in zip(convs, self.plan):
            if p.dense:
                continue
            M = random_filter_mask(p.shape, p.k, rng)
            dev = backend.device_of(module.weight.data)
            self.layers.append(SparseLayer(
                name=p.name, module=module, param=module.weight,
                mask=backend.to_device(M, dev), ever_active=backend.to_device(M.copy(), dev), k=p.k))
        self.apply_to_weights()

    def achieved(self):
        """The densities the masks achieve (``cht.density.achieved``): ``{"global": over the
        budget, "conv": over every conv layer, "layers": {weight key: k / F}}``."""
        return density.achieved(self.plan)

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
        """Active fraction over all sparse weights, a Python float (1.0 without sparse layers)."""
        return self._fraction(lambda l: l.mask)

    def itop_rate(self):
        """In-time over-parameterisation rate: fraction of sparse entries ever active."""
        return self._fraction(lambda l: l.ever_active)

    def _fraction(self, of):
        size = sum(l.mask.size for l in self.layers)
        return sum(int(of(l).sum()) for l in self.layers) / size if size else 1.0

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
