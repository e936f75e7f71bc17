"""FLOPs accounting (cht/flops.py, docs/algorithm.md section 9) and the scoring's product count."""
import numpy as np
import pytest

from cht import flops
from cht.masks import SparseConvMasks
from cht.scores import ch_scores
from minicnn import backend
from minicnn.layers import Conv2d, Linear
from minicnn.models import vgg16

VGG16_CONV_MACS = 313_196_544          # docs/algorithm.md section 9, full width, one 32x32 image
VGG16_LINEAR_MACS = 529_408            # 512*512 + 512*512 + 512*10


@pytest.fixture(scope="module")
def full_vgg16():
    return vgg16(num_classes=10, width=1.0, rng=np.random.default_rng(0))


def test_full_width_vgg16_forward_is_313725952_macs(full_vgg16):
    layers = flops.model_layers(full_vgg16, (3, 32, 32))
    conv = [l for l in layers if len(l.shape) == 4]
    linear = [l for l in layers if len(l.shape) == 2]
    assert len(conv) == 13 and len(linear) == 3
    assert flops.forward_macs(conv) == VGG16_CONV_MACS
    assert flops.forward_macs(linear) == VGG16_LINEAR_MACS
    assert flops.forward_macs(layers) == 313_725_952


def test_vgg16_count_from_layer_shapes_alone():
    """The same count without a model: stage by stage, 3x3 convs with padding 1 keep the size."""
    stages = [(32, [64, 64]), (16, [128, 128]), (8, [256] * 3), (4, [512] * 3), (2, [512] * 3)]
    layers, c_in = [], 3
    for size, channels in stages:
        for c in channels:
            layers.append(flops.conv_layer(f"conv{len(layers)}", (c, c_in, 3, 3), (size, size), 1, 1))
            c_in = c
    layers += [flops.linear_layer("fc1", (512, 512)), flops.linear_layer("fc2", (512, 512)),
               flops.linear_layer("fc3", (10, 512))]
    assert flops.forward_macs(layers) == 313_725_952


def test_model_layers_restores_the_modes(full_vgg16):
    full_vgg16.train()
    flops.model_layers(full_vgg16, (3, 32, 32))
    assert all(m.training for _, m in full_vgg16.named_modules())
    full_vgg16.eval()
    flops.model_layers(full_vgg16, (3, 32, 32))
    assert not any(m.training for _, m in full_vgg16.named_modules())
    full_vgg16.train()


def test_dense_fractions_are_exactly_one(full_vgg16):
    layers = flops.model_layers(full_vgg16, (3, 32, 32))
    f_D = flops.forward_macs(layers)
    assert flops.inference_fraction(layers, None) == 1.0
    full = {l.name: np.ones(l.shape, dtype=bool) for l in layers if len(l.shape) == 4}
    assert flops.inference_fraction(layers, full) == 1.0
    assert flops.training_fraction("dense", f_D, f_D, 200, 50_000, 128) == 1.0
    for method in ("static", "set", "rigl"):           # a sparse method at density 1 costs dense
        assert flops.training_fraction(method, f_D, f_D, 200, 50_000, 128, evolutions=150) == 1.0


def direct_count(model, masks, x):
    """Multiply-adds of ``x``'s forward counted from what the layers output: each conv output
    position of one example multiplies every active weight of its filter, each linear output
    every weight of its row."""
    total = 0
    for layer in list(model.features) + list(model.classifier):
        x = layer.forward(x)
        if isinstance(layer, Conv2d):
            M = backend.to_numpy(masks.get(layer.weight.name, np.ones(layer.weight.shape, dtype=bool)))
            for o in range(M.shape[0]):                   # filter o: its active entries, per position
                total += int(M[o].sum()) * x.shape[2] * x.shape[3]
        elif isinstance(layer, Linear):
            total += layer.weight.data.size
    return total


@pytest.mark.parametrize("in_channels,sparsity", [(3, 0.9), (1, 0.5), (3, 0.99)])
def test_sparse_inference_equals_a_count_from_the_checkpoint_masks(in_channels, sparsity):
    model = vgg16(width=0.125, in_channels=in_channels, rng=np.random.default_rng(1), dtype=np.float64)
    sparse = SparseConvMasks(model, sparsity, np.random.default_rng(2))
    state = sparse.state_dict()                          # what checkpoint.npz holds
    masks = {k[len("mask."):]: v for k, v in state.items() if k.startswith("mask.")}
    del masks["features.7.weight"]                       # one layer left dense, as ERK may
    layers = flops.model_layers(model, (in_channels, 32, 32))
    f_S, f_D = flops.forward_macs(layers, masks), flops.forward_macs(layers)
    model.eval()
    x = np.zeros((1, in_channels, 32, 32))
    assert f_S == direct_count(model, masks, x)
    assert f_D == direct_count(model, {}, x)
    assert flops.inference_fraction(layers, masks) == f_S / f_D < 1.0


def test_masks_must_match_the_layers():
    layers = [flops.conv_layer("a", (4, 2, 3, 3), (8, 8)), flops.linear_layer("b", (3, 4))]
    with pytest.raises(ValueError, match="not among the layers: z"):
        flops.forward_macs(layers, {"z": np.ones((4, 2, 3, 3), dtype=bool)})
    with pytest.raises(ValueError, match="a: mask of shape"):
        flops.forward_macs(layers, {"a": np.ones((4, 2, 1, 1), dtype=bool)})
    assert flops.forward_macs(layers, {"a": np.zeros((4, 2, 3, 3), dtype=bool)}) == 12
    assert flops.conv_layer("s", (4, 2, 3, 3), (9, 8), stride=2).positions == 4 * 3


# ---------------------------------------------------------------- training
RECIPE = dict(epochs=10, examples=1000, batch_size=128)     # the last batch holds 1000 - 7*128 = 104


def test_training_macs_per_method():
    f_S, f_D, steps = 1_000, 4_000, 7
    base = 3 * f_S * 1000 * 10
    assert flops.training_macs("dense", f_S, f_D, **RECIPE) == 3 * f_D * 1000 * 10
    for method in ("static", "set"):
        assert flops.training_macs(method, f_S, f_D, **RECIPE, evolutions=steps) == base
    # RigL: the batch whose dense gradient feeds a step costs f_D - f_S more per example
    assert flops.training_macs("rigl", f_S, f_D, **RECIPE, evolutions=steps) == base + 3_000 * 104 * steps
    assert flops.training_macs("rigl", f_S, f_D, 10, 1024, 128, evolutions=steps) == \
        3 * f_S * 1024 * 10 + 3_000 * 128 * steps
    for method in ("ch2", "ch3"):
        assert flops.training_macs(method, f_S, f_D, **RECIPE, evolutions=steps, scoring_macs=12_345) == \
            base + 12_345
    got = flops.training_fraction("rigl", f_S, f_D, **RECIPE, evolutions=steps)
    assert got == (base + 3_000 * 104 * steps) / (3 * f_D * 1000 * 10)


def test_training_arguments_are_checked():
    with pytest.raises(ValueError, match="method must be one of"):
        flops.training_macs("sett", 1, 2, **RECIPE)
    with pytest.raises(ValueError, match="set has no CH scoring"):
        flops.training_macs("set", 1, 2, **RECIPE, scoring_macs=5)


# ---------------------------------------------------------------- the scoring's products
class Counting(np.ndarray):
    """An ndarray that tallies every matrix product it takes part in, ``@`` (the ``matmul``
    ufunc) and ``np.tensordot``, at ``result.size * (length of the contracted axis)``
    multiply-adds, the definition of a product; every result stays ``Counting``."""

    macs = []

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        args = [np.asarray(v) for v in inputs]
        if out is not None:
            kwargs["out"] = tuple(np.asarray(v) for v in out)
        result = getattr(ufunc, method)(*args, **kwargs)
        if ufunc is np.matmul and method == "__call__":
            Counting.macs.append(result.size * args[0].shape[-1])
        if out is not None:
            return out[0] if len(out) == 1 else out
        return result.view(Counting) if isinstance(result, np.ndarray) else result

    def __array_function__(self, func, types, args, kwargs):
        result = super().__array_function__(func, (np.ndarray,), args, kwargs)
        if func is np.tensordot:
            assert kwargs == {"axes": 1}
            Counting.macs.append(result.size * args[0].shape[-1])
        return result.view(Counting) if isinstance(result, np.ndarray) else result


class CountingNumpy:
    """NumPy whose ``asarray`` and ``ascontiguousarray`` (which drop subclasses) give ``Counting``."""

    def __getattr__(self, name):
        f = getattr(np, name)
        if name in ("asarray", "ascontiguousarray"):
            return lambda *args, **kwargs: f(*args, **kwargs).view(Counting)
        return f


@pytest.mark.parametrize("method", ("ch2", "ch3"))
@pytest.mark.parametrize("shape,hw,stride,padding", [
    ((6, 4, 3, 3), (8, 8), 1, 1), ((5, 3, 3, 3), (9, 7), 2, 1), ((4, 6, 2, 3), (6, 7), (1, 2), (0, 1)),
])
def test_scoring_count_equals_an_instrumented_run(method, shape, hw, stride, padding, monkeypatch):
    mask = np.random.default_rng(3).random(shape) < 0.4
    macs = []
    want = ch_scores(mask, hw, stride, padding, method)
    got = ch_scores(mask, hw, stride, padding, method, macs=macs)
    np.testing.assert_array_equal(got, want)                # counting changes no score
    Counting.macs = []
    monkeypatch.setattr(backend, "get_array_module", lambda *arrays: CountingNumpy())
    ch_scores(mask.view(Counting), hw, stride, padding, method)
    monkeypatch.undo()
    assert len(Counting.macs) == len(macs) > 4
    assert sum(Counting.macs) == sum(macs) > 0
    assert sorted(Counting.macs) == sorted(macs)


@pytest.mark.skipif(not backend.gpu_available(), reason="needs CuPy and a GPU")
def test_counts_on_gpu_equal_cpu():
    mask = np.random.default_rng(4).random((8, 6, 3, 3)) < 0.3
    cpu, gpu = [], []
    ch_scores(mask, (8, 8), 1, 1, "ch3", macs=cpu)
    ch_scores(backend.to_device(mask, "gpu"), (8, 8), 1, 1, "ch3", macs=gpu)
    assert gpu == cpu
    layers = [flops.conv_layer("a", mask.shape, (8, 8), 1, 1)]
    assert flops.forward_macs(layers, {"a": backend.to_device(mask, "gpu")}) == \
        flops.forward_macs(layers, {"a": mask}) == int(mask.sum()) * 64
