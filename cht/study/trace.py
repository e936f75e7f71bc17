"""Trace one training step: every layer's forward, backward and update, checked by finite differences.

The step is the run's own (``Replay``): batch ``step`` of epoch ``epoch``, with the run's
weights, masks and optimizer state at that moment. It runs layer by layer exactly as
``Sequential.forward`` / ``backward`` do, so each layer's output ``y`` and the gradient
``dL/dy`` arriving at it can be recorded; then ``masks.apply_to_grads`` and ``optimizer.step``
as in ``Trainer.train_step``.

Finite differences: a float64 copy of the model *before* the step gives the analytic gradient
``g`` of the loss on the first ``fd_batch`` images of the batch (a few images: with the whole
batch, some of its millions of ReLU/max-pool inputs lie within ``eps`` of a kink and spoil the
difference); ``n = (L(w + eps) - L(w - eps)) / (2 eps)`` on a few entries of each weight
(active entries for masked convs), and

    rel_err = max|g - n| / max(max|g|, max|n|)        (minicnn.gradcheck.rel_error)

A correct backward gives about 1e-7 or less; a kink of ReLU/max-pool crossed within ``eps``
shows as a large value on one entry. ``f32_err`` compares the float32 gradient (the dtype of
the real step, same sub-batch) with ``n`` (float32 rounding: about 1e-4 or less).
"""
import copy
import json
import os

import numpy as np

from minicnn import backend
from minicnn.gradcheck import numerical_grad, rel_error
from minicnn.layers import Conv2d
from minicnn.utils.conv import col2im, im2col
from cht.study.common import Replay, StudyError, host, leaf_layers


def _stats(xp, a):
    """mean, std, fraction of exact zeros, rms of an array, as Python floats."""
    a64 = a.astype(xp.float64)
    return dict(mean=float(a64.mean()), std=float(a64.std()), zero=float((a == 0).mean()),
                rms=float(xp.sqrt((a64 * a64).mean())))


def _norm(a):
    xp = backend.get_array_module(a)
    return float(xp.sqrt((a.astype(xp.float64) ** 2).sum()))


def fd_check(model64, criterion, x64, yb, masks, n_entries=3, eps=1e-6, seed=0):
    """Finite-difference check of ``dL/dW`` on a few entries of every layer's weight.

    Args:
        model64: a float64 copy of the model; its grads are overwritten.
        x64, yb: the batch, float64 ``(N, C, H, W)`` and int labels ``(N,)``.
        masks: ``{weight key: bool mask}``: entries are drawn among the active ones there.
    Returns ``{weight key: dict(index, analytic, numeric, rel_err)}`` (flat indices, float64).

    Entries whose weight is exactly 0 (regrown at the last evolution step) are left out: with
    such a weight two positions of a max-pool window can hold equal values (on the constant
    zero-padded border of a 28x28 image, where only that entry would tell them apart), so the
    loss has a kink right there and no ``eps`` gives its derivative.

    Perturbing the weight of layer ``l`` changes nothing before it, so each loss is the forward
    of layers ``l..end`` from the cached input of layer ``l`` (half the cost of a full forward).
    """
    rng = np.random.default_rng(seed)
    model64.zero_grad()
    layers64 = leaf_layers(model64)
    inputs, x = [], x64
    for _, m in layers64:                                   # train mode, as the traced step
        m.train()
        inputs.append(x)
        x = m.forward(x)
    criterion.forward(x, yb)
    dy = criterion.backward()
    for _, m in reversed(layers64):
        dy = m.backward(dy)
        if dy is None:
            break

    out = {}
    for l, (name, m) in enumerate(layers64):
        p = getattr(m, "weight", None)
        if p is None:
            continue
        key = f"{name}.weight"                              # the state_dict key

        def loss():
            z = inputs[l]
            for _, mm in layers64[l:]:
                z = mm.forward(z)
            return criterion.forward(z, yb)

        w = host(p.data).reshape(-1)
        pool = np.flatnonzero((w != 0) & (masks[key].reshape(-1) if key in masks else True))
        idx = np.sort(rng.choice(pool, min(n_entries, pool.size), replace=False))
        numeric = numerical_grad(loss, p.data.reshape(-1), idx, eps)   # centered differences
        analytic = host(p.grad).reshape(-1)[idx]
        out[key] = dict(index=idx, analytic=analytic, numeric=numeric, rel_err=rel_error(analytic, numeric))
    return out


def trace_step(trainer, xb, yb, layer=None, fd_entries=3, eps=1e-6, fd_batch=8, seed=0):
    """Run one training step of ``trainer`` on ``(xb, yb)``, recording everything.

    Returns ``(rows, arrays, layer)``: ``rows`` one dict per layer (forward statistics of its output
    ``y``, of the gradient ``dy = dL/dy`` arriving at it, and for layers with a weight: norms,
    the update ratio ``|W_after - W_before| / |W_before|`` and the finite-difference check);
    ``arrays`` the raw arrays of ``layer`` (a leaf name such as ``features.3``; default the
    first conv that computes ``dx``): x, y, dy, dx, weight before/after, dense and applied
    gradient, mask, and for a conv the im2col matrix ``cols`` ``(K, P)``.
    """
    model, opt, masks, crit = trainer.model, trainer.optimizer, trainer.masks, trainer.criterion
    xp = backend.get_array_module(xb)
    layers = leaf_layers(model)
    names = [n for n, _ in layers]
    if layer is None:
        layer = next((n for n, m in layers if isinstance(m, Conv2d) and m.needs_input_grad), names[0])
    if layer not in names:
        raise StudyError(f"--layer {layer}: no such layer; choose from {', '.join(names)}")
    mask_of = {} if masks is None else {l.name: host(l.mask) for l in masks.layers}
    weights = {n: m.weight for n, m in layers if getattr(m, "weight", None) is not None}
    before = {n: w.data.copy() for n, w in weights.items()}
    bias_before = host(dict(layers)[layer].bias.data) if getattr(dict(layers)[layer], "bias", None) is not None else None
    model32 = copy.deepcopy(model)                               # for the finite differences
    model64 = copy.deepcopy(model).to("cpu").astype(np.float64)   # differences on the host, as the batch x64

    # forward, layer by layer (= Sequential.forward)
    model.train()
    rows, acts, x = [], {}, xb
    for name, m in layers:
        y = m.forward(x)
        if name == layer:
            acts["x"], acts["y"] = host(x), host(y)
        rows.append(dict(layer=name, kind=type(m).__name__, shape=list(y.shape), **{f"act_{k}": v
                    for k, v in _stats(xp, y).items()}))
        x = y
    loss = crit.forward(x, yb)
    # backward, layer by layer in reverse (= Sequential.backward); dy = dL/d(output of the layer)
    opt.zero_grad()
    dy = crit.backward()
    for row, (name, m) in zip(reversed(rows), reversed(layers)):
        row["grad_rms"] = _stats(xp, dy)["rms"]
        dx = m.backward(dy)
        if name == layer:
            acts["dy"] = host(dy)
            if dx is not None:
                acts["dx"] = host(dx)
        if dx is None:                                           # the first conv skips dx
            break
        dy = dx
    dense = {n: host(w.grad) for n, w in weights.items()}        # before masking
    if masks is not None:
        masks.apply_to_grads()
    opt.step()

    xs, ys = backend.to_numpy(xb[:fd_batch]), backend.to_numpy(yb[:fd_batch])
    fd = fd_check(model64, crit, xs.astype(np.float64), ys, mask_of, fd_entries, eps, seed)
    model32.zero_grad()                                          # the float32 gradient, same sub-batch
    model32.train()
    crit.forward(model32.forward(backend.to_device(xs, backend.device_of(xb))), ys)
    model32.backward(crit.backward())
    g32 = {key: host(p.grad) for key, p in model32.named_parameters()}
    for row in rows:
        n = row["layer"]
        if n not in weights:
            continue
        w, key = weights[n], f"{n}.weight"
        c = fd[key]
        c["float32"] = g32[key].reshape(-1)[c["index"]]
        row.update(weight=key, w_norm=_norm(before[n]), g_norm=_norm(w.grad),
                   update_ratio=_norm(w.data - before[n]) / max(_norm(before[n]), 1e-30),
                   fd_entries=int(c["index"].size), fd_err=c["rel_err"], f32_err=rel_error(c["float32"], c["numeric"]))
    m = dict(layers)[layer]
    arrays = dict(acts, loss=np.float64(loss))
    if layer in weights:
        w, key = weights[layer], f"{layer}.weight"
        c = fd[key]
        arrays.update(weight_before=host(before[layer]), weight_after=host(w.data),
                      grad_dense=dense[layer], grad_applied=host(w.grad), fd_index=c["index"],
                      fd_numeric=c["numeric"], fd_analytic64=c["analytic"],
                      fd_float32=c["float32"], fd_batch=np.int64(len(xs)))
        if key in mask_of:
            arrays["mask"] = mask_of[key]
        if bias_before is not None:
            arrays["bias"] = bias_before
    if isinstance(m, Conv2d):
        cols = im2col(acts["x"], m.kernel_size, m.stride, m.padding)   # (C, kh, kw, N, oh, ow)
        arrays["cols"] = cols.reshape(-1, cols[0, 0, 0].size)          # (K, P), P = N*oh*ow
    return rows, arrays, layer


def im2col_identities(arrays, stride=(1, 1), padding=(1, 1)):
    """The three GEMM identities of a conv layer, checked on its traced arrays.

    ``y = W (F, K) @ cols (K, P) + b``; ``dW = dy_mat (F, P) @ cols^T``;
    ``dx = col2im(W^T @ dy_mat)``. Returns ``{name: max abs difference}`` (float32 rounding).
    """
    W, cols, dy = arrays["weight_before"], arrays["cols"], arrays["dy"]
    F, K = W.shape[0], cols.shape[0]
    N, _, oh, ow = dy.shape
    dy_mat = dy.transpose(1, 0, 2, 3).reshape(F, -1)                   # (F, P)
    y = W.reshape(F, K) @ cols + arrays.get("bias", np.zeros(F, W.dtype))[:, None]
    out = {"forward  y = W @ cols + b": np.abs(y.reshape(F, N, oh, ow).transpose(1, 0, 2, 3) - arrays["y"]).max(),
           "backward dW = dy_mat @ cols^T": np.abs(dy_mat @ cols.T - arrays["grad_dense"].reshape(F, K)).max()}
    if "dx" in arrays:
        dcols = (W.reshape(F, K).T @ dy_mat).reshape(W.shape[1], *W.shape[2:], N, oh, ow)
        dx = col2im(dcols, arrays["x"].shape, W.shape[2:], stride, padding)
        out["backward dx = col2im(W^T @ dy_mat)"] = np.abs(dx - arrays["dx"]).max()
    return {k: float(v) for k, v in out.items()}


def format_table(rows):
    """The per-layer table as text."""
    head = (f"{'layer':<14}{'kind':<12}{'output':>16} {'act mean':>9} {'act std':>8} {'zero%':>6} "
            f"{'dL/dy rms':>9} {'|W|':>8} {'|grad|':>8} {'|dW|/|W|':>9} {'fd rel err':>10} {'f32 err':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        s = (f"{r['layer']:<14}{r['kind']:<12}{'x'.join(map(str, r['shape'])):>16} {r['act_mean']:>9.3g} "
             f"{r['act_std']:>8.3g} {100 * r['act_zero']:>6.1f} {r.get('grad_rms', float('nan')):>9.2e}")
        if "w_norm" in r:
            s += (f" {r['w_norm']:>8.3g} {r['g_norm']:>8.2e} {r['update_ratio']:>9.2e} "
                  f"{r['fd_err']:>10.1e} {r['f32_err']:>8.1e}")
        lines.append(s)
    return "\n".join(lines)


def run(run_dir, cfg, epoch=1, step=1, layer=None, fd_entries=3, eps=1e-6, fd_batch=8, out=None,
        data=None, device="cpu", echo=print):
    """The ``trace`` command: replay the run to (epoch, step), trace it, print and save.

    Writes ``trace.json`` (the table) and ``trace-<layer>.npz`` (the raw arrays) into ``out``
    (default ``run_dir``). Returns ``(rows, arrays, paths)``.
    """
    if not 1 <= epoch <= cfg["epochs"]:
        raise StudyError(f"--epoch {epoch}: the run has epochs 1..{cfg['epochs']}")
    out = out or run_dir
    os.makedirs(out, exist_ok=True)
    with Replay(cfg, data, device) as rep:
        t = rep.trainer
        n = len(t.train_loader)
        if not 1 <= step <= n:
            raise StudyError(f"--step {step}: epoch {epoch} has steps 1..{n}")
        rep.to_epoch(epoch - 1)
        for i, (xb, yb) in enumerate(t.train_loader):
            if i + 1 == step:
                rows, arrays, name = trace_step(t, xb, yb, layer, fd_entries, eps, fd_batch)
                break
            t.train_step(xb, yb)
    echo(f"trace of {run_dir}: epoch {epoch}, step {step} of {n}, batch {len(arrays['x'])}, "
         f"loss {float(arrays['loss']):.4f}")
    echo(format_table(rows))
    if "cols" in arrays:
        echo(f"\n{name}: im2col matrix cols {arrays['cols'].shape[0]}x{arrays['cols'].shape[1]} (K = C*kh*kw, "
             f"P = N*oh*ow); the layer's outputs rebuilt from it (max abs difference):")
        conv = dict(leaf_layers(t.model))[name]             # the trainer outlives its scratch folder
        for k, v in im2col_identities(arrays, conv.stride, conv.padding).items():
            echo(f"  {k:<36} {v:.2e}")
        cols = arrays.pop("cols")                    # (K, N*oh*ow): saved for the first image only
        arrays["cols_image0"] = cols[:, :cols.shape[1] // len(arrays["x"])]
    if "fd_index" in arrays:
        echo(f"\n{name}: dL/dW on the first {int(arrays['fd_batch'])} images, by backward (float32, float64) "
             f"and by finite differences (float64, eps {eps:g})")
        echo(f"  {'entry (o, c, dy, dx)':<24}{'float32 grad':>14}{'float64 grad':>14}{'numeric':>14}")
        for i, a32, a64, nu in zip(arrays["fd_index"], arrays["fd_float32"], arrays["fd_analytic64"],
                                   arrays["fd_numeric"]):
            ent = str(tuple(int(v) for v in np.unravel_index(i, arrays["weight_before"].shape)))
            echo(f"  {ent:<24}{a32:>14.6e}{a64:>14.6e}{nu:>14.6e}")
    paths = [os.path.join(out, "trace.json"), os.path.join(out, f"trace-{name}.npz")]
    with open(paths[0], "w") as f:
        json.dump(dict(epoch=epoch, step=step, layer=name, loss=float(arrays["loss"]), rows=rows), f, indent=1)
    np.savez(paths[1], **arrays)
    echo(f"\nwrote {paths[0]} and {paths[1]} ({', '.join(sorted(arrays))})")
    return rows, arrays, paths
