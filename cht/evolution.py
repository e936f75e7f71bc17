"""The evolution step of dynamic sparse training: prune by magnitude, regrow by a score.

Legend: ``C_out`` filters, ``F = C_in*kh*kw`` entries per filter, ``M`` the mask before the
step, ``M1`` after removal, ``M2`` after regrowth, ``n_o`` entries removed (and regrown) in
filter ``o``.

Timing (our reading of CHT_SPEC.md section 5, as in RigL's code): ``e`` is the number of
*completed* training epochs. Evolution runs right after the training of epoch ``e``
(1-based), when ``e % update_interval == 0`` and ``e < E_end = evolve_until * epochs``, with
``zeta_t = zeta/2 * (1 + cos(pi * e / E_end))``. There is none before training (``e = 0``)
and none at or after ``E_end`` (so never after the last epoch).

Selection (ranking, tie-breaking and random fill) runs on the host in NumPy with keys drawn
from the given Generator, so a seed gives the same masks on CPU and GPU; the weight and
optimizer-state updates run in place on the device of the weights (``xp``); CH scores are
computed on that device too (``ch_scores`` takes NumPy or CuPy).

SET regrows uniformly at random, i.e. every pick is a draw among zero-score candidates, so
its log reports ``random_fill == regrown``.

Cost of the selection (two row-wise lexsorts per layer): about 0.5 s for a 512x512x3x3
layer and 3-6 s for all 13 layers of VGG16 on the 2-core CPU, on top of the scoring.
"""
import math
import time

import numpy as np

from minicnn import backend
from cht.masks import zero_inactive_state

METHODS = ("static", "set", "ch2", "ch3", "rigl")


def zeta_schedule(epoch, epochs, zeta=0.3, evolve_until=0.75, update_interval=1):
    """Removal fraction of the evolution after ``epoch`` completed epochs, or None for none.

    ``zeta_t = zeta/2 * (1 + cos(pi * e / E_end))``, ``E_end = evolve_until * epochs``;
    None when ``e < 1``, ``e >= E_end`` or ``e % update_interval != 0``.
    """
    e, E_end = int(epoch), evolve_until * epochs
    if e < 1 or e >= E_end or e % update_interval != 0:
        return None
    return zeta / 2.0 * (1.0 + math.cos(math.pi * e / E_end))


def regrowth_scores(method, mask, layer, dense_grad=None):
    """Regrowth scores of one layer, host float64 ``(C_out, C_in, kh, kw)``; higher regrows first.

    ``mask`` is the host post-removal mask ``M1``. "set": all 0 (every pick is random);
    "ch2"/"ch3": ``cht.scores.ch_scores`` on ``M1`` with the layer's last input size, stride
    and padding; "rigl": ``|dL/dW|`` of the last batch (dense, taken before masking).
    Only entries with ``M1 == False`` are ever picked, whatever the score of active entries.
    """
    if method == "set":
        return np.zeros(mask.shape)
    if method in ("ch2", "ch3"):
        from cht.scores import ch_scores                       # lazy: written in parallel
        conv = layer.module
        hw = getattr(conv, "input_hw", None)
        if hw is None:
            raise RuntimeError(f"{layer.name}: CH scores need the layer's input size; run a forward pass first")
        # score on the weights' device (ch_scores takes NumPy or CuPy), rank on the host
        m = backend.to_device(mask, backend.device_of(layer.param.data))
        s = ch_scores(m, tuple(hw), stride=conv.stride, padding=conv.padding, method=method)
        return np.asarray(backend.to_numpy(s), dtype=np.float64)
    if method == "rigl":
        if dense_grad is None:
            raise ValueError(f"{layer.name}: rigl needs the dense gradient of the last batch (dense_grads)")
        return np.abs(backend.to_numpy(dense_grad)).astype(np.float64)
    raise ValueError(f"unknown regrowth method {method!r}")


def _first_n(primary, rng, n):
    """Bool ``(C_out, F)``: per row the ``n[o]`` entries of smallest ``primary``, ties at random.

    lexsort sorts by its last key first; the random key only orders equal primaries, so a tie
    is broken by a uniformly random permutation.
    """
    order = np.lexsort((rng.random(primary.shape), primary), axis=-1)   # (C_out, F) ranks -> column
    take = np.arange(primary.shape[1])[None, :] < n[:, None]            # (C_out, F) rank < n_o
    sel = np.zeros(primary.shape, dtype=bool)
    np.put_along_axis(sel, order, take, axis=1)
    return sel


def evolve_layer(layer, optimizer, method, zeta_t, rng, dense_grad=None):
    """One evolution step of one SparseLayer, in place. Returns its log dict (see ``evolve``)."""
    t0 = time.perf_counter()
    W = layer.param.data
    M = backend.to_numpy(layer.mask).reshape(W.shape[0], -1)            # (C_out, F) host
    absw = np.abs(backend.to_numpy(W)).reshape(M.shape).astype(np.float64)
    big = np.finfo(np.float64).max
    absw = np.nan_to_num(absw, nan=big, posinf=big)                    # keep active < inactive (inf)
    active = M.sum(axis=1)
    n = np.floor(zeta_t * active).astype(np.int64)                     # n_o = floor(zeta_t * active_o)

    # 1. removal: the n_o active entries of smallest |w|; inactive ones rank after every active one
    removed = _first_n(np.where(M, absw, np.inf), rng, n) & M
    M1 = M & ~removed

    # 2. scores of the disabled entries of the post-removal mask
    score = regrowth_scores(method, M1.reshape(W.shape), layer, dense_grad).reshape(M.shape)
    score = np.where(~M1 & (score > 0), score, 0.0)                    # only disabled entries compete

    # 3. regrowth: the n_o candidates of highest score; zero scores tie, so they fill at random
    regrown = _first_n(np.where(~M1, -score, np.inf), rng, n) & ~M1
    M2 = M1 | regrown
    assert (M2.sum(axis=1) == active).all(), "evolution changed a filter's active count"

    # 4. removed and regrown entries restart at 0, and so does their optimizer state
    keep = backend.to_device(M1.reshape(W.shape), backend.device_of(W))
    W *= keep
    zero_inactive_state(optimizer, layer.param, keep)
    layer.mask[...] = backend.to_device(M2.reshape(W.shape), backend.device_of(W))
    layer.ever_active |= layer.mask
    backend.synchronize()

    n_regrown = int(regrown.sum())
    return {
        "layer": layer.name,
        "removed": int(removed.sum()),
        "regrown": n_regrown,
        "random_fill": int((regrown & (score <= 0)).sum()),
        "overlap": float((regrown & removed).sum() / n_regrown) if n_regrown else 0.0,
        "density": float(M2.mean()),
        "itop": float(layer.ever_active.sum()) / layer.ever_active.size,
        "seconds": time.perf_counter() - t0,
    }


def evolve(masks, optimizer, method, zeta_t, rng, dense_grads=None):
    """One evolution step of every sparse conv layer (CHT_SPEC.md section 5), in place.

    Per filter ``o``: remove the ``n_o = floor(zeta_t * active_o)`` active entries of
    smallest ``|w|`` (ties at random); score the disabled entries of the post-removal mask
    (``regrowth_scores``); regrow the ``n_o`` of highest score (just-removed entries
    included; ties at random; when fewer than ``n_o`` scores are positive, the rest are drawn
    uniformly from the zero-score candidates). Removed and regrown weights and their optimizer
    state become 0. Filters keep exactly ``k`` active entries.

    Args:
        masks: a ``cht.masks.SparseConvMasks``.
        optimizer: an optimizer with ``.state[param]`` (or None).
        method: "set", "ch2", "ch3" or "rigl"; "static" returns [] (never evolves).
        zeta_t: removal fraction (``zeta_schedule``); None returns [] (no evolution).
        rng: ``numpy.random.Generator``; the step is deterministic given it.
        dense_grads: for "rigl", ``{weight key or Parameter: dL/dW}`` of the last batch,
            taken before ``apply_to_grads`` (``masks.snapshot_grads()``).

    Returns:
        one dict per layer: ``layer`` (weight key), ``removed``, ``regrown``, ``random_fill``
        (regrown entries drawn at random among zero scores; for "set" every regrown entry),
        ``overlap`` (fraction of regrown entries that were just removed, 0 if none),
        ``density``, ``itop`` (the layer's ever-active fraction after the step), ``seconds``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown evolution method {method!r}; expected one of {METHODS}")
    if method == "static" or zeta_t is None:
        return []
    logs = []
    for layer in masks.layers:
        masks._sync(layer)
        g = None
        if dense_grads is not None:
            g = dense_grads.get(layer.param, dense_grads.get(layer.name))
        logs.append(evolve_layer(layer, optimizer, method, zeta_t, rng, g))
    return logs
