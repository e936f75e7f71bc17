"""Parameter-free layers: ReLU, Dropout (inverted), Flatten."""
import numpy as np

from minicnn import backend, init, performance as perf
from minicnn.layers.module import Module


class ReLU(Module):
    """``y = max(x, 0)``. Cache: the output ``y`` (``y > 0`` is the mask)."""

    def forward(self, x):
        xp = backend.get_array_module(x)
        y = xp.empty_like(x)
        # blocks of images on the workers; Python 0: the dtype of x is kept
        perf.over_blocks(lambda i, j: xp.maximum(x[i:j], 0, out=y[i:j]), len(x), x)
        self.save_for_backward(y)
        return y

    def backward(self, dy):
        """``dx = dy * [y > 0]`` (the subgradient at 0 is 0, as PyTorch)."""
        y, = self.saved_for_backward()
        xp = backend.get_array_module(dy)
        dx = xp.empty_like(dy)
        # bool mask: dtype of dy kept; 4x faster than xp.where
        perf.over_blocks(lambda i, j: xp.multiply(dy[i:j], y[i:j] > 0, out=dx[i:j]), len(dy), dy)
        return dx


class Dropout(Module):
    """Inverted dropout: in training ``y = x * keep / (1 - p)``, ``keep ~ Bernoulli(1 - p)``;
    identity in eval.

    Attributes:
        p: drop probability.
        rng: the NumPy Generator that draws masks (seeded from ``minicnn.init``'s default
            generator at construction; assign or reseed it to reproduce masks).
        fixed_mask: None, or a 0/1 (bool) keep-array of the input's shape to use instead of a
            random draw (tests, gradient checks).
    Cache: the scaled mask ``keep / (1 - p)`` in the input's dtype (None in eval).
    """

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = float(p)
        self.rng = rng if rng is not None else np.random.default_rng(int(init.default_rng().integers(2**63)))
        self.fixed_mask = None

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self.save_for_backward(None)
            return x
        if self.fixed_mask is not None:
            keep = self.fixed_mask
        else:
            keep = self.rng.random(x.shape) >= self.p           # drawn on the CPU, reproducible
        keep = backend.to_device(keep, backend.device_of(x))
        scale = 0.0 if self.p == 1.0 else 1.0 / (1.0 - self.p)  # Python float: dtype of x kept
        mask = keep.astype(x.dtype) * scale
        self.save_for_backward(mask)
        return x * mask

    def backward(self, dy):
        """``dx = dy * keep / (1 - p)`` (training), ``dx = dy`` (eval)."""
        mask, = self.saved_for_backward()
        return dy if mask is None else dy * mask

    def extra_repr(self):
        return f"p={self.p}"


class Flatten(Module):
    """``(N, d1, d2, ...) -> (N, d1*d2*...)``. Cache: the input shape."""

    def forward(self, x):
        self.save_for_backward(x.shape)
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        shape, = self.saved_for_backward()
        return dy.reshape(shape)
