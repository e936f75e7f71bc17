"""minicnn.utils.conv: geometry against counting by hand, im2col against its definition, col2im as
its adjoint, in both work layouts."""
import numpy as np
import pytest

from minicnn.utils import conv

GEOMETRIES = [  # (H, W), kernel, stride, padding
    ((5, 5), (3, 3), (1, 1), (1, 1)), ((6, 5), (3, 3), (2, 2), (1, 1)), ((7, 5), (3, 2), (2, 1), (0, 2)),
    ((2, 2), (3, 3), (1, 1), (1, 1)), ((3, 3), (1, 1), (1, 1), (1, 1)), ((6, 6), (5, 5), (3, 3), (2, 2)),
    ((4, 4), (3, 3), (2, 2), (3, 3)), ((1, 3), (3, 2), (1, 1), (2, 0)),
]


def test_pair_accepts_ints_and_pairs_and_names_what_is_wrong():
    assert conv.pair(3) == (3, 3) and conv.pair((2, 1)) == (2, 1) and conv.pair([np.int64(4), 5]) == (4, 5)
    for bad, msg in [(1.5, "kernel_size must be an int"), ((1, 2, 3), "kernel_size must be an int"),
                     ("3", "kernel_size must be an int"), (0, "kernel_size must be >= 1")]:
        with pytest.raises(ValueError, match=msg):
            conv.pair(bad, "kernel_size", 1)


@pytest.mark.parametrize("hw, k, s, p", GEOMETRIES)
def test_output_size_and_window_counts_by_enumeration(hw, k, s, p):
    (H, W), (kh, kw), (sh, sw), (ph, pw) = hw, k, s, p
    oh = len(range(-ph, H + ph - kh + 1, sh))                   # windows that fit, every sh rows
    ow = len(range(-pw, W + pw - kw + 1, sw))
    assert conv.output_hw(hw, k, s, p) == (oh, ow)
    n_d = np.zeros((kh, kw), np.int64)
    for i in range(oh):
        for j in range(ow):
            for a in range(kh):
                for b in range(kw):
                    n_d[a, b] += 0 <= i * sh + a - ph < H and 0 <= j * sw + b - pw < W
    np.testing.assert_array_equal(conv.window_counts(hw, k, s, p), n_d)


def test_output_size_refuses_a_kernel_larger_than_the_padded_input():
    with pytest.raises(ValueError, match="does not fit the padded input 4x6"):
        conv.output_hw((2, 6), (5, 3), (1, 1), (1, 0))


@pytest.mark.parametrize("hw, k, s, p", GEOMETRIES)
@pytest.mark.parametrize("batch_last", [False, True])
def test_im2col_is_its_definition_and_col2im_its_adjoint(hw, k, s, p, batch_last):
    rng = np.random.default_rng(0)
    N, C = 3, 2
    x = rng.standard_normal((N, C) + hw)
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    oh, ow = conv.output_hw(hw, k, s, p)
    cols = conv.im2col(x, k, s, p, batch_last=batch_last)
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    want = np.empty((C, kh, kw, N, oh, ow))
    for c in range(C):
        for i in range(kh):
            for j in range(kw):
                for y in range(oh):
                    for z in range(ow):
                        want[c, i, j, :, y, z] = xpad[:, c, y * sh + i, z * sw + j]
    got = cols.transpose(0, 1, 2, 5, 3, 4) if batch_last else cols        # (C, kh, kw, N, oh, ow)
    np.testing.assert_array_equal(got, want)
    # adjoint: <im2col(x), d> = <x, col2im(d)> for any d, and the buffers are refilled
    d = rng.standard_normal(cols.shape)
    dxpad = np.full(conv.work_shape(C, N, hw[0] + 2 * ph, hw[1] + 2 * pw, batch_last), np.nan)
    out = np.full(x.shape, np.nan)
    dx = conv.col2im(d, x.shape, k, s, p, dxpad=dxpad, batch_last=batch_last, out=out)
    assert dx is out
    np.testing.assert_allclose(np.vdot(cols, d), np.vdot(x, dx), rtol=1e-12)
    np.testing.assert_array_equal(conv.col2im(d, x.shape, k, s, p, batch_last=batch_last), dx)


def test_naive_convolution_gradients_by_finite_differences():
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((3, 2, 3, 2)), rng.standard_normal(3)
    s, p = (2, 1), (1, 1)
    dy = rng.standard_normal(conv.conv2d_naive(x, w, b, s, p).shape)
    dx, dw, db = conv.conv2d_naive_backward(x, w, dy, s, p)
    for v, g in [(x, dx), (w, dw), (b, db)]:
        num = np.empty(v.size)
        for t in range(v.size):
            old = v.flat[t]
            v.flat[t] = old + 1e-6
            up = np.vdot(conv.conv2d_naive(x, w, b, s, p), dy)
            v.flat[t] = old - 1e-6
            num[t] = (up - np.vdot(conv.conv2d_naive(x, w, b, s, p), dy)) / 2e-6
            v.flat[t] = old
        np.testing.assert_allclose(g.ravel(), num, rtol=1e-6, atol=1e-8)
