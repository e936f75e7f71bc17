"""Winograd's minimal filtering F(2x2, 3x3): a 3x3 convolution with stride 1 in 16 products per
2x2 block of outputs instead of 36 (Lavin and Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016). Functional, as ``minicnn.utils.conv``: arrays in, arrays out.

The output is cut into 2x2 tiles; tile ``(ty, tx)`` reads the 4x4 patch ``d`` of the padded
input at ``(2*ty, 2*tx)``. In one dimension, with ``g`` the 3 kernel taps and ``d`` 4 inputs,

    y = A^T [(G g) * (B^T d)]          (elementwise product of two 4-vectors)

    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]

gives the two outputs ``y_a = sum_i g_i d_(a+i)``; nesting it in both dimensions gives
``Y = A^T [U * V] A`` with ``U = G g G^T`` and ``V = B^T d B`` (4x4 each). Summed over input
channels, each of the 16 positions ``xi`` of the 4x4 products is a matrix product:

    M[xi] = U[xi] @ V[xi]              (F, C) @ (C, P),  P = tiles of the batch

so a convolution is an input transform, 16 GEMMs and an output transform. The gradients are
the adjoints, with the same 16 GEMMs transposed:

    dM = A dY A^T (each 2x2 tile of dy)      dU[xi] = dM[xi] @ V[xi]^T      dg = G^T dU G

On flattened tiles a 2-D transform ``X Z Y^T`` is the product ``(X kron Y) vec(Z)``: the weight
and output transforms (and their adjoints) are computed so, as one small-by-long matrix product
(``G2``, ``AT2``); the input transform, whose patches overlap, as add/sub passes over strided
views, rows then columns.

(dx is the convolution of dy with the flipped kernel: ``Conv2d`` computes it with the same
forward). ``tests/test_winograd.py`` checks each transform against its matrix and the
convolution against the naive loops.

Layouts: the padded input in the batch-last work layout ``(C, Hp, Wp, N)`` of
``minicnn.utils.conv`` (every strided slice of a transform then moves runs of N values);
``V`` ``(4, 4, C, th, tw, N)``, ``M`` and ``dM`` ``(4, 4, F, th, tw, N)`` (the 16 matrices are
``reshape(16, C, -1)``), ``th = oh // 2``, ``tw = ow // 2``; ``U`` and ``dU`` ``(16, F, C)``.
"""
import numpy as np

from minicnn import backend

G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
AT = np.array([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]])
# the 2-D transforms on flattened tiles, X Z Y^T = (X kron Y) vec(Z):
G2 = np.kron(G, G)           # (16, 9):  U[(k, l)] = sum_(i, j) G[k, i] G[l, j] g[(i, j)]
AT2 = np.kron(AT, AT)        # (4, 16):  Y[(a, b)] = sum_(k, l) A^T[a, k] A^T[b, l] M[(k, l)]


def applies(kernel_size, stride, padding, out_hw):
    """F(2x2, 3x3) computes this convolution and its gradients: 3x3 kernel, stride 1, outputs in
    whole 2x2 tiles (the tiles' 4x4 patches then cover the padded input exactly), padding of at
    most 2 (dx is then a convolution of dy padded by 2 - padding)."""
    return (tuple(kernel_size) == (3, 3) and tuple(stride) == (1, 1) and max(padding) <= 2
            and out_hw[0] % 2 == 0 and out_hw[1] % 2 == 0)


def weight_transform(w, U, j0=0, j1=None):
    """``U = G g G^T`` of every kernel: w ``(F, C, 3, 3)`` -> U ``(16, F, C)`` (a buffer to fill),
    or only its kernels ``j0:j1`` of the ``F*C`` (flattened filter-major)."""
    xp = backend.get_array_module(w)
    F, C = w.shape[:2]
    g = w.reshape(F * C, 9).T[:, j0:j1]                                      # (9, j), a view
    xp.matmul(xp.asarray(G2, dtype=w.dtype), g, out=U.reshape(16, F * C)[:, j0:j1])   # (16, 9) @ (9, j)


def weight_transform_adjoint(dU, dg, j0=0, j1=None):
    """``dg = G^T dU G`` of every position: dU ``(16, F, C)`` -> ``dg`` ``(F, C, 3, 3)`` (``+=``),
    or only its kernels ``j0:j1`` of the ``F*C``."""
    xp = backend.get_array_module(dU)
    _, F, C = dU.shape
    d = xp.matmul(xp.asarray(G2.T, dtype=dU.dtype), dU.reshape(16, F * C)[:, j0:j1])    # (9, 16) @ (16, j)
    dg.reshape(F * C, 9)[j0:j1] += d.T


def input_transform(xpad, out_hw, V, rows):
    """``V = B^T d B`` of every 4x4 patch: xpad ``(C, Hp, Wp, N)`` -> V ``(4, 4, C, th, tw, N)``.

    ``V`` and ``rows`` ``(4, C, th, Wp, N)`` (the row transform, ``B^T d`` for every column) are
    buffers to fill; both may be views of a block of channels (the transform of each channel is
    its own).
    """
    xp = backend.get_array_module(xpad)
    th, tw = out_hw[0] // 2, out_hw[1] // 2
    r = [xpad[:, i:i + 2 * th:2] for i in range(4)]             # row i of every patch, (C, th, Wp, N)
    _bt(xp, r, rows)
    for k in range(4):
        _bt(xp, [rows[k][:, :, j:j + 2 * tw:2] for j in range(4)], V[k])    # then the columns


def _bt(xp, d, out):
    """``out[k] = (B^T d)[k]`` along a list of 4 arrays: d0 - d2, d1 + d2, d2 - d1, d1 - d3."""
    xp.subtract(d[0], d[2], out=out[0])
    xp.add(d[1], d[2], out=out[1])
    xp.subtract(d[2], d[1], out=out[2])
    xp.subtract(d[1], d[3], out=out[3])


def output_transform(M, out, f0=0, f1=None, bias=None, Y=None):
    """``Y = A^T M A`` of every tile, as one product ``(A^T kron A^T) (4, 16) @ M (16, ...)``:
    M ``(4, 4, F, th, tw, N)`` -> ``out`` ``(N, F, 2*th, 2*tw)`` (a view is fine), ``+ bias``
    ``(F,)`` if given; only filters ``f0:f1`` if given. ``Y`` ``(4, F, th, tw, N)``: a buffer."""
    xp = backend.get_array_module(M)
    F = M.shape[2]
    f1 = F if f1 is None else f1
    Y = xp.empty((4,) + M.shape[2:], dtype=M.dtype) if Y is None else Y
    cols = slice(f0 * (M[0, 0, 0].size), f1 * (M[0, 0, 0].size))              # filters f0:f1
    xp.matmul(xp.asarray(AT2, dtype=M.dtype), M.reshape(16, -1)[:, cols], out=Y.reshape(4, -1)[:, cols])
    for a in range(2):
        for b in range(2):
            tile = Y[2 * a + b, f0:f1].transpose(3, 0, 1, 2)                    # (N, f, th, tw), a view
            if bias is None:
                out[:, f0:f1, a::2, b::2] = tile
            else:
                xp.add(tile, bias[f0:f1, None, None], out=out[:, f0:f1, a::2, b::2])


def output_transform_adjoint(dy, dM, f0=0, f1=None, dY=None):
    """``dM = A dY A^T`` of every 2x2 tile of dy ``(N, F, oh, ow)``, as one product
    ``(A^T kron A^T)^T (16, 4) @ dY (4, ...)``: -> dM ``(4, 4, F, th, tw, N)``; only filters
    ``f0:f1`` if given. ``dY`` ``(4, F, th, tw, N)``: a buffer for the tiles of dy."""
    xp = backend.get_array_module(dy)
    F = dy.shape[1]
    f1 = F if f1 is None else f1
    dY = xp.empty((4,) + dM.shape[2:], dtype=dy.dtype) if dY is None else dY
    for a in range(2):
        for b in range(2):
            dY[2 * a + b, f0:f1] = dy[:, f0:f1, a::2, b::2].transpose(1, 2, 3, 0)    # (f, th, tw, N)
    cols = slice(f0 * (dM[0, 0, 0].size), f1 * (dM[0, 0, 0].size))
    xp.matmul(xp.asarray(AT2.T, dtype=dy.dtype), dY.reshape(4, -1)[:, cols], out=dM.reshape(16, -1)[:, cols])
