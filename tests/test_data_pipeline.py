"""data.pipeline: training-set statistics, padding, flips, shuffling, resumable RNG state."""
import json

import numpy as np
import pytest

import data
from minicnn import backend


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 3, 8, 6), dtype=np.uint8)
    x[:, 1] //= 3  # channels with different statistics
    return x, rng.integers(0, 10, 50)


def test_channel_stats_exact(images):
    x, _ = images
    mean, std = data.channel_stats(x)
    ref = x.astype(np.float64) / 255
    assert mean.dtype == std.dtype == np.float64 and mean.shape == (3,)
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(std, ref.std(axis=(0, 2, 3)), rtol=1e-12)
    m2, s2 = data.channel_stats(x, chunk=7)  # the chunking does not change a bit
    assert np.array_equal(mean, m2) and np.array_equal(std, s2)
    assert std[1] < std[0] / 2


def test_pad_images():
    x = np.arange(2 * 1 * 28 * 28, dtype=np.uint8).reshape(2, 1, 28, 28) | 1  # no zeros inside
    p = data.pad_images(x, 32)
    assert p.shape == (2, 1, 32, 32) and p.dtype == np.uint8
    np.testing.assert_array_equal(p[:, :, 2:30, 2:30], x)
    assert p.sum() == x.sum()  # the border is all zeros
    with pytest.raises(ValueError):
        data.pad_images(p, 28)


def reference(x, mean, std):
    return (x.astype(np.float64) / 255 - mean[:, None, None]) / std[:, None, None]


def test_eval_loader_order_and_values(images):
    x, y = images
    mean, std = data.channel_stats(x)
    loader = data.Loader(x, y, 16, mean, std, train=False)
    assert len(loader) == 4
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [16, 16, 16, 2]
    xb = np.concatenate([b[0] for b in batches])
    assert xb.dtype == np.float32 and all(b[1].dtype == np.int64 for b in batches)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    np.testing.assert_allclose(xb, reference(x, mean, std), rtol=1e-5, atol=1e-5)
    assert np.abs(xb.mean(axis=(0, 2, 3))).max() < 1e-5  # normalised with its own statistics
    np.testing.assert_allclose(xb.std(axis=(0, 2, 3)), 1, rtol=1e-5)
    assert len(data.Loader(x, y, 16, mean, std, train=False, drop_last=True)) == 3
    assert [len(b[1]) for b in data.Loader(x, y, 16, mean, std, train=False, drop_last=True)] == [16] * 3
    b64 = next(iter(data.Loader(x, y, 16, mean, std, train=False, dtype="float64")))[0]
    assert b64.dtype == np.float64
    np.testing.assert_allclose(b64, reference(x[:16], mean, std), rtol=1e-12, atol=1e-12)


def test_train_loader_shuffles_and_flips():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2000, 1, 4, 5), dtype=np.uint8)
    y = np.arange(2000)  # labels identify the images
    mean, std = np.array([0.5]), np.array([0.25])
    loader = data.Loader(x, y, 300, mean, std, train=True, seed=3)
    flipped, epochs = 0, []
    for _ in range(2):
        ys = []
        for xb, yb in loader:
            plain = reference(x[yb], mean, std)
            is_flip = np.abs(xb - plain[..., ::-1]).max(axis=(1, 2, 3)) < 1e-5
            is_plain = np.abs(xb - plain).max(axis=(1, 2, 3)) < 1e-5
            assert (is_flip | is_plain).all()  # each image is itself or its mirror image
            flipped += is_flip.sum()
            ys.append(yb)
        epochs.append(np.concatenate(ys))
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), y)  # every image once per epoch
        assert (e != y).mean() > 0.9  # shuffled
    assert (epochs[0] != epochs[1]).mean() > 0.9  # a new order each epoch
    assert 0.45 < flipped / 4000 < 0.55  # p = 0.5


def test_same_seed_same_batches(images):
    x, y = images
    mean, std = data.channel_stats(x)

    def run(seed):
        loader = data.Loader(x, y, 8, mean, std, train=True, seed=seed)
        return [b for _ in range(2) for b in loader]

    a, b, c = run(7), run(7), run(8)
    assert all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(np.array_equal(p[1], q[1]) for p, q in zip(a, c))


def test_state_resume_is_exact(images):
    x, y = images
    mean, std = data.channel_stats(x)
    full = data.Loader(x, y, 8, mean, std, train=True, pad_to=10, seed=11)
    list(full)
    state = json.loads(json.dumps(full.get_state()))  # survives a JSON checkpoint
    epoch2 = list(full)
    resumed = data.Loader(x, y, 8, mean, std, train=True, pad_to=10, seed=999)
    resumed.set_state(state)
    for (a, ay), (b, by) in zip(epoch2, resumed):
        assert np.array_equal(a, b) and np.array_equal(ay, by)
    # an epoch cut short leaves the generator where a full epoch would
    part = data.Loader(x, y, 8, mean, std, train=True, pad_to=10, seed=11)
    next(iter(part))
    assert part.get_state() == state


def test_padded_mnist_batches():
    x = np.full((5, 1, 28, 28), 255, np.uint8)
    mean, std = np.array([0.3]), np.array([0.4])
    xb, _ = next(iter(data.Loader(x, np.zeros(5), 5, mean, std, train=True, pad_to=32)))
    assert xb.shape == (5, 1, 32, 32) and xb.dtype == np.float32
    np.testing.assert_allclose(xb[:, :, 2:30, 2:30], (1 - 0.3) / 0.4, rtol=1e-6)
    np.testing.assert_allclose(xb[:, :, :2], -0.3 / 0.4, rtol=1e-6)  # black border, normalised


def test_loader_rejects_bad_input(images):
    x, y = images
    with pytest.raises(ValueError, match="uint8"):
        data.Loader(x.astype(np.float32), y, 4, [0] * 3, [1] * 3, train=False)
    with pytest.raises(ValueError, match="labels"):
        data.Loader(x, y[:3], 4, [0] * 3, [1] * 3, train=False)


@pytest.mark.skipif(not backend.gpu_available(), reason="needs CuPy and a GPU")
def test_gpu_batches_equal_cpu(images):
    x, y = images
    mean, std = data.channel_stats(x)
    cpu = list(data.Loader(x, y, 8, mean, std, train=True, seed=5, device="cpu"))
    gpu = list(data.Loader(x, y, 8, mean, std, train=True, seed=5, device="gpu"))
    for (a, ay), (b, by) in zip(cpu, gpu):
        assert backend.is_gpu_array(b) and backend.is_gpu_array(by)
        assert np.array_equal(a, backend.to_numpy(b)) and np.array_equal(ay, backend.to_numpy(by))
