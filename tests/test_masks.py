"""Masks of sparse conv layers (cht/masks.py): counts, randomness, invariants, checkpoints."""
import numpy as np
import pytest

from cht.masks import SparseConvMasks, kernel_counts, per_filter_count, random_mask, topology_measures
from minicnn import backend
from minicnn.layers import BatchNorm2d, Conv2d, Linear, Module, ReLU, Sequential
from minicnn.optim import SGD, Adam
from topology_brute import topology_by_hand


class Net(Module):
    """features/classifier children, as VGG16, so keys read ``features.0.weight``."""

    def __init__(self, seed=0, dtype=np.float32):
        super().__init__()
        r = np.random.default_rng(seed)
        self.features = Sequential(Conv2d(3, 4, 3, padding=1, rng=r, dtype=dtype), BatchNorm2d(4), ReLU(),
                                   Conv2d(4, 8, 3, padding=1, rng=r, dtype=dtype))
        self.classifier = Sequential(Linear(8, 3, rng=r, dtype=dtype))


class FakeOptimizer:
    def __init__(self):
        self.state = {}


def rows(a):
    return np.asarray(backend.to_numpy(a)).reshape(a.shape[0], -1)


def test_per_filter_count():
    assert per_filter_count(27, 0.5) == 14            # 13.5 + 0.5 -> 14 (round half up)
    assert per_filter_count(27, 0.7) == 8             # 8.1 + 0.5 -> 8
    assert per_filter_count(576, 0.7) == 173          # 172.8 + 0.5
    assert per_filter_count(4608, 0.5) == 2304
    assert per_filter_count(9, 0.99) == 1             # never an empty filter
    assert per_filter_count(9, 0.0) == 9
    assert per_filter_count(10, 0.25) == 8            # 7.5 + 0.5 -> 8
    # halves that binary floats put just below: (1 - 0.9) * 45 is 4.4999... in float64
    assert [per_filter_count(f, 0.9) for f in (15, 45, 135)] == [2, 5, 14]
    assert per_filter_count(25, 0.7) == 8             # 7.5 + 0.5 -> 8


def test_random_mask_counts_determinism_and_uniformity():
    M = random_mask((6, 3, 3, 3), 0.7, np.random.default_rng(0))
    assert M.dtype == bool and M.shape == (6, 3, 3, 3)
    assert (rows(M).sum(1) == 8).all()
    assert len({tuple(r) for r in rows(M)}) == 6                        # filters drawn independently
    assert np.array_equal(M, random_mask((6, 3, 3, 3), 0.7, np.random.default_rng(0)))
    assert not np.array_equal(M, random_mask((6, 3, 3, 3), 0.7, np.random.default_rng(1)))
    # every entry equally likely: frequency k/F = 0.3 within 5 binomial standard deviations
    rng, T = np.random.default_rng(2), 2000
    freq = sum(random_mask((2, 10), 0.7, rng).astype(int) for _ in range(T)) / T
    assert np.abs(freq - 0.3).max() < 5 * np.sqrt(0.3 * 0.7 / T)
    assert (rows(random_mask((3, 1, 2, 2), 0.99, rng)).sum(1) == 1).all()


def test_masks_cover_only_conv_weights_and_mask_them():
    net = Net()
    before = {k: v.copy() for k, v in net.state_dict().items()}
    masks = SparseConvMasks(net, 0.5, np.random.default_rng(0))
    assert [l.name for l in masks] == ["features.0.weight", "features.3.weight"]
    assert [l.k for l in masks] == [14, 18]
    assert [l.module for l in masks] == [net.features[0], net.features[3]]
    assert [l.param for l in masks] == [net.features[0].weight, net.features[3].weight]
    for l in masks:
        M = l.mask
        assert M.dtype == bool and M.shape == l.param.data.shape
        assert (rows(M).sum(1) == l.k).all()
        assert not (l.param.data * ~M).any()                            # W * ~M == 0 from the start
        assert np.array_equal(l.param.data[M], before[l.name][M])        # the kept entries untouched
    for key, v in net.state_dict().items():                             # everything else untouched
        if key not in ("features.0.weight", "features.3.weight"):
            assert np.array_equal(v, before[key]), key
    assert (net.classifier[0].weight.data != 0).all() and (net.features[0].bias.data != 0).all()
    assert masks.density() == pytest.approx((4 * 14 + 8 * 18) / (4 * 27 + 8 * 36))
    assert masks.itop_rate() == pytest.approx(masks.density())


def test_bad_arguments():
    with pytest.raises(ValueError):
        SparseConvMasks(Net(), 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError):
        SparseConvMasks(Net(), -0.1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="distribution"):
        SparseConvMasks(Net(), 0.5, np.random.default_rng(0), distribution="erdos")
    with pytest.raises(ValueError):
        SparseConvMasks(Sequential(Linear(2, 2)), 0.5, np.random.default_rng(0))


def test_sparsity_0_leaves_every_layer_dense():
    net = Net()
    before = net.state_dict()
    masks = SparseConvMasks(net, 0.0, np.random.default_rng(0))
    assert masks.layers == [] and masks.state_dict() == {} and [p.dense for p in masks.plan] == [True, True]
    assert masks.density() == masks.itop_rate() == 1.0
    assert masks.achieved() == {"global": 1.0, "conv": 1.0, "layers": {"features.0.weight": 1.0,
                                                                          "features.3.weight": 1.0}}
    for k, v in net.state_dict().items():
        assert np.array_equal(v, before[k])
    for p in net.parameters():
        p.grad[...] = 1.0
    masks.apply_to_grads()                                               # nothing to mask
    assert all((p.grad == 1.0).all() for p in net.parameters())


def test_a_layer_whose_k_is_its_fan_in_is_dense():
    # S = 0.015: features.0 (F = 27) keeps floor(26.6 + 0.5) = 27 = F entries: dense, no mask;
    # features.3 (F = 36) keeps floor(35.46 + 0.5) = 35 < F: sparse
    net = Net()
    w0 = net.features[0].weight.data.copy()
    masks = SparseConvMasks(net, 0.015, np.random.default_rng(0))
    assert [(p.name, p.k, p.dense) for p in masks.plan] == [("features.0.weight", 27, True),
                                                            ("features.3.weight", 35, False)]
    assert [l.name for l in masks] == ["features.3.weight"]
    assert set(masks.state_dict()) == {"mask.features.3.weight", "itop.features.3.weight"}
    assert np.array_equal(net.features[0].weight.data, w0)              # never masked
    assert masks.density() == 35 / 36


@pytest.mark.parametrize("dense_first", [False, True])
def test_erk_masks_follow_the_plan_and_skip_dense_layers(dense_first):
    from minicnn.models import vgg16
    from cht.density import conv_densities
    model = vgg16(width=0.25, rng=np.random.default_rng(0))
    convs = [m for _, m in model.named_modules() if isinstance(m, Conv2d)]
    first = convs[0].weight.data.copy()
    plan = conv_densities(convs, 0.9, "erk", dense_first)
    masks = SparseConvMasks(model, 0.9, np.random.default_rng(1), "erk", dense_first_layer=dense_first)
    assert masks.plan == plan and masks.distribution == "erk" and masks.dense_first_layer == dense_first
    dense = [p.name for p in plan if p.dense]
    assert dense and ("features.0.weight" in dense) == (dense_first or plan[0].density == 1.0)
    assert [l.name for l in masks] == [p.name for p in plan if not p.dense]
    assert len({p.k / p.fan_in for p in plan}) > 3                     # ERK: densities differ per layer
    for l, p in zip(masks, [p for p in plan if not p.dense]):
        assert l.k == p.k and (rows(l.mask).sum(1) == p.k).all()
    assert not any(k.endswith(name) for k in masks.state_dict() for name in dense)
    if dense_first:
        assert np.array_equal(convs[0].weight.data, first) and not plan[0].in_budget
    assert masks.achieved()["global"] == pytest.approx(0.1, abs=0.01)


def test_uniform_masks_are_the_per_layer_draws_of_random_mask():
    """The uniform distribution draws exactly what ``random_mask`` draws, layer by layer."""
    rng = np.random.default_rng(7)
    want = [random_mask((4, 3, 3, 3), 0.7, rng), random_mask((8, 4, 3, 3), 0.7, rng)]
    masks = SparseConvMasks(Net(), 0.7, np.random.default_rng(7))
    for l, M in zip(masks, want):
        assert np.array_equal(l.mask, M)


def test_apply_to_grads_weights_optimizer():
    net = Net(dtype=np.float64)
    masks = SparseConvMasks(net, 0.6, np.random.default_rng(0))
    l = masks.layers[0]
    l.param.grad[...] = 1.0
    masks.apply_to_grads()
    assert np.array_equal(l.param.grad, l.mask.astype(np.float64))
    l.param.data[...] = 2.0
    masks.apply_to_weights()
    assert np.array_equal(l.param.data, 2.0 * l.mask)
    opt = FakeOptimizer()
    ones = lambda: np.ones(l.param.data.shape)
    opt.state[l.param] = {"momentum_buffer": ones(), "exp_avg": ones(), "exp_avg_sq": ones(), "step": 3}
    masks.apply_to_optimizer(opt)                                        # absent state of layer 2: fine
    for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        assert np.array_equal(opt.state[l.param][key], l.mask.astype(np.float64))
    assert opt.state[l.param]["step"] == 3


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
                                  lambda ps: Adam(ps, lr=0.01, weight_decay=1e-3)], ids=["sgd", "adam"])
def test_real_optimizer_state_is_zeroed_and_stays_zero(make):
    net = Net()
    masks = SparseConvMasks(net, 0.7, np.random.default_rng(0))
    opt = make(net.parameters())
    r = np.random.default_rng(1)
    for p in net.parameters():                                           # one unmasked step: dense state
        p.grad[...] = r.normal(size=p.grad.shape)
    opt.step()
    masks.apply_to_weights()
    masks.apply_to_optimizer(opt)
    for step in range(5):                                                # then the trainer's order
        for p in net.parameters():
            p.grad[...] = r.normal(size=p.grad.shape)
        masks.apply_to_grads()
        opt.step()
        for l in masks:
            assert not (l.param.data * ~l.mask).any()                    # without apply_to_weights
            for k, v in opt.state[l.param].items():
                if k != "step":
                    assert not (v * ~l.mask).any() and v.dtype == np.float32


def test_state_dict_round_trip(tmp_path):
    net = Net()
    masks = SparseConvMasks(net, 0.5, np.random.default_rng(0))
    l0 = masks.layers[0]
    extra = np.zeros(l0.mask.shape, dtype=bool)
    extra[0, 0, 0, 0] = extra[1, 2, 2, 2] = True
    l0.ever_active |= extra                                              # as after some evolutions
    sd = masks.state_dict()
    assert set(sd) == {"mask.features.0.weight", "mask.features.3.weight",
                       "itop.features.0.weight", "itop.features.3.weight"}
    assert all(v.dtype == bool and isinstance(v, np.ndarray) for v in sd.values())
    np.savez(tmp_path / "ck.npz", **sd, **{"features.0.weight": np.zeros(3)})
    with np.load(tmp_path / "ck.npz") as f:
        loaded = dict(f)
    other = SparseConvMasks(Net(), 0.5, np.random.default_rng(99))
    assert not np.array_equal(other.layers[0].mask, l0.mask)
    other.load_state_dict(loaded)                                        # other keys are ignored
    for a, b in zip(masks, other):
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.ever_active, b.ever_active)
        assert not (b.param.data * ~b.mask).any()
    assert other.itop_rate() == masks.itop_rate() > masks.density()
    # a checkpoint without itop records restarts them at the mask
    third = SparseConvMasks(Net(), 0.5, np.random.default_rng(5))
    third.load_state_dict({k: v for k, v in sd.items() if k.startswith("mask.")})
    assert third.itop_rate() == masks.density()


def test_load_state_dict_rejects_bad_masks():
    masks = SparseConvMasks(Net(), 0.5, np.random.default_rng(0))
    sd = masks.state_dict()
    with pytest.raises(KeyError):
        masks.load_state_dict({k: v for k, v in sd.items() if k != "mask.features.3.weight"})
    bad = dict(sd, **{"mask.features.0.weight": sd["mask.features.0.weight"][:2]})
    with pytest.raises(ValueError, match="shape"):
        masks.load_state_dict(bad)
    full = dict(sd, **{"mask.features.0.weight": np.ones_like(sd["mask.features.0.weight"])})
    with pytest.raises(ValueError, match="per filter"):
        masks.load_state_dict(full)


def test_topology_measures_worked_example():
    # n[o, c] = [[2, 0, 1], [1, 0, 0]]: deg = [3, 0, 1], mean 4/3, population std sqrt(14)/3
    M = np.array([[[[1, 1]], [[0, 0]], [[1, 0]]],
                  [[[0, 1]], [[0, 0]], [[0, 0]]]], dtype=bool)               # (2, 3, 1, 2)
    assert kernel_counts(M).tolist() == [[2, 0, 1], [1, 0, 0]]
    t = topology_measures(M)
    assert t == {"channel_cv": pytest.approx(np.sqrt(14) / 4, rel=1e-15), "empty_kernels": 0.5,
                 "unused_inputs": 1}
    assert isinstance(t["channel_cv"], float) and isinstance(t["unused_inputs"], int)
    even = np.zeros((4, 3, 3, 3), dtype=bool)                              # 2 entries per (o, c): spread evenly
    even[:, :, 0, :2] = True
    assert topology_measures(even) == {"channel_cv": 0.0, "empty_kernels": 0.0, "unused_inputs": 0}


def test_topology_measures_equal_counts_by_hand():
    rng = np.random.default_rng(0)
    for shape, sparsity in [((6, 5, 3, 3), 0.9), ((4, 7, 1, 1), 0.7), ((3, 2, 3, 3), 0.5)]:
        M = random_mask(shape, sparsity, rng)
        cv, empty, unused = topology_by_hand(M)
        t = topology_measures(M)
        assert t["channel_cv"] == pytest.approx(cv, rel=1e-12) and t["empty_kernels"] == pytest.approx(empty)
        assert t["unused_inputs"] == unused
    assert topology_measures(random_mask((8, 6, 1, 1), 0.9, rng))["unused_inputs"] > 0   # k = 1: some unused


def test_vgg16_has_thirteen_sparse_layers():
    from minicnn.models import vgg16
    masks = SparseConvMasks(vgg16(width=0.125, rng=np.random.default_rng(0)), 0.7, np.random.default_rng(0))
    assert len(masks) == 13 and masks.layers[0].name == "features.0.weight"
    assert masks.layers[0].k == per_filter_count(27, 0.7) == 8


@pytest.mark.skipif(not backend.gpu_available(), reason="needs CuPy and a GPU")
def test_masks_follow_the_weights_to_the_gpu():
    net = Net()
    masks = SparseConvMasks(net, 0.5, np.random.default_rng(0))
    cpu_masks = [l.mask.copy() for l in masks]
    net.to("gpu")
    for p in net.parameters():
        p.grad[...] = 1.0
    masks.apply_to_grads()                                               # moves the masks too
    for l, M in zip(masks, cpu_masks):
        assert backend.device_of(l.mask) == "gpu"
        assert np.array_equal(backend.to_numpy(l.mask), M)
        assert np.array_equal(backend.to_numpy(l.param.grad), M.astype(np.float32))
    sd = masks.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())
