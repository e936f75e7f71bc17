"""Optional: minicnn layers against torch.nn with the same weights (float64 to 1e-6 relative;
float32 forward sanity). Skipped where torch is absent; the framework never imports torch."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from minicnn.layers import BatchNorm1d, BatchNorm2d, Conv2d, Linear, MaxPool2d  # noqa: E402
from minicnn.models import VGG16_CFG, vgg16  # noqa: E402

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


class TorchVGG(nn.Module):
    """The spec's VGG16 in torch.nn, built independently of minicnn.models."""

    def __init__(self, width, num_classes=10):
        super().__init__()
        c = lambda v: max(1, int(round(v * width)))  # noqa: E731
        layers, cin = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, c(v), 3, padding=1), nn.BatchNorm2d(c(v)), nn.ReLU()]
                cin = c(v)
        h = c(512)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin, h), nn.ReLU(), nn.BatchNorm1d(h),
                                        nn.Linear(h, h), nn.ReLU(), nn.BatchNorm1d(h), nn.Linear(h, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def test_vgg16_matches_torch_logits_and_gradients():
    ours = vgg16(width=0.25, rng=np.random.default_rng(0)).astype(np.float64)
    theirs = TorchVGG(0.25).double()
    copy_into(ours, theirs)                          # keys must be identical: strict load
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
