"""CH-L3n scores of conv layers (cht.scores, cht.fast_scores, cht.topology) against brute force."""
import itertools

import numpy as np
import pytest

from cht.scores import ch_matrix, ch_scores, ch_sparse
from cht.topology import conv_topology
from ch_brute import ch_matrix_brute, ch_pair, adjacency, ch_scores_brute
from minicnn import backend
from worker_count import workers

EXAMPLE = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])     # docs/algorithm.md section 3
EXAMPLE_LINKS = [(0, 2), (1, 0), (1, 3), (2, 1)]


def _expected_example(value):
    S = np.zeros(EXAMPLE.shape)
    for u, v in EXAMPLE_LINKS:
        S[u, v] = value
    return S


def _assert_close(actual, expected):
    """1e-9 relative agreement; exact zeros where expected is zero."""
    assert actual.dtype == np.float64 and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=0)


# ---------------------------------------------------------------- the worked example
@pytest.mark.parametrize("method,value", [("ch3", 2.0), ("ch2", 4.0)])
def test_worked_example_matrix_form(method, value):
    np.testing.assert_array_equal(ch_matrix(EXAMPLE, method), _expected_example(value))
    u, v = np.nonzero(EXAMPLE)
    su, sv, s = ch_sparse(u, v, 3, 4, method)
    dense = np.zeros(EXAMPLE.shape)
    dense[su, sv] = s
    np.testing.assert_array_equal(dense, _expected_example(value))


def test_worked_example_node_walk():
    brute = ch_matrix_brute(EXAMPLE)
    np.testing.assert_array_equal(brute["ch3"], _expected_example(2.0))
    np.testing.assert_array_equal(brute["ch2"], _expected_example(4.0))


def test_node_walk_counts_each_community_node_once():
    # u=o0 -a- {i0,i1} -b- o1 ~ v=i2: two L3 paths through b=o1 (via i0 and via i1); o1 counts once.
    # di(o1) = |{i0, i1}| = 2, de(o1) = d(o1) - di - [o1~v] = 4 - 2 - 1 = 1 (its link to i3).
    X = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    nbr = adjacency(*np.nonzero(X), 2, 4)
    s = ch_pair(nbr, ("o", 0), ("i", 2))
    # a=i0: d=2, di=1 (o1), de = 2-1-1 = 0; i1 likewise; b=o1 as above
    assert s["ch3"] == pytest.approx(1 + 1 + 1 / 2)
    assert s["ch2"] == pytest.approx(2 + 2 + 3 / 2)
    np.testing.assert_allclose(ch_matrix(X, "ch3")[0, 2], s["ch3"], rtol=1e-15)
    np.testing.assert_allclose(ch_matrix(X, "ch2")[0, 2], s["ch2"], rtol=1e-15)


@pytest.mark.parametrize("seed", range(6))
def test_matrix_forms_equal_node_walk_on_random_graphs(seed):
    rng = np.random.default_rng(seed)
    n_out, n_in = rng.integers(2, 14, size=2)
    X = rng.random((n_out, n_in)) < rng.uniform(0.1, 0.8)
    brute = ch_matrix_brute(X)
    for method in ("ch2", "ch3"):
        _assert_close(ch_matrix(X, method), brute[method])
        u, v = np.nonzero(X)
        su, sv, s = ch_sparse(u, v, n_out, n_in, method)
        dense = np.zeros(X.shape)
        dense[su, sv] = s
        _assert_close(dense, brute[method])


# ---------------------------------------------------------------- the layer's graph
def _naive_edges(mask, H, W, sh, sw, ph, pw):
    C_out, C_in, kh, kw = mask.shape
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    edges = set()
    for o, c, dy, dx, i, j in itertools.product(range(C_out), range(C_in), range(kh), range(kw),
                                                range(Ho), range(Wo)):
        y, x = i * sh + dy - ph, j * sw + dx - pw
        if mask[o, c, dy, dx] and 0 <= y < H and 0 <= x < W:
            edges.add((c * H * W + y * W + x, o * Ho * Wo + i * Wo + j))
    return edges, C_in * H * W, C_out * Ho * Wo


@pytest.mark.parametrize("shape,hw,stride,padding", [
    ((2, 3, 3, 3), (5, 4), 1, 1), ((3, 2, 1, 1), (3, 3), 2, 0), ((2, 2, 5, 3), (6, 7), (2, 1), (2, 0)),
    ((1, 2, 2, 3), (4, 5), (1, 2), (0, 1)), ((2, 1, 3, 3), (2, 2), 1, 2)])
def test_conv_topology_matches_naive_loop(shape, hw, stride, padding):
    rng = np.random.default_rng(1)
    mask = rng.random(shape) < 0.5
    ei, eo, n_in, n_out = conv_topology(mask, hw, stride, padding)
    sh, sw = stride if isinstance(stride, tuple) else (stride, stride)
    ph, pw = padding if isinstance(padding, tuple) else (padding, padding)
    edges, n_in_ref, n_out_ref = _naive_edges(mask, *hw, sh, sw, ph, pw)
    assert ei.dtype == np.int64 and eo.dtype == np.int64
    assert (n_in, n_out) == (n_in_ref, n_out_ref)
    assert len(ei) == len(edges) and set(zip(ei.tolist(), eo.tolist())) == edges


def test_conv_topology_node_ids():
    # one active entry M[1, 2, 0, 1] in a 2x3 input, 2x2 kernel, stride 1, no padding -> Ho, Wo = 1, 2
    mask = np.zeros((2, 3, 2, 2), dtype=bool)
    mask[1, 2, 0, 1] = True
    ei, eo, n_in, n_out = conv_topology(mask, (2, 3))
    assert (n_in, n_out) == (3 * 2 * 3, 2 * 1 * 2)
    # window (0, j) sees pixel (0, j + 1) of channel 2: input id 2*6 + 0*3 + j+1, output 1*2 + 0*2 + j
    assert sorted(zip(ei.tolist(), eo.tolist())) == [(13, 2), (14, 3)]
    # padding positions are not nodes: with padding 1 the corner window's offset lands outside
    ei, eo, n_in, n_out = conv_topology(mask, (2, 3), padding=1)      # Ho, Wo = 3, 4
    assert n_out == 2 * 3 * 4 and len(ei) == 2 * 3      # y = i - 1 in {0, 1}, x = j in {0, 1, 2}
    assert ei.min() >= 12 and ei.max() < 18


# ---------------------------------------------------------------- window-averaged layer scores
def _layer_cases():
    """Random layers covering kernels 1/3/5, strides 1/2, paddings 0-2, maps 2x2..16x16, densities
    0.1-0.9, channels 1-6; the brute force is slow, so big maps get few channels."""
    rng = np.random.default_rng(2024)
    fixed = [((2, 3, 3, 3), (8, 8), 1, 1, 0.5), ((1, 1, 3, 3), (16, 16), 1, 1, 0.6),
             ((2, 1, 3, 3), (16, 9), 2, 1, 0.5), ((3, 2, 5, 5), (7, 5), 1, 2, 0.4),
             ((6, 5, 3, 3), (4, 4), 1, 1, 0.5), ((5, 6, 3, 3), (2, 2), 1, 1, 0.7),
             ((4, 3, 1, 1), (5, 6), 2, 2, 0.3), ((3, 3, 5, 5), (6, 6), 2, 0, 0.9),
             ((2, 4, 5, 3), (5, 4), (2, 1), (1, 2), 0.5), ((2, 2, 3, 3), (2, 3), 1, 2, 0.5),
             ((4, 4, 3, 3), (6, 6), 1, 1, 0.1), ((3, 1, 3, 5), (9, 3), (1, 2), (0, 2), 0.8),
             ((2, 3, 5, 5), (11, 10), 3, 2, 0.5)]                       # stride 3 too
    cases = list(fixed)
    while len(cases) < 50:
        k = tuple(int(v) for v in rng.choice([1, 3, 5], size=2 if rng.random() < 0.3 else 1))
        kh, kw = k if len(k) == 2 else (k[0], k[0])
        stride, pad = int(rng.integers(1, 3)), int(rng.integers(0, 3))
        H = int(rng.integers(max(2, kh - 2 * pad), 17))
        W = H if rng.random() < 0.5 else int(rng.integers(max(2, kw - 2 * pad), 17))
        c_out, c_in = (int(v) for v in rng.integers(1, 7, size=2))
        density = float(rng.uniform(0.1, 0.9))
        # brute-force cost ~ absent links x L3 paths each: keep each case well under a second
        links = c_out * c_in * kh * kw * (H // stride) * (W // stride) * (1 - density)
        if links * c_out * c_in * (kh * kw * density) ** 2 > 3e6:
            continue
        cases.append(((c_out, c_in, kh, kw), (H, W), stride, pad, density))
    return cases


@pytest.mark.parametrize("shape,hw,stride,padding,density", _layer_cases())
def test_ch_scores_equal_brute_force(shape, hw, stride, padding, density):
    rng = np.random.default_rng([*shape, *np.ravel(hw), *np.ravel(stride), *np.ravel(padding)])
    mask = rng.random(shape) < density
    brute = ch_scores_brute(mask, hw, stride, padding)
    for method in ("ch2", "ch3"):
        for impl in ("fast", "reference"):
            _assert_close(ch_scores(mask, hw, stride, padding, method, impl=impl), brute[method])


@pytest.mark.parametrize("shape,hw,stride,padding", [
    ((16, 8, 3, 3), (8, 8), 1, 1), ((8, 16, 3, 3), (8, 6), 2, 1), ((6, 6, 5, 5), (9, 9), 1, 2)])
def test_fast_equals_reference_on_larger_layers(shape, hw, stride, padding):
    rng = np.random.default_rng(7)
    mask = rng.random(shape) < 0.5
    for method in ("ch2", "ch3"):
        fast = ch_scores(mask, hw, stride, padding, method)
        assert (fast > 0).sum() > 0.3 * (~mask).sum()          # not trivially zero
        _assert_close(fast, ch_scores(mask, hw, stride, padding, method, impl="reference"))


def test_scores_zero_on_active_entries_and_entries_inside_no_window():
    rng = np.random.default_rng(3)
    mask = rng.random((3, 2, 3, 3)) < 0.5
    # 2x2 input, 3x3 kernel, stride 2, padding 1: one window, pixel (dy - 1, dx - 1); row/column 0
    # of the kernel never lies inside the image
    for impl in ("fast", "reference"):
        s = ch_scores(mask, (2, 2), 2, 1, impl=impl)
        assert np.all(s[mask] == 0) and np.all(s[:, :, 0, :] == 0) and np.all(s[:, :, :, 0] == 0)
        assert np.all(s >= 0) and s.max() > 0
        np.testing.assert_allclose(s, ch_scores_brute(mask, (2, 2), 2, 1)["ch3"], rtol=1e-9, atol=0)


def test_ch_scores_accepts_01_masks_and_leaves_input_alone():
    rng = np.random.default_rng(4)
    mask = rng.random((4, 3, 3, 3)) < 0.5
    ints = mask.astype(np.int8)
    before = ints.copy()
    s = ch_scores(ints, (5, 5), padding=1)
    np.testing.assert_array_equal(ints, before)
    np.testing.assert_array_equal(s, ch_scores(mask, (5, 5), padding=1))
    np.testing.assert_array_equal(s, ch_scores(mask, [5, 5], stride=(1, 1), padding=(1, 1)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="ch4"), "method"), (dict(impl="slow"), "impl"),
    (dict(mask=np.ones((2, 3, 3), dtype=bool)), "4-D"),
    (dict(mask=np.zeros((0, 3, 3, 3), dtype=bool)), "4-D"),
    (dict(mask=np.full((2, 3, 3, 3), 0.5)), "boolean"),
    (dict(input_hw=(2,)), "input_hw"), (dict(input_hw=(4.0, 4)), "input_hw"),
    (dict(input_hw=(0, 4)), "input_hw"), (dict(stride=0), "stride"),
    (dict(padding=-1), "padding"), (dict(input_hw=(1, 1)), "does not fit")])
def test_ch_scores_rejects_bad_arguments(kwargs, match):
    args = dict(mask=np.ones((2, 3, 3, 3), dtype=bool), input_hw=(4, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ch_scores(**args)
    if "method" not in kwargs and "impl" not in kwargs:
        with pytest.raises(ValueError, match=match):
            conv_topology(args["mask"], args["input_hw"], args.get("stride", 1), args.get("padding", 0))


@pytest.mark.parametrize("method", ["ch3", "ch2"])
def test_scores_are_the_same_bits_on_any_core_count(method):
    # n cores: n CPU workers and n BLAS threads, as the library chooses them. Regrowth ranks
    # these scores, so a last-bit difference could flip a near-tie on another machine (the
    # float64 products of this layer round differently on 1 and 2 BLAS threads).
    mask = np.random.default_rng(7).random((64, 48, 3, 3)) < 0.5
    blas = backend.blas_threads()
    scores = []
    try:
        for n in (1, 2, 3):
            with workers(n):
                backend.set_blas_threads(n)
                scores.append(ch_scores(mask, (4, 4), 1, 1, method))
    finally:
        if blas is not None:
            backend.set_blas_threads(blas)
    for s in scores[1:]:
        np.testing.assert_array_equal(s, scores[0])


@pytest.mark.skipif(not backend.gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_ch_scores_on_gpu_equal_cpu():
    rng = np.random.default_rng(5)
    mask = rng.random((8, 6, 3, 3)) < 0.5
    gmask = backend.to_device(mask, "gpu")
    for impl in ("fast", "reference"):
        s = ch_scores(gmask, (6, 6), 1, 1, "ch3", impl=impl)
        assert backend.is_gpu_array(s) and s.dtype == np.float64
        _assert_close(backend.to_numpy(s), ch_scores(mask, (6, 6), 1, 1, "ch3"))
