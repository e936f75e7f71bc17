"""2-D convolution by im2col + GEMM, with a hand-written backward (col2im).

Legend: N batch, C input channels, F output channels (filters), H, W input height/width,
kh, kw kernel, sh, sw stride, ph, pw padding, oh, ow output height/width, Hp, Wp padded size,
K = C*kh*kw (the length of one unrolled receptive field), P = N*oh*ow (output pixels).

Layout of the column buffer: ``cols[c, i, j, n, y, x] = xpad[n, c, y*sh + i, x*sw + j]``,
shape ``(C, kh, kw, N, oh, ow)``, which is ``(K, P)`` when flattened. Why this order:
- the forward GEMM ``W (F, K) @ cols (K, P)`` takes both operands as they are, C-contiguous:
  the weight ``(F, C, kh, kw)`` flattens to ``(F, K)`` in the same ``(c, i, j)`` order as the
  rows of ``cols``, so BLAS gets no copy and no odd strides;
- the GEMM result ``(F, P) = (F, N, oh, ow)`` needs one transpose of the two leading axes to
  become NCHW; it moves whole contiguous ``oh*ow`` rows and is fused with the bias add;
- in backward ``dW^T = cols @ dy_mat^T`` takes ``dy_mat`` ``(F, P)`` as a transposed view,
  which BLAS reads with its transpose flag (no copy);
- im2col pads ``x`` into a ``(C, N, Hp, Wp)`` buffer (pad and transpose in one copy), so each
  of the ``kh*kw`` strided slices is copied with the same axis order as its place in ``cols``
  (long contiguous inner runs). The other natural order, ``(N, oh, ow, K)``, makes the GEMM
  give NHWC, whose transpose to NCHW moves single elements ``F`` apart.

Speed and memory (the performance issue): ``cols`` is ``kh*kw`` times the input, 300 MB for
one VGG16 layer at batch 128. The layer therefore works on chunks of images whose ``cols``
fit in about ``CHUNK_BYTES`` (16 MB: the GEMM reads what im2col has just written while it is
still in cache; much smaller chunks mean many small multi-threaded GEMM calls, which stall
when another process shares the cores), keeps only its input ``x`` for backward (as Chainer
does) and redoes the chunk's im2col there: 0.8 GB less memory for VGG16 at batch 128. With
stride 1, ``dx`` is computed as a convolution of ``dy`` (im2col + GEMM) instead of col2im. Work
arrays come from a module-level workspace shared by every layer (see :func:`workspace`). On the
CPU the chunks go to ``backend.cpu_workers()`` threads (each takes the next one when free),
each with single-threaded BLAS, so that im2col's copies use every core as the GEMMs do (see
"worker threads" below).
"""
import math
import threading

import numpy as np

from minicnn import backend, init
from minicnn.layers.module import Module, Parameter


def _pair(v):
    """``3 -> (3, 3)``; a pair stays a pair (of ints)."""
    if isinstance(v, (tuple, list)):
        a, b = v
        return int(a), int(b)
    return int(v), int(v)


def conv_output_hw(H, W, kernel_size, stride, padding):
    """``(oh, ow)`` of a convolution: ``o = (H + 2*ph - kh) // sh + 1``."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    oh, ow = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"kernel {kernel_size} larger than padded input {(H + 2 * ph, W + 2 * pw)}")
    return oh, ow


# -- workspace ------------------------------------------------------------------------------
# One flat buffer per (name, dtype, device, thread), grown to the largest request and shared by
# every layer: a layer uses its views only inside one forward or backward call, layers run one
# after the other, and each worker thread (see "worker threads") has buffers of its own, so they
# never overlap. Keeping them (instead of a fresh array per call)
# matters on the CPU: a fresh array of a few MB costs a page fault per 4 KiB on first touch.
_WORKSPACE = {}


def workspace(name, shape, like, keep=True):
    """A scratch array ``(shape, like.dtype)`` on ``like``'s device, contents undefined.

    A view of the calling thread's shared buffer ``name`` (valid until its next request of
    that name); with ``keep=False`` a fresh array that nobody keeps.
    """
    xp = backend.get_array_module(like)
    size = math.prod(shape)
    if not keep:
        return xp.empty(shape, dtype=like.dtype)
    key = (name, np.dtype(like.dtype).str, xp.__name__, threading.get_ident())
    buf = _WORKSPACE.get(key)
    if buf is None or buf.size < size:
        _WORKSPACE.pop(key, None)          # free the old one before allocating the bigger one
        buf = _WORKSPACE[key] = xp.empty(size, dtype=like.dtype)
    return buf[:size].reshape(shape)


def clear_workspace():
    """Free every shared work buffer (they come back, at the size needed, on the next call)."""
    _WORKSPACE.clear()


# -- worker threads -------------------------------------------------------------------------
# With ``backend.set_cpu_workers(n)`` a layer hands its chunks of images to n threads
# (``backend.on_items``: each takes the next chunk when it is free), each running
# single-threaded BLAS on its own buffers (the workspace is per thread), so im2col's copies and
# transposes run on every core too. A chunk writes only its own outputs: its images of y (or
# dx) and its own slot of dW and db, which are summed in chunk order at the end; so which
# thread ran which chunk never shows in the result, and a run is deterministic for a given
# number of workers (which sets the chunks).


# -- im2col / col2im ------------------------------------------------------------------------
# Small maps use a second layout, "batch last": xpad ``(C, Hp, Wp, N)``, cols
# ``(C, kh, kw, oh, ow, N)`` (columns ordered (y, x, n); the GEMMs are the same). Each strided
# copy then moves runs of ``ow*N`` values instead of ``ow``. Measured (512 channels, batch 128,
# im2col with the transposes in and out): 2x2 maps 7.0 -> 1.8 ms, 4x4 17.5 -> 8.5 ms; from 8x8
# on the element-wise transposes this layout needs cost more than they save.
def _spatial(a, batch_last):
    """``a[c, n, y, x]`` (channel-major) or ``a[c, y, x, n]`` (batch last) as a function
    ``(ys, xs) -> view (c, n, ys, xs)`` or ``(c, ys, xs, n)``: where the spatial axes are."""
    if batch_last:
        return lambda ys, xs: a[:, ys, xs, :]
    return lambda ys, xs: a[:, :, ys, xs]


_TO_WORK = {False: (1, 0, 2, 3), True: (1, 2, 3, 0)}     # NCHW -> (C, N, H, W) or (C, H, W, N)
_FROM_WORK = {False: (1, 0, 2, 3), True: (3, 0, 1, 2)}   # and back


def _work_shape(C, n, h, w, batch_last):
    """The shape of an ``(n, C, h, w)`` batch in the work layout."""
    return (C, h, w, n) if batch_last else (C, n, h, w)


def _pad(x, padding, xpad, batch_last=False):
    """``xpad (C, N, Hp, Wp)`` (or ``(C, Hp, Wp, N)``) = x ``(N, C, H, W)`` transposed, inside a
    zero border."""
    N, C, H, W = x.shape
    ph, pw = padding
    at = _spatial(xpad, batch_last)
    if ph or pw:     # the buffer is shared: its border holds another layer's data until zeroed
        at(slice(None, ph), slice(None))[...] = 0
        at(slice(ph + H, None), slice(None))[...] = 0
        at(slice(None), slice(None, pw))[...] = 0
        at(slice(None), slice(pw + W, None))[...] = 0
    at(slice(ph, ph + H), slice(pw, pw + W))[...] = x.transpose(_TO_WORK[batch_last])
    return xpad


def _store(y, out, bias, batch_last):
    """``out (n, F, oh, ow) = y + bias``, ``y`` the GEMM result ``(F, n, oh, ow)`` (or batch
    last): one pass that transposes back to NCHW and adds the bias."""
    y = y.transpose(_FROM_WORK[batch_last])
    if bias is not None:
        backend.get_array_module(y).add(y, bias[:, None, None], out=out)
    else:
        out[...] = y


def _unroll(xpad, kernel_size, stride, cols, batch_last=False):
    """``cols[c, i, j] = xpad[c, :, i::sh, j::sw]`` cut to ``(N, oh, ow)``: kh*kw strided copies.
    (Batch last: ``cols[c, i, j] = xpad[c, i::sh, j::sw, :]``, ``(oh, ow, N)``.)"""
    (kh, kw), (sh, sw) = kernel_size, stride
    oh, ow = cols.shape[-3:-1] if batch_last else cols.shape[-2:]

    at = _spatial(xpad, batch_last)
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j] = at(slice(i, i + sh * oh, sh), slice(j, j + sw * ow, sw))   # (C, N, oh, ow)
    return cols


def _fold(dcols, kernel_size, stride, dxpad, batch_last=False):
    """The adjoint of :func:`_unroll`: ``dxpad = 0``, then ``dxpad[c, :, i::sh, j::sw] += dcols[c, i, j]``."""
    (kh, kw), (sh, sw) = kernel_size, stride
    oh, ow = dcols.shape[-3:-1] if batch_last else dcols.shape[-2:]

    dxpad.fill(0)
    at = _spatial(dxpad, batch_last)
    for i in range(kh):          # the same loop as im2col, with += (no np.add.at)
        for j in range(kw):
            at(slice(i, i + sh * oh, sh), slice(j, j + sw * ow, sw))[...] += dcols[:, i, j]
    return dxpad


def im2col(x, kernel_size, stride, padding, cols=None, xpad=None):
    """Unroll every receptive field of ``x`` into a column.

    Args:
        x: ``(N, C, H, W)``.
        cols, xpad: optional buffers to fill instead of allocating: ``cols`` of the result's
            shape, ``xpad`` ``(C, N, H + 2*ph, W + 2*pw)`` (its border is zeroed here).
    Returns:
        cols: ``(C, kh, kw, N, oh, ow)``, ``cols[c, i, j, n, y, x] = xpad[n, c, y*sh+i, x*sw+j]``
        (reshape to ``(K, P)`` is free).
    """
    xp = backend.get_array_module(x)
    N, C, H, W = x.shape
    (kh, kw), (ph, pw) = kernel_size, padding
    oh, ow = conv_output_hw(H, W, kernel_size, stride, padding)
    if xpad is None:
        xpad = xp.empty((C, N, H + 2 * ph, W + 2 * pw), dtype=x.dtype)
    if cols is None:
        cols = xp.empty((C, kh, kw, N, oh, ow), dtype=x.dtype)
    return _unroll(_pad(x, padding, xpad), kernel_size, stride, cols)


def col2im(dcols, x_shape, kernel_size, stride, padding, dxpad=None):
    """The adjoint of :func:`im2col`: add every column entry back onto its input pixel.

    Args:
        dcols: ``(C, kh, kw, N, oh, ow)``.
        x_shape: ``(N, C, H, W)``.
        dxpad: optional ``(C, N, H + 2*ph, W + 2*pw)`` buffer to accumulate into (zeroed here).
    Returns:
        dx: ``(N, C, H, W)``, a new C-contiguous array; overlapping windows add up.
    """
    xp = backend.get_array_module(dcols)
    N, C, H, W = x_shape
    ph, pw = padding
    if dxpad is None:
        dxpad = xp.empty((C, N, H + 2 * ph, W + 2 * pw), dtype=dcols.dtype)
    _fold(dcols, kernel_size, stride, dxpad)
    return dxpad[:, :, ph:ph + H, pw:pw + W].transpose(1, 0, 2, 3).copy()   # (C, N, H, W) -> NCHW


class Conv2d(Module):
    """2-D convolution (cross-correlation, as PyTorch), NCHW.

    ``y[n, f, y, x] = b[f] + sum_{c,i,j} W[f, c, i, j] * xpad[n, c, y*sh + i, x*sw + j]``

    Args:
        in_channels (C), out_channels (F), kernel_size, stride, padding: ints or pairs.
        bias: learn a per-filter bias.
        rng: NumPy Generator for the initialisation (default: ``minicnn.init``'s).
        dtype: of the parameters (float32 default).
    Parameters: ``weight`` ``(F, C, kh, kw)``, ``bias`` ``(F,)`` or None (PyTorch's init).
    Attributes:
        needs_input_grad: when False, backward skips dx and returns None (first layer).
        input_hw: ``(H, W)`` of the last forward input.
        reuse_buffers (class attribute, default True): take the work arrays (a chunk's
            ``cols``, padded input, GEMM output) from the shared :func:`workspace`; False
            allocates them per call.
        CHUNK_BYTES (class attribute): the size of one chunk's ``cols``; the batch is processed
            ``max(1, CHUNK_BYTES // (K*oh*ow*itemsize))`` images at a time.
    Cache (forward -> backward): the input ``x`` (a reference: the previous layer's output, no
    copy); backward redoes im2col chunk by chunk and drops the reference.
    """

    reuse_buffers = True
    CHUNK_BYTES = 16 << 20

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 rng=None, dtype=np.float32):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        kh, kw = self.kernel_size
        fan_in = self.in_channels * kh * kw
        self.weight = Parameter(init.kaiming_uniform((out_channels, in_channels, kh, kw), fan_in,
                                                     rng=rng, dtype=dtype))
        self.bias = Parameter(init.bias_uniform((out_channels,), fan_in, rng=rng, dtype=dtype)) if bias else None
        self.needs_input_grad = True
        self.input_hw = None
        self._x = None

    def _chunks(self, x, per_image):
        """``(n0, n1)`` image ranges whose ``cols`` (``per_image`` bytes per image) fit in
        ``CHUNK_BYTES`` (at least one image).
        On the GPU one chunk: its memory is fast, and fewer kernel launches win. On the CPU
        a multiple of ``cpu_workers()`` chunks, so that every worker gets as many."""
        N = x.shape[0]
        if backend.is_gpu_array(x):
            return [(0, N)]
        workers = backend.workers_for(x)
        count = -(-N // max(1, min(N, self.CHUNK_BYTES // per_image)))   # chunks that fit
        count = min(N, -(-count // workers) * workers)
        nb = -(-N // count)                  # equal chunks: ceil(N / number of chunks)
        return [(n0, min(N, n0 + nb)) for n0 in range(0, N, nb)]

    BATCH_LAST_MAX_PIXELS = 16

    def _batch_last(self, oh, ow):
        """Use the batch-last work layout (see ``_spatial``) for outputs of at most 16 pixels."""
        return oh * ow <= self.BATCH_LAST_MAX_PIXELS

    def _im2col(self, x, padding, oh, ow, batch_last):
        """im2col of the images ``x`` ``(n, C, H, W)`` into the workspace (padded input there too):
        ``(C, kh, kw, n, oh, ow)`` or, batch last, ``(C, kh, kw, oh, ow, n)``."""
        n, C, H, W = x.shape
        (kh, kw), (ph, pw), keep = self.kernel_size, padding, self.reuse_buffers
        xpad = workspace("conv.xpad", _work_shape(C, n, H + 2 * ph, W + 2 * pw, batch_last), x, keep)
        cols = workspace("conv.cols", (C, kh, kw) + _work_shape(C, n, oh, ow, batch_last)[1:], x, keep)
        return _unroll(_pad(x, padding, xpad, batch_last), self.kernel_size, self.stride, cols, batch_last)

    def _conv(self, x, w, padding, out, bias=None):
        """``out (n, F, oh, ow) = conv(x, w) + bias`` chunk by chunk, stride ``self.stride``.

        ``w`` ``(F, C*kh*kw)``; x ``(N, C, H, W)``; the GEMM per chunk is ``w @ cols``.
        """
        xp = backend.get_array_module(x)
        F, (oh, ow), keep = w.shape[0], out.shape[2:], self.reuse_buffers
        bl = self._batch_last(oh, ow)

        def chunk(images):
            n0, n1 = images
            cols = self._im2col(x[n0:n1], padding, oh, ow, bl)
            y = workspace("conv.gemm", _work_shape(F, n1 - n0, oh, ow, bl), x, keep)
            xp.matmul(w, cols.reshape(w.shape[1], -1), out=y.reshape(F, -1))   # (F, K) @ (K, p)
            _store(y, out[n0:n1], bias, bl)                       # transpose + bias in one pass

        backend.on_items(chunk, self._chunks(x, w.shape[1] * oh * ow * x.dtype.itemsize), x)
        return out

    def forward(self, x):
        """x ``(N, C, H, W)`` -> y ``(N, F, oh, ow)``."""
        xp = backend.get_array_module(x)
        N, C, H, W = x.shape
        F = self.out_channels
        oh, ow = conv_output_hw(H, W, self.kernel_size, self.stride, self.padding)
        out = xp.empty((N, F, oh, ow), dtype=x.dtype)
        self._conv(x, self.weight.data.reshape(F, -1), self.padding, out,
                   None if self.bias is None else self.bias.data)
        self._x, self.input_hw = x, (H, W)
        return out

    def backward(self, dy):
        """dy ``(N, F, oh, ow)`` -> dx ``(N, C, H, W)`` (None when ``needs_input_grad`` is False).

        Per chunk, with ``dy_mat = dy`` as ``(F, p)`` and ``cols`` (im2col of the kept ``x``,
        redone here) as ``(K, p)``: ``dW += dy_mat @ cols^T``, ``db += sum_p dy_mat``,
        ``dx = col2im(W^T @ dy_mat)``; with stride 1 ``dx`` is a convolution (:meth:`_dx_by_conv`).
        """
        xp = backend.get_array_module(dy)
        x, self._x = self._x, None
        N, C, H, W = x.shape
        F, oh, ow = dy.shape[1:]
        (kh, kw), (ph, pw), keep = self.kernel_size, self.padding, self.reuse_buffers
        w = self.weight.data.reshape(F, -1)                                   # (F, K)
        K = w.shape[1]
        # dx as a convolution of dy unrolls F*kh*kw rows, col2im adds back C*kh*kw rows but costs
        # ~3x more per value (read-modify-write): the convolution wins unless F >> C
        by_conv = (self.needs_input_grad and self.stride == (1, 1) and ph < kh and pw < kw
                   and F <= 2 * C)
        dx = xp.empty(x.shape, dtype=dy.dtype) if self.needs_input_grad else None
        # (K, F), small: BLAS ran up to 2x slower on the transposed view w.T
        w_t = xp.ascontiguousarray(w.T) if dx is not None and not by_conv else None
        # dW^T = cols @ dy_mat^T, (K, p) @ (p, F), is the same GEMM as dy_mat @ cols^T, and up to
        # 1.7x faster in OpenBLAS for few filters; with many, adding its transpose to .grad costs more
        transposed = F <= 64
        bl = self._batch_last(oh, ow)

        chunks = self._chunks(x, K * oh * ow * x.dtype.itemsize)
        dw_all = workspace("conv.dw", (len(chunks),) + ((K, F) if transposed else (F, K)), dy, keep)
        db_all = workspace("conv.db", (len(chunks), F), dy, keep)      # one slot per chunk, both

        def chunk(i):                # chunk i's dW (or dW^T) and db into its slots, dx of its images
            n0, n1 = chunks[i]
            dy_mat = workspace("conv.gemm", _work_shape(F, n1 - n0, oh, ow, bl), dy, keep)
            dy_mat[...] = dy[n0:n1].transpose(_TO_WORK[bl])                       # (F, n, oh, ow), one copy
            dy_mat = dy_mat.reshape(F, -1)                                        # (F, p)
            cols = self._im2col(x[n0:n1], self.padding, oh, ow, bl)               # again: x was kept, not cols
            if transposed:
                xp.matmul(cols.reshape(K, -1), dy_mat.T, out=dw_all[i])          # (K, p) @ (p, F)
            else:
                xp.matmul(dy_mat, cols.reshape(K, -1).T, out=dw_all[i])          # (F, p) @ (p, K)
            dy_mat.sum(axis=1, out=db_all[i])
            if dx is None or by_conv:
                return
            dcols = cols                                          # cols is spent: W^T dy_mat overwrites it
            xp.matmul(w_t, dy_mat, out=dcols.reshape(K, -1))                      # (K, F) @ (F, p)
            dxpad = workspace("conv.xpad", _work_shape(C, n1 - n0, H + 2 * ph, W + 2 * pw, bl), dy, keep)
            _fold(dcols, self.kernel_size, self.stride, dxpad, bl)
            inner = _spatial(dxpad, bl)(slice(ph, ph + H), slice(pw, pw + W))      # drop the padding
            dx[n0:n1] = inner.transpose(_FROM_WORK[bl])                           # back to NCHW

        backend.on_items(chunk, list(range(len(chunks))), dy)
        self._add_grads(dw_all, db_all, transposed)
        if by_conv:
            self._dx_by_conv(dy, dx)
        return dx

    def _add_grads(self, dw_all, db_all, transposed):
        """``weight.grad += sum_i dW_i``, ``bias.grad += sum_i db_i`` over the chunks' slots
        ``dw_all`` ``(chunks, F, K)`` (or ``(chunks, K, F)``, dW^T) and ``db_all`` ``(chunks, F)``,
        added in chunk order; blocks of filters on the CPU workers."""
        F = self.out_channels
        grad = self.weight.grad.reshape(F, -1)                                # (F, K), a view

        def filters(f0, f1):
            if transposed:
                grad[f0:f1] += dw_all[:, :, f0:f1].sum(axis=0).T
            else:
                grad[f0:f1] += dw_all[:, f0:f1].sum(axis=0)

        backend.over_ranges(filters, F, grad)
        if self.bias is not None:
            self.bias.grad += db_all.sum(axis=0)

    def _dx_by_conv(self, dy, dx):
        """Stride 1: ``dx`` is the convolution of ``dy`` with the flipped, transposed kernel,

        ``dx[n, c, y, x] = sum_{f,i,j} W[f, c, kh-1-i, kw-1-j] * dypad[n, f, y + i, x + j]``,
        ``dy`` padded by ``(kh-1-ph, kw-1-pw)``. Same result as col2im, faster: im2col of dy
        only writes its columns, col2im reads and writes dx once per kernel offset.
        """
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        w_flip = self.weight.data[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)    # (C, F, kh, kw)
        w_flip = w_flip.reshape(self.in_channels, -1)                          # (C, F*kh*kw), one small copy
        self._conv(dy, w_flip, (kh - 1 - ph, kw - 1 - pw), dx)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        return s + ("" if self.bias is not None else ", bias=False")
