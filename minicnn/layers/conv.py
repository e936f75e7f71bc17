"""2-D convolution by im2col + GEMM, with a hand-written backward.

Legend: N batch, C input channels, F output channels (filters), H, W input height/width,
kh, kw kernel, sh, sw stride, ph, pw padding, oh, ow output height/width,
K = C*kh*kw (one unrolled receptive field), p = n*oh*ow (output pixels of a chunk of n images).

The math, per chunk of images (``minicnn.utils.conv`` has the geometry, im2col, col2im and
their layouts; ``minicnn.performance`` the chunks, work buffers and layout choices):

    forward    cols = im2col(x)                 (K, p)
               y = W @ cols + b                 (F, K) @ (K, p)
    backward   dW += dy @ cols^T                (F, p) @ (p, K)
               db += sum_p dy
               dx = col2im(W^T @ dy)            (K, F) @ (F, p), added back onto the pixels
               or, stride 1: dx = conv(dy padded by k-1-p, W flipped and transposed)

Where it pays (``minicnn.performance.winograd``: 3x3, stride 1, small maps, many channels), the
same convolution by Winograd's F(2x2, 3x3) (``minicnn.utils.winograd``): 16 products per 2x2
outputs instead of 36, the whole batch at once:

    forward    V = B^T d B (every 4x4 patch), U = G g G^T, M[xi] = U[xi] @ V[xi], y = A^T M A + b
    backward   dM = A dy A^T, dU[xi] = dM[xi] @ V[xi]^T, dW += G^T dU G, db += sum dy,
               dx = conv(dy padded, W flipped and transposed), by the same forward

Forward keeps only its input ``x`` (as Chainer does) and backward redoes each chunk's im2col.
Each chunk writes its own images of y (or dx) and its own slot of dW and db, which are summed
in chunk order at the end: the chunks, fixed by the shapes, may run on any CPU worker in any
order and the result is the same bit for bit.
"""
import numpy as np

from minicnn import backend, init, performance as perf
from minicnn.layers.module import Module, Parameter
from minicnn.utils import conv, winograd
from minicnn.utils.conv import col2im, im2col  # noqa: F401  (re-exported: the functional forms)


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
    Cache (forward -> backward): the input ``x`` (a reference: the previous layer's output, no
    copy).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 rng=None, dtype=np.float32):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = conv.pair(kernel_size, "kernel_size", 1)
        self.stride, self.padding = conv.pair(stride, "stride", 1), conv.pair(padding, "padding", 0)
        kh, kw = self.kernel_size
        fan_in = self.in_channels * kh * kw
        self.weight = Parameter(init.kaiming_uniform((out_channels, in_channels, kh, kw), fan_in,
                                                     rng=rng, dtype=dtype))
        self.bias = Parameter(init.bias_uniform((out_channels,), fan_in, rng=rng, dtype=dtype)) if bias else None
        self.needs_input_grad = True
        self.input_hw = None

    def forward(self, x):
        """x ``(N, C, H, W)`` -> y ``(N, F, oh, ow)``."""
        xp = backend.get_array_module(x)
        N, C, H, W = x.shape
        F = self.out_channels
        oh, ow = conv.output_hw((H, W), self.kernel_size, self.stride, self.padding)
        y = xp.empty((N, F, oh, ow), dtype=x.dtype)
        self._conv(x, self.weight.data.reshape(F, -1), self.padding, y,
                   None if self.bias is None else self.bias.data)
        self.input_hw = (H, W)
        self.save_for_backward(x)
        return y

    def _conv(self, x, w, padding, out, bias=None):
        """``out = conv(x, w) + bias`` with stride ``self.stride``, chunk by chunk of images.

        x ``(N, C', H', W')``, w ``(F', C'*kh*kw)``, out ``(N, F', oh, ow)``, bias ``(F',)`` or None.
        """
        xp = backend.get_array_module(x)
        F, K, (oh, ow) = w.shape[0], w.shape[1], out.shape[2:]
        if perf.winograd(self.kernel_size, self.stride, padding, (oh, ow), x.shape[1], F):
            return self._conv_winograd(x, w, padding, out, bias)
        bl = perf.batch_last(oh, ow)

        def chunk(images):
            n0, n1 = images
            cols = self._im2col(x[n0:n1], padding, oh, ow, bl)                 # (K, p)
            y = perf.workspace("conv.gemm", conv.work_shape(F, n1 - n0, oh, ow, bl), x)
            xp.matmul(w, cols.reshape(K, -1), out=y.reshape(F, -1))            # y = W @ cols, (F, p)
            y = conv.from_work(y, bl)                                          # (n, F, oh, ow), a view
            if bias is None:
                out[n0:n1] = y
            else:                                                              # + b, in the same pass
                xp.add(y, bias[:, None, None], out=out[n0:n1])

        backend.on_items(chunk, perf.image_chunks(len(x), K * oh * ow * x.dtype.itemsize, x), x)
        return out

    def _conv_winograd(self, x, w, padding, out, bias=None):
        """:meth:`_conv` by F(2x2, 3x3), the whole batch at once: ``V = B^T d B`` by blocks of
        channels, the 16 GEMMs ``M[xi] = U[xi] @ V[xi]`` one per item, ``out = A^T M A + bias`` by
        blocks of filters, on the CPU workers. w ``(F', C'*9)``."""
        (F, C), g = (w.shape[0], x.shape[1]), w.reshape(w.shape[0], x.shape[1], 3, 3)     # g (F', C', 3, 3)
        V = self._winograd_input(x, padding, out.shape[2:])                       # (4, 4, C', th, tw, N)
        U = perf.workspace("conv.wino.U", (16, F, C), x)
        perf.over_blocks(lambda j0, j1: winograd.weight_transform(g, U, j0, j1), F * C, U)   # U = G g G^T
        M = perf.workspace("conv.wino.M", (4, 4, F) + V.shape[3:], x)              # (4, 4, F', th, tw, N)
        self._winograd_products(lambda i: (U[i], V.reshape(16, C, -1)[i]), M.reshape(16, F, -1), x)   # M = U @ V
        Y = perf.workspace("conv.wino.Y", (4,) + M.shape[2:], x)                  # (4, F', th, tw, N)
        perf.over_blocks(lambda f0, f1: winograd.output_transform(M, out, f0, f1, bias, Y), F, out)
        return out

    def _winograd_input(self, x, padding, out_hw):
        """``V = B^T d B`` of every 4x4 patch of x ``(N, C', H', W')`` padded by ``padding``:
        ``(4, 4, C', th, tw, N)`` (a work buffer), blocks of channels on the CPU workers."""
        N, C = x.shape[:2]
        (oh, ow), (th, tw) = out_hw, (out_hw[0] // 2, out_hw[1] // 2)
        xpad = perf.workspace("conv.wino.xpad", conv.work_shape(C, N, oh + 2, ow + 2, True), x)
        V = perf.workspace("conv.wino.V", (4, 4, C, th, tw, N), x)
        rows = perf.workspace("conv.wino.rows_in", (4, C, th, ow + 2, N), x)

        def channels(c0, c1):
            conv.pad_to_work(x[:, c0:c1], padding, xpad[c0:c1], batch_last=True)     # (c, Hp, Wp, N)
            winograd.input_transform(xpad[c0:c1], out_hw, V[:, :, c0:c1], rows[:, c0:c1])
        perf.over_blocks(channels, C, x)
        return V

    @staticmethod
    def _winograd_products(operands, out, like):
        """``out[i] = a @ b`` with ``(a, b) = operands(i)`` for the 16 positions, one per item on
        the CPU workers (each product single-threaded: the same bits on any core count)."""
        xp = backend.get_array_module(like)

        def product(i):
            a, b = operands(i)
            xp.matmul(a, b, out=out[i])
        backend.on_items(product, list(range(16)), like)

    def _im2col(self, x, padding, oh, ow, batch_last):
        """``conv.im2col`` of the images x ``(n, C', H', W')`` into work buffers: ``(C', kh, kw, n, oh, ow)``
        (batch last: ``(C', kh, kw, oh, ow, n)``)."""
        n, C, H, W = x.shape
        (kh, kw), (ph, pw) = self.kernel_size, padding
        xpad = perf.workspace("conv.xpad", conv.work_shape(C, n, H + 2 * ph, W + 2 * pw, batch_last), x)
        cols = perf.workspace("conv.cols", (C, kh, kw) + conv.work_shape(C, n, oh, ow, batch_last)[1:], x)
        return conv.im2col(x, self.kernel_size, self.stride, padding, cols, xpad, batch_last)

    def backward(self, dy):
        """dy ``(N, F, oh, ow)`` -> dx ``(N, C, H, W)`` (None when ``needs_input_grad`` is False).

        Per chunk, with ``dy_mat`` = its dy as ``(F, p)`` and ``cols`` (its im2col, redone here)
        as ``(K, p)``: ``dW_i = dy_mat @ cols^T``, ``db_i = sum_p dy_mat``, ``dx = col2im(W^T @ dy_mat)``;
        then ``dW += sum_i dW_i``, ``db += sum_i db_i`` in chunk order. With stride 1, ``dx`` is
        a convolution instead (:meth:`_dx_by_conv`).
        """
        xp = backend.get_array_module(dy)
        x, = self.saved_for_backward()
        N, C, H, W = x.shape
        F, oh, ow = dy.shape[1:]
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        if perf.winograd(self.kernel_size, self.stride, self.padding, (oh, ow), C, F):
            return self._backward_winograd(x, dy)
        w = self.weight.data.reshape(F, -1)                                   # (F, K)
        K = w.shape[1]
        by_conv = (self.needs_input_grad and self.stride == (1, 1) and ph < kh and pw < kw
                   and perf.dx_by_conv_pays(F, C))
        dx = xp.empty(x.shape, dtype=dy.dtype) if self.needs_input_grad else None
        # (K, F) contiguous: BLAS ran up to 2x slower on the view w.T
        w_t = xp.ascontiguousarray(w.T) if dx is not None and not by_conv else None
        transposed = perf.dw_transposed(F)
        bl = perf.batch_last(oh, ow)

        chunks = perf.image_chunks(N, K * oh * ow * x.dtype.itemsize, x, slot_bytes=F * K * dy.dtype.itemsize)
        dw_all = perf.workspace("conv.dw", (len(chunks),) + ((K, F) if transposed else (F, K)), dy)
        db_all = perf.workspace("conv.db", (len(chunks), F), dy)         # one slot per chunk, both

        def chunk(i):
            n0, n1 = chunks[i]
            dy_mat = perf.workspace("conv.gemm", conv.work_shape(F, n1 - n0, oh, ow, bl), dy)
            dy_mat[...] = conv.to_work(dy[n0:n1], bl)                            # one copy
            dy_mat = dy_mat.reshape(F, -1)                                        # (F, p)
            cols = self._im2col(x[n0:n1], self.padding, oh, ow, bl).reshape(K, -1)   # (K, p), again
            if transposed:
                xp.matmul(cols, dy_mat.T, out=dw_all[i])                          # dW_i^T = cols @ dy_mat^T, (K, F)
            else:
                xp.matmul(dy_mat, cols.T, out=dw_all[i])                          # dW_i = dy_mat @ cols^T, (F, K)
            dy_mat.sum(axis=1, out=db_all[i])                                     # db_i = sum_p dy_mat
            if dx is None or by_conv:
                return
            dcols = xp.matmul(w_t, dy_mat, out=cols)                              # W^T @ dy_mat, (K, p): cols is spent
            dxpad = perf.workspace("conv.xpad", conv.work_shape(C, n1 - n0, H + 2 * ph, W + 2 * pw, bl), dy)
            conv.col2im(dcols.reshape((C, kh, kw) + conv.work_shape(C, n1 - n0, oh, ow, bl)[1:]),
                        (n1 - n0, C, H, W), self.kernel_size, self.stride, self.padding, dxpad, bl, out=dx[n0:n1])

        backend.on_items(chunk, list(range(len(chunks))), dy)
        self._add_grads(dw_all, db_all, transposed)
        if by_conv:
            self._dx_by_conv(dy, dx)
        return dx

    def _backward_winograd(self, x, dy):
        """:meth:`backward` by F(2x2, 3x3): ``dM = A dy A^T`` (blocks of filters), ``V`` redone,
        ``dU[xi] = dM[xi] @ V[xi]^T`` (one item each), ``dW += G^T dU G``, ``db += sum dy``; dx as
        the convolution of dy with the flipped kernel (:meth:`_dx_by_conv`)."""
        xp = backend.get_array_module(dy)
        N, F, oh, ow = dy.shape
        C = x.shape[1]
        dM = perf.workspace("conv.wino.M", (4, 4, F, oh // 2, ow // 2, N), dy)
        dY = perf.workspace("conv.wino.Y", (4,) + dM.shape[2:], dy)               # dy's tiles
        perf.over_blocks(lambda f0, f1: winograd.output_transform_adjoint(dy, dM, f0, f1, dY), F, dy)
        V = self._winograd_input(x, self.padding, (oh, ow))
        dU = perf.workspace("conv.wino.dU", (16, F, C), dy)
        self._winograd_products(lambda i: (dM.reshape(16, F, -1)[i], V.reshape(16, C, -1)[i].T), dU, dy)
        perf.over_blocks(lambda j0, j1: winograd.weight_transform_adjoint(dU, self.weight.grad, j0, j1),
                         F * C, dU)                                               # dW += G^T dU G
        if self.bias is not None:
            self.bias.grad += dY.sum(axis=0).reshape(F, -1).sum(axis=1)       # db += sum_(n, y, x) dy
        if not self.needs_input_grad:
            return None
        dx = xp.empty(x.shape, dtype=dy.dtype)
        self._dx_by_conv(dy, dx)
        return dx

    def _add_grads(self, dw_all, db_all, transposed):
        """``weight.grad += sum_i dW_i``, ``bias.grad += sum_i db_i`` over the chunks' slots
        ``dw_all`` ``(chunks, F, K)`` (or ``(chunks, K, F)``, dW^T) and ``db_all`` ``(chunks, F)``,
        added in chunk order; blocks of filters on the CPU workers (each entry its own sum)."""
        F = self.out_channels
        grad = self.weight.grad.reshape(F, -1)                                # (F, K), a view

        def filters(f0, f1):
            if transposed:
                grad[f0:f1] += dw_all[:, :, f0:f1].sum(axis=0).T
            else:
                grad[f0:f1] += dw_all[:, f0:f1].sum(axis=0)

        perf.over_blocks(filters, F, grad)
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
