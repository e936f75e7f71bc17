"""Fully connected layer: ``y = x W^T + b`` (PyTorch's layout, weight ``(out, in)``)."""
import numpy as np

from minicnn import backend, init
from minicnn.layers.module import Module, Parameter


class Linear(Module):
    """Affine map on the last axis.

    Args:
        in_features (I), out_features (O), bias; rng, dtype as in Conv2d.
    Parameters: ``weight`` ``(O, I)``, ``bias`` ``(O,)`` or None (PyTorch's init).
    Cache: the input ``x`` ``(N, I)``. Its GEMMs run on one BLAS thread (the layer is small).
    """

    def __init__(self, in_features, out_features, bias=True, rng=None, dtype=np.float32):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = Parameter(init.kaiming_uniform((out_features, in_features), in_features,
                                                     rng=rng, dtype=dtype))
        self.bias = Parameter(init.bias_uniform((out_features,), in_features, rng=rng, dtype=dtype)) if bias else None

    def forward(self, x):
        """x ``(N, I)`` -> y ``(N, O)``: ``y = x W^T + b``."""
        with backend.single_threaded_blas():      # the same rounding on any machine (backend.blas)
            y = x @ self.weight.data.T
        if self.bias is not None:
            y += self.bias.data
        self.save_for_backward(x)
        return y

    def backward(self, dy):
        """dy ``(N, O)`` -> dx ``(N, I)``: ``dW += dy^T x``, ``db += sum_N dy``, ``dx = dy W``."""
        x, = self.saved_for_backward()
        with backend.single_threaded_blas():
            self.weight.grad += dy.T @ x
            dx = dy @ self.weight.data
        if self.bias is not None:
            self.bias.grad += dy.sum(axis=0)
        return dx

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
