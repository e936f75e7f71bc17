"""The gradient checker itself: it must catch a wrong backward, and leave the module as it was."""
import numpy as np
import pytest

from minicnn import init
from minicnn.gradcheck import gradcheck, rel_error
from minicnn.layers import BatchNorm2d, Conv2d, Linear, Module, Parameter, ReLU, Sequential


class ScaledBadBackward(Module):
    """``y = w * x`` with a backward whose dw is off by 1% and dx forgets the weight."""

    def __init__(self):
        super().__init__()
        self.w = Parameter(np.array([1.5]))

    def forward(self, x):
        self._x = x
        return self.w.data * x

    def backward(self, dy):
        self.w.grad += 1.01 * (dy * self._x).sum()
        return dy


class BNWithoutMeanTerm(BatchNorm2d):
    """BatchNorm whose backward drops the sum(dy) term: invisible with an all-ones upstream
    gradient only for some inputs; a random upstream gradient exposes it."""

    def backward(self, dy):
        xhat, inv, _ = self.saved_for_backward()
        m = dy.size // dy.shape[1]
        s = (dy * xhat).sum(axis=(0, 2, 3))
        self.weight.grad += s
        self.bias.grad += dy.sum(axis=(0, 2, 3))
        return (self.weight.data * inv)[None, :, None, None] * (dy - xhat * s[None, :, None, None] / m)


def test_rel_error_definition():
    assert rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.2])) == pytest.approx(0.2 / 2.2)
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_error(np.array([1e-12]), np.array([0.0]), floor=1e-2) == pytest.approx(1e-10)


def test_catches_wrong_backward():
    errors = gradcheck(ScaledBadBackward(), np.random.default_rng(0).standard_normal((3, 4)))
    assert errors["input"] > 0.1 and errors["w"] > 1e-3


def test_catches_missing_batchnorm_term():
    bn = BNWithoutMeanTerm(3).astype(np.float64)
    x = 1 + np.random.default_rng(3).standard_normal((4, 3, 2, 2))
    assert gradcheck(bn, x)["input"] > 1e-3
    good = BatchNorm2d(3).astype(np.float64)
    assert gradcheck(good, x)["input"] < 1e-6


def test_restores_module_state_and_checks_subsets():
    init.seed(0)
    net = Sequential(Conv2d(2, 3, 3, padding=1), BatchNorm2d(3), ReLU()).astype(np.float64)
    x = np.random.default_rng(1).standard_normal((2, 2, 5, 5))
    net.forward(x)                                         # running stats move once
    for p in net.parameters():
        p.grad[...] = 7.0                                  # a gradient the caller accumulated
    before = {k: v.copy() for k, v in net.state_dict().items()}
    errors = gradcheck(net, x, max_entries=5)
    assert set(errors) == {"input", "0.weight", "0.bias", "1.weight", "1.bias"}
    assert errors["0.weight"] < 1e-6 and errors["input"] < 1e-6
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert all((p.grad == 7.0).all() for p in net.parameters())
    assert set(gradcheck(net[1], net[0].forward(x))) == {"input", "weight", "bias"}  # keys of net[1]
    assert net[1].weight.name == "1.weight"                 # the names are left as they are


def test_requires_float64():
    with pytest.raises(TypeError):
        gradcheck(Linear(2, 2), np.ones((1, 2)))
