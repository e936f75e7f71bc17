"""Max pooling by a running maximum over the ``kh*kw`` strided views of the input."""

from minicnn import backend, performance as perf
from minicnn.grad_mode import is_grad_enabled
from minicnn.layers.module import Module
from minicnn.utils import conv


class _Windows:
    """The ``kh*kw`` strided views ``x[:, :, i::sh, j::sw]`` cut to ``(oh, ow)``, in scan order."""

    def __init__(self, kernel_size, stride, H, W):
        (kh, kw), (sh, sw) = kernel_size, stride
        self.oh, self.ow = conv.output_hw((H, W), kernel_size, stride, (0, 0))
        self.slices = [(slice(None), slice(None), slice(i, i + sh * self.oh, sh), slice(j, j + sw * self.ow, sw))
                       for i in range(kh) for j in range(kw)]


class MaxPool2d(Module):
    """``y[n, c, y, x] = max_{i,j} x[n, c, y*sh + i, x*sw + j]`` (no padding; trailing rows and
    columns that fill no window are dropped, as PyTorch with ``ceil_mode=False``).

    Args:
        kernel_size: int or pair; stride: int, pair or None (= kernel_size). Windows may overlap.
    Backward routes each output's gradient to the FIRST maximum of its window in scan order
    (row by row), PyTorch's rule for ties.
    Cache: ``argmax`` ``(N, C, oh, ow)`` uint8 (int16 for windows of more than 255 entries), the
    scan-order index of that first maximum, and the input shape.
    """

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size = conv.pair(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else conv.pair(stride, "stride", 1)

    def forward(self, x):
        """x ``(N, C, H, W)`` -> y ``(N, C, oh, ow)``."""
        xp = backend.get_array_module(x)
        win = _Windows(self.kernel_size, self.stride, *x.shape[2:])
        N, C = x.shape[:2]
        kk = len(win.slices)
        y = xp.empty((N, C, win.oh, win.ow), dtype=x.dtype)
        # no backward (no_grad): the maximum alone
        argmax = xp.zeros(y.shape, dtype=xp.uint8 if kk <= 256 else xp.int16) if is_grad_enabled() else None

        def images(i, j):             # one block of images, on a worker
            yb, ab = y[i:j], None if argmax is None else argmax[i:j]
            yb[...] = x[i:j][win.slices[0]]
            for k, s in enumerate(win.slices[1:], start=1):
                v = x[i:j][s]
                if ab is not None:
                    later_is_larger = v > yb       # strict: a later equal value never replaces the first
                    # argmax = k where later_is_larger: k exceeds every earlier index, so a max does
                    # it branch-free (copyto/where with a random mask is ~10x slower)
                    xp.maximum(ab, later_is_larger.astype(ab.dtype) * k, out=ab)
                xp.maximum(yb, v, out=yb)

        perf.over_blocks(images, N, x)
        self.save_for_backward(argmax, x.shape)
        return y

    def backward(self, dy):
        """dy ``(N, C, oh, ow)`` -> dx ``(N, C, H, W)``: ``dx[first argmax of window] += dy``."""
        xp = backend.get_array_module(dy)
        argmax, x_shape = self.saved_for_backward()
        win = _Windows(self.kernel_size, self.stride, *x_shape[2:])
        H, W = x_shape[2:]
        tiles = self.stride == self.kernel_size and (H, W) == (win.oh * self.stride[0], win.ow * self.stride[1])
        # every pixel in exactly one window (2x2, stride 2, even size): plain writes; else
        # overlapping windows share pixels and uncovered pixels get 0
        dx = (xp.empty if tiles else xp.zeros)(x_shape, dtype=dy.dtype)

        def images(i, j):             # one block of images, on a worker
            for k, s in enumerate(win.slices):
                if tiles:
                    xp.multiply(dy[i:j], argmax[i:j] == k, out=dx[i:j][s])   # straight into the strided view
                else:
                    dx[i:j][s] += dy[i:j] * (argmax[i:j] == k)

        perf.over_blocks(images, len(dy), dy)
        return dx

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}"
