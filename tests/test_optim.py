"""SGD and Adam against hand-computed values and a plain textbook reference (no torch).

The reference is written out of place in float64 and in the textbook form (Adam with
m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t), p -= lr * m_hat / (sqrt(v_hat) + eps)), which
is mathematically PyTorch's update; the tests use eps and gradients where a misplaced eps,
missing bias correction or dampening on the first step change the result far beyond the
tolerance.
"""
import itertools
import json

import numpy as np
import pytest

from minicnn.layers.module import Parameter
from minicnn.optim import SGD, Adam
from worker_count import workers


def _params(dtype=np.float64, seed=0, shapes=((3, 4), (5,))):
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal(s).astype(dtype), name=f"p{i}") for i, s in enumerate(shapes)]


def _grad(p, t, seed=1):
    """A gradient that depends on the parameter and the step, so trajectories couple."""
    rng = np.random.default_rng(seed + 100 * t + p.data.size)
    return (0.5 * p.data ** 3 - p.data + 0.1 * rng.standard_normal(p.data.shape)).astype(p.data.dtype)


def _run(opt, params, steps, t0=0):
    for t in range(t0, t0 + steps):
        for p in params:
            p.grad[...] = _grad(p, t)
        opt.step()


# -- plain references ------------------------------------------------------------------------
def _sgd_reference(datas, steps, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    ps = [d.astype(np.float64).copy() for d in datas]
    bufs = [None] * len(ps)
    for t in range(steps):
        for i, p in enumerate(ps):
            g = _grad(Parameter(p), t) + weight_decay * p
            if momentum:
                bufs[i] = g.copy() if bufs[i] is None else momentum * bufs[i] + (1 - dampening) * g
                g = g + momentum * bufs[i] if nesterov else bufs[i]
            ps[i] = p - lr * g
    return ps, bufs


def _adam_reference(datas, steps, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, lrs=None):
    b1, b2 = betas
    ps = [d.astype(np.float64).copy() for d in datas]
    ms = [np.zeros_like(p) for p in ps]
    vs = [np.zeros_like(p) for p in ps]
    for t in range(steps):
        lr_t = lrs[t] if lrs is not None else lr
        for i, p in enumerate(ps):
            g = _grad(Parameter(p), t) + weight_decay * p
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            m_hat = ms[i] / (1 - b1 ** (t + 1))
            v_hat = vs[i] / (1 - b2 ** (t + 1))
            ps[i] = p - lr_t * m_hat / (np.sqrt(v_hat) + eps)
    return ps, ms, vs


def _close(a, b, rtol):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


SGD_CASES = [dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n)
             for m, d, wd, n in itertools.product([0.0, 0.9], [0.0, 0.1], [0.0, 5e-4], [False, True])
             if not n or (m > 0 and d == 0)]
ADAM_CASES = [dict(betas=b, eps=e, weight_decay=wd)
              for b, e, wd in itertools.product([(0.9, 0.999), (0.5, 0.9)], [1e-8, 0.3], [0.0, 1e-2])]


# -- hand-computed steps ----------------------------------------------------------------------
def _scalar(value=1.0):
    return Parameter(np.array([value]))


@pytest.mark.parametrize("kw,expected", [
    (dict(), [0.95, 0.90]),                                  # p -= lr * g
    (dict(momentum=0.9), [0.95, 0.855]),                     # b = 0.5, then b = 0.9*0.5 + 0.5 = 0.95
    (dict(momentum=0.9, dampening=0.1), [0.95, 0.86]),       # b = 0.5 (no dampening at first), then 0.45 + 0.45
    (dict(momentum=0.9, nesterov=True), [0.905, 0.7695]),    # g + 0.9 b = 0.95, then 0.5 + 0.9*0.95 = 1.355
    (dict(weight_decay=0.2), [0.93, 0.8614]),                # g = 0.5 + 0.2 p
])
def test_sgd_by_hand(kw, expected):
    p = _scalar()
    opt = SGD([p], lr=0.1, **kw)
    for want in expected:
        p.grad[...] = 0.5
        opt.step()
        assert abs(p.data[0] - want) < 1e-15


def test_adam_first_step_by_hand():
    """Step 1: m_hat = g, v_hat = g^2 exactly, so p -= lr * g / (|g| + eps), for any betas.

    With eps = 0.3 and |g| from 0.01 to 2, a wrongly placed eps (sqrt(v + eps), or eps added
    before the bias correction) or a missing bias correction changes the step by > 10%.
    """
    g = np.array([0.01, -0.1, 0.5, -2.0])
    for betas in [(0.9, 0.999), (0.5, 0.9)]:
        p = Parameter(np.zeros(4))
        opt = Adam([p], lr=0.1, betas=betas, eps=0.3)
        p.grad[...] = g
        opt.step()
        _close(p.data, -0.1 * g / (np.abs(g) + 0.3), 1e-14)
        assert opt.state[p]["step"] == 1


def test_adam_second_step_by_hand():
    """Two steps with g = 1 then g = -1 (b1 = 0.5, b2 = 0.9, lr = 1, eps = 0.1), by hand:
    m = (0.5, 0.25 - 0.5 = -0.25), v = (0.1, 0.09 + 0.1 = 0.19),
    step 2: m_hat = -0.25/0.75 = -1/3, v_hat = 0.19/0.19 = 1, update = -(-1/3)/(1 + 0.1)."""
    p = Parameter(np.zeros(1))
    opt = Adam([p], lr=1.0, betas=(0.5, 0.9), eps=0.1)
    p.grad[...] = 1.0
    opt.step()
    assert abs(p.data[0] - (-1 / 1.1)) < 1e-15
    p.grad[...] = -1.0
    opt.step()
    assert abs(p.data[0] - (-1 / 1.1 + (1 / 3) / 1.1)) < 1e-15
    assert abs(opt.state[p]["exp_avg"][0] + 0.25) < 1e-16
    assert abs(opt.state[p]["exp_avg_sq"][0] - 0.19) < 1e-16


# -- every option combination against the reference -----------------------------------------
@pytest.mark.parametrize("kw", SGD_CASES, ids=str)
def test_sgd_matches_reference(kw):
    params = _params()
    datas = [p.data.copy() for p in params]
    opt = SGD(params, lr=0.05, **kw)
    _run(opt, params, 6)
    ref, bufs = _sgd_reference(datas, 6, 0.05, **kw)
    for p, r, b in zip(params, ref, bufs):
        _close(p.data, r, 1e-13)
        if kw["momentum"]:
            _close(opt.state[p]["momentum_buffer"], b, 1e-13)
        else:
            assert p not in opt.state  # no state without momentum, as PyTorch


@pytest.mark.parametrize("kw", ADAM_CASES, ids=str)
def test_adam_matches_reference(kw):
    params = _params()
    datas = [p.data.copy() for p in params]
    opt = Adam(params, lr=0.05, **kw)
    _run(opt, params, 6)
    ref, ms, vs = _adam_reference(datas, 6, 0.05, **kw)
    for p, r, m, v in zip(params, ref, ms, vs):
        _close(p.data, r, 1e-12)
        _close(opt.state[p]["exp_avg"], m, 1e-13)
        _close(opt.state[p]["exp_avg_sq"], v, 1e-13)
        assert opt.state[p]["step"] == 6 and isinstance(opt.state[p]["step"], int)


def test_step_reads_lr_from_param_groups_every_time():
    params = _params()
    datas = [p.data.copy() for p in params]
    lrs = [0.1, 0.05, 0.0, 0.02]
    opt = Adam(params, lr=lrs[0])
    for t, lr in enumerate(lrs):
        opt.param_groups[0]["lr"] = lr
        _run(opt, params, 1, t0=t)
    ref, _, _ = _adam_reference(datas, len(lrs), None, lrs=lrs)
    for p, r in zip(params, ref):
        _close(p.data, r, 1e-12)


# -- in place, dtypes, state ------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
                                  lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.1),
                                  lambda ps: Adam(ps, lr=0.01, weight_decay=1e-2)])
def test_float32_stays_float32_in_place(make):
    params = _params(np.float32)
    datas = [p.data for p in params]
    views = [p.data.reshape(-1) for p in params]  # others hold views (masks, ...)
    before = [p.data.copy() for p in params]
    opt = make(params)
    for t in range(3):
        grads = []
        for p in params:
            p.grad[...] = _grad(p, t)
            grads.append(p.grad.copy())
        opt.step()
        for p, g in zip(params, grads):
            np.testing.assert_array_equal(p.grad, g)  # step never touches .grad
    for p, d, v, b in zip(params, datas, views, before):
        assert p.data is d and p.data.dtype == np.float32 and p.grad.dtype == np.float32
        np.testing.assert_array_equal(v, p.data.reshape(-1))
        assert not np.array_equal(p.data, b)
        for k, s in opt.state[p].items():
            if k != "step":
                assert s.dtype == np.float32, k
    # same trajectory as float64 up to float32 rounding
    params64 = [Parameter(b.astype(np.float64)) for b in before]
    opt64 = make(params64)
    _run(opt64, params64, 3)
    for p, q in zip(params, params64):
        _close(p.data, q.data, 1e-5)


def test_zero_grad_in_place():
    params = _params()
    grads = [p.grad for p in params]
    for p in params:
        p.grad[...] = 1.0
    SGD(params, lr=0.1).zero_grad()
    for p, g in zip(params, grads):
        assert p.grad is g and not g.any()


def test_state_created_lazily_with_pytorch_names():
    params = _params()
    sgd, adam = SGD(params, lr=0.1, momentum=0.9), Adam(params, lr=0.1)
    assert sgd.state == {} and adam.state == {}
    _run(sgd, params, 1)
    _run(adam, params, 1)
    assert set(sgd.state[params[0]]) == {"momentum_buffer"}
    assert set(adam.state[params[1]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sgd.params == params and sgd.param_groups[0]["params"] is sgd.params
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["nesterov"] is False
    assert adam.param_groups[0]["betas"] == (0.9, 0.999) and adam.param_groups[0]["eps"] == 1e-8


def _through_npz_and_json(sd):
    """What a checkpoint does to a state_dict: string keys, 0-d arrays, lists for tuples."""
    state = {str(i): {k: np.asarray(v) for k, v in s.items()} for i, s in sd["state"].items()}
    groups = json.loads(json.dumps(sd["param_groups"]))
    return {"state": state, "param_groups": groups}


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=5e-4),
                                  lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
                                  lambda ps: Adam(ps, lr=0.01, betas=(0.8, 0.99), weight_decay=1e-2)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_state_dict_round_trip_continues_bit_for_bit(make, dtype):
    params = _params(dtype)
    opt = make(params)
    _run(opt, params, 3)
    opt.param_groups[0]["lr"] *= 0.5  # as a scheduler would
    sd = _through_npz_and_json(opt.state_dict())
    # a fresh process: new parameters with the checkpointed values, a new optimizer
    params2 = [Parameter(p.data.copy(), name=p.name) for p in params]
    opt2 = make(params2)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    _run(opt, params, 4, t0=3)
    _run(opt2, params2, 4, t0=3)
    for p, q in zip(params, params2):
        np.testing.assert_array_equal(p.data, q.data)
        assert q.data.dtype == dtype
        for k in opt.state[p]:
            np.testing.assert_array_equal(opt.state[p][k], opt2.state[q][k])


@pytest.mark.parametrize("make, arrays, scalars", [
    (lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4), {"momentum_buffer"}, set()),
    (lambda ps: Adam(ps, lr=0.01, betas=(0.8, 0.99)), {"exp_avg", "exp_avg_sq"}, {"step"})], ids=["sgd", "adam"])
def test_flat_state_dict_through_an_npz_file_continues_bit_for_bit(tmp_path, make, arrays, scalars):
    params = _params(np.float32)
    opt = make(params)
    _run(opt, params, 3)
    opt.param_groups[0]["lr"] *= 0.5
    flat, meta = opt.flat_state_dict()
    assert set(flat) == {f"{i}.{k}" for i in (0, 1) for k in arrays}
    assert all(type(v) is np.ndarray and v.dtype == np.float32 for v in flat.values())
    assert meta["scalars"] == {f"{i}.{k}": 3 for i in (0, 1) for k in scalars}
    np.savez(tmp_path / "opt.npz", **flat)
    (tmp_path / "opt.json").write_text(json.dumps(meta))
    params2 = [Parameter(p.data.copy(), name=p.name) for p in params]
    opt2 = make(params2)
    with np.load(tmp_path / "opt.npz") as z:
        opt2.load_flat_state_dict(dict(z), json.loads((tmp_path / "opt.json").read_text()))
    assert opt2.param_groups[0] == {**opt.param_groups[0], "params": params2}
    _run(opt, params, 4, t0=3)
    _run(opt2, params2, 4, t0=3)
    for p, q in zip(params, params2):
        np.testing.assert_array_equal(p.data, q.data)
        for k in opt.state[p]:
            np.testing.assert_array_equal(opt.state[p][k], opt2.state[q][k])


def test_state_dict_is_a_snapshot_and_loads_onto_param_dtype():
    params = _params()
    opt = Adam(params, lr=0.01)
    _run(opt, params, 2)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["params"] == [0, 1] and set(sd["state"]) == {0, 1}
    saved = sd["state"][0]["exp_avg"].copy()
    _run(opt, params, 1, t0=2)
    np.testing.assert_array_equal(sd["state"][0]["exp_avg"], saved)  # not aliased
    params32 = _params(np.float32)
    opt32 = Adam(params32, lr=0.01)
    opt32.load_state_dict(sd)
    assert opt32.state[params32[0]]["exp_avg"].dtype == np.float32


def test_load_state_dict_rejects_mismatch():
    opt = SGD(_params(), lr=0.1, momentum=0.9)
    _run(opt, opt.params, 1)
    with pytest.raises(ValueError):
        SGD(_params(shapes=((3, 4),)), lr=0.1).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError):
        SGD(_params(shapes=((3, 4), (6,))), lr=0.1).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("make", [
    lambda ps: SGD(ps, lr=-0.1),
    lambda ps: SGD(ps, lr=0.1, momentum=-0.9),
    lambda ps: SGD(ps, lr=0.1, weight_decay=-1e-4),
    lambda ps: SGD(ps, lr=0.1, nesterov=True),
    lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
    lambda ps: Adam(ps, lr=-1e-3),
    lambda ps: Adam(ps, eps=-1e-8),
    lambda ps: Adam(ps, betas=(1.0, 0.999)),
    lambda ps: Adam(ps, betas=(0.9, -0.1)),
    lambda ps: Adam(ps, weight_decay=-1e-2),
    lambda ps: SGD([], lr=0.1),
    lambda ps: Adam(ps + ps[:1]),
])
def test_invalid_arguments_raise(make):
    with pytest.raises(ValueError):
        make(_params())


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
                                  lambda ps: Adam(ps, lr=0.01, weight_decay=1e-3)])
def test_worker_threads_give_the_same_updates_and_state_order(make):
    rng = np.random.default_rng(5)
    shapes = [(64, 3, 3, 3), (64,), (128, 64), (7,), (32, 32, 3, 3), (10, 128)]
    values = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    out = {}
    for n in (1, 3):
        with workers(n):
            params = [Parameter(v.copy()) for v in values]
            opt = make(params)
            for step in grads:
                for p, g in zip(params, step):
                    p.grad[...] = g
                opt.step()
        out[n] = ([p.data for p in params], opt.state_dict()["state"])
    for a, b in zip(out[1][0], out[3][0]):
        np.testing.assert_array_equal(a, b)
    assert list(out[1][1]) == list(out[3][1])              # the same indices, in the same order
    for i in out[1][1]:
        for k, v in out[1][1][i].items():
            np.testing.assert_array_equal(v, out[3][1][i][k])
