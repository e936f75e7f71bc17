"""Optional: minicnn layers against torch.nn with the same weights (float64 to 1e-6 relative;
float32 forward sanity). Skipped where torch is absent; the framework never imports torch."""
import numpy as np
import pytest
from torchref import import_torch

from minicnn.layers import BatchNorm1d, BatchNorm2d, Conv2d, Linear, MaxPool2d
from minicnn.models import vgg16

torch = import_torch()
nn = torch.nn

from bench.torch_vgg import to_torch, torch_vgg16  # noqa: E402  (imports torch)

torch.set_num_threads(1)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def close(a, b, tol=1e-6, floor=1e-30):
    """max|a - b| <= tol * max(max|b|, floor)."""
    b = b.detach().numpy() if hasattr(b, "detach") else np.asarray(b)
    a, b = np.asarray(a, np.float64), b.astype(np.float64)
    assert a.shape == b.shape
    scale = max(np.abs(b).max(initial=0.0), floor)
    assert np.abs(a - b).max(initial=0.0) <= tol * scale, np.abs(a - b).max() / scale


def copy_into(ours, theirs):
    theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()})


def run_both(ours, theirs, x, dy):
    """Forward and backward through both; returns (our y, our dx, torch y, torch x)."""
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = theirs(xt)
    yt.backward(torch.from_numpy(dy))
    y = ours.forward(x)
    dx = ours.backward(dy)
    return y, dx, yt, xt


@pytest.mark.parametrize("C,F,k,s,p,hw", [(3, 4, 3, 1, 1, (6, 6)), (2, 3, (2, 3), 2, 2, (7, 5)),
                                          (4, 2, 3, (1, 2), (0, 1), (5, 8)), (3, 4, 3, 1, 1, (2, 2)),
                                          (2, 3, 1, 1, 1, (3, 3))])
def test_conv2d_matches_torch(C, F, k, s, p, hw):
    ours = Conv2d(C, F, k, stride=s, padding=p, rng=np.random.default_rng(0)).astype(np.float64)
    theirs = nn.Conv2d(C, F, k, stride=s, padding=p).double()
    copy_into(ours, theirs)
    x = rand(2, C, *hw)
    y, dx, yt, xt = run_both(ours, theirs, x, rand(*theirs(torch.from_numpy(x)).shape, seed=1))
    close(y, yt), close(dx, xt.grad)
    close(ours.weight.grad, theirs.weight.grad), close(ours.bias.grad, theirs.bias.grad)
    # float32 forward sanity
    ours32, theirs32 = ours.astype(np.float32), theirs.float()
    close(ours32.forward(x.astype(np.float32)), theirs32(torch.from_numpy(x.astype(np.float32))), tol=1e-5)


@pytest.mark.parametrize("ours_cls,theirs_cls,shape", [(BatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 2)),
                                                       (BatchNorm1d, nn.BatchNorm1d, (6, 5))])
def test_batchnorm_matches_torch_over_steps(ours_cls, theirs_cls, shape):
    C = shape[1]
    ours, theirs = ours_cls(C, momentum=0.3).astype(np.float64), theirs_cls(C, momentum=0.3).double()
    ours.weight.data[...] = 1 + rand(C, seed=9)
    ours.bias.data[...] = rand(C, seed=8)
    copy_into(ours, theirs)
    for step in range(3):
        x, dy = 2 + 3 * rand(*shape, seed=step), rand(*shape, seed=10 + step)
        ours.zero_grad(), theirs.zero_grad()
        y, dx, yt, xt = run_both(ours, theirs, x, dy)
        close(y, yt), close(dx, xt.grad)
        close(ours.weight.grad, theirs.weight.grad), close(ours.bias.grad, theirs.bias.grad)
    close(ours.running_mean, theirs.running_mean), close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
    ours.eval(), theirs.eval()
    x, dy = rand(*shape, seed=20), rand(*shape, seed=21)
    y, dx, yt, xt = run_both(ours, theirs, x, dy)
    close(y, yt), close(dx, xt.grad)


@pytest.mark.parametrize("k,s,hw", [(2, None, (6, 7)), (3, 2, (7, 7)), ((2, 3), (1, 2), (5, 7))])
def test_maxpool_ties_match_torch(k, s, hw):
    x = np.random.default_rng(0).integers(0, 3, size=(2, 3, *hw)).astype(np.float64)
    ours, theirs = MaxPool2d(k, s), nn.MaxPool2d(k, s)
    dy = rand(*theirs(torch.from_numpy(x)).shape, seed=1)
    y, dx, yt, xt = run_both(ours, theirs, x, dy)
    close(y, yt), close(dx, xt.grad, tol=1e-12)


def test_linear_matches_torch():
    ours = Linear(7, 4, rng=np.random.default_rng(0)).astype(np.float64)
    theirs = nn.Linear(7, 4).double()
    copy_into(ours, theirs)
    y, dx, yt, xt = run_both(ours, theirs, rand(5, 7), rand(5, 4, seed=1))
    close(y, yt), close(dx, xt.grad)
    close(ours.weight.grad, theirs.weight.grad), close(ours.bias.grad, theirs.bias.grad)


def test_vgg16_matches_torch_logits_and_gradients():
    ours = vgg16(width=0.25, rng=np.random.default_rng(0)).astype(np.float64)
    theirs = to_torch(ours)         # layer for layer, weights copied (the structure itself is
                                    # checked against docs/algorithm.md in test_vgg.py)
    x, dy = rand(4, 3, 32, 32), rand(4, 10, seed=1)
    y, dx, yt, xt = run_both(ours, theirs, x, dy)
    close(y, yt), close(dx, xt.grad)
    tp = dict(theirs.named_parameters())
    for p in ours.parameters():   # conv biases before BN: true gradient 0, compare absolutely
        close(p.grad, tp[p.name].grad, floor=1e-3)
    for k, v in theirs.state_dict().items():        # running statistics after one train step
        close(ours.state_dict()[k], v)
    ours.eval(), theirs.eval()
    close(ours.forward(x), theirs(torch.from_numpy(x)))
    # float32 sanity: the same model in single precision agrees to float32 accuracy
    ours32, theirs32, x32 = ours.astype(np.float32), theirs.float(), x.astype(np.float32)
    y32 = ours32.forward(x32)
    assert y32.dtype == np.float32
    close(y32, theirs32(torch.from_numpy(x32)), tol=1e-4)


def test_torch_vgg16_is_minicnn_vgg16():
    ours = vgg16(num_classes=100, in_channels=1, width=0.125, rng=np.random.default_rng(0))
    theirs = torch_vgg16(num_classes=100, in_channels=1, width=0.125, inplace_relu=True)
    assert ({k: tuple(v.shape) for k, v in theirs.state_dict().items()}
            == {k: tuple(v.shape) for k, v in ours.state_dict().items()})
    assert all(m.inplace for m in theirs.modules() if isinstance(m, nn.ReLU))
    theirs.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()})
    x = rand(3, 1, 32, 32).astype(np.float32)
    close(ours.eval().forward(x), theirs.eval()(torch.from_numpy(x)), tol=1e-4)
