"""Layer-wise sparsity distributions (cht/density.py) against a direct computation of section 8."""
import math

import numpy as np
import pytest

from cht.density import achieved, conv_densities, erk_densities, filter_count, layer_densities
from cht.masks import per_filter_count
from minicnn.layers import Conv2d
from minicnn.models import VGG16_CFG, scaled, vgg16

SPARSITIES = (0.5, 0.9, 0.95, 0.99)
WIDTHS = (0.125, 0.25, 0.5, 1.0)
# graded square layers on which ERK's cap binds in two successive rounds at density 0.07
LADDER = [(c, c, 3, 3) for c in (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 512)]


def vgg16_shapes(width, in_channels=3):
    """The 13 conv weight shapes of VGG16 (docs/algorithm.md section 6) at ``width``."""
    shapes, c_in = [], in_channels
    for v in VGG16_CFG:
        if v != "M":
            c = scaled(v, width)
            shapes.append((c, c_in, 3, 3))
            c_in = c
    return shapes


def erk_rigl(shapes, density):
    """ERK as RigL's code solves it: per round, only the layers of the largest ratio
    ``(C_in + C_out + kh + kw) / n`` that exceed 1 become dense. Returns (densities, dense)."""
    n = np.array([np.prod(s) for s in shapes], dtype=np.float64)
    raw = np.array([sum(s) for s in shapes], dtype=np.float64) / n
    dense = np.zeros(len(shapes), dtype=bool)
    while True:
        eps = (density * n.sum() - n[dense].sum()) / (raw * n)[~dense].sum()
        top = np.where(dense, -np.inf, raw).max()
        if eps * top <= 1:
            return np.where(dense, 1.0, eps * raw), dense
        dense |= ~dense & (raw == top)


def assert_within_rounding(plan, sparsity):
    """Active budget weights differ from ``(1 - S)`` of them by at most half an entry per filter
    (or ``1 - d*F`` in a filter whose count is lifted to 1)."""
    budget = [p for p in plan if p.in_budget]
    n = sum(p.size for p in budget)
    active = sum(p.shape[0] * p.k for p in budget)
    bound = sum(p.shape[0] * max(0.5, 1 - p.density * p.fan_in) for p in budget)
    assert abs(active - (1 - sparsity) * n) <= bound + 1e-9 * n
    assert achieved(plan)["global"] == active / n


# ---------------------------------------------------------------- ERK
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_erk_on_vgg16_equals_direct_computation(width, sparsity):
    shapes = vgg16_shapes(width)
    want, want_dense = erk_rigl(shapes, 1 - sparsity)
    plan = layer_densities(shapes, sparsity, "erk")
    got = np.array([p.density for p in plan])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    assert all(p.density <= 1.0 for p in plan)
    # the budget: the densities weight the layers to exactly (1 - S) of all weights
    n = np.array([p.size for p in plan])
    assert math.isclose((got * n).sum(), (1 - sparsity) * n.sum(), rel_tol=1e-12)
    for p, capped in zip(plan, want_dense):
        assert p.k == max(1, math.floor(p.density * p.fan_in + 0.5))
        assert p.dense == (p.k == p.fan_in) and p.in_budget
        assert not capped or (p.dense and p.density == 1.0)
    assert_within_rounding(plan, sparsity)


def test_erk_makes_the_first_vgg16_layer_dense_where_its_density_would_exceed_1():
    """At S = 0.9 the 3-channel first layer's ERK density would be above 1: dense, no mask."""
    shapes = vgg16_shapes(1.0)
    n = [math.prod(s) for s in shapes]
    eps0 = 0.1 * sum(n) / sum(sum(s) for s in shapes)             # the unconstrained solution
    assert eps0 * sum(shapes[0]) / n[0] > 1
    plan = layer_densities(shapes, 0.9, "erk")
    assert plan[0].dense and plan[0].density == 1.0 and plan[0].k == 27
    assert not any(p.dense for p in plan[1:])


def test_erk_cap_resolves_over_several_rounds():
    """A layer under 1 at the first solution exceeds 1 once the first capped layers free their
    budget: the loop must solve again (twice here) and still total exactly 1 - S."""
    density = 0.07
    n = np.array([math.prod(s) for s in LADDER], dtype=np.float64)
    erk = np.array([sum(s) for s in LADDER], dtype=np.float64)
    eps1 = density * n.sum() / erk.sum()
    round1 = eps1 * erk > n                                         # dense after one solve
    eps2 = (density * n.sum() - n[round1].sum()) / erk[~round1].sum()
    round2 = round1 | (eps2 * erk > n)
    assert round1.any() and (round2 & ~round1).any()                # a second round is needed
    got = np.array(erk_densities(LADDER, density))
    want, want_dense = erk_rigl(LADDER, density)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    assert ((got == 1.0) == want_dense).all() and (want_dense >= round2).all()
    assert math.isclose((got * n).sum(), density * n.sum(), rel_tol=1e-12)
    assert got.max() <= 1.0
    assert_within_rounding(layer_densities(LADDER, 1 - density, "erk"), 1 - density)


def test_erk_of_one_layer_is_uniform():
    for S in (0.0, 0.3, 0.9, 0.99):
        (d,) = erk_densities([(16, 8, 3, 3)], 1 - S)
        assert math.isclose(d, 1 - S, rel_tol=1e-12)
        assert layer_densities([(16, 8, 3, 3)], S, "erk")[0].k == per_filter_count(72, S)


# ---------------------------------------------------------------- uniform
@pytest.mark.parametrize("width", (0.125, 1.0))
@pytest.mark.parametrize("sparsity", (0.0, 0.1, 0.5, 0.7, 0.9, 0.95, 0.99, 0.999))
def test_uniform_equals_section_1(width, sparsity):
    shapes = vgg16_shapes(width)
    plan = layer_densities(shapes, sparsity, "uniform")
    for p, s in zip(plan, shapes):
        F = math.prod(s[1:])
        assert p.k == per_filter_count(F, sparsity) == max(1, math.floor((1 - sparsity) * F + 0.5))
        assert p.density == 1.0 - sparsity and p.dense == (p.k == F) and p.in_budget
    assert_within_rounding(plan, sparsity)


def test_filter_count_rounds_half_up_and_keeps_one():
    assert filter_count(27, 0.5) == 14                  # 13.5 -> 14
    assert filter_count(27, 0.01) == 1                  # 0.27 -> 0, lifted to 1
    assert filter_count(10, 0.25) == 3                  # 2.5 -> 3
    assert filter_count(10, 1.0) == 10


# ---------------------------------------------------------------- edges
@pytest.mark.parametrize("distribution", ("uniform", "erk"))
def test_sparsity_0_makes_every_layer_dense(distribution):
    plan = layer_densities(vgg16_shapes(0.25), 0.0, distribution)
    assert all(p.dense and p.k == p.fan_in for p in plan)
    assert achieved(plan) == {"global": 1.0, "conv": 1.0, "layers": {p.name: 1.0 for p in plan}}


@pytest.mark.parametrize("distribution", ("uniform", "erk"))
def test_sparsity_099_keeps_at_least_one_entry_per_filter(distribution):
    plan = layer_densities(vgg16_shapes(0.125), 0.99, distribution)
    assert all(1 <= p.k < p.fan_in and not p.dense for p in plan)
    if distribution == "uniform":
        assert plan[0].k == 1                           # 0.27 of 27 entries, lifted to 1
    assert_within_rounding(plan, 0.99)


@pytest.mark.parametrize("distribution", ("uniform", "erk"))
def test_dense_first_layer_stays_out_of_the_budget(distribution):
    shapes = vgg16_shapes(0.5)
    plan = layer_densities(shapes, 0.9, distribution, dense_first_layer=True)
    first = plan[0]
    assert first.dense and not first.in_budget and first.k == first.fan_in and first.density == 1.0
    rest = layer_densities(shapes[1:], 0.9, distribution)
    assert [(p.density, p.k, p.dense) for p in plan[1:]] == [(p.density, p.k, p.dense) for p in rest]
    got = achieved(plan)
    assert got["global"] == achieved(rest)["global"]
    total = sum(p.size for p in plan)
    assert got["conv"] == (first.size + sum(p.active for p in plan[1:])) / total
    assert_within_rounding(plan, 0.9)


@pytest.mark.parametrize("distribution", ("uniform", "erk"))
def test_dense_first_layer_with_a_single_conv(distribution):
    (p,) = layer_densities([(8, 3, 3, 3)], 0.9, distribution, dense_first_layer=True)
    assert p.dense and not p.in_budget and p.k == 27
    assert achieved([p]) == {"global": 1.0, "conv": 1.0, "layers": {"0": 1.0}}


def test_achieved_densities_from_the_counts():
    plan = layer_densities([(4, 2, 3, 3), (6, 4, 1, 1)], 0.5, "uniform", names=["a", "b"])
    assert [p.k for p in plan] == [9, 2]
    assert achieved(plan) == {"global": (36 + 12) / (72 + 24), "conv": (36 + 12) / (72 + 24),
                              "layers": {"a": 9 / 18, "b": 2 / 4}}


def test_conv_densities_of_a_model():
    model = vgg16(width=0.125, rng=np.random.default_rng(0))
    model.named_parameters()
    convs = [m for _, m in model.named_modules() if isinstance(m, Conv2d)]
    plan = conv_densities(convs, 0.95, "erk", dense_first_layer=True)
    assert [p.name for p in plan] == [c.weight.name for c in convs]
    assert plan[0].name == "features.0.weight" and plan[1].name == "features.3.weight"
    want = layer_densities(vgg16_shapes(0.125), 0.95, "erk", dense_first_layer=True)
    assert [(p.density, p.k, p.dense, p.in_budget) for p in plan] == \
        [(p.density, p.k, p.dense, p.in_budget) for p in want]


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity=float("nan")), "sparsity"), (dict(distribution="er"), "distribution"),
    (dict(shapes=[]), "no conv layer"), (dict(shapes=[(4, 2, 3)]), "shape"),
    (dict(shapes=[(4, 0, 3, 3)]), "shape"), (dict(names=["a", "b"]), "names"),
])
def test_bad_arguments_are_refused(kwargs, match):
    args = dict(shapes=[(4, 2, 3, 3)], sparsity=0.5, distribution="uniform", names=None) | kwargs
    with pytest.raises(ValueError, match=match):
        layer_densities(args["shapes"], args["sparsity"], args["distribution"], names=args["names"])
