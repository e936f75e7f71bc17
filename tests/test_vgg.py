"""VGG16 as docs/algorithm.md section 6 describes it: structure, state_dict, BN modes, a
whole-model gradient check, and a float32 training run whose loss falls."""
import numpy as np
import pytest

from minicnn import init, performance
from minicnn.gradcheck import gradcheck
from minicnn.layers import BatchNorm1d, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU
from minicnn.losses import CrossEntropyLoss
from minicnn.models import VGG, vgg16
from minicnn.optim import SGD, Adam
from worker_count import workers

SPEC = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def expected_state(num_classes=10, in_channels=3, width=1.0):
    """``{key: shape}`` of the model of docs/algorithm.md section 6, written out independently of
    minicnn.models."""
    c = lambda v: max(1, int(round(v * width)))  # noqa: E731
    out, i, cin = {}, 0, in_channels
    for v in SPEC:
        if v == "M":
            i += 1
            continue
        out[f"features.{i}.weight"], out[f"features.{i}.bias"] = (c(v), cin, 3, 3), (c(v),)
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"features.{i + 1}.{k}"] = (c(v),)
        out[f"features.{i + 1}.num_batches_tracked"] = ()
        i, cin = i + 3, c(v)
    h = c(512)
    for j, kind, fi, fo in [(1, "lin", cin, h), (3, "bn", h, h), (4, "lin", h, h), (6, "bn", h, h),
                            (7, "lin", h, num_classes)]:
        if kind == "lin":
            out[f"classifier.{j}.weight"], out[f"classifier.{j}.bias"] = (fo, fi), (fo,)
            continue
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"classifier.{j}.{k}"] = (h,)
        out[f"classifier.{j}.num_batches_tracked"] = ()
    return out


@pytest.mark.parametrize("kw", [{}, dict(num_classes=100, in_channels=1, width=0.25)])
def test_state_dict_keys_and_shapes_match_spec(kw):
    sd = vgg16(**kw).state_dict()
    exp = expected_state(**kw)
    assert list(sd) == list(exp)                      # PyTorch's order too
    assert {k: tuple(v.shape) for k, v in sd.items()} == exp


def test_layer_types_and_first_conv():
    m = vgg16(width=0.125)
    kinds = [type(l) for l in m.features]
    assert kinds.count(Conv2d) == 13 and kinds.count(MaxPool2d) == 5
    assert kinds[:4] == [Conv2d, BatchNorm2d, ReLU, Conv2d]
    assert [type(l) for l in m.classifier] == [Flatten, Linear, ReLU, BatchNorm1d, Linear, ReLU, BatchNorm1d, Linear]
    convs = [l for l in m.features if isinstance(l, Conv2d)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.stride == (1, 1) for c in convs)
    assert all(c.needs_input_grad for c in convs)                # dx of the image, as PyTorch would give
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert m.features.forward(x).shape == (2, 64, 1, 1)          # 32x32 -> 1x1 after five pools
    assert m.forward(x).shape == (2, 10)
    assert m.backward(np.ones((2, 10), np.float32)).shape == x.shape
    m.features[0].needs_input_grad = False                       # what a training loop sets
    m.forward(x)
    assert m.backward(np.ones((2, 10), np.float32)) is None      # the first conv skips dx


def test_construction_is_deterministic_given_a_seed():
    init.seed(14)
    a = vgg16(width=0.125)
    init.seed(14)
    b = vgg16(width=0.125)
    c = vgg16(width=0.125, rng=np.random.default_rng(14))
    d = vgg16(width=0.125, rng=np.random.default_rng(14))
    for k in a.state_dict():
        np.testing.assert_array_equal(a.state_dict()[k], b.state_dict()[k])
        np.testing.assert_array_equal(c.state_dict()[k], d.state_dict()[k])
    assert not np.array_equal(a.state_dict()["features.0.weight"], vgg16(width=0.125).state_dict()["features.0.weight"])


def test_load_state_dict_roundtrip_keeps_dtype():
    src = vgg16(width=0.125, rng=np.random.default_rng(0)).astype(np.float64)
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32))
    src.forward(x)                                                   # running stats and counters move
    dst = vgg16(width=0.125, rng=np.random.default_rng(1))           # float32, other weights
    dst.load_state_dict({k: v.copy() for k, v in src.state_dict().items()})
    for k, v in dst.state_dict().items():
        assert v.dtype == src.state_dict()[k].dtype, k               # float64 in -> float64 kept
        np.testing.assert_array_equal(v, src.state_dict()[k])
    assert all(p.grad.dtype == np.float64 for p in dst.parameters())
    src.eval(), dst.eval()
    np.testing.assert_array_equal(src.forward(x), dst.forward(x))


def test_train_and_eval_batchnorm_differ():
    m = vgg16(width=0.125, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((8, 3, 32, 32)).astype(np.float32)
    y_train = m.forward(x)
    m.eval()
    y_eval = m.forward(x)
    assert not np.allclose(y_train, y_eval, atol=1e-3)
    # eval: a sample's output does not depend on the rest of its batch (running statistics)
    np.testing.assert_allclose(m.forward(x[:3]), y_eval[:3], rtol=1e-4, atol=1e-5)
    m.train()
    assert not np.allclose(m.forward(x[:3]), y_train[:3], atol=1e-3)


def test_small_vgg_gradcheck_float64():
    """conv-bn-relu-pool-conv-bn-relu-pool-flatten-linear-relu-bn-linear-relu-bn-linear."""
    model = VGG([3, "M", 4, "M"], num_classes=3, in_channels=2, hidden=5, input_size=8,
                rng=np.random.default_rng(0)).astype(np.float64)
    # the first conv computes dx by default: checked as well
    x = np.random.default_rng(1).standard_normal((4, 2, 8, 8))
    # the conv biases before BN have a true gradient of exactly 0: floor the denominator
    errors = gradcheck(model, x, max_entries=12, floor=1e-2)
    bad = {k: e for k, e in errors.items() if not e < 1e-6}
    assert not bad, bad
    assert len(errors) == 1 + len(model.parameters())


def test_vgg16_float32_training_loss_falls():
    model = vgg16(width=0.25, rng=np.random.default_rng(0))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    crit, opt = CrossEntropyLoss(), SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        losses.append(crit.forward(model.forward(x), y))
        model.backward(crit.backward())
        opt.step()
        assert all(p.data.dtype == np.float32 and p.grad.dtype == np.float32 for p in model.parameters())
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses
    assert model.forward(x).dtype == np.float32


@pytest.mark.parametrize("make_opt", [lambda ps: Adam(ps, lr=1e-3, weight_decay=5e-4),
                                      lambda ps: SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4)])
def test_training_is_bitwise_the_same_on_1_2_and_3_workers(make_opt, monkeypatch):
    """Chunks, blocks and sums are fixed by the shapes, BLAS runs single-threaded: a run gives
    the same weights on any machine's core count (and resumes on another one). Small chunks and
    blocks here, as a batch of 128 gets, so that the workers share them."""
    monkeypatch.setattr(performance, "CHUNK_BYTES", 1 << 16)
    monkeypatch.setattr(performance, "BLOCK_SIZE", 1 << 13)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    results = []
    for n in (1, 2, 3):
        with workers(n):
            model = vgg16(width=0.125, rng=np.random.default_rng(0))
            model.features[0].needs_input_grad = False
            crit, opt = CrossEntropyLoss(), make_opt(model.parameters())
            for _ in range(3):
                opt.zero_grad()
                crit.forward(model.forward(x), y)
                model.backward(crit.backward())
                opt.step()
            state = opt.state_dict()["state"]
            results.append([v.copy() for v in model.state_dict().values()]
                           + [v for i in sorted(state) for v in state[i].values() if hasattr(v, "shape")])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    assert len(performance.image_chunks(16, 27 * 1024 * 4, x)) > 3        # the first conv's chunks
