"""CH-L3n link-prediction scores of a sparse conv layer (docs/algorithm.md sections 3-4).

``ch_scores`` is the public entry point. Two exact routes give the same numbers:
- ``ch_scores_reference``: builds the layer's explicit bipartite graph (``conv_topology``),
  scores every absent link with the matrix form of section 3 on a sparse (COO, NumPy-only)
  0/1 matrix ``X``, then averages each kernel entry over its windows (section 4). Readable;
  its cost grows with the number of L3 paths, so it suits small and moderate layers.
- ``cht.fast_scores.ch_scores_fast``: the same sums regrouped by window classes, never
  building the graph; the default.
``ch_matrix`` is the dense matrix form on an explicit ``X``, for study and small graphs.
"""
import numpy as np

from minicnn import backend
from minicnn.utils import conv
from cht.fast_scores import ch_scores_fast, node_weight
from cht.topology import check_layer, conv_topology

METHODS = ("ch2", "ch3")


def ch_matrix(X, method="ch3"):
    """CH-L3n score of every absent link of a bipartite graph, dense matrix form.

    Inputs: X 0/1 (n_out, n_in) (rows outputs, columns inputs), NumPy or CuPy; method "ch2"/"ch3".
    Returns float64 (n_out, n_in): ``S = (Wr X + (Wc X^T)^T) * (X == 0)`` with
    ``Cr = X X^T``, ``Wr[i, k] = g(Cr[i, k], dr[k])`` (``dr`` row sums; ``g`` = ``node_weight``:
    ``[C>0] / (1 + max(d - C - 1, 0))``, times ``1 + C`` for CH2), ``Wc`` likewise from
    ``Cc = X^T X`` and column sums ``dc``.
    """
    _check_method(method)
    xp = backend.get_array_module(X)
    X = (xp.asarray(X) != 0).astype(xp.float64)
    Cr, Cc = X @ X.T, X.T @ X                       # common inputs / common outputs
    dr, dc = X.sum(axis=1), X.sum(axis=0)           # degrees of outputs / inputs
    Wr = node_weight(Cr, dr[None, :], method)       # weight of community node k (a column)
    Wc = node_weight(Cc, dc[None, :], method)
    return (Wr @ X + (Wc @ X.T).T) * (X == 0)


def _coo_sum(rows, cols, vals, n_cols):
    """Sum duplicate entries of a COO matrix; returns (rows, cols, vals), sorted by (row, col)."""
    key = rows * n_cols + cols
    if key.size and key.max() < max(4 * key.size, 1 << 20):    # a dense tally beats sorting
        present = np.flatnonzero(np.bincount(key))
        total = np.bincount(key, weights=vals)[present]
        key = present
    else:
        key, inv = np.unique(key, return_inverse=True)
        total = np.bincount(inv.ravel(), weights=vals, minlength=key.size)
    return key // n_cols, key % n_cols, total


def _coo_matmul(a, b, n_cols):
    """``A @ B`` of COO matrices ``a = (rows, inner, vals)``, ``b = (inner, cols, vals)``.

    A sort-merge join on the inner index: every entry ``(i, k)`` of A meets every entry
    ``(k, j)`` of B; the products are summed per ``(i, j)``. ``n_cols``: columns of B.
    """
    ar, ak, av = a
    order = np.argsort(b[0], kind="stable")
    bk, bc, bv = (x[order] for x in b)
    lo = np.searchsorted(bk, ak, side="left")
    cnt = np.searchsorted(bk, ak, side="right") - lo                 # partners of each A entry
    left = np.repeat(np.arange(ak.size), cnt)                        # A entry of each product
    right = lo[left] + np.arange(left.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)   # B entry
    return _coo_sum(ar[left], bc[right], av[left] * bv[right], n_cols)


def ch_sparse(edges_out, edges_in, n_out, n_in, method="ch3"):
    """The matrix form of ``ch_matrix`` on a sparse graph given as edges (NumPy int arrays).

    Returns COO ``(u, v, s)``: output ids, input ids, float64 scores of the absent links
    ``(u, v)`` with a positive score (every other absent link scores 0).
    """
    _check_method(method)
    ones = np.ones(edges_out.size)
    X, XT = (edges_out, edges_in, ones), (edges_in, edges_out, ones)
    dr, dc = np.bincount(edges_out, minlength=n_out), np.bincount(edges_in, minlength=n_in)
    i, k, Cr = _coo_matmul(X, XT, n_out)                             # Cr = X X^T, entries > 0
    Wr = (i, k, node_weight(Cr, dr[k], method))
    v, a, Cc = _coo_matmul(XT, X, n_in)                              # Cc = X^T X, entries > 0
    WcT = (a, v, node_weight(Cc, dc[a], method))                     # Wc^T: (Wc X^T)^T = X Wc^T
    t1, t2 = _coo_matmul(Wr, X, n_in), _coo_matmul(X, WcT, n_in)
    u, v, s = _coo_sum(*(np.concatenate(z) for z in zip(t1, t2)), n_in)
    absent = ~np.isin(u * n_in + v, edges_out * n_in + edges_in)     # the factor (X == 0)
    return u[absent], v[absent], s[absent]


def ch_scores_reference(mask, input_hw, stride=1, padding=0, method="ch3"):
    """``ch_scores`` through the explicit graph (NumPy; see ``ch_scores`` for the contract)."""
    _check_method(method)
    device = backend.device_of(mask)
    mask, (H, W), (sh, sw), (ph, pw), (Ho, Wo) = check_layer(backend.to_numpy(mask),
                                                              input_hw, stride, padding)
    C_out, C_in, kh, kw = mask.shape
    edges_in, edges_out, n_in, n_out = conv_topology(mask, (H, W), (sh, sw), (ph, pw))
    u, v, s = ch_sparse(edges_out, edges_in, n_out, n_in, method)
    # back to kernel entries: u = (o, i, j), v = (c, y, x), offset (y - i*sh + ph, x - j*sw + pw)
    o, i, j = u // (Ho * Wo), u // Wo % Ho, u % Wo
    c, y, x = v // (H * W), v // W % H, v % W
    dy, dx = y - i * sh + ph, x - j * sw + pw
    link = (dy >= 0) & (dy < kh) & (dx >= 0) & (dx < kw)            # pairs that are layer links
    flat = ((o * C_in + c) * kh + dy) * kw + dx
    total = np.bincount(flat[link], weights=s[link], minlength=mask.size).reshape(mask.shape)
    n_d = conv.window_counts((H, W), (kh, kw), (sh, sw), (ph, pw))  # (kh, kw) windows where d is inside
    scores = np.where(n_d > 0, total / np.maximum(n_d, 1), 0.0)
    return backend.to_device(scores, device)


def ch_scores(mask, input_hw, stride=1, padding=0, method="ch3", impl="fast", macs=None):
    """Window-averaged CH-L3n regrowth scores of a conv layer's disabled kernel entries.

    Inputs:
    - mask: bool (C_out, C_in, kh, kw), NumPy or CuPy (0/1 of another dtype is accepted)
    - input_hw: (H, W) of the layer's input map; stride, padding: int or (h, w) pair
    - method: "ch3" (CH3-L3n) or "ch2" (CH2-L3n)
    - impl: "fast" (window classes, default) or "reference" (explicit graph); equal results
    - macs: None, or a list that receives the multiply-adds of each matrix product of the fast
      route (the scoring cost of docs/algorithm.md section 9); the reference route adds none
    Returns float64 (C_out, C_in, kh, kw) on the mask's device: for each disabled entry the mean,
    over the windows where it lies inside the image, of the CH score of its absent link;
    0 for active entries and for entries inside no window.
    """
    _check_method(method)
    if impl == "reference":
        return ch_scores_reference(mask, input_hw, stride, padding, method)
    if impl != "fast":
        raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
    mask, hw, st, pad, _ = check_layer(mask, input_hw, stride, padding)
    return ch_scores_fast(mask, hw, st, pad, method, macs)


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
