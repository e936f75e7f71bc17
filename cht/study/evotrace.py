"""Trace one CHT-Conv evolution step of one layer: removal, CH scores, regrowth, overlap.

The step is the run's own: the run is replayed (``Replay``) to the end of epoch ``E``, and the
evolution after it is ``cht.evolution.evolve`` itself, with the run's Generator, asked for its
intermediate masks and scores (``trace=True``). Only one window's own CH scores
(``window_scores``, before the averaging over windows) are computed here, for the reader.

Legend: ``M0`` mask before, ``M1`` after removal, ``M2`` after regrowth; ``(o, c, dy, dx)`` a
kernel entry; window ``(i, j)`` one output position; ``n_o`` entries removed in filter ``o``;
``deg[c]`` the active entries on input channel ``c`` (docs/algorithm.md section 7).
"""
import json
import os

import numpy as np

from cht.evolution import evolve
from cht.fast_scores import node_weight
from cht.masks import kernel_counts, topology_measures
from cht.study.common import Replay, StudyError, find_sparse_layer
from cht.topology import check_layer, conv_topology
from cht.trainer import EVOLUTION_KEYS, zeta_after


def window_scores(mask, input_hw, stride=1, padding=0, window=(0, 0), method="ch3"):
    """CH-L3n score of every absent link of one window ``(i, j)`` (before window averaging).

    Inputs: mask bool ``(C_out, C_in, kh, kw)`` (NumPy), the layer's input size, stride, padding.
    Returns float64 ``(C_out, C_in, kh, kw)``: for a disabled entry whose pixel
    ``(i*sh + dy - ph, j*sw + dx - pw)`` lies inside the image, the score of the absent link
    ``(o, i, j) - (c, y, x)`` of the expanded graph; 0 for active entries; NaN where the entry
    falls on padding at this window (no link). The mean of these over the windows where an
    entry lies inside the image is ``cht.ch_scores`` (docs/algorithm.md section 4).

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


def trace_evolution(masks, optimizer, method, zeta_t, rng, name, window=None, dense_grads=None, epoch=None):
    """``cht.evolution.evolve`` with every layer's intermediates (its records name ``epoch``).
    Returns ``(logs, traces)``.

    ``traces``: ``{weight key: steps}`` with the arrays ``evolve(..., trace=True)`` returns
    (``mask_before``, ``weight_before``, ``n``, ``removed``, ``mask_removed``, ``scores``,
    ``regrown``, ``random_fill``, ``mask_after``). The layer ``name`` (a weight key) also gets
    ``zeta_t`` and, for CH methods, ``window`` (default the centre) and ``window_scores``: the
    CH scores of that one window on M1.
    """
    logs, steps = evolve(masks, optimizer, method, zeta_t, rng, dense_grads, trace=True, epoch=epoch)
    traces = {l.name: st for l, st in zip(masks.layers, steps)}
    t = traces[name]
    t["zeta_t"] = np.float64(zeta_t)
    if method in ("ch2", "ch3"):
        conv = find_sparse_layer(masks, name).module
        Ho, Wo = check_layer(t["mask_removed"], conv.input_hw, conv.stride, conv.padding)[4]
        window = tuple(window) if window is not None else (Ho // 2, Wo // 2)
        t["window"] = np.array(window)
        t["window_scores"] = window_scores(t["mask_removed"], conv.input_hw, conv.stride, conv.padding,
                                           window, method)
    return logs, traces


def format_channels(t, per_line=16):
    """``deg[c]`` before and after the step, per input channel, and the section 7 measures."""
    before, after = kernel_counts(t["mask_before"]).sum(axis=0), kernel_counts(t["mask_after"]).sum(axis=0)
    lines = ["active entries per input channel c (deg[c], over all filters and kernel offsets):"]
    for c0 in range(0, before.size, per_line):
        cs = range(c0, min(before.size, c0 + per_line))
        lines += ["  c      " + "".join(f"{c:>6}" for c in cs),
                  "  before " + "".join(f"{before[c]:>6}" for c in cs),
                  "  after  " + "".join(f"{after[c]:>6}" for c in cs),
                  "  change " + "".join(f"{after[c] - before[c]:>+6}" for c in cs)]
    mb, ma = topology_measures(t["mask_before"]), topology_measures(t["mask_after"])
    lines.append(f"channel_cv {mb['channel_cv']:.4f} -> {ma['channel_cv']:.4f}, empty_kernels "
                 f"{mb['empty_kernels']:.4f} -> {ma['empty_kernels']:.4f}, unused_inputs "
                 f"{mb['unused_inputs']} -> {ma['unused_inputs']}")
    return "\n".join(lines)


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
    scores, window scores, weights and masks (``trace.<name>``). Returns ``(trace, logs, path)``.
    """
    if cfg["method"] in ("dense", "static"):
        raise StudyError(f"{run_dir}: method {cfg['method']} never evolves")
    steps = [e for e in range(1, cfg["epochs"] + 1) if zeta_after(cfg, e) is not None]
    if epoch not in steps:
        raise StudyError(f"--epoch {epoch}: this run evolves after epochs {', '.join(map(str, steps)) or 'none'}")
    out = out or run_dir
    with Replay(cfg, data, device) as rep:
        t = rep.trainer
        name = find_sparse_layer(t.masks, layer or t.masks.layers[1 if len(t.masks.layers) > 1 else 0].name).name
        rep.to_epoch(epoch - 1)
        if t.evolution_stopped_after is not None:
            raise StudyError(f"--epoch {epoch}: this run stopped evolving after epoch {t.evolution_stopped_after} "
                             f"(--early-stop {cfg['early_stop']})")
        _, _, dense = t.train_epoch(keep_dense_grads=cfg["method"] == "rigl")
        t.epoch += 1
        zeta_t = t.scheduled_zeta(t.epoch)
        logs, traces = trace_evolution(t.masks, t.optimizer, cfg["method"], zeta_t, t.evo_rng, name, window, dense,
                                       epoch)
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
    rec = read_log(run_dir, epoch, name)
    if rec is not None:
        keys = [k for k in EVOLUTION_KEYS if k in rec and k in log and k != "seconds"]
        same = all(rec[k] == log[k] for k in keys)
        echo(f"evolution.jsonl, epoch {epoch}: removed {rec['removed']}, regrown {rec['regrown']}, "
             f"overlap {rec['overlap']:.4f}: {'the same' if same else 'DIFFERENT (was the run made on another device?)'}")
    if "window_scores" in tr:
        ws, s, M1 = tr["window_scores"], tr["scores"], tr["mask_removed"]
        echo(f"CH scores on the post-removal mask: {int((~M1).sum())} disabled entries, "
             f"{int((s > 0).sum())} with a positive window-averaged score (max {s.max():.4f}); at window "
             f"{tuple(int(v) for v in tr['window'])}: {int((ws > 0).sum())} positive (max {np.nanmax(ws):.4f})")
    echo("")
    echo(format_channels(tr))
    for o in range(min(filters, C_out)):
        echo("")
        echo(format_filter(tr, o))
    arrays = {}
    for key, t_ in traces.items():
        for k in ("mask_before", "removed", "regrown"):
            arrays[f"{key}.{k}"] = t_[k]
    arrays.update({f"trace.{k}": v for k, v in tr.items()})
    arrays["trace.layer"] = np.array(name)
    arrays["logs"] = np.array(json.dumps(logs))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"evotrace-e{epoch}.npz")
    np.savez(path, **arrays)
    echo(f"\nwrote {path} (every layer: mask_before, removed, regrown; {name}: scores, window scores)")
    return tr, logs, path
