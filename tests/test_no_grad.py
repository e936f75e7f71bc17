"""minicnn.no_grad(): the same outputs, no caches kept, a clear error on backward; eval() unchanged."""
import threading

import numpy as np
import pytest

import minicnn
from minicnn import init
from minicnn.layers import (BatchNorm1d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU,
                            Sequential)
from minicnn.models import vgg16

LAYERS = [lambda: Conv2d(3, 4, 3, padding=1), lambda: BatchNorm2d(3), lambda: ReLU(), lambda: MaxPool2d(2),
          lambda: MaxPool2d(3, 1), lambda: Dropout(0.5, rng=np.random.default_rng(0)), lambda: Flatten()]


def x4():
    return np.random.default_rng(0).standard_normal((4, 3, 6, 6)).astype(np.float32)


def kept(module):
    """The modules still holding a forward's cache."""
    return [name for name, m in module.named_modules() if m._saved is not None]


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("training", [True, False])
def test_layers_give_the_same_output_and_keep_nothing(make, training):
    init.seed(0)
    a, b = make().train(training), make().train(training)
    b.load_state_dict(a.state_dict())
    if isinstance(a, Dropout):
        b.rng = np.random.default_rng(0)
    y = a.forward(x4())
    with minicnn.no_grad():
        y_ng = b.forward(x4())
    np.testing.assert_array_equal(y, y_ng)
    for k, v in a.state_dict().items():                 # BatchNorm's running statistics alike
        np.testing.assert_array_equal(v, b.state_dict()[k])
    assert kept(a) == [""] and kept(b) == []
    with pytest.raises(RuntimeError, match="no_grad"):
        b.backward(np.ones_like(y))


def test_a_no_grad_forward_drops_the_cache_of_an_earlier_one():
    lin = Linear(3, 2)
    x = np.ones((2, 3), np.float32)
    lin.forward(x)
    with minicnn.no_grad():
        lin.forward(x)
    with pytest.raises(RuntimeError, match="no_grad"):
        lin.backward(np.ones((2, 2), np.float32))       # it would use the stale input otherwise
    lin.forward(x)
    lin.backward(np.ones((2, 2), np.float32))
    with pytest.raises(RuntimeError, match="backward already ran"):
        lin.backward(np.ones((2, 2), np.float32))


def test_vgg_evaluation_keeps_no_activations_and_matches_eval_mode():
    init.seed(3)
    model = vgg16(width=0.125).eval()
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with minicnn.no_grad():
        y = model.forward(x)
    assert kept(model) == []
    np.testing.assert_array_equal(y, model.forward(x))   # eval() alone: the same numbers, caches kept
    assert len(kept(model)) == sum(1 for _, m in model.named_modules() if not m._children)


def test_mode_nests_restores_decorates_and_is_per_thread():
    assert minicnn.is_grad_enabled()
    seen = []
    with minicnn.no_grad():
        with minicnn.no_grad():
            assert not minicnn.is_grad_enabled()
        assert not minicnn.is_grad_enabled()
        t = threading.Thread(target=lambda: seen.append(minicnn.is_grad_enabled()))
        t.start()
        t.join()
    assert minicnn.is_grad_enabled() and seen == [True]

    @minicnn.no_grad()
    def inside():
        return minicnn.is_grad_enabled()

    assert inside() is False and minicnn.is_grad_enabled()
    with pytest.raises(ZeroDivisionError):
        with minicnn.no_grad():
            1 / 0
    assert minicnn.is_grad_enabled()


def test_batchnorm1d_and_sequential_under_no_grad():
    net = Sequential(Linear(5, 4), BatchNorm1d(4), ReLU())
    x = np.random.default_rng(2).standard_normal((6, 5)).astype(np.float32)
    y = net.forward(x)
    with minicnn.no_grad():
        np.testing.assert_array_equal(net.eval().forward(x).shape, y.shape)
    assert kept(net) == []
    with pytest.raises(RuntimeError, match="ReLU.backward"):
        net.backward(np.ones_like(y))
