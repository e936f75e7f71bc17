"""Convolution geometry, im2col and col2im, each written once (as Chainer's ``utils/conv.py``).

``Conv2d``, ``MaxPool2d`` and ``cht`` (the layer's graph, the window average of the CH scores)
all take their geometry from here. Functional: arrays in, arrays out, no state.

Legend: N batch, C channels, F filters, H, W input height/width, kh, kw kernel, sh, sw stride,
ph, pw zero padding, oh, ow output height/width, Hp = H + 2*ph, Wp = W + 2*pw the padded size,
K = C*kh*kw the length of one unrolled receptive field.

Geometry (docs/algorithm.md section 1): the window of output pixel ``(y, x)`` reads, at kernel
offset ``(i, j)``, the padded input at ``(y*sh + i, x*sw + j)``, which is the input pixel
``(y*sh + i - ph, x*sw + j - pw)`` (or padding); along each axis ``o = (n + 2p - k) // s + 1``.

Column layouts. ``im2col`` pads ``x`` into a work buffer and copies the ``kh*kw`` strided
slices of it into ``cols`` ``(C, kh, kw, N, oh, ow)``:
``cols[c, i, j, n, y, x] = xpad[n, c, y*sh + i, x*sw + j]``, which is ``(K, N*oh*ow)``
flattened, so that a conv is one GEMM ``W (F, K) @ cols (K, P)`` on both operands as they are
(the weight ``(F, C, kh, kw)`` flattens to ``(F, K)`` in the same ``(c, i, j)`` order). The
work buffer is ``(C, N, Hp, Wp)`` (pad and transpose in one copy), so that each strided copy
keeps the axis order of its place in ``cols``. "Batch last" is the same with the batch axis
last: work buffer ``(C, Hp, Wp, N)``, ``cols`` ``(C, kh, kw, oh, ow, N)`` (columns ordered
``(y, x, n)``); each strided copy then moves runs of ``ow*N`` values instead of ``ow``, which
pays on small maps (the choice is the caller's: ``minicnn.performance``).
"""
import operator

import numpy as np

from minicnn import backend


# -- geometry -------------------------------------------------------------------------------
def pair(v, name="size", minimum=0):
    """``3 -> (3, 3)``; a pair stays a pair. ints (or NumPy ints) ``>= minimum``, else ValueError."""
    p = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    try:
        p = tuple(operator.index(a) for a in p)        # ints, NumPy ints; not floats
    except TypeError:
        p = ()
    if len(p) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(p) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return p


def out_size(n, k, s, p):
    """Windows along one axis: ``o = (n + 2p - k) // s + 1`` (input n, kernel k, stride s, padding p)."""
    return (n + 2 * p - k) // s + 1


def output_hw(input_hw, kernel_size, stride, padding):
    """``(oh, ow)`` of a convolution (or pooling: padding ``(0, 0)``) of pairs; ValueError
    when the kernel does not fit the padded input."""
    (H, W), (kh, kw), (sh, sw), (ph, pw) = input_hw, kernel_size, stride, padding
    oh, ow = out_size(H, kh, sh, ph), out_size(W, kw, sw, pw)
    if oh < 1 or ow < 1:
        raise ValueError(f"kernel {kh}x{kw} does not fit the padded input {H + 2 * ph}x{W + 2 * pw}")
    return oh, ow


def window_counts(input_hw, kernel_size, stride, padding):
    """``n_d`` int64 ``(kh, kw)``: the number of windows in which kernel offset ``d = (i, j)``
    lies inside the image (not on padding), ``n_d = n_i * n_j`` with
    ``n_i = #{y < oh : 0 <= y*sh + i - ph < H}`` (docs/algorithm.md section 4)."""
    (H, W), (kh, kw), (sh, sw), (ph, pw) = input_hw, kernel_size, stride, padding
    oh, ow = output_hw(input_hw, kernel_size, stride, padding)

    def axis(n, m, k, s, p):                         # (k,): n_i along one axis
        pix = np.arange(m)[:, None] * s + np.arange(k) - p       # (m, k) input pixel of (window, offset)
        return ((pix >= 0) & (pix < n)).sum(axis=0)

    return np.outer(axis(H, oh, kh, sh, ph), axis(W, ow, kw, sw, pw)).astype(np.int64)


# -- the naive reference: one dot product per output pixel -----------------------------------
def conv2d_naive(x, w, b, stride, padding):
    """``y[n, f, y, x] = b[f] + sum_{c,i,j} w[f, c, i, j] * xpad[n, c, y*sh + i, x*sw + j]`` by
    loops over the output pixels (as CS231n's ``conv_forward_naive``): slow, plainly right.

    x ``(N, C, H, W)``, w ``(F, C, kh, kw)``, b ``(F,)`` or None; stride, padding pairs.
    Returns y ``(N, F, oh, ow)``.
    """
    xp = backend.get_array_module(x)
    (sh, sw), (ph, pw), (kh, kw) = stride, padding, w.shape[2:]
    oh, ow = output_hw(x.shape[2:], (kh, kw), stride, padding)
    xpad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = xp.zeros((x.shape[0], w.shape[0], oh, ow), dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            patch = xpad[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]           # (N, C, kh, kw)
            y[:, :, i, j] = xp.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3]))  # (N, F)
    return y if b is None else y + b[None, :, None, None]


def conv2d_naive_backward(x, w, dy, stride, padding):
    """The gradients of :func:`conv2d_naive` by the same loops: per output pixel,
    ``dw += dy[:, :, y, x]^T patch``, ``dxpad[window] += dy[:, :, y, x] w``, ``db = sum dy``.

    Returns ``(dx (N, C, H, W), dw (F, C, kh, kw), db (F,))``.
    """
    xp = backend.get_array_module(x)
    (sh, sw), (ph, pw), (kh, kw) = stride, padding, w.shape[2:]
    N, C, H, W = x.shape
    xpad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dxpad, dw = xp.zeros_like(xpad), xp.zeros_like(w)
    for i in range(dy.shape[2]):
        for j in range(dy.shape[3]):
            win = (slice(None), slice(None), slice(i * sh, i * sh + kh), slice(j * sw, j * sw + kw))
            dw += xp.tensordot(dy[:, :, i, j], xpad[win], axes=([0], [0]))       # (F, C, kh, kw)
            dxpad[win] += xp.tensordot(dy[:, :, i, j], w, axes=([1], [0]))       # (N, C, kh, kw)
    return dxpad[:, :, ph:ph + H, pw:pw + W], dw, dy.sum(axis=(0, 2, 3))


# -- work layouts ---------------------------------------------------------------------------
_TO_WORK = {False: (1, 0, 2, 3), True: (1, 2, 3, 0)}     # NCHW -> (C, N, H, W) or (C, H, W, N)
_FROM_WORK = {False: (1, 0, 2, 3), True: (3, 0, 1, 2)}   # and back


def work_shape(C, n, h, w, batch_last=False):
    """The shape of an ``(n, C, h, w)`` batch in the work layout: ``(C, n, h, w)`` or, batch
    last, ``(C, h, w, n)``."""
    return (C, h, w, n) if batch_last else (C, n, h, w)


def to_work(a, batch_last=False):
    """A view of NCHW ``a`` in the work layout (no copy)."""
    return a.transpose(_TO_WORK[batch_last])


def from_work(a, batch_last=False):
    """A view of work-layout ``a`` as NCHW (no copy)."""
    return a.transpose(_FROM_WORK[batch_last])


def _spatial(a, batch_last):
    """``a[c, n, y, x]`` (or ``a[c, y, x, n]``) as a function ``(ys, xs) -> view`` of those pixels."""
    if batch_last:
        return lambda ys, xs: a[:, ys, xs, :]
    return lambda ys, xs: a[:, :, ys, xs]


def _windows(kernel_size, stride, out_hw):
    """``(i, j, ys, xs)`` for every kernel offset: the strided slices of the padded input that
    offset ``(i, j)`` reads in the ``(oh, ow)`` windows."""
    (kh, kw), (sh, sw), (oh, ow) = kernel_size, stride, out_hw
    return [(i, j, slice(i, i + sh * oh, sh), slice(j, j + sw * ow, sw)) for i in range(kh) for j in range(kw)]


# -- im2col / col2im ------------------------------------------------------------------------
def pad_to_work(x, padding, xpad=None, batch_last=False):
    """``x`` ``(N, C, H, W)`` zero-padded by ``padding`` into the work layout
    ``work_shape(C, N, Hp, Wp)`` (pad and transpose in one copy); into the buffer ``xpad`` if
    given (its border is zeroed here). Returns the padded array."""
    xp = backend.get_array_module(x)
    N, C, H, W = x.shape
    ph, pw = padding
    if xpad is None:
        xpad = xp.empty(work_shape(C, N, H + 2 * ph, W + 2 * pw, batch_last), dtype=x.dtype)
    at = _spatial(xpad, batch_last)
    if ph or pw:     # a reused buffer's border holds other data until zeroed
        at(slice(None, ph), slice(None))[...] = 0
        at(slice(ph + H, None), slice(None))[...] = 0
        at(slice(None), slice(None, pw))[...] = 0
        at(slice(None), slice(pw + W, None))[...] = 0
    at(slice(ph, ph + H), slice(pw, pw + W))[...] = to_work(x, batch_last)
    return xpad


def im2col(x, kernel_size, stride, padding, cols=None, xpad=None, batch_last=False):
    """Unroll every receptive field of ``x`` into a column.

    Args:
        x: ``(N, C, H, W)``.
        cols, xpad: optional buffers to fill instead of allocating: ``cols`` of the result's
            shape, ``xpad`` ``work_shape(C, N, Hp, Wp)`` (its border is zeroed here).
    Returns:
        cols ``(C, kh, kw, N, oh, ow)``, ``cols[c, i, j, n, y, x] = xpad[n, c, y*sh+i, x*sw+j]``
        (``(C, kh, kw, oh, ow, N)`` batch last); reshape to ``(K, P)`` is free.
    """
    xp = backend.get_array_module(x)
    N, C, H, W = x.shape
    kh, kw = kernel_size
    oh, ow = output_hw((H, W), kernel_size, stride, padding)
    if cols is None:
        cols = xp.empty((C, kh, kw) + work_shape(C, N, oh, ow, batch_last)[1:], dtype=x.dtype)
    at = _spatial(pad_to_work(x, padding, xpad, batch_last), batch_last)
    for i, j, ys, xs in _windows(kernel_size, stride, (oh, ow)):
        cols[:, i, j] = at(ys, xs)                    # cols[c, i, j] = xpad[c, :, i::sh, j::sw]
    return cols


def col2im(dcols, x_shape, kernel_size, stride, padding, dxpad=None, batch_last=False, out=None):
    """The adjoint of :func:`im2col`: add every column entry back onto its input pixel.

    Args:
        dcols: ``(C, kh, kw, N, oh, ow)`` (or batch last, as ``im2col``).
        x_shape: ``(N, C, H, W)``.
        dxpad: optional ``work_shape(C, N, Hp, Wp)`` buffer to accumulate into (zeroed here).
        out: optional ``(N, C, H, W)`` array (a view is fine) to write dx into.
    Returns:
        dx ``(N, C, H, W)`` (``out``, or a new C-contiguous array); overlapping windows add up.
    """
    xp = backend.get_array_module(dcols)
    N, C, H, W = x_shape
    ph, pw = padding
    oh, ow = output_hw((H, W), kernel_size, stride, padding)
    if dxpad is None:
        dxpad = xp.empty(work_shape(C, N, H + 2 * ph, W + 2 * pw, batch_last), dtype=dcols.dtype)
    dxpad.fill(0)
    at = _spatial(dxpad, batch_last)
    for i, j, ys, xs in _windows(kernel_size, stride, (oh, ow)):   # im2col's loop with +=
        at(ys, xs)[...] += dcols[:, i, j]            # dxpad[c, :, i::sh, j::sw] += dcols[c, i, j]
    inner = from_work(at(slice(ph, ph + H), slice(pw, pw + W)), batch_last)   # drop the padding
    if out is None:
        return inner.copy()
    out[...] = inner
    return out
