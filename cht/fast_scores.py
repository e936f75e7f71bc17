"""Exact CH-L3n window-averaged scores without building the layer's graph (CHT_SPEC.md section 4).

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

from minicnn import backend
from minicnn.utils import conv


def node_weight(C, deg, method):
    """Weight of a community node ``z`` (CHT_SPEC.md sections 3-4), elementwise, float64.

    ``C``: common neighbours of the scored node and ``z`` (= ``di(z)``); ``deg``: ``d(z)``
    (broadcast against ``C``); exact integer counts of any dtype.
    ``de(z) = max(deg - C - 1, 0)``; returns ``[C > 0] / (1 + de)`` for "ch3" and
    ``[C > 0] (1 + C) / (1 + de)`` for "ch2".
    """
    xp = backend.get_array_module(C)
    den = xp.maximum(deg - C, 1)            # 1 + de = 1 + max(deg - C - 1, 0)
    den = xp.where(C > 0, den, xp.inf)      # [C > 0]: no common neighbour, no community node
    num = 1.0 if method == "ch3" else C + 1.0
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


def _dot(a, b, macs):
    """``a``'s last axis contracted with ``b``'s first: ``a @ b`` (``b`` 2-D) or ``tensordot``.

    ``macs``: None, or a list to which the product's multiply-adds, ``a.size * b.size / b.shape[0]``,
    are appended (docs/algorithm.md section 9 counts the scoring from them).
    """
    out = a @ b if b.ndim == 2 else backend.get_array_module(a, b).tensordot(a, b, axes=1)
    if macs is not None:
        macs.append(a.size * (b.size // b.shape[0]))
    return out


def _class_sums(sets, degs, counts, pairs, deg_vec, method, xp, macs):
    """Count-weighted class sums of ``g`` for one shift: ``A[r] = sum_cl counts*sets[cl, r] g_cl``.

    ``pairs`` (nu, C, C): the products for the used offsets ``r`` (columns of ``sets`` already
    restricted to them); ``deg_vec`` (kk, C): the degree contribution of each offset.
    Returns float64 (nu, C, C).
    """
    ftype = pairs.dtype
    common = _dot(xp.asarray(sets, dtype=ftype), pairs, macs)             # (ncl, C, C) counts
    deg = _dot(xp.asarray(degs, dtype=ftype), deg_vec, macs)               # (ncl, C) d(z)
    g = node_weight(common, deg[:, None, :], method)                       # (ncl, C, C)
    weights = xp.asarray(sets.T * counts, dtype=xp.float64)               # (nu, ncl)
    return _dot(weights, g, macs)                                          # (nu, C, C)


def _community_sums(prods, shifts, deg_vec, method, xp, macs):
    """The ``A`` matrices of one term, grouped by the entry offset they score.

    ``prods`` (kk, C, kk, C): ``prods[d, :, e, :]`` the common-neighbour counts of offsets
    ``d``, ``e``; ``shifts``: per shift, ``(sets, degs, counts, partner)`` with the 2-D classes
    and ``partner`` (kk,) the offset paired with each ``d``. Returns ``{d: [(A, partner), ...]}``.
    """
    terms = {}
    for sets, degs, counts, partner in shifts:
        used = np.flatnonzero(sets.any(axis=0))               # offsets d that occur
        if used.size == 0:
            continue
        pairs = prods[xp.asarray(used), :, xp.asarray(partner[used]), :]   # (nu, C, C)
        A = _class_sums(sets[:, used], degs, counts, pairs, deg_vec, method, xp, macs)
        for a, d, e in zip(A, used.tolist(), partner[used].tolist()):
            terms.setdefault(d, []).append((a, e))
    return terms


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
    Cost: two GEMMs for all offset pairs, one small GEMM per shift and class group, one GEMM per
    offset for the final products (few, large BLAS calls: they stay fast on a busy machine).
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
    # term 1: output community nodes b = (o', w + D); P[d, :, e, :] = M_d M_e^T
    flat = Mo.reshape(kk * C_out, C_in)
    P = _dot(flat, flat.T, macs).reshape(kk, C_out, kk, C_out)
    terms = _community_sums(P, _out_shifts(*geometry), Mo.sum(axis=2), method, xp, macs)
    del P
    for d, ts in terms.items():                                # S1[d] = sum_D A1[d, D] M_(d-sD)
        S[d] += _dot(xp.concatenate([a for a, _ in ts], axis=1),
                     xp.concatenate([M64[e] for _, e in ts]), macs)
    # term 2: input community nodes a = (c', q + L); Q[d, :, e, :] = M_d^T M_e
    flat = xp.ascontiguousarray(Mo.transpose(0, 2, 1)).reshape(kk * C_in, C_out)
    Q = _dot(flat, flat.T, macs).reshape(kk, C_in, kk, C_in)
    terms = _community_sums(Q, _in_shifts(*geometry), Mo.sum(axis=1), method, xp, macs)
    del Q
    for d, ts in terms.items():                                # S2[d] = sum_L M_(d+L) A2[d, d+L]^T
        S[d] += _dot(xp.concatenate([M64[e] for _, e in ts], axis=1),
                     xp.concatenate([a.T for a, _ in ts]), macs)
    del terms
    # mean over the n_d windows where entry d lies inside the image; 0 on active entries
    n_d = conv.window_counts((H, W), (kh, kw), (sh, sw), (ph, pw))                     # (kh, kw)
    n_d = xp.asarray(n_d.reshape(kk, 1, 1), dtype=xp.float64)
    S = xp.where((Mo == 0) & (n_d > 0), S / xp.maximum(n_d, 1), 0.0)
    return S.reshape(kh, kw, C_out, C_in).transpose(2, 3, 0, 1).copy()
