"""The evolution step (cht/evolution.py): schedule, removal, regrowth, invariants over many steps."""
import math
import types

import numpy as np
import pytest

from cht import evolution
from cht.evolution import evolve, zeta_schedule
from cht.masks import SparseConvMasks
from minicnn import backend
from minicnn.layers import BatchNorm2d, Conv2d, Linear, ReLU, Sequential
from minicnn.optim import SGD, Adam
from topology_brute import topology_by_hand


# -- helpers ----------------------------------------------------------------------------------
def tiny_net(seed=0, dtype=np.float32):
    """Two 3x3 convs (fan-in 27 and 36), a BatchNorm and a Linear that must stay dense."""
    r = np.random.default_rng(seed)
    return Sequential(Conv2d(3, 4, 3, padding=1, rng=r, dtype=dtype), BatchNorm2d(4), ReLU(),
                      Conv2d(4, 6, 3, padding=1, bias=False, rng=r, dtype=dtype), ReLU(),
                      Linear(6, 2, rng=r, dtype=dtype))


def make_opt(kind, params):
    if kind == "sgd":
        return SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    return Adam(params, lr=0.01, weight_decay=1e-4)


def train_steps(net, masks, opt, rng, steps=2):
    """Random dense gradients through the trainer's order: apply_to_grads, step (no weight re-mask:
    the invariants must hold without that safety net). Returns the last dense gradients (rigl)."""
    for _ in range(steps):
        for p in net.parameters():
            p.grad[...] = rng.normal(size=p.grad.shape).astype(p.grad.dtype)
        dense = masks.snapshot_grads()
        masks.apply_to_grads()
        opt.step()
    return dense


def record_scores(monkeypatch, fn=None):
    """Wrap ``regrowth_scores`` to record, per call, (layer name, post-removal mask, scores)."""
    calls = []
    original = evolution.regrowth_scores

    def wrapped(method, mask, layer, dense_grad=None, macs=None):
        s = fn(method, mask, layer) if fn else original(method, mask, layer, dense_grad, macs)
        calls.append((layer.name, mask.copy(), np.asarray(s, dtype=np.float64).copy()))
        return s
    monkeypatch.setattr(evolution, "regrowth_scores", wrapped)
    return calls


def rows(a):
    return np.asarray(backend.to_numpy(a)).reshape(a.shape[0], -1)


def state_arrays(opt, p):
    st = opt.state.get(p, {})
    return [backend.to_numpy(v) for k, v in st.items() if k != "step"]


# -- the schedule -----------------------------------------------------------------------------
def test_zeta_schedule_values_and_stop():
    E_end = 75.0
    assert zeta_schedule(1, 100) == pytest.approx(0.15 * (1 + math.cos(math.pi / E_end)), rel=1e-15)
    assert zeta_schedule(0, 100) is None                      # nothing before training
    assert zeta_schedule(74, 100) == pytest.approx(0.15 * (1 + math.cos(math.pi * 74 / 75)))
    assert zeta_schedule(74, 100) > 0
    assert zeta_schedule(75, 100) is None and zeta_schedule(99, 100) is None
    assert zeta_schedule(3, 8) == pytest.approx(0.15)         # e = E_end/2 -> zeta/2
    assert zeta_schedule(3, 8, zeta=0.5, evolve_until=1.0) == pytest.approx(0.25 * (1 + math.cos(math.pi * 3 / 8)))
    assert zeta_schedule(7, 10) is not None and zeta_schedule(8, 10) is None   # E_end = 7.5
    assert zeta_schedule(10, 10, evolve_until=1.0) is None    # never after the last epoch
    assert zeta_schedule(1, 100, update_interval=2) is None
    assert zeta_schedule(2, 100, update_interval=2) == zeta_schedule(2, 100)
    values = [zeta_schedule(e, 100) for e in range(1, 75)]
    assert all(a > b for a, b in zip(values, values[1:]))     # strictly decaying
    assert all(0 < v < 0.3 for v in values)


# -- invariants over many steps ---------------------------------------------------------------
def bits(a):
    """The bytes of an array: equal bits, not merely equal values (-0.0 vs 0.0, NaN)."""
    return np.ascontiguousarray(a).tobytes()


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize("method", ["set", "ch2", "ch3", "rigl", "stub"])
def test_invariants_over_many_steps(monkeypatch, opt_kind, method):
    """Docs/algorithm.md sections 5.1-5.4 and 7 on every step of 20, each after two optimizer steps.

    Sparsity 0.3 and zeta up to 0.5 leave few disabled entries besides the removed ones, so every
    method regrows some entries it has just removed: those must keep their weight and optimizer
    state bit for bit, like the kept ones.
    """
    rng = np.random.default_rng(1)
    net = tiny_net()
    x = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    for i in range(5):                                        # the convs learn their input size (CH scores)
        x = net[i].forward(x)
    masks = SparseConvMasks(net, 0.3, np.random.default_rng(2))
    opt = make_opt(opt_kind, net.parameters())
    stub = (lambda m, mask, layer: rng.random(mask.shape) * (rng.random(mask.shape) < 0.3)) if method == "stub" else None
    calls = record_scores(monkeypatch, stub)
    union = {l.name: rows(l.mask).copy() for l in masks}
    itop_prev = {l.name: 0.0 for l in masks}
    evo_rng = np.random.default_rng(3)
    readded_total = new_total = 0
    for step in range(20):
        dense = train_steps(net, masks, opt, rng)
        for l in masks:                                       # the gradient of inactive entries was never applied
            assert not (rows(l.param.data) * ~rows(l.mask)).any()
        before = {l.name: (rows(l.mask).copy(), rows(l.param.data).copy(),
                           [s.reshape(s.shape[0], -1).copy() for s in state_arrays(opt, l.param)]) for l in masks}
        assert all(len(b[2]) == (1 if opt_kind == "sgd" else 2) for b in before.values())
        zeta_t = [0.3, 0.5, 0.1][step % 3]
        calls.clear()
        logs = evolve(masks, opt, "set" if method == "stub" else method, zeta_t, evo_rng, dense)
        assert [c[0] for c in calls] == [l.name for l in masks] == [g["layer"] for g in logs]
        for l, log, (_, M1, score) in zip(masks, logs, calls):
            M0, W0, S0 = before[l.name]
            M1 = M1.reshape(M0.shape)
            M2, W2 = rows(l.mask), rows(l.param.data)
            S2 = [s.reshape(M2.shape) for s in state_arrays(opt, l.param)]
            n = math.floor(zeta_t * l.k)
            removed, regrown = M0 & ~M1, M2 & ~M1
            # exact counts: k per filter, n_o removed, n_o regrown (none onto active entries)
            assert (M2.sum(1) == l.k).all() and (M1.sum(1) == l.k - n).all()
            assert (removed.sum(1) == n).all() and (regrown.sum(1) == n).all()
            assert not (M1 & ~M0).any()                       # removal only disables
            # removal takes the smallest |w| among active entries of each filter
            absw = np.abs(W0)
            assert (np.where(removed, absw, -np.inf).max(1) <= np.where(M1, absw, np.inf).min(1)).all()
            # section 5.4: active before and after (kept, or removed and regrown): weight and state unchanged
            stay, new, gone = M0 & M2, M2 & ~M0, M0 & ~M2
            readded = removed & regrown
            assert not (readded & ~stay).any()
            assert bits(W2[stay]) == bits(W0[stay]) and np.count_nonzero(W0[stay]) > 0
            for s0, s2 in zip(S0, S2):
                assert bits(s2[stay]) == bits(s0[stay]) and np.count_nonzero(s0[readded]) == readded.sum()
            # newly active: 0 with zero state; newly inactive: 0 with zero state; inactive stays 0
            for s2 in [W2] + S2:
                assert not s2[new].any() and not s2[gone].any() and not (s2 * ~M2).any()
            readded_total += readded.sum()
            new_total += new.sum()
            # the log
            assert log["removed"] == log["regrown"] == n * M0.shape[0]
            ov = (regrown & removed).sum() / regrown.sum() if regrown.sum() else 0.0
            assert log["overlap"] == pytest.approx(ov)
            assert log["density"] == pytest.approx(l.k / M0.shape[1])
            union[l.name] |= M2
            assert log["itop"] == pytest.approx(union[l.name].mean())
            assert log["itop"] >= itop_prev[l.name]
            itop_prev[l.name] = log["itop"]
            pos = (score.reshape(M0.shape) > 0) & ~M1
            assert log["random_fill"] == np.maximum(0, n - pos.sum(1)).sum()
            cv, empty, unused = topology_by_hand(backend.to_numpy(l.mask))
            assert log["channel_cv"] == pytest.approx(cv, rel=1e-12, abs=1e-15)
            assert log["empty_kernels"] == pytest.approx(empty) and log["unused_inputs"] == unused
    assert readded_total > 0 and new_total > 0                # both branches of 5.4 were exercised
    # dense parts stayed dense
    assert np.all(backend.to_numpy(net[5].weight.data) != 0)


# -- removal ----------------------------------------------------------------------------------
def one_conv(C_in=4, C_out=5, k=3, sparsity=0.5, seed=0):
    net = Sequential(Conv2d(C_in, C_out, k, padding=1, rng=np.random.default_rng(seed), dtype=np.float64))
    return net, SparseConvMasks(net, sparsity, np.random.default_rng(seed + 1))


def test_removal_picks_smallest_magnitudes(monkeypatch):
    net, masks = one_conv()
    l = masks.layers[0]
    F = rows(l.mask).shape[1]
    r = np.random.default_rng(5)
    mags = np.stack([r.permutation(F) + 1.0 for _ in range(5)])          # distinct |w| per filter
    l.param.data[...] = (mags * r.choice([-1, 1], size=mags.shape)).reshape(l.param.data.shape)
    masks.apply_to_weights()
    M0 = rows(l.mask).copy()
    calls = record_scores(monkeypatch)
    evolve(masks, None, "set", 0.4, np.random.default_rng(0))
    M1 = calls[0][1].reshape(M0.shape)
    n = math.floor(0.4 * l.k)
    for o in range(5):
        act = np.flatnonzero(M0[o])
        expect = set(act[np.argsort(mags[o, act])[:n]])
        assert set(np.flatnonzero(M0[o] & ~M1[o])) == expect


def test_removal_ties_are_random(monkeypatch):
    net, masks = one_conv(C_out=2)
    l = masks.layers[0]
    M0 = rows(l.mask).copy()
    calls = record_scores(monkeypatch)
    seen = np.zeros_like(M0, dtype=int)
    for seed in range(40):
        l.mask[...] = M0.reshape(l.mask.shape)
        l.param.data[...] = np.where(l.mask, 1.0, 0.0)                   # all active |w| equal
        evolve(masks, None, "set", 0.3, np.random.default_rng(seed))
        seen += M0 & ~calls[-1][1].reshape(M0.shape)
    assert (seen[M0] > 0).all() and (seen[~M0] == 0).all()               # every tied entry gets removed sometimes


# -- regrowth ---------------------------------------------------------------------------------
def test_regrowth_picks_top_scores_and_ignores_active(monkeypatch):
    net, masks = one_conv()
    l = masks.layers[0]
    F = rows(l.mask).shape[1]
    r = np.random.default_rng(7)
    table = np.stack([r.permutation(F) + 1.0 for _ in range(5)])        # distinct, all positive
    calls = record_scores(monkeypatch, lambda m, mask, layer: (table + 1e6 * mask.reshape(5, -1)).reshape(mask.shape))
    for step in range(5):
        M0 = rows(l.mask).copy()
        log = evolve(masks, None, "ch3", 0.5, np.random.default_rng(step))[0]
        M1, M2 = calls[-1][1].reshape(M0.shape), rows(l.mask)
        n = math.floor(0.5 * l.k)
        for o in range(5):
            cand = np.flatnonzero(~M1[o])
            expect = set(cand[np.argsort(-table[o, cand])[:n]])
            assert set(np.flatnonzero(M2[o] & ~M1[o])) == expect
        assert log["random_fill"] == 0 and (M2.sum(1) == l.k).all()


@pytest.mark.parametrize("n_pos", [0, 1, 2, 3, 7])
def test_random_fill_only_when_positive_scores_run_out(monkeypatch, n_pos):
    net, masks = one_conv(C_in=6, C_out=4, sparsity=0.5)                 # F = 54, k = 27, n = 3 at zeta 0.12
    l = masks.layers[0]
    n = math.floor(0.12 * l.k)
    assert n == 3

    def stub(m, mask, layer):                                            # n_pos positive candidates per filter
        M1 = mask.reshape(4, -1)
        s = np.zeros(M1.shape)
        for o in range(4):
            idx = np.flatnonzero(~M1[o])[::-1][:n_pos]
            s[o, idx] = 1.0 + np.arange(len(idx))
        return s.reshape(mask.shape)
    calls = record_scores(monkeypatch, stub)
    filled = np.zeros(rows(l.mask).shape, dtype=int)
    for seed in range(30):
        log = evolve(masks, None, "ch2", 0.12, np.random.default_rng(seed))[0]
        M1, s = calls[-1][1].reshape(4, -1), calls[-1][2].reshape(4, -1)
        regrown = rows(l.mask) & ~M1
        assert log["random_fill"] == 4 * max(0, n - n_pos)
        assert (regrown[s > 0].sum() == 4 * min(n, n_pos))                # positives first
        if n_pos < n:
            assert (regrown & (s > 0)).sum() == 4 * n_pos                # every positive one taken
            filled += regrown & (s == 0)
    if n_pos < n:                                                        # the fill is spread, not index order
        assert (filled > 0).sum() > 4 * 3 * (n - n_pos)


def test_set_regrowth_is_uniform_random_fill():
    net, masks = one_conv(C_out=2)
    l = masks.layers[0]
    logs = evolve(masks, None, "set", 0.3, np.random.default_rng(0))
    assert logs[0]["random_fill"] == logs[0]["regrown"] > 0
    M0 = rows(l.mask).copy()
    hits = np.zeros(M0.shape, dtype=int)
    for seed in range(60):
        l.mask[...] = M0.reshape(l.mask.shape)
        evolve(masks, None, "set", 0.3, np.random.default_rng(seed))
        hits += rows(l.mask) & ~M0
    assert (hits[~M0] > 0).mean() > 0.9                                 # nearly every inactive entry regrown once


def test_overlap_all_and_none(monkeypatch):
    net, masks = one_conv()
    l = masks.layers[0]
    holder = {}

    def favour_removed(m, mask, layer):                                  # removed entries score highest
        return ((holder["M0"] & ~mask.reshape(5, -1)) * 10.0 + 1.0).reshape(mask.shape)
    record_scores(monkeypatch, favour_removed)
    holder["M0"] = rows(l.mask).copy()
    W0 = l.param.data.copy()
    log = evolve(masks, None, "ch3", 0.5, np.random.default_rng(0))[0]
    assert log["overlap"] == 1.0 and np.array_equal(rows(l.mask), holder["M0"])
    assert bits(l.param.data) == bits(W0)                                # every removed entry came back as it was

    def avoid_removed(m, mask, layer):
        return ((~holder["M0"] & ~mask.reshape(5, -1)) * 1.0).reshape(mask.shape)
    record_scores(monkeypatch, avoid_removed)
    holder["M0"] = rows(l.mask).copy()
    log = evolve(masks, None, "ch3", 0.5, np.random.default_rng(0))[0]
    assert log["overlap"] == 0.0 and log["random_fill"] == 0


def test_rigl_regrows_largest_grad():
    net, masks = one_conv()
    l = masks.layers[0]
    F = rows(l.mask).shape[1]
    r = np.random.default_rng(9)
    g = np.stack([r.permutation(F) + 1.0 for _ in range(5)]) * r.choice([-1, 1], size=(5, F))
    with pytest.raises(ValueError):
        evolve(masks, None, "rigl", 0.5, np.random.default_rng(0))
    for key in (l.name, l.param):
        M0 = rows(l.mask).copy()
        l.param.data[...] = (r.permutation(5 * F) + 1.0).reshape(l.param.data.shape)   # distinct |w|
        masks.apply_to_weights()
        W0 = rows(l.param.data).copy()
        evolve(masks, None, "rigl", 0.5, np.random.default_rng(0), {key: g.reshape(l.param.data.shape)})
        M2 = rows(l.mask)
        n = math.floor(0.5 * l.k)
        for o in range(5):
            act = np.flatnonzero(M0[o])
            M1o = M0[o].copy()
            M1o[act[np.argsort(np.abs(W0[o, act]))[:n]]] = False
            cand = np.flatnonzero(~M1o)
            assert set(np.flatnonzero(M2[o] & ~M1o)) == set(cand[np.argsort(-np.abs(g[o, cand]))[:n]])


# -- CH scoring, end to end with cht.scores ---------------------------------------------------
def conv_1x1(X0, W0):
    """A 1x1 conv whose layer graph (input 1x1) is the mask itself: rows outputs, columns inputs."""
    C_out, C_in = X0.shape
    net = Sequential(Conv2d(C_in, C_out, 1, bias=False, dtype=np.float64))
    net[0].input_hw = (1, 1)
    masks = SparseConvMasks(net, 1 - X0.sum(1)[0] / C_in, np.random.default_rng(0))
    l = masks.layers[0]
    l.mask[...] = X0[:, :, None, None]
    l.param.data[...] = (W0 * X0)[:, :, None, None]
    return masks, l


@pytest.mark.parametrize("method", ["ch2", "ch3"])
def test_ch_regrowth_on_the_worked_example(method):
    # after removing the smallest weight per row the mask is X = [[1,1,0,0],[0,1,1,0],[0,0,1,1]],
    # the worked example of docs/algorithm.md section 3
    X0 = np.array([[1, 1, 0, 1], [1, 1, 1, 0], [0, 1, 1, 1]], dtype=bool)
    W0 = np.array([[5, 6, 0, .1], [.2, 6, 7, 0], [0, .3, 7, 8]])
    picks = set()
    for seed in range(12):
        masks, l = conv_1x1(X0, W0)
        log = evolve(masks, None, method, 0.5, np.random.default_rng(seed))[0]
        M2 = rows(l.mask)
        # positive candidates: (0,2); (1,0),(1,3) (one is picked); (2,1)
        assert M2[0].tolist() == [1, 1, 1, 0] and M2[2].tolist() == [0, 1, 1, 1]
        assert M2[1, 1] and M2[1, 2] and M2[1, 0] != M2[1, 3]
        picks.add(int(M2[1, 3]))
        assert log["random_fill"] == 0 and log["removed"] == log["regrown"] == 3
        # row 2 regrows its just-removed (2,1); row 1 does when it picks (1,0); row 0 never
        assert log["overlap"] == pytest.approx((1 + M2[1, 0]) / 3)
        # a regrown entry that was just removed keeps its weight; a newly active one starts at 0
        W2 = rows(l.param.data)
        assert not (W2 * ~M2).any() and W2[0, 2] == 0 and W2[2, 1] == .3
        assert W2[1, 0] == (.2 if M2[1, 0] else 0) and W2[1, 3] == 0
    assert picks == {0, 1}                                               # the tie (1,0)/(1,3) is random


def test_ch_regrowth_falls_back_to_random_without_paths():
    # block-diagonal after removal: no absent link has an L3 path, every regrown entry is random fill
    X0 = np.array([[1, 1, 1, 0], [1, 1, 0, 1], [1, 0, 1, 1]], dtype=bool)
    W0 = np.array([[5, 6, .1, 0], [5, 6, 0, .1], [.1, 0, 5, 6]])
    masks, l = conv_1x1(X0, W0)
    log = evolve(masks, None, "ch3", 0.5, np.random.default_rng(0))[0]
    assert log["random_fill"] == log["regrown"] == 3


def test_ch3_many_steps_random_fill_matches_scores(monkeypatch):
    r = np.random.default_rng(0)
    net = Sequential(Conv2d(2, 3, 3, padding=1, rng=r, dtype=np.float64), ReLU(),
                     Conv2d(3, 4, 3, stride=2, padding=1, rng=r, dtype=np.float64))
    net.forward(r.normal(size=(1, 2, 5, 5)))
    masks = SparseConvMasks(net, 0.8, np.random.default_rng(1))
    opt = SGD(net.parameters(), lr=0.1, momentum=0.9)
    calls = record_scores(monkeypatch)
    fills, positives = 0, 0
    for step in range(6):
        train_steps(net, masks, opt, r, steps=1)
        calls.clear()
        logs = evolve(masks, opt, "ch3", 0.6, np.random.default_rng(step))
        for l, log, (_, M1, s) in zip(masks, logs, calls):
            M1, s = M1.reshape(M1.shape[0], -1), s.reshape(M1.shape[0], -1)
            assert not s[M1].any()                                       # active entries score 0
            n = math.floor(0.6 * l.k)
            pos = ((s > 0) & ~M1).sum(1)
            assert log["random_fill"] == np.maximum(0, n - pos).sum()
            regrown = rows(l.mask) & ~M1
            assert (regrown.sum(1) == n).all()
            for o in range(M1.shape[0]):                                 # top-n: nothing left above a pick
                assert s[o][regrown[o]].min() >= s[o][~M1[o] & ~regrown[o]].max(initial=0)
            fills += log["random_fill"]
            positives += log["regrown"] - log["random_fill"]
    assert fills > 0 and positives > 0                                   # both branches were exercised


# -- the step taken apart ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ch3", "rigl"])
def test_trace_returns_the_steps_intermediates(method):
    """``trace=True`` hands back the step's own masks and scores and changes nothing else."""
    def run(trace):
        r = np.random.default_rng(0)
        net = Sequential(Conv2d(3, 5, 3, padding=1, rng=r, dtype=np.float64))
        net.forward(r.normal(size=(1, 3, 4, 4)))
        masks = SparseConvMasks(net, 0.6, np.random.default_rng(1))
        opt = make_opt("adam", net.parameters())
        dense = train_steps(net, masks, opt, r)
        l = masks.layers[0]
        M0, W0 = l.mask.copy(), l.param.data.copy()
        out = evolve(masks, opt, method, 0.4, np.random.default_rng(2), dense, trace=trace)
        return out, M0, W0, l.mask.copy(), l.param.data.copy(), [s.copy() for s in state_arrays(opt, l.param)]

    (logs, steps), M0, W0, M2, W2, S2 = run(True)
    plain = run(False)
    assert [{k: v for k, v in g.items() if k != "seconds"} for g in logs] == \
        [{k: v for k, v in g.items() if k != "seconds"} for g in plain[0]]
    assert all(bits(a) == bits(b) for a, b in zip((M2, W2, *S2), (plain[3], plain[4], *plain[5])))
    t = steps[0]
    assert set(t) == {"mask_before", "weight_before", "n", "removed", "mask_removed", "scores", "regrown",
                      "random_fill", "mask_after"}
    assert np.array_equal(t["mask_before"], M0) and bits(t["weight_before"]) == bits(W0)
    assert np.array_equal(t["mask_after"], M2)
    k = int(M0[0].sum())
    assert t["n"].tolist() == [math.floor(0.4 * k)] * 5
    assert np.array_equal(t["removed"], M0 & ~t["mask_removed"]) and t["removed"].sum() == logs[0]["removed"] > 0
    assert np.array_equal(t["regrown"], M2 & ~t["mask_removed"]) and t["regrown"].sum() == logs[0]["regrown"]
    assert not t["scores"][t["mask_removed"]].any() and (t["scores"] >= 0).all()
    assert t["scores"].any()
    assert np.array_equal(t["random_fill"], t["regrown"] & (t["scores"] == 0))
    assert t["random_fill"].sum() == logs[0]["random_fill"]
    assert (t["removed"] & t["regrown"]).sum() == round(logs[0]["overlap"] * logs[0]["regrown"])


def test_seconds_is_the_layers_own_time(monkeypatch):
    clock = iter([10.0, 12.5, 20.0, 20.25])
    monkeypatch.setattr(evolution, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    logs = evolve(SparseConvMasks(tiny_net(), 0.5, np.random.default_rng(0)), None, "set", 0.3,
                  np.random.default_rng(0))
    assert [g["seconds"] for g in logs] == [2.5, 0.25]


def test_records_carry_the_keys_of_evolution_jsonl():
    """Every key of an evolution.jsonl record but the trainer's early-stop decision, in its order,
    with the epoch the caller gives (None when it gives none)."""
    from cht.trainer import EVOLUTION_KEYS
    for epoch in (None, 3):
        logs = evolve(SparseConvMasks(tiny_net(), 0.5, np.random.default_rng(0)), None, "set", 0.3,
                      np.random.default_rng(0), epoch=epoch)
        assert len(logs) == 2 and all(tuple(g) == EVOLUTION_KEYS[:-1] and g["epoch"] == epoch for g in logs)


def test_a_broken_selection_raises_instead_of_changing_k(monkeypatch):
    net, masks = one_conv()
    real, calls = evolution._first_n, []

    def short(primary, rng, n):                                          # regrowth one entry short
        sel = real(primary, rng, n)
        calls.append(1)
        if len(calls) == 2:
            sel[0, np.flatnonzero(sel[0] & np.isfinite(primary[0]))[0]] = False
        return sel
    monkeypatch.setattr(evolution, "_first_n", short)
    with pytest.raises(RuntimeError, match="active count"):
        evolve(masks, None, "set", 0.5, np.random.default_rng(0))


# -- determinism, no-ops ----------------------------------------------------------------------
def run_evolutions(seed_masks, seed_evo, steps=5):
    net = tiny_net(seed=4)
    masks = SparseConvMasks(net, 0.7, np.random.default_rng(seed_masks))
    opt = make_opt("adam", net.parameters())
    r, evo = np.random.default_rng(0), np.random.default_rng(seed_evo)
    for _ in range(steps):
        train_steps(net, masks, opt, r, steps=1)
        evolve(masks, opt, "set", 0.3, evo)
    return [rows(l.mask).copy() for l in masks], [rows(l.param.data).copy() for l in masks]


def test_same_seed_same_masks_different_seed_different():
    a, wa = run_evolutions(1, 2)
    b, wb = run_evolutions(1, 2)
    c, _ = run_evolutions(1, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(np.array_equal(x, y) for x, y in zip(wa, wb))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_static_and_no_zeta_do_nothing():
    net, masks = one_conv()
    M0 = rows(masks.layers[0].mask).copy()
    assert evolve(masks, None, "static", 0.3, np.random.default_rng(0)) == []
    assert evolve(masks, None, "set", None, np.random.default_rng(0)) == []
    assert np.array_equal(rows(masks.layers[0].mask), M0)
    with pytest.raises(ValueError):
        evolve(masks, None, "dense", 0.3, np.random.default_rng(0))
    log = evolve(masks, None, "set", 0.0, np.random.default_rng(0))[0]
    assert log["removed"] == log["regrown"] == 0 and log["overlap"] == 0.0


def test_ch_needs_a_forward_pass():
    net, masks = one_conv()
    with pytest.raises(RuntimeError, match="forward"):
        evolve(masks, None, "ch3", 0.3, np.random.default_rng(0))


@pytest.mark.skipif(not backend.gpu_available(), reason="needs CuPy and a GPU")
def test_gpu_matches_cpu():
    def run(device):
        net = tiny_net(seed=4)
        if device == "gpu":
            net.to("gpu")
        masks = SparseConvMasks(net, 0.7, np.random.default_rng(1))
        opt = make_opt("sgd", net.parameters())
        r, evo = np.random.default_rng(0), np.random.default_rng(2)
        logs = []
        for _ in range(4):
            for p in net.parameters():
                p.grad[...] = backend.to_device(r.normal(size=p.grad.shape).astype(np.float32), device)
            dense = masks.snapshot_grads()
            masks.apply_to_grads()
            opt.step()
            logs += evolve(masks, opt, "rigl", 0.3, evo, dense)
        for l in masks:
            assert backend.device_of(l.mask) == device
            assert not (backend.to_numpy(l.param.data) * ~backend.to_numpy(l.mask)).any()
            for s in state_arrays(opt, l.param):
                assert not (s * ~backend.to_numpy(l.mask)).any()
        return [backend.to_numpy(l.mask) for l in masks], [(g["removed"], g["regrown"]) for g in logs]
    cpu, gpu = run("cpu"), run("gpu")
    assert all(np.array_equal(a, b) for a, b in zip(cpu[0], gpu[0])) and cpu[1] == gpu[1]


# -- layers that cannot evolve; the scoring's multiply-adds ---------------------------------------
@pytest.mark.parametrize("method", ["set", "ch2", "ch3", "rigl"])
def test_a_layer_whose_removal_rounds_to_0_is_skipped(method, monkeypatch):
    """S = 0.9: features.0 keeps k = 3 of 27 entries, features.3 k = 4 of 36; at zeta_t = 0.3 the
    first removes floor(0.9) = 0 per filter (no scoring, no selection, nothing changes), the
    second floor(1.2) = 1."""
    net = tiny_net(dtype=np.float64)
    masks = SparseConvMasks(net, 0.9, np.random.default_rng(1))
    assert [l.k for l in masks] == [3, 4]
    x = np.random.default_rng(2).normal(size=(2, 3, 5, 5))
    for i in range(5):                                                 # the convs learn their input size
        x = net[i].forward(x)
    opt = make_opt("adam", net.parameters())
    dense = train_steps(net, masks, opt, np.random.default_rng(3))
    l0 = masks.layers[0]
    before = (l0.mask.copy(), l0.param.data.copy(), l0.ever_active.copy(),
              {k: v.copy() for k, v in opt.state[l0.param].items() if k != "step"})
    scored = record_scores(monkeypatch)
    selections = []
    real_first_n = evolution._first_n
    monkeypatch.setattr(evolution, "_first_n", lambda *a: selections.append(1) or real_first_n(*a))
    logs, steps = evolve(masks, opt, method, 0.3, np.random.default_rng(4), dense, trace=True)
    assert [name for name, _, _ in scored] == ["3.weight"] and len(selections) == 2
    skipped, moved = logs
    assert skipped["evolved"] is False and moved["evolved"] is True and moved["reason"] is None
    assert skipped["reason"] == "no entry to remove: floor(zeta_t * k) = floor(0.3 * 3) = 0"
    assert (skipped["removed"], skipped["regrown"], skipped["random_fill"], skipped["overlap"],
            skipped["score_macs"]) == (0, 0, 0, 0.0, 0)
    assert skipped["density"] == 3 / 27 and skipped["itop"] == before[2].mean()
    cv, empty, unused = topology_by_hand(before[0])                    # the measures are still taken
    assert skipped["channel_cv"] == pytest.approx(cv, rel=1e-12, abs=1e-15)
    assert (skipped["empty_kernels"], skipped["unused_inputs"]) == (pytest.approx(empty), unused)
    assert np.array_equal(l0.mask, before[0]) and np.array_equal(l0.param.data, before[1])
    assert np.array_equal(l0.ever_active, before[2])
    for k, v in before[3].items():
        assert np.array_equal(opt.state[l0.param][k], v), k
    t = steps[0]
    assert not t["n"].any() and not t["removed"].any() and not t["regrown"].any() and not t["scores"].any()
    assert np.array_equal(t["mask_after"], before[0]) and np.array_equal(t["mask_removed"], before[0])
    assert moved["removed"] == moved["regrown"] == 6                   # one per filter
    if method in ("ch2", "ch3"):                                       # the products of scoring M1
        conv = masks.layers[1].module
        macs = []
        evolution.ch_scores(scored[0][1], conv.input_hw, conv.stride, conv.padding, method, macs=macs)
        assert moved["score_macs"] == sum(macs) > 0
    else:
        assert moved["score_macs"] == 0


def test_no_layer_can_evolve_at_k_1():
    """k = 1 (S = 0.99): nothing can ever be removed; every layer reports why, nothing changes."""
    net = tiny_net()
    masks = SparseConvMasks(net, 0.99, np.random.default_rng(0))
    assert [l.k for l in masks] == [1, 1]
    before = [l.mask.copy() for l in masks]
    logs = evolve(masks, None, "set", 0.3, np.random.default_rng(0))
    assert [g["evolved"] for g in logs] == [False, False] and all("floor(0.3 * 1) = 0" in g["reason"] for g in logs)
    assert all(np.array_equal(l.mask, M) for l, M in zip(masks, before))
