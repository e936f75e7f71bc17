"""The evolution step of dynamic sparse training: prune by magnitude, regrow by a score.

Legend: ``C_out`` filters, ``F = C_in*kh*kw`` entries per filter, ``M`` the mask before the
step, ``M1`` after removal, ``M2`` after regrowth, ``n_o`` entries removed (and regrown) in
filter ``o``.

Timing (docs/algorithm.md section 5, as in RigL's code): ``e`` is the number of
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

Cost of the selection: two row-wise lexsorts of ``(C_out, F)`` keys per layer, on the host,
on top of the scoring; about 0.8 s for a 512x512x3x3 layer on one core of an x86-64 cloud VM
(SET, which scores nothing: ``evolve(masks, None, "set", 0.3, rng)`` on that one layer).
"""
import math
import time

import numpy as np

from minicnn import backend
from cht.masks import topology_measures, zero_inactive_state
from cht.scores import ch_scores

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


def regrowth_scores(method, mask, layer, dense_grad=None, macs=None):
    """Regrowth scores of one layer, host float64 ``(C_out, C_in, kh, kw)``; higher regrows first.

    ``mask`` is the host post-removal mask ``M1``. "set": all 0 (every pick is random);
    "ch2"/"ch3": ``cht.scores.ch_scores`` on ``M1`` with the layer's last input size, stride
    and padding; "rigl": ``|dL/dW|`` of the last batch (dense, taken before masking).
    Only entries with ``M1 == False`` are ever picked, whatever the score of active entries.
    ``macs``: None, or a list that receives the multiply-adds of each matrix product of the CH
    scoring (docs/algorithm.md section 9; nothing for the other methods).
    """
    if method == "set":
        return np.zeros(mask.shape)
    if method in ("ch2", "ch3"):
        conv = layer.module
        hw = getattr(conv, "input_hw", None)
        if hw is None:
            raise RuntimeError(f"{layer.name}: CH scores need the layer's input size; run a forward pass first")
        # score on the weights' device (ch_scores takes NumPy or CuPy), rank on the host
        m = backend.to_device(mask, backend.device_of(layer.param.data))
        s = ch_scores(m, tuple(hw), stride=conv.stride, padding=conv.padding, method=method, macs=macs)
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


def evolve_layer(layer, optimizer, method, zeta_t, rng, dense_grad=None, trace=False):
    """One evolution step of one SparseLayer, in place (docs/algorithm.md section 5).

    Returns its record (the keys of ``evolve``). With ``trace=True``, returns
    ``(record, steps)``: ``steps`` holds the step's host arrays, every one of the weight's
    shape ``(C_out, C_in, kh, kw)`` except ``n``: ``mask_before`` (M), ``weight_before``,
    ``n`` (n_o per filter, ``(C_out,)``), ``removed``, ``mask_removed`` (M1), ``scores``
    (float64, on M1, 0 except on disabled entries with a positive score), ``regrown``,
    ``random_fill`` (regrown with score 0) and ``mask_after`` (M2).
    """
    t0 = time.perf_counter()
    W = layer.param.data
    shape, dev = tuple(W.shape), backend.device_of(W)
    M = np.array(backend.to_numpy(layer.mask)).reshape(shape[0], -1)   # (C_out, F) host copy
    w_host = backend.to_numpy(W)
    weight_before = np.array(w_host) if trace else None                # a copy: W changes below
    absw = np.abs(w_host).reshape(M.shape).astype(np.float64)
    big = np.finfo(np.float64).max
    absw = np.nan_to_num(absw, nan=big, posinf=big)                    # keep active < inactive (inf)
    active = M.sum(axis=1)
    n = np.floor(zeta_t * active).astype(np.int64)                     # n_o = floor(zeta_t * active_o)
    evolved, macs = bool(n.any()), []                                  # macs: the scoring's products

    if evolved:
        # 1. removal: the n_o active entries of smallest |w|; inactive ones rank after every active one
        removed = _first_n(np.where(M, absw, np.inf), rng, n) & M
        M1 = M & ~removed

        # 2. scores of the disabled entries of the post-removal mask
        score = regrowth_scores(method, M1.reshape(shape), layer, dense_grad, macs).reshape(M.shape)
        score = np.where(~M1 & (score > 0), score, 0.0)                # only disabled entries compete

        # 3. regrowth: the n_o candidates of highest score; zero scores tie, so they fill at random
        regrown = _first_n(np.where(~M1, -score, np.inf), rng, n) & ~M1
    else:
        # every filter removes floor(zeta_t * k) = 0 entries (k < 1/zeta_t): the layer cannot
        # evolve, and skips the scoring and the selection (and their random draws)
        removed, M1, score, regrown = np.zeros_like(M), M, np.zeros(M.shape), np.zeros_like(M)
    M2 = M1 | regrown
    if not (M2.sum(axis=1) == active).all():
        raise RuntimeError(f"{layer.name}: the evolution step changed a filter's active count "
                           f"(before {active.tolist()}, after {M2.sum(axis=1).tolist()})")

    # 4. weights and optimizer state (section 5.4): an entry active before and after the step
    #    (kept, or removed and regrown) keeps both unchanged (x * True == x exactly); every other
    #    entry is 0 with zero state, so a newly active one starts at 0
    if evolved:
        stay = backend.to_device((M & M2).reshape(shape), dev)
        W *= stay
        zero_inactive_state(optimizer, layer.param, stay)
        layer.mask[...] = backend.to_device(M2.reshape(shape), dev)
        layer.ever_active |= layer.mask
        backend.synchronize()

    n_regrown = int(regrown.sum())
    fill = regrown & (score <= 0)
    record = {
        "layer": layer.name,
        "removed": int(removed.sum()),
        "regrown": n_regrown,
        "random_fill": int(fill.sum()),
        "overlap": float((regrown & removed).sum() / n_regrown) if n_regrown else 0.0,
        "density": float(M2.mean()),
        "itop": float(layer.ever_active.sum()) / layer.ever_active.size,
        "seconds": time.perf_counter() - t0,
        **topology_measures(M2.reshape(shape)),                        # section 7, after regrowth
        "evolved": evolved,
        "reason": None if evolved else (f"no entry to remove: floor(zeta_t * k) = floor({zeta_t:.4g} * "
                                        f"{int(active[0])}) = 0"),
        "score_macs": int(sum(macs)),
    }
    if not trace:
        return record
    steps = dict(mask_before=M, weight_before=weight_before, n=n, removed=removed, mask_removed=M1,
                 scores=score, regrown=regrown, random_fill=fill, mask_after=M2)
    return record, {k: (v if k in ("n", "weight_before") else v.reshape(shape)) for k, v in steps.items()}


def evolve(masks, optimizer, method, zeta_t, rng, dense_grads=None, trace=False, epoch=None):
    """One evolution step of every sparse conv layer (docs/algorithm.md section 5), in place.

    Per filter ``o``: remove the ``n_o = floor(zeta_t * active_o)`` active entries of
    smallest ``|w|`` (ties at random); score the disabled entries of the post-removal mask
    (``regrowth_scores``); regrow the ``n_o`` of highest score (just-removed entries
    included; ties at random; when fewer than ``n_o`` scores are positive, the rest are drawn
    uniformly from the zero-score candidates). Filters keep exactly ``k`` active entries. A
    layer whose filters would remove ``floor(zeta_t * k) = 0`` entries does not evolve.

    Weights and optimizer state (section 5.4, as in the CHT and RigL codes): an entry active
    before and after the step, kept or removed and regrown, keeps its weight and its state
    (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``) unchanged: it never really left. An
    entry that becomes active starts at 0 with zero state; one that becomes inactive is 0
    with zero state.

    Args:
        masks: a ``cht.masks.SparseConvMasks``.
        optimizer: an optimizer with ``.state[param]`` (or None).
        method: "set", "ch2", "ch3" or "rigl"; "static" returns [] (never evolves).
        zeta_t: removal fraction (``zeta_schedule``); None returns [] (no evolution).
        rng: ``numpy.random.Generator``; the step is deterministic given it.
        dense_grads: for "rigl", ``{weight key or Parameter: dL/dW}`` of the last batch,
            taken before ``apply_to_grads`` (``masks.snapshot_grads()``).
        trace: also return each layer's intermediate masks and scores (``evolve_layer``).
        epoch: the epoch after which the step runs, copied into the records (None if not given).

    Returns:
        one dict per layer: ``epoch``, ``layer`` (weight key), ``removed``, ``regrown``, ``random_fill``
        (regrown entries drawn at random among zero scores; for "set" every regrown entry),
        ``overlap`` (fraction of regrown entries that were just removed, 0 if none),
        ``density``, ``itop`` (the layer's ever-active fraction after the step), ``seconds``,
        the topology measures of section 7 after regrowth (``channel_cv``,
        ``empty_kernels``, ``unused_inputs``; ``cht.masks.topology_measures``), ``evolved``
        (False when every filter's removal count ``floor(zeta_t * k)`` is 0: the layer is left
        as it was, without scoring or selection), ``reason`` (why not, or None) and
        ``score_macs`` (multiply-adds of the CH scoring, section 9; 0 for set and rigl and for
        a layer that did not evolve).
        With ``trace=True``: ``(records, steps)``, ``steps`` one dict per layer.
    """
    if method not in METHODS:
        raise ValueError(f"unknown evolution method {method!r}; expected one of {METHODS}")
    records, steps = [], []
    if method != "static" and zeta_t is not None:
        for layer in masks.layers:
            masks._sync(layer)
            g = None
            if dense_grads is not None:
                g = dense_grads.get(layer.param, dense_grads.get(layer.name))
            out = evolve_layer(layer, optimizer, method, zeta_t, rng, g, trace)
            records.append({"epoch": epoch, **(out[0] if trace else out)})
            if trace:
                steps.append(out[1])
    return (records, steps) if trace else records
