"""Schedulers: closed-form values, presets, edge cases, checkpoints, and PyTorch's values."""
import json
import math
import warnings

import numpy as np
import pytest

from minicnn import schedulers as S
from minicnn.layers.module import Parameter
from minicnn.optim import SGD, Adam
from torchref import import_torch


def _opt(lr=0.1):
    return SGD([Parameter(np.zeros(2))], lr=lr, momentum=0.9)


def _lrs(opt, sched, epochs):
    """The lr of epochs 0..epochs (the one set at construction, then after each step)."""
    out = [opt.param_groups[0]["lr"]]
    for _ in range(epochs):
        sched.step()
        out.append(opt.param_groups[0]["lr"])
        assert sched.get_last_lr() == [out[-1]]
    return np.array(out)


def _preset_reference(kind, lr, epochs, warm=5, s=0.1):
    """docs/algorithm.md section 6 in closed form: warm-up s*lr -> lr over `warm` epochs, then decay."""
    out = []
    for e in range(epochs + 1):
        if e < warm:
            out.append(lr * (s + (1 - s) * e / warm))
        elif kind == "linear":
            out.append(lr * (1 - min(e - warm, epochs - warm) / (epochs - warm)))
        else:
            out.append(lr * (1 + math.cos(math.pi * (e - warm) / (epochs - warm))) / 2)
    return np.array(out)


# -- closed forms (no torch) -----------------------------------------------------------------
@pytest.mark.parametrize("epochs", [100, 240, 7])
@pytest.mark.parametrize("kind,preset", [("linear", S.linear_linear), ("cos", S.linear_cos)])
def test_presets_closed_form(kind, preset, epochs):
    opt = _opt(0.1)
    got = _lrs(opt, preset(opt, epochs), epochs)
    ref = _preset_reference(kind, 0.1, epochs)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-14)
    assert got[0] == pytest.approx(0.01) and got[5] == pytest.approx(0.1) and abs(got[epochs]) < 1e-15


def test_linear_lr_closed_form():
    opt = _opt(0.2)
    got = _lrs(opt, S.LinearLR(opt, start_factor=0.25, end_factor=0.75, total_iters=4), 10)
    ref = [0.2 * (0.25 + 0.5 * min(e, 4) / 4) for e in range(11)]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-15)


def test_cosine_closed_form_with_eta_min_and_beyond_t_max():
    opt = _opt(0.2)
    got = _lrs(opt, S.CosineAnnealingLR(opt, T_max=10, eta_min=0.02), 45)
    ref = [0.02 + 0.18 * (1 + math.cos(math.pi * e / 10)) / 2 for e in range(46)]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-14)


def test_constant_and_build():
    opt = _opt(0.3)
    assert np.all(_lrs(opt, S.build("constant", opt, 20), 20) == 0.3)
    for name in ["linear-linear", "linear-cos"]:
        opt = _opt(0.3)
        sched = S.build(name, opt, 50, warmup_epochs=5)
        assert isinstance(sched, S.SequentialLR) and opt.param_groups[0]["lr"] == pytest.approx(0.03)
    with pytest.raises(ValueError):
        S.build("step", _opt(), 10)


def test_construction_sets_epoch_zero_lr_and_initial_lr():
    opt = _opt(0.5)
    sched = S.LinearLR(opt, start_factor=0.5, total_iters=2)
    assert opt.param_groups[0]["lr"] == 0.25 and opt.param_groups[0]["initial_lr"] == 0.5
    assert sched.last_epoch == 0 and sched.get_last_lr() == [0.25]


@pytest.mark.parametrize("epochs", [1, 3, 5])
@pytest.mark.parametrize("preset", [S.linear_linear, S.linear_cos])
def test_epochs_not_above_warmup_gives_warmup_only(preset, epochs):
    """epochs <= warmup: the run sees only warm-up values; no division by zero."""
    opt = _opt(0.1)
    got = _lrs(opt, preset(opt, epochs, warmup_epochs=5), epochs)
    ref = [0.1 * (0.1 + 0.9 * e / 5) for e in range(epochs)]
    np.testing.assert_allclose(got[:epochs], ref, rtol=0, atol=1e-15)
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize("kind,preset", [("linear", S.linear_linear), ("cos", S.linear_cos)])
def test_zero_warmup(kind, preset):
    opt = _opt(0.1)
    got = _lrs(opt, preset(opt, 20, warmup_epochs=0), 20)
    np.testing.assert_allclose(got, _preset_reference(kind, 0.1, 20, warm=0), rtol=0, atol=1e-15)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError):
        S.LinearLR(_opt(), start_factor=0.0)
    with pytest.raises(ValueError):
        S.LinearLR(_opt(), start_factor=1.5)
    with pytest.raises(ValueError):
        S.LinearLR(_opt(), end_factor=-0.1)
    with pytest.raises(ValueError):
        S.CosineAnnealingLR(_opt(), T_max=0)
    with pytest.raises(ValueError):
        S.linear_cos(_opt(), 0)
    with pytest.raises(ValueError):
        S.linear_linear(_opt(), 10, warmup_epochs=-1)
    opt = _opt()
    a = S.LinearLR(opt)
    with pytest.raises(ValueError):
        S.SequentialLR(opt, [a], milestones=[3])
    with pytest.raises(ValueError):
        S.SequentialLR(opt, [a, S.LinearLR(_opt())], milestones=[3])
    with pytest.raises(TypeError):
        S.LinearLR(object())


@pytest.mark.parametrize("preset", [S.linear_linear, S.linear_cos, S.constant])
@pytest.mark.parametrize("stop", [0, 3, 5, 6, 17])
def test_checkpoint_resume_continues_exactly(preset, stop):
    """Save optimizer + scheduler state (through JSON) at epoch `stop`, rebuild both from
    scratch, load, and continue: the same lrs as the uninterrupted run, bit for bit."""
    epochs = 30
    opt = Adam([Parameter(np.zeros(3))], lr=0.01)
    full = _lrs(opt, preset(opt, epochs), epochs)

    opt = Adam([Parameter(np.zeros(3))], lr=0.01)
    sched = preset(opt, epochs)
    _lrs(opt, sched, stop)
    sd_opt = json.loads(json.dumps(opt.state_dict()["param_groups"]))
    sd_sched = json.loads(json.dumps(sched.state_dict()))

    for opt_first in [True, False]:
        opt2 = Adam([Parameter(np.zeros(3))], lr=0.01)
        sched2 = preset(opt2, epochs)  # construction changes the lr: the loads must undo that
        if opt_first:
            opt2.load_state_dict({"state": {}, "param_groups": sd_opt})
            sched2.load_state_dict(sd_sched)
        else:
            sched2.load_state_dict(sd_sched)
            opt2.load_state_dict({"state": {}, "param_groups": sd_opt})
        assert sched2.last_epoch == stop
        rest = _lrs(opt2, sched2, epochs - stop)
        np.testing.assert_array_equal(rest, full[stop:])


def test_scheduler_only_resume_sets_the_optimizer_lr():
    opt = _opt(0.1)
    sched = S.linear_cos(opt, 20)
    _lrs(opt, sched, 8)
    opt2 = _opt(0.1)
    sched2 = S.linear_cos(opt2, 20)
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


# -- against PyTorch ---------------------------------------------------------------------------
def _torch_lrs(make, epochs, lr=0.1):
    torch = import_torch()
    opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=lr, momentum=0.9)
    sched = make(torch.optim.lr_scheduler, opt)
    out = [opt.param_groups[0]["lr"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        for _ in range(epochs):
            opt.step()
            sched.step()
            out.append(opt.param_groups[0]["lr"])
    return np.array(out)


def _mine_lrs(make, epochs, lr=0.1):
    opt = _opt(lr)
    return _lrs(opt, make(S, opt), epochs)


CLASS_CASES = {
    "linear_default": lambda m, o: m.LinearLR(o),
    "linear_up": lambda m, o: m.LinearLR(o, start_factor=0.1, total_iters=5),
    "linear_down": lambda m, o: m.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=95),
    "linear_partial": lambda m, o: m.LinearLR(o, start_factor=0.3, end_factor=0.7, total_iters=37),
    "cos_100": lambda m, o: m.CosineAnnealingLR(o, T_max=100),
    "cos_periodic": lambda m, o: m.CosineAnnealingLR(o, T_max=7, eta_min=0.01),
    "cos_t1": lambda m, o: m.CosineAnnealingLR(o, T_max=1),
    "seq_3": lambda m, o: m.SequentialLR(o, [m.LinearLR(o, 0.2, total_iters=4),
                                             m.CosineAnnealingLR(o, T_max=30, eta_min=0.001),
                                             m.LinearLR(o, 0.5, 0.1, total_iters=20)], milestones=[4, 40]),
    "seq_cos_cos": lambda m, o: m.SequentialLR(o, [m.CosineAnnealingLR(o, 10),
                                                   m.CosineAnnealingLR(o, 50)], milestones=[10]),
    "preset_linear_linear": lambda m, o: m.SequentialLR(o, [m.LinearLR(o, 0.1, total_iters=5),
                                                            m.LinearLR(o, 1.0, 0.0, 95)], milestones=[5]),
    "preset_linear_cos": lambda m, o: m.SequentialLR(o, [m.LinearLR(o, 0.1, total_iters=5),
                                                         m.CosineAnnealingLR(o, 95)], milestones=[5]),
    "preset_warmup_0": lambda m, o: m.SequentialLR(o, [m.LinearLR(o, 0.1, total_iters=0),
                                                       m.CosineAnnealingLR(o, 100)], milestones=[0]),
}


@pytest.mark.parametrize("name", sorted(CLASS_CASES))
def test_classes_match_torch(name):
    make = CLASS_CASES[name]
    ref = _torch_lrs(make, 100)
    got = _mine_lrs(make, 100)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("epochs,lr", [(100, 0.01), (240, 0.1), (6, 0.1), (30, 1.0)])
def test_presets_match_torch(epochs, lr):
    torch_ll = lambda T, o: T.SequentialLR(o, [T.LinearLR(o, 0.1, total_iters=5),  # noqa: E731
                                              T.LinearLR(o, 1.0, 0.0, epochs - 5)], [5])
    torch_lc = lambda T, o: T.SequentialLR(o, [T.LinearLR(o, 0.1, total_iters=5),  # noqa: E731
                                              T.CosineAnnealingLR(o, epochs - 5)], [5])
    for preset, ref_make in [(S.linear_linear, torch_ll), (S.linear_cos, torch_lc)]:
        ref = _torch_lrs(ref_make, epochs, lr)
        opt = _opt(lr)
        got = _lrs(opt, preset(opt, epochs), epochs)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)
