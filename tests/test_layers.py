"""Layers against plain reference code (loops, formulas) and finite differences, in float64;
dtype preservation in float32. Each test names what a bug would look like when it fails."""
import numpy as np
import pytest

from minicnn import backend, init, performance
from minicnn.gradcheck import gradcheck
from minicnn.layers import (BatchNorm1d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU,
                            Sequential)
from minicnn.utils.conv import conv2d_naive, conv2d_naive_backward
from worker_count import workers

TOL = 1e-6


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def f64(layer):
    return layer.astype(np.float64)


def assert_gradcheck(module, x, **kw):
    errors = gradcheck(module, x, **kw)
    bad = {k: e for k, e in errors.items() if not e < TOL}
    assert not bad, f"gradient check failed: {bad}"
    return errors


# -- plain references (loops; slow, obviously right) -------------------------------------------
# the convolution's: minicnn.utils.conv.conv2d_naive and conv2d_naive_backward
def maxpool_ref(x, k, s, dy):
    """Max pool forward and the first-maximum backward, window by window."""
    (kh, kw), (sh, sw) = k, s
    N, C, H, W = x.shape
    oh, ow = (H - kh) // sh + 1, (W - kw) // sw + 1
    y, dx = np.zeros((N, C, oh, ow)), np.zeros_like(x)
    for n in range(N):
        for c in range(C):
            for i in range(oh):
                for j in range(ow):
                    win = x[n, c, i * sh:i * sh + kh, j * sw:j * sw + kw]
                    a, b = np.unravel_index(np.argmax(win), win.shape)   # argmax: the first maximum
                    y[n, c, i, j] = win[a, b]
                    dx[n, c, i * sh + a, j * sw + b] += dy[n, c, i, j]
    return y, dx


# -- Conv2d ---------------------------------------------------------------------------------
CONV_CASES = [  # (C, F, kernel, stride, padding, (H, W))
    (2, 3, 3, 1, 0, (5, 5)),
    (2, 3, 3, 1, 1, (5, 5)),
    (2, 3, 3, 2, 1, (6, 5)),
    (3, 2, 3, 2, 2, (5, 7)),
    (2, 3, (2, 3), 1, 1, (4, 6)),          # non-square kernel
    (2, 2, (3, 2), (2, 1), (0, 2), (7, 5)),  # non-square everything
    (3, 4, 1, 1, 0, (3, 4)),               # 1x1 conv
    (1, 2, 5, 3, 2, (6, 6)),               # stride > 1 leaves pixels unused
    (3, 4, 3, 1, 1, (2, 2)),               # maps smaller than the kernel (VGG16's 2x2 layers)
    (2, 3, 3, 1, 1, (1, 2)),
    (2, 3, 3, 2, 1, (2, 2)),
    (2, 2, (3, 2), 1, (2, 0), (1, 3)),
    (2, 3, 1, 1, 1, (3, 3)),               # padding >= kernel: the border outputs see only padding
    (2, 3, 2, 1, 2, (3, 4)),               # ... with stride 1 (col2im: no dx by conv)
    (2, 3, 3, 2, 3, (4, 4)),
]


@pytest.mark.parametrize("C,F,k,s,p,hw", CONV_CASES)
def test_conv_forward_and_backward_match_direct_loops(C, F, k, s, p, hw):
    init.seed(0)
    conv = f64(Conv2d(C, F, k, stride=s, padding=p))
    x = rand(2, C, *hw)
    y = conv.forward(x)
    ref = conv2d_naive(x, conv.weight.data, conv.bias.data, conv.stride, conv.padding)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    assert conv.input_hw == hw
    dy = rand(*y.shape, seed=3)
    dx = conv.backward(dy)
    for got, want in zip((dx, conv.weight.grad, conv.bias.grad),
                         conv2d_naive_backward(x, conv.weight.data, dy, conv.stride, conv.padding)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("C,F,k,s,p,hw", CONV_CASES)
def test_conv_gradcheck(C, F, k, s, p, hw):
    init.seed(1)
    conv = f64(Conv2d(C, F, k, stride=s, padding=p))
    assert_gradcheck(conv, rand(2, C, *hw, seed=1))


def test_conv_without_bias_and_reuse_off_give_same_grads(monkeypatch):
    init.seed(2)
    x, dy = rand(3, 2, 6, 6), rand(3, 4, 3, 3, seed=5)
    results = []
    for reuse in (True, False):
        init.seed(2)
        conv = f64(Conv2d(2, 4, 3, stride=2, padding=1, bias=False))
        monkeypatch.setattr(performance, "reuse_workspace", reuse)
        for _ in range(2):                       # second pass reuses the kept buffers
            conv.zero_grad()
            y = conv.forward(x)
            dx = conv.backward(dy)
        results.append((y, dx, conv.weight.grad.copy()))
        assert conv.bias is None and [k for k in conv.state_dict()] == ["weight"]
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    assert_gradcheck(conv, x)


def test_conv_kept_buffers_follow_shape_changes(monkeypatch):
    init.seed(5)
    conv = f64(Conv2d(2, 3, 3, padding=1))
    xs = [rand(n, 2, h, h, seed=n) for n, h in [(4, 6), (2, 5), (4, 6)]]
    for x in xs:                                   # batch and size change between calls
        conv.zero_grad()
        y = conv.forward(x)
        dy = rand(*y.shape, seed=9)
        dx = conv.backward(dy)
        np.testing.assert_allclose(y, conv2d_naive(x, conv.weight.data, conv.bias.data, (1, 1), (1, 1)), atol=1e-12)
        fresh = f64(Conv2d(2, 3, 3, padding=1))
        fresh.load_state_dict(conv.state_dict())
        monkeypatch.setattr(performance, "reuse_workspace", False)
        fresh.forward(x)
        np.testing.assert_allclose(dx, fresh.backward(dy), atol=1e-12)
        np.testing.assert_allclose(conv.weight.grad, fresh.weight.grad, atol=1e-12)
        monkeypatch.setattr(performance, "reuse_workspace", True)


@pytest.mark.parametrize("C, F, s", [(8, 4, 1), (3, 8, 1), (4, 6, 2)])   # dx by conv, F > 2C, col2im
def test_conv_is_bitwise_the_same_on_any_number_of_workers(monkeypatch, C, F, s):
    init.seed(6)
    conv = f64(Conv2d(C, F, 3, stride=s, padding=1))
    monkeypatch.setattr(performance, "CHUNK_BYTES", 1 << 14)         # several chunks per worker
    x = rand(11, C, 12, 12)
    dy = rand(*conv.forward(x).shape, seed=1)
    out = []
    for n in (1, 3, 2, 3):
        with workers(n):
            conv.zero_grad()
            y = conv.forward(x)
            out.append((y, conv.backward(dy), conv.weight.grad.copy(), conv.bias.grad.copy()))
    assert len(performance.image_chunks(11, 3 * 9 * 144 * 8, x)) > 3
    for other in out[1:]:                    # the same sums in the same order, whoever runs them
        for a, b in zip(out[0], other):
            np.testing.assert_array_equal(a, b)


def test_gemms_run_on_one_blas_thread_whatever_the_worker_count(monkeypatch):
    """OpenBLAS rounds a product differently on 1 and on several threads (float64 here): the
    layers must call it single-threaded, also with one worker, or results follow the core count."""
    blas_before = backend.blas_threads()
    if blas_before is None:
        pytest.skip("needs an OpenBLAS whose thread count can be set")
    init.seed(9)
    conv, lin = f64(Conv2d(64, 64, 3, padding=1)), f64(Linear(1000, 333))
    x, xl = rand(16, 64, 8, 8), rand(37, 1000, seed=2)          # shapes where 1 and 4 threads round apart
    seen, matmul = [], np.matmul

    def spy(*args, **kw):                   # the BLAS thread count at every GEMM of the conv
        seen.append(backend.blas_threads())
        return matmul(*args, **kw)

    out = {}
    try:
        for blas in (1, 4):
            for n in (1, 2):
                backend.set_blas_threads(blas)                     # BLAS's setting outside the layers
                with workers(n):
                    monkeypatch.setattr(np, "matmul", spy)
                    y, z = conv.forward(x), lin.forward(xl)
                    conv.zero_grad(), lin.zero_grad()
                    grads = conv.backward(np.ones_like(y)), lin.backward(np.ones_like(z))
                    monkeypatch.setattr(np, "matmul", matmul)
                assert backend.blas_threads() == blas              # restored after the layers
                out[blas, n] = (y, z) + grads + tuple(p.grad.copy() for p in conv.parameters() + lin.parameters())
    finally:
        backend.set_blas_threads(blas_before)
    assert seen and set(seen) == {1}
    for key in out:
        for a, b in zip(out[1, 1], out[key]):
            np.testing.assert_array_equal(a, b)


def test_conv_gradcheck_with_worker_threads(monkeypatch):
    monkeypatch.setattr(performance, "CHUNK_BYTES", 1 << 10)
    init.seed(8)
    with workers(2):
        assert_gradcheck(f64(Conv2d(2, 3, 3, padding=1)), rand(4, 2, 5, 5))


def test_conv_skips_input_grad_when_told():
    init.seed(3)
    conv = f64(Conv2d(2, 3, 3, padding=1))
    x, dy = rand(2, 2, 4, 4), rand(2, 3, 4, 4, seed=1)
    conv.forward(x)
    conv.backward(dy)
    dW = conv.weight.grad.copy()
    conv.zero_grad()
    conv.needs_input_grad = False
    conv.forward(x)
    assert conv.backward(dy) is None
    np.testing.assert_array_equal(conv.weight.grad, dW)


def test_conv_grads_accumulate():
    init.seed(4)
    conv = f64(Conv2d(2, 3, 3))
    x, dy = rand(2, 2, 5, 5), rand(2, 3, 3, 3, seed=1)
    conv.forward(x); conv.backward(dy)
    once = conv.weight.grad.copy(), conv.bias.grad.copy()
    conv.forward(x); conv.backward(dy)
    np.testing.assert_allclose(conv.weight.grad, 2 * once[0])
    np.testing.assert_allclose(conv.bias.grad, 2 * once[1])


def test_init_bounds_and_seed():
    init.seed(7)
    a = Conv2d(16, 8, 3)
    init.seed(7)
    b = Conv2d(16, 8, 3)
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    bound = 1 / np.sqrt(16 * 9)                  # kaiming_uniform_(a=sqrt(5)) -> 1/sqrt(fan_in)
    for p in (a.weight.data, a.bias.data):
        assert p.dtype == np.float32 and np.abs(p).max() <= bound
    assert np.abs(a.weight.data).max() > 0.9 * bound      # spread over the whole interval
    lin = Linear(100, 5, rng=np.random.default_rng(0))
    assert np.abs(lin.weight.data).max() <= 0.1 and np.abs(lin.weight.data).max() > 0.09
    bn = BatchNorm2d(4)
    assert (bn.weight.data == 1).all() and (bn.bias.data == 0).all()


# -- BatchNorm ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,shape", [(BatchNorm2d, (4, 3, 3, 2)), (BatchNorm1d, (6, 4)), (BatchNorm1d, (3, 2, 5))])
def test_batchnorm_gradcheck_train_and_eval(cls, shape):
    bn = f64(cls(shape[1]))
    bn.weight.data[...] = 1 + rand(shape[1], seed=3)   # gamma != 1, beta != 0: all terms matter
    bn.bias.data[...] = rand(shape[1], seed=4)
    x = 2 + 3 * rand(*shape, seed=5)
    assert_gradcheck(bn, x)                         # training mode, random upstream gradient
    bn.running_mean[...] = rand(shape[1], seed=6)
    bn.running_var[...] = 0.5 + rand(shape[1], seed=7) ** 2
    bn.eval()
    assert_gradcheck(bn, x)


def test_batchnorm_train_statistics_and_running_update():
    bn = f64(BatchNorm2d(3, momentum=0.2))
    bn.weight.data[...] = [1.0, 2.0, 0.5]
    bn.bias.data[...] = [0.0, -1.0, 3.0]
    x = 5 + 2 * rand(4, 3, 5, 6)
    y = bn.forward(x)
    mu, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))          # biased, for normalising
    ref = (x - mu[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5) * bn.weight.data[:, None, None] \
        + bn.bias.data[:, None, None]
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    m = 4 * 5 * 6
    np.testing.assert_allclose(bn.running_mean, 0.2 * mu, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, 0.8 + 0.2 * var * m / (m - 1), rtol=1e-12)  # unbiased
    assert bn.num_batches_tracked.dtype == np.int64 and int(bn.num_batches_tracked) == 1
    bn.forward(x)
    assert int(bn.num_batches_tracked) == 2
    # eval uses the running statistics, and does not update them
    bn.eval()
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    y = bn.forward(x)
    ref = (x - rm[:, None, None]) / np.sqrt(rv[:, None, None] + 1e-5) * bn.weight.data[:, None, None] \
        + bn.bias.data[:, None, None]
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(bn.running_mean, rm)
    assert int(bn.num_batches_tracked) == 2


def test_batchnorm_momentum_none_is_cumulative_average():
    bn = f64(BatchNorm1d(2, momentum=None))
    xs = [rand(5, 2, seed=s) for s in range(3)]
    for x in xs:
        bn.forward(x)
    np.testing.assert_allclose(bn.running_mean, np.mean([x.mean(0) for x in xs], axis=0), rtol=1e-12)


def test_batchnorm_rejects_one_value_per_channel():
    with pytest.raises(ValueError):
        BatchNorm1d(3).forward(np.ones((1, 3), np.float32))


# -- MaxPool2d ------------------------------------------------------------------------------
POOL_CASES = [(2, None, (6, 6)), (2, None, (5, 7)), (3, 2, (7, 6)), ((2, 3), (1, 2), (5, 7)), (3, 1, (4, 5))]


@pytest.mark.parametrize("k,s,hw", POOL_CASES)
def test_maxpool_ties_route_to_first_maximum(k, s, hw):
    pool = MaxPool2d(k, s)
    x = np.random.default_rng(0).integers(0, 3, size=(2, 3, *hw)).astype(np.float64)   # many ties
    dy = rand(2, 3, *pool.forward(x).shape[2:], seed=1)
    y = pool.forward(x)
    dx = pool.backward(dy)
    ref_y, ref_dx = maxpool_ref(x, pool.kernel_size, pool.stride, dy)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("k,s,hw", POOL_CASES)
def test_maxpool_gradcheck_tie_free(k, s, hw):
    x = np.random.default_rng(2).permutation(2 * 3 * hw[0] * hw[1]).reshape(2, 3, *hw) * 0.01  # distinct
    assert_gradcheck(MaxPool2d(k, s), x.astype(np.float64))


# -- Linear, ReLU, Dropout, Flatten ---------------------------------------------------------------
def test_linear_forward_and_gradcheck():
    lin = f64(Linear(5, 3, rng=np.random.default_rng(0)))
    x = rand(4, 5)
    np.testing.assert_allclose(lin.forward(x), x @ lin.weight.data.T + lin.bias.data, rtol=1e-14)
    assert lin.weight.shape == (3, 5)
    assert_gradcheck(lin, x)
    assert_gradcheck(f64(Linear(5, 3, bias=False)), x)


def test_relu_gradcheck_and_zero_at_zero():
    x = rand(3, 4, 5)
    x[np.abs(x) < 0.01] = 0.5                      # keep finite differences off the kink
    assert_gradcheck(ReLU(), x)
    r = ReLU()
    r.forward(np.array([-1.0, 0.0, 2.0]))
    np.testing.assert_array_equal(r.backward(np.ones(3)), [0.0, 0.0, 1.0])


def test_dropout_fixed_mask_gradcheck_and_scaling():
    x = rand(4, 6)
    d = Dropout(0.25)
    d.fixed_mask = rand(4, 6, seed=3) > 0
    np.testing.assert_allclose(d.forward(x), x * d.fixed_mask / 0.75)
    assert_gradcheck(d, x)
    d.fixed_mask = None
    assert_gradcheck(d, x)                        # random masks: gradcheck replays the rng state


def test_dropout_reproducible_and_eval_identity():
    x = np.ones((200, 50), np.float32)
    a, b = Dropout(0.3, rng=np.random.default_rng(5)), Dropout(0.3, rng=np.random.default_rng(5))
    ya, yb = a.forward(x), b.forward(x)
    np.testing.assert_array_equal(ya, yb)
    assert ya.dtype == np.float32
    assert abs((ya == 0).mean() - 0.3) < 0.02 and np.allclose(ya[ya != 0], 1 / 0.7)
    np.testing.assert_array_equal(a.backward(np.ones_like(x)), ya)      # dx = dy * mask / (1-p)
    a.eval()
    assert a.forward(x) is x and a.backward(x) is x
    assert (Dropout(1.0).forward(x) == 0).all()


def test_flatten_roundtrip():
    x = rand(2, 3, 4, 5)
    f = Flatten()
    assert f.forward(x).shape == (2, 60)
    assert_gradcheck(Flatten(), x)
    np.testing.assert_array_equal(f.backward(x.reshape(2, 60)), x)


# -- dtype: float32 stays float32 ------------------------------------------------------------
def test_every_layer_keeps_float32():
    init.seed(0)
    net = Sequential(Conv2d(3, 4, 3, padding=1), BatchNorm2d(4), ReLU(), MaxPool2d(2), Dropout(0.5),
                     Flatten(), Linear(64, 6), BatchNorm1d(6), ReLU(), Linear(6, 2))
    x = rand(3, 3, 8, 8).astype(np.float32)
    h = x
    for layer in net:
        h = layer.forward(h)
        assert h.dtype == np.float32, type(layer).__name__
    g = np.ones_like(h)
    for layer in reversed(list(net)):
        g = layer.backward(g)
        assert g.dtype == np.float32, type(layer).__name__
    for p in net.parameters():
        assert p.data.dtype == np.float32 and p.grad.dtype == np.float32, p.name
    for key, v in net.state_dict().items():
        assert v.dtype == (np.int64 if key.endswith("num_batches_tracked") else np.float32), key


def _bn_eval():
    bn = BatchNorm2d(16)
    bn.running_mean[...] = np.linspace(-1, 1, 16)
    bn.running_var[...] = np.linspace(0.5, 2, 16)
    return bn.eval()


@pytest.mark.parametrize("make", [lambda: ReLU(), lambda: MaxPool2d(2), lambda: MaxPool2d(3, 2),
                                  lambda: BatchNorm2d(16), _bn_eval, lambda: BatchNorm1d(16)])
@pytest.mark.parametrize("shape", [(9, 16, 24, 24), (9, 16, 3, 3)])
def test_blocked_layers_are_bitwise_the_same_on_any_number_of_workers(monkeypatch, make, shape):
    if isinstance(make(), BatchNorm1d):
        shape = (shape[0] * 600, 16)
    x = rand(*shape).astype(np.float32)
    if x.ndim == 4:
        x[:, :, ::5, ::3] = 0.0                              # ties for the pools, zeros for ReLU
    monkeypatch.setattr(performance, "BLOCK_SIZE", x.size // 16)    # 4 blocks, shared by the workers
    out = []
    for n in (1, 2, 3, 16):
        with workers(n):
            layer = make()
            y = layer.forward(x)
            dx = layer.backward(rand(*y.shape, seed=2).astype(np.float32))
            out.append((y, dx) + tuple(p.grad for p in layer.parameters()) + tuple(layer.state_dict().values()))
    for other in out[1:]:
        for a, b in zip(out[0], other):
            np.testing.assert_array_equal(a, b)


def test_chunks_made_for_the_workers_keep_their_slots_within_slot_bytes():
    x = np.zeros(1, dtype=np.float32)
    chunks = lambda bytes_per_image, slot=0: len(performance.image_chunks(128, bytes_per_image, x, slot))
    assert chunks(1024) == performance.MIN_CHUNKS
    assert chunks(1024, performance.SLOT_BYTES // 2) == 2
    assert chunks(1024, 2 * performance.SLOT_BYTES) == 1
    # chunks that keep the cols within CHUNK_BYTES are never capped
    assert chunks(performance.CHUNK_BYTES // 4, 2 * performance.SLOT_BYTES) == 32


def test_blocks_of_channels_stop_at_max_channel_blocks_and_others_at_max_blocks():
    x = np.zeros((32, 64, 32, 32), dtype=np.float32)           # 2M elements: 8 blocks by size
    seen = []
    performance.over_channels(lambda c0, c1: seen.append((c0, c1)), x)
    assert len(seen) == performance.MAX_CHANNEL_BLOCKS < 8
    assert sorted(seen)[0][0] == 0 and sorted(seen)[-1][1] == 64
    seen.clear()
    performance.over_blocks(lambda i0, i1: seen.append((i0, i1)), len(x), x)
    assert len(seen) == 8 <= performance.MAX_BLOCKS
