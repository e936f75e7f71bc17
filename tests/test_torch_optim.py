"""SGD and Adam against torch.optim, step by step (optional: needs torch)."""
import itertools
import warnings

import numpy as np
import pytest

from minicnn import schedulers
from minicnn.layers.module import Parameter
from minicnn.optim import SGD, Adam
from torchref import import_torch

torch = import_torch()

# the same cases and gradients as test_optim.py (copied: test files do not import each other)
SGD_CASES = [dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n)
             for m, d, wd, n in itertools.product([0.0, 0.9], [0.0, 0.1], [0.0, 5e-4], [False, True])
             if not n or (m > 0 and d == 0)]
ADAM_CASES = [dict(betas=b, eps=e, weight_decay=wd)
              for b, e, wd in itertools.product([(0.9, 0.999), (0.5, 0.9)], [1e-8, 0.3], [0.0, 1e-2])]


def _params(dtype, shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal(s).astype(dtype), name=f"p{i}") for i, s in enumerate(shapes)]


def _grad(p, t, seed=1):
    """A gradient that depends on the parameter and the step, so trajectories couple."""
    rng = np.random.default_rng(seed + 100 * t + p.data.size)
    return (0.5 * p.data ** 3 - p.data + 0.1 * rng.standard_normal(p.data.shape)).astype(p.data.dtype)

STEPS = 8


def _pair(dtype, make_mine, make_torch):
    params = _params(dtype, shapes=((4, 3, 3, 3), (4,), (7, 5)))
    tparams = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    return params, make_mine(params), tparams, make_torch(tparams)


def _step_both(params, opt, tparams, topt, t):
    for p, tp in zip(params, tparams):
        p.grad[...] = _grad(p, t)
        tp.grad = torch.tensor(_grad(Parameter(tp.detach().numpy().copy()), t))
    opt.step()
    topt.step()


def _assert_same(params, opt, tparams, topt, rtol):
    for p, tp in zip(params, tparams):
        ref = tp.detach().numpy()
        assert p.data.dtype == ref.dtype
        np.testing.assert_allclose(p.data, ref, rtol=rtol, atol=rtol * np.abs(ref).max())
        for k, v in topt.state[tp].items():
            if k == "step":
                assert opt.state[p]["step"] == int(v.item())
            else:
                r = v.numpy()
                np.testing.assert_allclose(opt.state[p][k], r, rtol=rtol, atol=rtol * np.abs(r).max())
        assert set(opt.state.get(p, {})) == set(topt.state[tp])


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-14), (np.float32, 1e-6)])
@pytest.mark.parametrize("kw", SGD_CASES, ids=str)
def test_sgd_matches_torch(kw, dtype, rtol):
    params, opt, tparams, topt = _pair(dtype, lambda ps: SGD(ps, lr=0.05, **kw),
                                       lambda ps: torch.optim.SGD(ps, lr=0.05, foreach=False, **kw))
    for t in range(STEPS):
        _step_both(params, opt, tparams, topt, t)
        _assert_same(params, opt, tparams, topt, rtol)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-14), (np.float32, 1e-6)])
@pytest.mark.parametrize("kw", ADAM_CASES, ids=str)
def test_adam_matches_torch(kw, dtype, rtol):
    params, opt, tparams, topt = _pair(dtype, lambda ps: Adam(ps, lr=0.05, **kw),
                                       lambda ps: torch.optim.Adam(ps, lr=0.05, foreach=False, **kw))
    for t in range(STEPS):
        _step_both(params, opt, tparams, topt, t)
        _assert_same(params, opt, tparams, topt, rtol)


@pytest.mark.parametrize("preset,torch_second", [
    (schedulers.linear_linear, lambda o, E: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.0, E - 3)),
    (schedulers.linear_cos, lambda o, E: torch.optim.lr_scheduler.CosineAnnealingLR(o, E - 3)),
])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_training_with_schedule_matches_torch(preset, torch_second, opt_name):
    """Optimizer + scheduler together, 2 steps per epoch for 10 epochs, as the training loop runs."""
    E, warm = 10, 3
    T = torch.optim.lr_scheduler
    if opt_name == "sgd":
        mine = lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4)  # noqa: E731
        ref = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=False)  # noqa: E731
    else:
        mine = lambda ps: Adam(ps, lr=0.01)  # noqa: E731
        ref = lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=False)  # noqa: E731
    params, opt, tparams, topt = _pair(np.float64, mine, ref)
    sched = preset(opt, E, warmup_epochs=warm)
    tsched = T.SequentialLR(topt, [T.LinearLR(topt, 0.1, total_iters=warm), torch_second(topt, E)], [warm])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch in range(E):
            assert opt.param_groups[0]["lr"] == topt.param_groups[0]["lr"]
            for s in range(2):
                _step_both(params, opt, tparams, topt, 2 * epoch + s)
            sched.step()
            tsched.step()
    _assert_same(params, opt, tparams, topt, 1e-12)


def test_loads_torch_optimizer_state_dict():
    """A torch Adam state_dict (tensors, float step) loads and continues identically."""
    params, opt, tparams, topt = _pair(np.float64, lambda ps: Adam(ps, lr=0.02),
                                       lambda ps: torch.optim.Adam(ps, lr=0.02, foreach=False))
    for t in range(3):
        _step_both(params, opt, tparams, topt, t)
    fresh = Adam(params, lr=0.5)
    tsd = topt.state_dict()
    fresh.load_state_dict({"state": tsd["state"],
                           "param_groups": [{k: v for k, v in g.items()} for g in tsd["param_groups"]]})
    for p, tp in zip(params, tparams):
        p.data[...] = tp.detach().numpy()
    for t in range(3, 6):
        _step_both(params, fresh, tparams, topt, t)
    _assert_same(params, fresh, tparams, topt, 1e-13)
