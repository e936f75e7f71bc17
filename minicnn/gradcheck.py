"""Finite-difference gradient checks of any Module (in float64), after Chainer's gradient_check.

The scalar checked is ``L = sum(forward(x) * g)`` with a random upstream gradient ``g``
(fixed seed; an all-ones ``g`` hides bugs such as a missing term in BatchNorm's backward).
The analytic gradients are ``backward(g)`` (dx) and each Parameter's ``.grad``; the numeric ones
are centered differences ``(L(v + eps) - L(v - eps)) / (2 eps)``, one entry at a time.

Relative error of one tensor (over the entries checked):

    rel_err = max|a - n| / max(max|a|, max|n|, floor, tiny)

with ``a`` analytic, ``n`` numeric and ``floor`` 0 by default. A tensor whose true gradient is
identically 0 (the bias of a conv followed by BatchNorm) makes the plain ratio noise over noise
(about 1e-10 / 1e-10); a ``floor`` at the scale of the other gradients measures it absolutely.
A correct float64 backward gives about 1e-9 or less for smooth layers; above 1e-6 is a bug (or a
kink of ReLU / max-pool within ``eps`` of the input).

The module's state is restored afterwards: parameter values and gradients, buffers (BatchNorm's
running statistics and ``num_batches_tracked``), and the state of every ``rng`` Generator
attribute (reset before each forward, so Dropout draws the same mask every time).
"""
import numpy as np

from minicnn import backend

TINY = 1e-30


def rel_error(a, n, floor=0.0):
    """``max|a - n| / max(max|a|, max|n|, floor, tiny)`` of two arrays of the same shape (0 if empty)."""
    a, n = backend.to_numpy(a).astype(np.float64), backend.to_numpy(n).astype(np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - n)) / max(np.max(np.abs(a)), np.max(np.abs(n)), floor, TINY))


class _Snapshot:
    """Copies of a module's parameters, gradients, buffers and Generator states, to put back."""

    def __init__(self, module):
        self.params = [(p, p.data.copy(), p.grad.copy()) for p in module.parameters()]
        self.buffers = [(m, b, getattr(m, b).copy()) for _, m in module.named_modules() for b in m._buffers]
        self.rngs = [(g, g.bit_generator.state) for _, m in module.named_modules()
                     for g in vars(m).values() if isinstance(g, np.random.Generator)]

    def restore_buffers_and_rngs(self):
        for m, b, v in self.buffers:
            object.__setattr__(m, b, v.copy())
        for g, s in self.rngs:
            g.bit_generator.state = s

    def restore(self):
        for p, data, grad in self.params:
            p.data[...] = data
            p.grad[...] = grad
        self.restore_buffers_and_rngs()


def numerical_grad(loss, flat, idx, eps=1e-6):
    """Centered differences ``(L(v + eps) - L(v - eps)) / (2 eps)`` at entries ``idx`` of ``flat``.

    ``flat``: a 1-D view of the array ``loss()`` reads (perturbing it perturbs that array);
    every entry is restored. Error O(eps^2). Returns float64 (len(idx),).
    """
    numeric = np.empty(len(idx))
    for t, i in enumerate(idx):
        old = float(flat[i])
        flat[i] = old + eps
        lp = loss()
        flat[i] = old - eps
        lm = loss()
        flat[i] = old
        numeric[t] = (lp - lm) / (2 * eps)
    return numeric


def _entries(size, max_entries, rng):
    """Flat indices to check: all, or a random subset of ``max_entries``."""
    if max_entries is None or size <= max_entries:
        return np.arange(size)
    return np.sort(rng.choice(size, max_entries, replace=False))


def gradcheck(module, x, dy=None, eps=1e-6, max_entries=None, seed=0, check_input=True, floor=0.0):
    """Compare a module's backward with centered finite differences.

    Args:
        module: a Module with float64 parameters (``module.astype(np.float64)``).
        x: float64 input array.
        dy: upstream gradient, shape of the output; default: standard normal with ``seed``.
        eps: the finite-difference step.
        max_entries: check at most this many random entries of each tensor (None: all).
        seed: for ``dy`` and the entry subsets.
        check_input: also check dx (skip for a module whose backward returns None).
        floor: lower bound of the denominator of the relative error (see the module doc).
    Returns:
        ``{name: rel_err}``: ``"input"`` for dx, then each parameter under its key in
        ``module.state_dict()``.
    """
    if x.dtype != np.float64 or any(p.data.dtype != np.float64 for p in module.parameters()):
        raise TypeError("gradcheck needs float64 input and parameters (module.astype(np.float64))")
    rng = np.random.default_rng(seed)
    snap = _Snapshot(module)
    x = x.copy()

    def loss():
        snap.restore_buffers_and_rngs()
        return float((module.forward(x) * dy).sum())

    try:
        snap.restore_buffers_and_rngs()
        y = module.forward(x)
        if dy is None:
            dy = backend.to_device(rng.standard_normal(y.shape), backend.device_of(y))
        for p in module.parameters():
            p.grad[...] = 0
        dx = module.backward(dy.copy())
        analytic = {} if not check_input else {"input": dx}
        named = module.named_parameters()                        # keys of module.state_dict()
        analytic.update((key, p.grad.copy()) for key, p in named)
        targets = ([("input", x)] if check_input else []) + [(key, p.data) for key, p in named]

        errors = {}
        for name, v in targets:
            idx = _entries(v.size, max_entries, rng)
            numeric = numerical_grad(loss, v.reshape(-1), idx, eps)   # a view of the tensor
            a = backend.to_numpy(analytic[name]).reshape(-1)[idx]
            errors[name] = rel_error(a, numeric, floor)
        return errors
    finally:
        snap.restore()

