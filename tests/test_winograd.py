"""Winograd F(2x2, 3x3) (minicnn.utils.winograd and Conv2d's route through it): each transform
against its matrix written out, each adjoint against the transform by the inner-product
identity, the convolution against the direct loops and finite differences in float64, the route
bitwise the same on any number of workers, and the policy choosing it where it pays."""
import numpy as np
import pytest

from minicnn import init, performance
from minicnn.gradcheck import gradcheck
from minicnn.layers import Conv2d, MaxPool2d
from minicnn.models import vgg16
from minicnn.utils import winograd
from minicnn.utils.conv import conv2d_naive, conv2d_naive_backward, pad_to_work
from worker_count import workers

BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=float)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=float)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.fixture
def always_winograd(monkeypatch):
    """Every conv where F(2x2, 3x3) applies takes it, whatever its size."""
    monkeypatch.setattr(performance, "WINOGRAD_MIN_PAIRS", 1)
    monkeypatch.setattr(performance, "WINOGRAD_MAX_PIXELS", 1 << 30)


def test_the_one_dimensional_identity_holds():
    g, d = rand(3), rand(4, seed=1)
    y = AT @ ((winograd.G @ g) * (BT @ d))
    np.testing.assert_allclose(y, [g @ d[0:3], g @ d[1:4]], rtol=1e-14)   # y_a = sum_i g_i d_(a+i)


def test_weight_transform_is_G_g_Gt_and_its_adjoint_is_Gt_dU_G():
    F, C = 3, 4
    g, dU = rand(F, C, 3, 3), rand(16, F, C, seed=1)
    U = np.empty((16, F, C))
    winograd.weight_transform(g, U)
    want = np.einsum("ki,fcij,lj->klfc", winograd.G, g, winograd.G).reshape(16, F, C)
    np.testing.assert_allclose(U, want, rtol=1e-14, atol=1e-15)
    dg = np.zeros_like(g)
    for j0, j1 in [(0, 5), (5, 12)]:                          # in two parts, as the workers do
        winograd.weight_transform_adjoint(dU, dg, j0, j1)
    want = np.einsum("ki,klfc,lj->fcij", winograd.G, dU.reshape(4, 4, F, C), winograd.G)
    np.testing.assert_allclose(dg, want, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(np.vdot(U, dU), np.vdot(g, dg), rtol=1e-13)


@pytest.mark.parametrize("padding, hw", [((1, 1), (4, 6)), ((0, 2), (6, 2)), ((2, 0), (2, 4))])
def test_input_transform_is_Bt_d_B_of_every_patch(padding, hw):
    N, C = 3, 2
    x = rand(N, C, *hw)
    oh, ow = hw[0] + 2 * padding[0] - 2, hw[1] + 2 * padding[1] - 2
    xpad = pad_to_work(x, padding, batch_last=True)                         # (C, Hp, Wp, N)
    V = np.full((4, 4, C, oh // 2, ow // 2, N), np.nan)
    winograd.input_transform(xpad, (oh, ow), V, np.empty((4, C, oh // 2, ow + 2, N)))
    padded = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    for ty in range(oh // 2):
        for tx in range(ow // 2):
            d = padded[:, :, 2 * ty:2 * ty + 4, 2 * tx:2 * tx + 4]           # (N, C, 4, 4)
            want = np.einsum("ki,ncij,lj->klcn", BT, d, BT)
            np.testing.assert_allclose(V[:, :, :, ty, tx], want, rtol=1e-14, atol=1e-14)


def test_output_transform_is_At_M_A_and_its_adjoint_is_A_dY_At():
    F, th, tw, N = 3, 2, 3, 2
    M, dy = rand(4, 4, F, th, tw, N), rand(N, F, 2 * th, 2 * tw, seed=1)
    bias = rand(F, seed=2)
    out = np.full((N, F, 2 * th, 2 * tw), np.nan)
    for f0, f1 in [(0, 1), (1, 3)]:                             # in two parts, as the workers do
        winograd.output_transform(M, out, f0, f1, bias)
    want = np.einsum("ak,klftsn,bl->nftasb", AT, M, AT).reshape(N, F, 2 * th, 2 * tw) + bias[:, None, None]
    np.testing.assert_allclose(out, want, rtol=1e-14, atol=1e-14)
    dM = np.full_like(M, np.nan)
    for f0, f1 in [(0, 2), (2, 3)]:
        winograd.output_transform_adjoint(dy, dM, f0, f1)
    want = np.einsum("ak,nftasb,bl->klftsn", AT, dy.reshape(N, F, th, 2, tw, 2), AT)
    np.testing.assert_allclose(dM, want, rtol=1e-14, atol=1e-14)
    out_nb = np.empty_like(out)
    winograd.output_transform(M, out_nb)
    np.testing.assert_allclose(np.vdot(out_nb, dy), np.vdot(M, dM), rtol=1e-13)


WINO_CASES = [  # (C, F, padding, (H, W), bias): where F(2x2, 3x3) applies
    (3, 4, 1, (2, 2), True),         # VGG16's last maps
    (2, 5, 1, (4, 6), True),
    (4, 3, 1, (8, 8), False),
    (3, 2, 0, (6, 4), True),         # dx then pads dy by 2
    (2, 3, 2, (2, 4), True),         # ... by 0
    (1, 1, (1, 0), (4, 6), True),
]


@pytest.mark.parametrize("C,F,p,hw,bias", WINO_CASES)
def test_winograd_conv_matches_direct_loops(always_winograd, C, F, p, hw, bias):
    init.seed(0)
    conv = Conv2d(C, F, 3, padding=p, bias=bias).astype(np.float64)
    x = rand(3, C, *hw)
    y = conv.forward(x)
    b = conv.bias.data if bias else None
    np.testing.assert_allclose(y, conv2d_naive(x, conv.weight.data, b, (1, 1), conv.padding), rtol=1e-12, atol=1e-12)
    dy = rand(*y.shape, seed=3)
    dx = conv.backward(dy)
    conv.forward(x)
    np.testing.assert_array_equal(conv.backward(dy), dx)     # the second pass adds to .grad
    ref_dx, ref_dw, ref_db = conv2d_naive_backward(x, conv.weight.data, dy, (1, 1), conv.padding)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(conv.weight.grad, 2 * ref_dw, rtol=1e-12, atol=1e-12)
    if bias:
        np.testing.assert_allclose(conv.bias.grad, 2 * ref_db, rtol=1e-12, atol=1e-12)


def test_winograd_conv_is_the_route_taken(always_winograd, monkeypatch):
    """The cases above would pass through im2col as well: make sure they did not."""
    calls = []
    real = winograd.input_transform
    monkeypatch.setattr(winograd, "input_transform", lambda *a: calls.append(1) or real(*a))
    conv = Conv2d(2, 3, 3, padding=1).astype(np.float64)
    conv.backward(np.ones_like(conv.forward(rand(2, 2, 4, 4))))
    assert len(calls) == 3 * 1                                # forward, backward's V, dx's forward (1 block each)


@pytest.mark.parametrize("C,F,p,hw,bias", WINO_CASES[:4])
def test_winograd_conv_gradcheck(always_winograd, C, F, p, hw, bias):
    init.seed(1)
    conv = Conv2d(C, F, 3, padding=p, bias=bias).astype(np.float64)
    errors = gradcheck(conv, rand(2, C, *hw, seed=1))
    assert all(e < 1e-6 for e in errors.values()), errors


def test_no_input_gradient_for_the_first_layer(always_winograd):
    conv = Conv2d(2, 3, 3, padding=1).astype(np.float64)
    conv.needs_input_grad = False
    x = rand(2, 2, 4, 4)
    assert conv.backward(rand(*conv.forward(x).shape, seed=1)) is None
    assert np.abs(conv.weight.grad).sum() > 0


def test_winograd_conv_is_bitwise_the_same_on_any_number_of_workers(monkeypatch):
    monkeypatch.setattr(performance, "WINOGRAD_MIN_PAIRS", 1)
    monkeypatch.setattr(performance, "BLOCK_SIZE", 64)           # several blocks of channels and filters
    init.seed(6)
    conv = Conv2d(24, 20, 3, padding=1).astype(np.float64)
    x = rand(5, 24, 4, 6)
    dy = rand(5, 20, 4, 6, seed=1)
    out = []
    for n in (1, 3, 2):
        with workers(n):
            conv.zero_grad()
            y = conv.forward(x)
            out.append((y, conv.backward(dy), conv.weight.grad.copy(), conv.bias.grad.copy()))
    for other in out[1:]:
        for a, b in zip(out[0], other):
            np.testing.assert_array_equal(a, b)


def test_the_policy_takes_winograd_on_vgg16s_wide_small_maps_only():
    model, hw, chosen = vgg16(), 32, []
    for name, m in model.features.named_modules():
        if isinstance(m, MaxPool2d):
            hw //= 2
        if isinstance(m, Conv2d) and performance.winograd(m.kernel_size, m.stride, m.padding, (hw, hw),
                                                          m.in_channels, m.out_channels):
            chosen.append((m.in_channels, m.out_channels, hw))
    assert chosen == [(128, 256, 8), (256, 256, 8), (256, 256, 8),
                      (256, 512, 4), (512, 512, 4), (512, 512, 4),
                      (512, 512, 2), (512, 512, 2), (512, 512, 2)]
    assert not performance.winograd((3, 3), (2, 2), (1, 1), (4, 4), 512, 512)        # stride 2
    assert not performance.winograd((3, 3), (1, 1), (1, 1), (3, 3), 512, 512)        # odd output
    assert not performance.winograd((3, 3), (1, 1), (3, 3), (4, 4), 512, 512)        # dx would not be a conv
