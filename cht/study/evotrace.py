"""Trace one CHT-Conv evolution step of one layer: removal, CH scores, regrowth, overlap.

The step is the run's own: the run is replayed (``Replay``) to the end of epoch ``E``, and the
evolution after it runs layer by layer as ``cht.evolution.evolve`` does, with the same
Generator. The chosen layer's step is taken apart with the same functions as
``cht.evolution.evolve_layer`` (``_first_n`` for removal and regrowth, ``regrowth_scores`` for
the window-averaged CH scores); then ``evolve_layer`` itself runs on the layer with a copy of
the Generator's state, and the two masks must agree.

Legend: ``M0`` mask before, ``M1`` after removal, ``M2`` after regrowth; ``(o, c, dy, dx)`` a
kernel entry; window ``(i, j)`` one output position; ``n_o`` entries removed in filter ``o``.
"""
import json
import os

import numpy as np

from minicnn import backend
from cht import evolution
from cht.evolution import regrowth_scores
from cht.fast_scores import node_weight
from cht.study.common import Replay, StudyError, find_sparse_layer, host
from cht.topology import check_layer, conv_topology
from cht.trainer import zeta_after


def window_scores(mask, input_hw, stride=1, padding=0, window=(0, 0), method="ch3"):
    """CH-L3n score of every absent link of one window ``(i, j)`` (before window averaging).

    Inputs: mask bool ``(C_out, C_in, kh, kw)`` (NumPy), the layer's input size, stride, padding.
    Returns float64 ``(C_out, C_in, kh, kw)``: for a disabled entry whose pixel
    ``(i*sh + dy - ph, j*sw + dx - pw)`` lies inside the image, the score of the absent link
    ``(o, i, j) - (c, y, x)`` of the expanded graph; 0 for active entries; NaN where the entry
    falls on padding at this window (no link). The mean of these over the windows where an
    entry lies inside the image is ``cht.ch_scores`` (CHT_SPEC.md section 4).

    Exact and local: the rows ``u = (o, i, j)`` of the matrix form
    ``S = (Wr X + (Wc X^T)^T) * (X == 0)`` need only the outputs whose windows share a pixel
    with window ``(i, j)`` (offsets up to ``(kh-1)//sh``, ``(kw-1)//sw``) and the inputs they
    touch, and every degree entering those rows is complete in that subgraph.
    """
    mask, (H, W), (sh, sw), (ph, pw), (Ho, Wo) = check_layer(np.asarray(mask), input_hw, stride, padding)
    C_out, C_in, kh, kw = mask.shape
    i0, j0 = window
    if not (0 <= i0 < Ho and 0 <= j0 < Wo):
        raise StudyError(f"--window {i0} {j0}: the layer has windows 0..{Ho - 1} x 0..{Wo - 1}")
    Dh, Dw = (kh - 1) // sh, (kw - 1) // sw
    wins = [(i, j) for i in range(max(0, i0 - Dh), min(Ho, i0 + Dh + 1))
            for j in range(max(0, j0 - Dw), min(Wo, j0 + Dw + 1))]
    o, c, dy, dx = np.nonzero(mask)                                   # active entries (nnz,)
    rows, cols = [], []
    for w, (i, j) in enumerate(wins):                                 # the local expanded graph
        y, x = i * sh + dy - ph, j * sw + dx - pw
        inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
        rows.append(o[inside] * len(wins) + w)                        # local output id (o, w)
        cols.append(c[inside] * H * W + y[inside] * W + x[inside])    # global input id (c, y, x)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    ids, col = np.unique(cols, return_inverse=True)                   # local input ids
    X = np.zeros((C_out * len(wins), ids.size))
    X[rows, col] = 1.0
    U = np.arange(C_out) * len(wins) + wins.index((i0, j0))           # rows of window (i0, j0)
    XU = X[U]
    dr, dc = X.sum(axis=1), X.sum(axis=0)                             # degrees (complete here)
    Wr = node_weight(XU @ X.T, dr[None, :], method)                   # (C_out, rows): b = (o', w')
    A = np.flatnonzero(XU.any(axis=0))                                # inputs a ~ some u
    Wc = node_weight(X.T @ X[:, A], dc[A][None, :], method)           # (inputs, |A|): Wc[v, a]
    S = (Wr @ X + XU[:, A] @ Wc.T) * (XU == 0)                        # (C_out, inputs)

    out = np.full(mask.shape, np.nan)
    yy = i0 * sh + np.arange(kh) - ph                                 # pixel row of each dy
    xx = j0 * sw + np.arange(kw) - pw
    for a in range(kh):
        for b in range(kw):
            if not (0 <= yy[a] < H and 0 <= xx[b] < W):
                continue
            gid = np.arange(C_in) * H * W + yy[a] * W + xx[b]          # (C_in,) pixel of each c
            pos = np.clip(np.searchsorted(ids, gid), 0, ids.size - 1)
            known = ids[pos] == gid                                   # a pixel no local edge touches scores 0
            out[:, :, a, b] = np.where(known[None, :], S[:, pos], 0.0)
    out[mask] = 0.0
    return out


def trace_layer_step(layer, optimizer, method, zeta_t, rng, window=None, dense_grad=None, windowed=True):
    """One evolution step of ``layer`` (a ``SparseLayer``) taken apart; the layer is evolved.

    Returns a dict of host arrays: ``mask_before`` (M0), ``weight_before``, ``n`` (n_o per
    filter), ``removed``, ``mask_removed`` (M1), ``scores`` (window-averaged, on M1),
    ``window`` and ``window_scores`` (one window, on M1; CH methods and ``windowed`` only), ``regrown``,
    ``mask_after`` (M2), ``random_fill`` (regrown with score 0), and ``log`` (the dict
    ``evolve_layer`` returned) and ``agrees`` (its mask equals M2).
    """
    W = layer.param.data
    shape = tuple(W.shape)
    M0 = host(layer.mask).reshape(shape[0], -1)                         # (C_out, F)
    w0 = host(W)
    absw = np.nan_to_num(np.abs(w0).reshape(M0.shape).astype(np.float64), nan=np.inf)
    n = np.floor(zeta_t * M0.sum(axis=1)).astype(np.int64)              # n_o = floor(zeta_t * active_o)
    r = np.random.Generator(type(rng.bit_generator)())
    r.bit_generator.state = rng.bit_generator.state                     # a copy: evolve_layer gets the original
    # 1. removal: the n_o active entries of smallest |w|
    removed = evolution._first_n(np.where(M0, absw, np.inf), r, n) & M0
    M1 = M0 & ~removed
    # 2. scores of the disabled entries on the post-removal mask (window-averaged)
    score = regrowth_scores(method, M1.reshape(shape), layer, dense_grad).reshape(M0.shape)
    score = np.where(~M1 & (score > 0), score, 0.0)
    # 3. regrowth: the n_o candidates of highest score; zero scores fill at random
    regrown = evolution._first_n(np.where(~M1, -score, np.inf), r, n) & ~M1
    M2 = M1 | regrown
    log = evolution.evolve_layer(layer, optimizer, method, zeta_t, rng, dense_grad)
    out = dict(mask_before=M0.reshape(shape), weight_before=w0, n=n, removed=removed.reshape(shape),
               mask_removed=M1.reshape(shape), scores=score.reshape(shape), regrown=regrown.reshape(shape),
               mask_after=M2.reshape(shape), random_fill=(regrown & (score <= 0)).reshape(shape),
               zeta_t=np.float64(zeta_t), log=log,
               agrees=bool(np.array_equal(host(layer.mask), M2.reshape(shape))))
    if windowed and method in ("ch2", "ch3"):
        conv = layer.module
        Ho, Wo = check_layer(M1.reshape(shape), conv.input_hw, conv.stride, conv.padding)[4]
        window = tuple(window) if window is not None else (Ho // 2, Wo // 2)
        out["window"] = np.array(window)
        out["window_scores"] = window_scores(M1.reshape(shape), conv.input_hw, conv.stride, conv.padding,
                                             window, method)
    return out


def evolve_traced(masks, optimizer, method, zeta_t, rng, name, window=None, dense_grads=None):
    """``cht.evolution.evolve`` with the layer ``name`` traced. Returns ``(logs, traces)``.

    ``traces``: ``{weight key: trace_layer_step dict}`` for every layer (window scores for
    ``name`` only).
    """
    logs, traces = [], {}
    for layer in masks.layers:
        masks._sync(layer)
        g = None if dense_grads is None else dense_grads.get(layer.name)
        t = trace_layer_step(layer, optimizer, method, zeta_t, rng, window, g, windowed=layer.name == name)
        traces[layer.name] = t
        logs.append(t["log"])
    return logs, traces


def _entry(idx, shape):
    return "(" + ",".join(str(int(v)) for v in np.unravel_index(idx, shape)[1:]) + ")"


def format_filter(t, o, top=6):
    """A text picture of filter ``o`` (one tile per input channel) and its candidate table."""
    M0, rem, reg = t["mask_before"][o], t["removed"][o], t["regrown"][o]
    C_in, kh, kw = M0.shape
    sym = np.full(M0.shape, ".")
    sym[M0] = "#"
    sym[rem] = "x"
    sym[reg] = "+"
    sym[rem & reg] = "*"
    lines = [f"filter {o}: {int(M0.sum())} active, removed {int(rem.sum())}, regrown {int(reg.sum())} "
             f"(# kept  x removed  + regrown  * removed and regrown  . inactive; one tile per input channel c)"]
    show = min(C_in, 16)
    for a in range(kh):
        lines.append("  " + " ".join("".join(sym[c, a]) for c in range(show)) + (" ..." if show < C_in else ""))
    w = np.abs(t["weight_before"][o]).reshape(-1)
    r, kept = rem.reshape(-1), (M0 & ~rem).reshape(-1)
    if r.any():
        lines.append(f"  removed {', '.join(_entry(k, (1,) + M0.shape) for k in np.flatnonzero(r)[:8])}"
                     f"{' ...' if r.sum() > 8 else ''}: the {int(r.sum())} smallest |w| (up to {w[r].max():.4g}; "
                     f"smallest kept |w| {w[kept].min() if kept.any() else float('nan'):.4g})")
    s, ws = t["scores"][o].reshape(-1), t.get("window_scores")
    cand = np.flatnonzero(~t["mask_removed"][o].reshape(-1))
    best = cand[np.argsort(-s[cand], kind="stable")][:top]
    win = tuple(int(v) for v in t["window"]) if "window" in t else None
    lines.append(f"  {'candidate (c,dy,dx)':<20}{'CH avg':>10}{f'CH @ window {win}':>22}  regrown")
    for k in best:
        wv = ws[o].reshape(-1)[k] if ws is not None else np.nan
        lines.append(f"  {_entry(k, (1, C_in, kh, kw)):<20}{s[k]:>10.4f}{'' if np.isnan(wv) else f'{wv:.4f}':>22}"
                     f"  {'yes' if reg.reshape(-1)[k] else 'no'}")
    return "\n".join(lines)


def read_log(run_dir, epoch, name):
    """The line of ``evolution.jsonl`` for (epoch, layer), or None."""
    path = os.path.join(run_dir, "evolution.jsonl")
    if not os.path.exists(path):
        return None
    for line in open(path):
        if line.strip():
            rec = json.loads(line)
            if rec["epoch"] == epoch and rec["layer"] == name:
                return rec
    return None


def run(run_dir, cfg, epoch=1, layer=None, window=None, filters=2, out=None, data=None, device="cpu",
        echo=print):
    """The ``evotrace`` command: replay the run to the evolution after ``epoch``, trace ``layer``.

    Writes ``evotrace-e<epoch>.npz`` into ``out`` (default ``run_dir``): for every layer
    ``<key>.mask_before``, ``<key>.removed``, ``<key>.regrown``; for the traced layer also its
    scores, window scores, weights and masks. Returns ``(trace, logs, path)``.
    """
    if cfg["method"] in ("dense", "static"):
        raise StudyError(f"{run_dir}: method {cfg['method']} never evolves")
    steps = [e for e in range(1, cfg["epochs"] + 1)
             if zeta_after(cfg, e) is not None]
    if epoch not in steps:
        raise StudyError(f"--epoch {epoch}: this run evolves after epochs {', '.join(map(str, steps)) or 'none'}")
    out = out or run_dir
    with Replay(cfg, data, device) as rep:
        t = rep.trainer
        name = find_sparse_layer(t.masks, layer or t.masks.layers[1 if len(t.masks.layers) > 1 else 0].name).name
        rep.to_epoch(epoch - 1)
        _, _, dense = t.train_epoch(keep_dense_grads=cfg["method"] == "rigl")
        t.epoch += 1
        zeta_t = zeta_after(cfg, t.epoch)
        logs, traces = evolve_traced(t.masks, t.optimizer, cfg["method"], zeta_t, t.evo_rng, name, window, dense)
        conv = find_sparse_layer(t.masks, name).module
        hw, st, pad = conv.input_hw, conv.stride, conv.padding
    tr = traces[name]
    log = next(l for l in logs if l["layer"] == name)
    edges_in, _, n_in, n_out = conv_topology(tr["mask_removed"], hw, st, pad)
    C_out, C_in, kh, kw = tr["mask_before"].shape
    echo(f"evolution after epoch {epoch} of {run_dir}, layer {name} {C_out}x{C_in}x{kh}x{kw}, "
         f"input {hw[0]}x{hw[1]}, method {cfg['method']}, zeta_t {zeta_t:.4f}")
    echo(f"expanded graph after removal: {n_in} input nodes (c,y,x), {n_out} output nodes (o,i,j), "
         f"{edges_in.size} links")
    echo(f"removed {log['removed']} (n_o = floor(zeta_t * k) = {int(tr['n'][0])} per filter), regrown "
         f"{log['regrown']}, random fill {log['random_fill']}, overlap {log['overlap']:.4f}, "
         f"density {log['density']:.4f}, ITOP {log['itop']:.4f}")
    echo(f"step-by-step replay agrees with cht.evolution.evolve_layer: {'yes' if tr['agrees'] else 'NO'}")
    rec = read_log(run_dir, epoch, name)
    if rec is not None:
        same = all(rec[k] == log[k] for k in ("removed", "regrown", "random_fill")) and \
            abs(rec["overlap"] - log["overlap"]) < 1e-12
        echo(f"evolution.jsonl, epoch {epoch}: removed {rec['removed']}, regrown {rec['regrown']}, "
             f"overlap {rec['overlap']:.4f}: {'the same' if same else 'DIFFERENT (was the run made on another device?)'}")
    if "window_scores" in tr:
        ws, s, M1 = tr["window_scores"], tr["scores"], tr["mask_removed"]
        echo(f"CH scores on the post-removal mask: {int((~M1).sum())} disabled entries, "
             f"{int((s > 0).sum())} with a positive window-averaged score (max {s.max():.4f}); at window "
             f"{tuple(int(v) for v in tr['window'])}: {int((ws > 0).sum())} positive (max {np.nanmax(ws):.4f})")
    for o in range(min(filters, C_out)):
        echo("")
        echo(format_filter(tr, o))
    arrays = {}
    for key, t_ in traces.items():
        for k in ("mask_before", "removed", "regrown"):
            arrays[f"{key}.{k}"] = t_[k]
    arrays.update({f"trace.{k}": v for k, v in tr.items() if k not in ("log", "agrees")})
    arrays["trace.layer"] = np.array(name)
    arrays["logs"] = np.array(json.dumps([dict(epoch=epoch, **l) for l in logs]))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"evotrace-e{epoch}.npz")
    np.savez(path, **arrays)
    echo(f"\nwrote {path} (every layer: mask_before, removed, regrown; {name}: scores, window scores)")
    return tr, logs, path
