"""Exact CH-L3n window-averaged scores without building the layer's graph (docs/algorithm.md section 4).

Legend: ``M_d = mask[:, :, d]`` (``C_out x C_in``) for kernel offset ``d`` in ``K``
(``kk = kh*kw`` offsets, flattened); window ``w``, stride ``s``, padding ``p``; window ``w``
puts entry ``(o, c, d)`` on pixel ``q = s*w + d - p``; ``in(q)``: pixel inside the image;
``win(w)``: a real window. The score of a disabled entry sums two kinds of community nodes:

- output nodes ``b = (o', w + D)``: ``S1[:, :, d] = sum_D A1[d, D] M_(d - sD)``, where
  ``A1[d, D] = sum_w g(Cr_(w,D), dout(w + D))`` over windows with ``in(s*w + d - p)`` and
  ``win(w + D)``, ``Cr_(w,D) = sum_d1 M_d1 M_(d1-sD)^T`` over ``d1`` with ``in(s*w + d1 - p)``
  and ``d1 - sD`` in ``K`` (the common inputs of ``(o, w)`` and ``(o', w + D)``);
- input nodes ``a = (c', q + L)``: ``S2[:, :, d] = sum_L M_(d+L) A2[d, d + L]^T``, where
  ``A2[d, d+L] = sum_q g(Cc_(q,L), din(q + L))`` over pixels ``q`` and ``q + L`` inside and a
  window ``(q - d + p)/s``, ``Cc_(q,L) = sum_e M_e^T M_(e+L)`` over ``e`` with a window
  ``(q - e + p)/s`` and ``e + L`` in ``K`` (the common outputs of ``(c, q)`` and ``(c', q+L)``).

The offsets that enter ``Cr_(w,D)`` are exactly the entries ``d`` that window ``w`` adds to
``A1[d, D]`` (likewise for ``Cc``), and both factor into a row part and a column part. So the
windows (pixels) are grouped, one axis at a time, into classes with the same offset set and the
same degree pattern; a 2-D class is a row class times a column class, with the product of the
counts. Each class costs one ``g`` matrix; the window sums become count-weighted class sums.
Counts are exact in float32 (all products are of 0/1 matrices with sums < 2**24); ``g``, the
class sums and the final products are float64.
"""
import numpy as np

from minicnn import backend, performance as perf
from minicnn.utils import conv


def node_weight(C, deg, method):
    """Weight of a community node ``z`` (docs/algorithm.md sections 3-4), elementwise, float64.

    ``C``: common neighbours of the scored node and ``z`` (= ``di(z)``); ``deg``: ``d(z)``
    (broadcast against ``C``); exact integer counts of any dtype, ``C >= 0``.
    ``de(z) = max(deg - C - 1, 0)``; returns ``[C > 0] / (1 + de)`` for "ch3" and
    ``[C > 0] (1 + C) / (1 + de)`` for "ch2".
    """
    xp = backend.get_array_module(C)
    den = xp.subtract(deg, C)
    xp.maximum(den, 1, out=den)             # 1 + de = 1 + max(deg - C - 1, 0)
    num = xp.minimum(C, 1)                  # [C > 0] (C whole): no common neighbour, no community node
    if method == "ch2":
        num += C                            # (1 + C) [C > 0]
    return xp.divide(num, den, dtype=xp.float64)   # one rounding, in float64


def _group(keys):
    """Rows of the bool matrix ``keys`` (n, m) grouped: (unique rows (ncl, m), counts (ncl,))."""
    if keys.shape[0] == 0:
        return keys, np.zeros(0, dtype=np.int64)
    uniq, counts = np.unique(keys, axis=0, return_counts=True)
    return uniq, counts


def _inside(pix, n):
    return (pix >= 0) & (pix < n)


def _window(pix, e, p, s, m):
    """``(pix - e + p) / s`` is a real window index (pix (n, 1), e (k,)) -> bool (n, k)."""
    num = pix - e + p
    return (num >= 0) & (num % s == 0) & (num // s < m)


def _out_classes(n, m, k, s, p, D):
    """One axis, term 1, window shift ``D``: classes of windows ``i`` with a window ``i + D``.

    Returns ``(sets, degs, counts)``: ``sets`` bool (ncl, k) the offsets ``d1`` with
    ``in(s*i + d1 - p)`` and ``0 <= d1 - s*D < k``; ``degs`` bool (ncl, k) the offsets inside for
    window ``i + D`` (its degree); ``counts`` (ncl,). Classes with an empty set are dropped.
    """
    i = np.arange(m)[:, None]
    i = i[_inside(i + D, m)[:, 0]]                                      # (n_i, 1)
    t = np.arange(k)
    sets = _inside(s * i + t - p, n) & _inside(t - s * D, k)           # (n_i, k)
    degs = _inside(s * (i + D) + t - p, n)                              # (n_i, k)
    uniq, counts = _group(np.concatenate([sets, degs], axis=1))
    keep = uniq[:, :k].any(axis=1)
    return uniq[keep, :k], uniq[keep, k:], counts[keep]


def _in_classes(n, m, k, s, p, L):
    """One axis, term 2, pixel offset ``L``: classes of pixels ``q`` with ``q + L`` inside.

    Returns ``(sets, degs, counts)``: ``sets`` bool (ncl, k) the offsets ``e`` with a window
    ``(q - e + p)/s`` and ``0 <= e + L < k``; ``degs`` bool (ncl, k) the offsets ``e`` with a
    window ``(q + L - e + p)/s`` (the degree of pixel ``q + L``); ``counts`` (ncl,).
    """
    q = np.arange(n)[:, None]
    q = q[_inside(q + L, n)[:, 0]]                                      # (n_q, 1)
    t = np.arange(k)
    sets = _window(q, t, p, s, m) & _inside(t + L, k)                   # (n_q, k)
    degs = _window(q + L, t, p, s, m)                                   # (n_q, k)
    uniq, counts = _group(np.concatenate([sets, degs], axis=1))
    keep = uniq[:, :k].any(axis=1)
    return uniq[keep, :k], uniq[keep, k:], counts[keep]


def _classes_2d(cy, cx):
    """Row classes x column classes -> (sets (ncl, kk), degs (ncl, kk), counts (ncl,))."""
    (sy, dy, ny), (sx, dx, nx) = cy, cx
    shape = (len(ny) * len(nx), sy.shape[1] * sx.shape[1])
    sets = (sy[:, None, :, None] & sx[None, :, None, :]).reshape(shape)
    degs = (dy[:, None, :, None] & dx[None, :, None, :]).reshape(shape)
    return sets, degs, (ny[:, None] * nx[None, :]).ravel()


def _dot(a, b, macs, out=None):
    """``a``'s last axis contracted with ``b``'s first: ``a @ b`` (``b`` 2-D, into ``out`` if
    given) or ``tensordot``.

    ``macs``: None, or a list to which the product's multiply-adds, ``a.size * b.size / b.shape[0]``,
    are appended (docs/algorithm.md section 9 counts the scoring from them).
    """
    if b.ndim == 2:
        out = backend.get_array_module(a, b).matmul(a, b, out=out)
    else:
        out = backend.get_array_module(a, b).tensordot(a, b, axes=1)
    if macs is not None:
        macs.append(a.size * (b.size // b.shape[0]))
    return out


def _class_sums(sets, degs, counts, prods, deg_vec, method, xp, macs):
    """Count-weighted class sums of ``g`` for one shift: ``A[r] = sum_cl counts*sets[cl, r] g_cl``.

    ``prods``: the nu ``(C, C)`` products for the used offsets ``r`` (columns of ``sets`` already
    restricted to them); ``deg_vec`` (kk, C): the degree contribution of each offset.
    Returns float64 (nu, C, C). Computed a block of rows at a time
    (``minicnn.performance.row_blocks``): the passes over ``common`` and ``g`` stay in cache.
    """
    ftype, C = deg_vec.dtype, prods[0].shape[0]
    sets_f = xp.asarray(sets, dtype=ftype)                                 # (ncl, nu)
    deg = _dot(xp.asarray(degs, dtype=ftype), deg_vec, macs)               # (ncl, C) d(z)
    weights = xp.asarray(sets.T * counts, dtype=xp.float64)               # (nu, ncl)
    A = xp.empty((len(prods), C, C), dtype=xp.float64)
    for r0, r1 in perf.row_blocks(C, len(counts) * C * 8):
        common = _dot(sets_f, xp.stack([p[r0:r1] for p in prods]), macs)  # (ncl, rows, C) counts
        g = node_weight(common, deg[:, None, :], method)                   # (ncl, rows, C)
        A[:, r0:r1] = _dot(weights, g.reshape(len(counts), -1), macs).reshape(len(prods), r1 - r0, C)
    return A


def _community_sums(F, shifts, deg_vec, method, xp, macs):
    """The ``A`` matrices of one term, grouped by the entry offset they score.

    ``F`` (kk, C, C'): the 0/1 matrix of each offset (``M_d`` for term 1, ``M_d^T`` for term 2),
    so that ``F[d] F[e]^T`` counts the common neighbours of offsets ``d``, ``e``; ``shifts``: per
    shift, ``(sets, degs, counts, partner)`` with the 2-D classes and ``partner`` (kk,) the offset
    paired with each ``d``. Returns ``{d: [(A, partner), ...]}``, the shifts in order.

    Work on the CPU workers (each part writes only its own result, and BLAS runs single-threaded
    in it, so the numbers do not depend on the worker count): first the products ``F[d] F[e]^T``
    of the offset pairs the shifts use, each unordered pair once (``F[e] F[d]^T`` is its
    transpose), then one part per shift.
    """
    jobs = []
    for sets, degs, counts, partner in shifts:
        used = np.flatnonzero(sets.any(axis=0))                 # offsets d that occur
        if used.size:
            jobs.append((sets[:, used], degs, counts, used.tolist(), partner[used].tolist()))
    pairs = sorted({(min(d, e), max(d, e)) for *_, used, partner in jobs for d, e in zip(used, partner)})
    blocks = dict(zip(pairs, backend.on_items(lambda de: _dot(F[de[0]], F[de[1]].T, macs), pairs, F)))

    def shift(job):
        sets, degs, counts, used, partner = job
        prods = [blocks[d, e] if d <= e else blocks[e, d].T for d, e in zip(used, partner)]
        return _class_sums(sets, degs, counts, prods, deg_vec, method, xp, macs)

    terms = {}
    for (*_, used, partner), A in zip(jobs, backend.on_items(shift, jobs, F)):
        for a, d, e in zip(A, used, partner):
            terms.setdefault(d, []).append((a, e))
    return terms


def _add_products(S, terms, operands, macs):
    """``S[d] += sum_t x_t @ y_t`` over the terms of each offset ``d`` in order, with
    ``(x_t, y_t) = operands(A_t, e_t)``; one part per offset on the CPU workers."""
    def offset(d):
        prod = None
        for a, e in terms.get(d, ()):
            prod = _dot(*operands(a, e), macs, out=prod)           # (C_out, C_in)
            S[d] += prod

    backend.on_items(offset, list(range(len(S))), S)


def _out_shifts(H, W, Ho, Wo, kh, kw, sh, sw, ph, pw):
    """Term 1 shifts ``D``: 2-D window classes and partner offsets ``d - sD``."""
    ry, rx = np.arange(kh)[:, None], np.arange(kw)[None, :]
    for Dy in range(-((kh - 1) // sh), (kh - 1) // sh + 1):
        cy = _out_classes(H, Ho, kh, sh, ph, Dy)
        for Dx in range(-((kw - 1) // sw), (kw - 1) // sw + 1):
            cx = _out_classes(W, Wo, kw, sw, pw, Dx)
            yield (*_classes_2d(cy, cx), ((ry - sh * Dy) * kw + rx - sw * Dx).ravel())


def _in_shifts(H, W, Ho, Wo, kh, kw, sh, sw, ph, pw):
    """Term 2 pixel offsets ``L``: 2-D pixel classes and partner offsets ``d + L``."""
    ry, rx = np.arange(kh)[:, None], np.arange(kw)[None, :]
    for Ly in range(-(kh - 1), kh):
        cy = _in_classes(H, Ho, kh, sh, ph, Ly)
        for Lx in range(-(kw - 1), kw):
            cx = _in_classes(W, Wo, kw, sw, pw, Lx)
            yield (*_classes_2d(cy, cx), ((ry + Ly) * kw + rx + Lx).ravel())


def ch_scores_fast(mask, input_hw, stride, padding, method, macs=None):
    """Window-averaged CH scores by window classes (any stride); arguments already validated.

    Inputs: mask bool (C_out, C_in, kh, kw) NumPy or CuPy; input_hw, stride, padding int pairs.
    Returns float64 (C_out, C_in, kh, kw) on the mask's device: the mean over the ``n_d`` windows
    where each disabled entry lies inside the image of its CH score; 0 on active entries and on
    entries inside no window. ``macs``: None, or a list that receives the multiply-adds of every
    matrix product performed (one int per product).
    Cost: one GEMM per pair of offsets a shift uses (each unordered pair once), one small GEMM
    per shift and class group, one GEMM per offset and shift for the final products; the parts
    run on the CPU workers with single-threaded BLAS (the same bits on any core count).
    """
    xp = backend.get_array_module(mask)
    C_out, C_in, kh, kw = mask.shape
    (H, W), (sh, sw), (ph, pw) = input_hw, stride, padding
    Ho, Wo = conv.output_hw((H, W), (kh, kw), (sh, sw), (ph, pw))
    kk, geometry = kh * kw, (H, W, Ho, Wo, kh, kw, sh, sw, ph, pw)
    exact32 = max(C_in, C_out) * kk < 2 ** 24                  # integer counts stay exact
    ftype = xp.float32 if exact32 else xp.float64
    Mo = mask.transpose(2, 3, 0, 1).reshape(kk, C_out, C_in).astype(ftype)   # (kk, C_out, C_in)
    M64 = Mo.astype(xp.float64)
    S = xp.zeros((kk, C_out, C_in), dtype=xp.float64)
    # term 1: output community nodes b = (o', w + D), common inputs M_d M_e^T
    terms = _community_sums(Mo, _out_shifts(*geometry), Mo.sum(axis=2), method, xp, macs)
    _add_products(S, terms, lambda a, e: (a, M64[e]), macs)          # S1[d] = sum_D A1[d, D] M_(d-sD)
    # term 2: input community nodes a = (c', q + L), common outputs M_d^T M_e
    MoT = xp.ascontiguousarray(Mo.transpose(0, 2, 1))                       # (kk, C_in, C_out)
    terms = _community_sums(MoT, _in_shifts(*geometry), Mo.sum(axis=1), method, xp, macs)
    _add_products(S, terms, lambda a, e: (M64[e], a.T), macs)        # S2[d] = sum_L M_(d+L) A2[d, d+L]^T
    del terms
    # mean over the n_d windows where entry d lies inside the image; 0 on active entries
    n_d = conv.window_counts((H, W), (kh, kw), (sh, sw), (ph, pw))                     # (kh, kw)
    n_d = xp.asarray(n_d.reshape(kk, 1, 1), dtype=xp.float64)
    S = xp.where((Mo == 0) & (n_d > 0), S / xp.maximum(n_d, 1), 0.0)
    return S.reshape(kh, kw, C_out, C_in).transpose(2, 3, 0, 1).copy()
