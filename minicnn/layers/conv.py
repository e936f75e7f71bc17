"""2-D convolution by im2col + one GEMM, with a hand-written backward (col2im).

Legend: N batch, C input channels, F output channels (filters), H, W input height/width,
kh, kw kernel, sh, sw stride, ph, pw padding, oh, ow output height/width,
K = C*kh*kw (the length of one unrolled receptive field), P = N*oh*ow (output pixels).

Layout of the column buffer: ``cols[c, i, j, n, y, x] = xpad[n, c, y*sh + i, x*sw + j]``,
shape ``(C, kh, kw, N, oh, ow)``, which is ``(K, P)`` when flattened. Why this order:
- the forward GEMM ``W (F, K) @ cols (K, P)`` takes both operands as they are, C-contiguous:
  the weight ``(F, C, kh, kw)`` flattens to ``(F, K)`` in the same ``(c, i, j)`` order as the
  rows of ``cols``, so BLAS gets no copy and no odd strides;
- the GEMM result ``(F, P) = (F, N, oh, ow)`` needs one transpose of the two leading axes to
  become NCHW; it moves whole contiguous ``oh*ow`` rows and is fused with the bias add;
- in backward ``dW = dy_mat @ cols^T`` and ``dcols = W^T @ dy_mat`` take ``cols`` and ``W``
  as transposed views of contiguous arrays, which BLAS reads with its transpose flag (no copy);
- im2col pads ``x`` once into a ``(C, N, Hp, Wp)`` buffer (pad and transpose in one copy),
  so each of the ``kh*kw`` strided slices is copied with the same axis order as its place in
  ``cols`` (long contiguous inner runs). The other natural order, ``(N, oh, ow, K)``, makes the
  GEMM give NHWC, whose transpose to NCHW moves single elements ``F`` apart.
"""
import os
from concurrent.futures import ThreadPoolExecutor

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


# NumPy releases the GIL inside its copy and add loops, so the kh*kw strided copies of im2col
# and col2im, which run on one core, scale with threads over channel blocks (the GEMMs already
# use every core through BLAS). Measured on the 2-core machine: 2 threads halve im2col + col2im
# (0.55 s -> 0.30 s per VGG16 step at batch 128) *when OpenBLAS's idle threads sleep*
# (environment OPENBLAS_THREAD_TIMEOUT=4 before NumPy loads); with OpenBLAS's default
# busy-wait after each GEMM the spinning thread holds the second core and the gain is nil.
# Set to 1 to turn threading off.
COPY_THREADS = min(4, os.cpu_count() or 1)
_pool = None


def _over_channel_blocks(fn, C, xp, work):
    """Call ``fn(c0, c1)`` on channel blocks covering ``range(C)``: on ``COPY_THREADS``
    threads for big NumPy arrays (``work`` elements or more than 2**20), else once.
    Each block writes only its own channels, so the result is bitwise the same."""
    global _pool
    n = min(COPY_THREADS, C)
    if xp is not np or n < 2 or work < 1 << 20:
        fn(0, C)
        return
    if _pool is None or _pool._max_workers < n:
        _pool = ThreadPoolExecutor(max_workers=n)
    bounds = [C * t // n for t in range(n + 1)]
    list(_pool.map(lambda t: fn(bounds[t], bounds[t + 1]), range(n)))


def im2col(x, kernel_size, stride, padding, cols=None, xpad=None):
    """Unroll every receptive field of ``x`` into a column.

    Args:
        x: ``(N, C, H, W)``.
        cols, xpad: optional buffers to fill instead of allocating: ``cols`` of the result's
            shape, ``xpad`` ``(C, N, H + 2*ph, W + 2*pw)`` with a zero border (only its
            interior is written, so a reused buffer keeps its zero border).
    Returns:
        cols: ``(C, kh, kw, N, oh, ow)``, ``cols[c, i, j, n, y, x] = xpad[n, c, y*sh+i, x*sw+j]``
        (reshape to ``(K, P)`` is free).
    """
    xp = backend.get_array_module(x)
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    oh, ow = conv_output_hw(H, W, kernel_size, stride, padding)
    if xpad is None:
        xpad = xp.zeros((C, N, H + 2 * ph, W + 2 * pw), dtype=x.dtype)
    if cols is None:
        cols = xp.empty((C, kh, kw, N, oh, ow), dtype=x.dtype)

    def copy(c0, c1):
        # pad once, into channel-major (C, N, Hp, Wp) so the slices below copy like-ordered memory
        xpad[c0:c1, :, ph:ph + H, pw:pw + W] = x[:, c0:c1].transpose(1, 0, 2, 3)
        for i in range(kh):      # one strided copy per kernel offset: kh*kw copies in all
            for j in range(kw):
                cols[c0:c1, i, j] = xpad[c0:c1, :, i:i + sh * oh:sh, j:j + sw * ow:sw]   # (c, N, oh, ow)

    _over_channel_blocks(copy, C, xp, cols.size)
    return cols


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
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    oh, ow = dcols.shape[-2:]
    if dxpad is None:
        dxpad = xp.empty((C, N, H + 2 * ph, W + 2 * pw), dtype=dcols.dtype)
    dx = xp.empty(x_shape, dtype=dcols.dtype)

    def add(c0, c1):
        d = dxpad[c0:c1]
        d.fill(0)
        for i in range(kh):      # the same loop as im2col, with += (no np.add.at)
            for j in range(kw):
                d[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += dcols[c0:c1, i, j]
        # drop the padding, back to NCHW: (c, N, H, W) -> (N, c, H, W)
        dx[:, c0:c1] = d[:, :, ph:ph + H, pw:pw + W].transpose(1, 0, 2, 3)

    _over_channel_blocks(add, C, xp, dcols.size)
    return dx


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
        reuse_buffers (class attribute, default True): keep the big work arrays (``cols``, the
            padded input, the ``(F, P)`` GEMM operand, the padded dx) between calls and refill
            them while shapes stay the same. A fresh ~300 MB array costs a page fault per 4 KiB
            on first touch, which made im2col about 2x slower. The price: the layer holds its
            ``cols`` (``K*P`` values) between steps, the same memory a training step needs anyway.
            Set False to allocate per call and free everything after backward.
    Cache (forward -> backward): ``cols`` ``(C, kh, kw, N, oh, ow)`` (the big one) and the input
    shape; the weight is read again in backward. Backward drops its reference to the cache
    (the buffer itself stays for reuse when ``reuse_buffers``).
    """

    reuse_buffers = True

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
        self._cols = self._x_shape = None
        self._buffers_kept = {}

    def _buffer(self, name, shape, like, zero=False):
        """A work array ``(shape, like.dtype)`` on ``like``'s device: the kept one when it fits,
        else a new one (kept when ``reuse_buffers``). ``zero``: a new one starts at 0."""
        xp = backend.get_array_module(like)
        b = self._buffers_kept.get(name)
        if b is None or b.shape != shape or b.dtype != like.dtype or backend.get_array_module(b) is not xp:
            b = (xp.zeros if zero else xp.empty)(shape, dtype=like.dtype)
            if self.reuse_buffers:
                self._buffers_kept[name] = b
        return b

    def forward(self, x):
        """x ``(N, C, H, W)`` -> y ``(N, F, oh, ow)``."""
        xp = backend.get_array_module(x)
        N, C, H, W = x.shape
        F = self.out_channels
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        oh, ow = conv_output_hw(H, W, self.kernel_size, self.stride, self.padding)
        cols = im2col(x, self.kernel_size, self.stride, self.padding,
                      cols=self._buffer("cols", (C, kh, kw, N, oh, ow), x),
                      xpad=self._buffer("xpad", (C, N, H + 2 * ph, W + 2 * pw), x, zero=True))
        y = self._buffer("fp", (F, N * oh * ow), x)
        # the GEMM: (F, K) @ (K, P) -> (F, P)
        xp.matmul(self.weight.data.reshape(F, -1), cols.reshape(-1, N * oh * ow), out=y)
        y = y.reshape(F, N, oh, ow).transpose(1, 0, 2, 3)                   # view (N, F, oh, ow)
        out = xp.empty((N, F, oh, ow), dtype=x.dtype)
        if self.bias is not None:
            xp.add(y, self.bias.data[:, None, None], out=out)                # transpose + bias in one pass
        else:
            out[...] = y
        self._cols, self._x_shape, self.input_hw = cols, x.shape, (H, W)
        return out

    def backward(self, dy):
        """dy ``(N, F, oh, ow)`` -> dx ``(N, C, H, W)`` (None when ``needs_input_grad`` is False).

        With ``dy_mat = dy`` as ``(F, P)`` and ``cols`` as ``(K, P)``:
        ``dW += dy_mat @ cols^T``, ``db += sum_P dy_mat``, ``dx = col2im(W^T @ dy_mat)``.
        """
        xp = backend.get_array_module(dy)
        cols, self._cols = self._cols, None
        N, C, H, W = self._x_shape
        F, P = self.out_channels, dy.shape[0] * dy.shape[2] * dy.shape[3]
        K = cols.shape[0] * cols.shape[1] * cols.shape[2]
        dy_mat = self._buffer("fp", (F, P), dy)
        dy_mat.reshape(F, N, *dy.shape[2:])[...] = dy.transpose(1, 0, 2, 3)   # (F, P), one copy
        self.weight.grad += (dy_mat @ cols.reshape(K, P).T).reshape(self.weight.data.shape)
        if self.bias is not None:
            self.bias.grad += dy_mat.sum(axis=1)
        if not self.needs_input_grad:
            return None
        dcols = cols                                          # cols is spent: W^T dy_mat overwrites it
        w_t = xp.ascontiguousarray(self.weight.data.reshape(F, K).T)   # (K, F), small; BLAS ran up to
        xp.matmul(w_t, dy_mat, out=dcols.reshape(K, P))                # 2x slower on the transposed view
        (ph, pw) = self.padding
        return col2im(dcols, self._x_shape, self.kernel_size, self.stride, self.padding,
                      dxpad=self._buffer("dxpad", (C, N, H + 2 * ph, W + 2 * pw), dy))

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        return s + ("" if self.bias is not None else ", bias=False")
