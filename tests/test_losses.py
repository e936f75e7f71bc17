"""CrossEntropyLoss: plain reference, finite differences, dtypes, validation, and PyTorch."""
import numpy as np
import pytest

from minicnn.losses import CrossEntropyLoss
from torchref import import_torch


def _batch(N=6, K=5, dtype=np.float64, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    z = (scale * rng.standard_normal((N, K))).astype(dtype)
    y = rng.integers(0, K, size=N)
    return z, y


def _reference_loss(z, y):
    """The textbook formula, unshifted, in float64: -mean log(exp(z_y) / sum exp(z))."""
    z = z.astype(np.float64)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return -np.mean(np.log(p[np.arange(len(y)), y]))


def test_forward_matches_reference():
    z, y = _batch()
    loss = CrossEntropyLoss().forward(z, y)
    assert isinstance(loss, float)
    assert abs(loss - _reference_loss(z, y)) < 1e-14 * max(1.0, abs(loss))


def test_backward_is_softmax_minus_onehot_over_n():
    z, y = _batch(N=4, K=3)
    crit = CrossEntropyLoss()
    crit.forward(z, y)
    d = crit.backward()
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    expected = (p - np.eye(3)[y]) / 4
    np.testing.assert_allclose(d, expected, rtol=0, atol=1e-16)
    np.testing.assert_allclose(crit.probs, p, rtol=1e-14)
    np.testing.assert_array_equal(crit.labels, y)
    np.testing.assert_allclose(d.sum(axis=1), 0, atol=1e-16)  # each row of softmax - onehot sums to 0


def test_gradcheck_centered_differences_float64():
    """dL/dz from backward() against centered differences (L(z+h) - L(z-h)) / 2h, entry by entry."""
    z, y = _batch(N=5, K=7, seed=1, scale=2.0)
    crit = CrossEntropyLoss()
    crit.forward(z, y)
    analytic = crit.backward()
    numeric = np.zeros_like(z)
    h = 1e-4  # truncation error ~h^2, round-off ~1e-16/h: best near 1e-4 here (3e-9)
    for idx in np.ndindex(*z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        numeric[idx] = (CrossEntropyLoss().forward(zp, y) - CrossEntropyLoss().forward(zm, y)) / (2 * h)
    rel = np.abs(analytic - numeric) / np.maximum(np.abs(analytic) + np.abs(numeric), 1e-12)
    print(f"cross-entropy gradcheck: max relative error {rel.max():.2e}, "
          f"max abs error {np.abs(analytic - numeric).max():.2e}")
    assert rel.max() < 1e-7


def test_stable_for_huge_logits():
    z = np.array([[1000.0, 0.0, -1000.0], [-1e4, 1e4, 0.0]])
    y = np.array([1, 1])
    crit = CrossEntropyLoss()
    loss = crit.forward(z, y)
    assert np.isfinite(loss) and abs(loss - 1000.0 / 2) < 1e-12  # row 0: 1000, row 1: ~0
    d = crit.backward()
    assert np.all(np.isfinite(d))
    np.testing.assert_allclose(d, [[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]], atol=1e-15)


def test_shift_invariance():
    z, y = _batch()
    a = CrossEntropyLoss().forward(z, y)
    b = CrossEntropyLoss().forward(z + 123.0, y)
    assert abs(a - b) < 1e-12


@pytest.mark.parametrize("label_dtype", [np.int64, np.int32, np.uint8])
def test_float32_stays_float32(label_dtype):
    z, y = _batch(dtype=np.float32)
    crit = CrossEntropyLoss()
    loss = crit.forward(z, y.astype(label_dtype))
    assert crit.probs.dtype == np.float32
    d = crit.backward()
    assert d.dtype == np.float32 and d.shape == z.shape
    assert abs(loss - _reference_loss(z, y)) < 1e-5
    assert z.dtype == np.float32 and np.array_equal(z, _batch(dtype=np.float32)[0])  # input untouched


def test_uniform_logits_give_log_k():
    z = np.zeros((3, 10))
    assert abs(CrossEntropyLoss().forward(z, np.array([0, 5, 9])) - np.log(10)) < 1e-15


@pytest.mark.parametrize("labels", [[0, 5], [-1, 0], [0, -100]])
def test_out_of_range_labels_raise(labels):
    with pytest.raises(ValueError):
        CrossEntropyLoss().forward(np.zeros((2, 5)), np.array(labels))


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        CrossEntropyLoss().forward(np.zeros((2, 5)), np.array([0, 1, 2]))
    with pytest.raises(ValueError):
        CrossEntropyLoss().forward(np.zeros((2, 5, 1)), np.array([0, 1]))
    with pytest.raises(ValueError):
        CrossEntropyLoss().forward(np.zeros((2, 5)), np.array([0.0, 1.0]))
    with pytest.raises(RuntimeError):
        CrossEntropyLoss().backward()


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-13), (np.float32, 1e-6)])
def test_against_torch(dtype, tol):
    torch = import_torch()
    z, y = _batch(N=16, K=10, dtype=dtype, seed=3, scale=5.0)
    crit = CrossEntropyLoss()
    loss = crit.forward(z, y)
    d = crit.backward()
    zt = torch.tensor(z, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(zt, torch.tensor(y))
    lt.backward()
    assert abs(loss - lt.item()) <= tol * abs(lt.item())
    np.testing.assert_allclose(d, zt.grad.numpy(), rtol=tol, atol=tol * np.abs(d).max())
