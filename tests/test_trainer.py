"""The training loop (cht/trainer.py): its step, its model, topology records, early stop, resume."""
import io
import json
import math
import os

import numpy as np
import pytest

import run
from cht import evolution, trainer as trainer_mod
from cht.config import make_config
from cht.trainer import EVOLUTION_KEYS, Trainer
from minicnn import backend
from minicnn.models import vgg16
from topology_brute import topology_by_hand


def tiny_data(seed=0, n=64, n_test=32, channels=1, hw=28, classes=10):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, channels, hw, hw), dtype=np.uint8), rng.integers(0, classes, n),
            rng.integers(0, 256, (n_test, channels, hw, hw), dtype=np.uint8), rng.integers(0, classes, n_test))


def tiny_cfg(**kw):
    return make_config(**{**dict(dataset="fashion-mnist", method="ch3", width=0.0625, epochs=4, batch_size=32,
                                 warmup_epochs=1), **kw})


def make_trainer(tmp_path, name="run", data=None, **kw):
    out = str(tmp_path / name)
    os.makedirs(out, exist_ok=True)
    t = Trainer(tiny_cfg(**kw), data if data is not None else tiny_data(), out, log=io.StringIO())
    t.write_config()
    return t


def records(t):
    with open(t.path("evolution.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


def checkpoint(t):
    with np.load(t.path("checkpoint.npz")) as z:
        return {k: z[k] for k in z.files}


# -- the model and the step -------------------------------------------------------------------
def test_the_class_count_comes_from_the_dataset_and_a_model_can_be_given(tmp_path):
    # CIFAR-100 labels that happen to stop at 9: the head still has 100 outputs
    t = make_trainer(tmp_path, "c100", data=tiny_data(channels=3, hw=32), dataset="cifar100", epochs=1)
    assert t.model.classifier[-1].weight.data.shape[0] == 100
    model = vgg16(num_classes=10, in_channels=1, width=0.0625, rng=np.random.default_rng(99))
    t = Trainer(tiny_cfg(), tiny_data(), str(tmp_path), model=model, log=io.StringIO())
    assert t.model is model
    assert [l.param for l in t.masks.layers][0] is model.features[0].weight
    assert t.optimizer.params == model.parameters()


def test_train_step_masks_the_gradient_and_returns_the_dense_one(tmp_path):
    t = make_trainer(tmp_path, method="rigl")
    xb, yb = next(iter(t.train_loader))
    t.model.train()
    before = {l.name: l.param.data.copy() for l in t.masks}
    loss, logits, dense = t.train_step(xb, yb, keep_dense_grads=True)
    assert np.isfinite(loss) and logits.shape == (32, 10)
    for l in t.masks:
        M = backend.to_numpy(l.mask)
        assert (dense[l.name][~M] != 0).any()                        # the dense gradient reaches inactive entries
        np.testing.assert_array_equal(backend.to_numpy(l.param.grad), dense[l.name] * M)
        assert not l.param.data[~M].any() and not np.array_equal(l.param.data, before[l.name])
    assert t.train_step(xb, yb)[2] is None


# -- topology measures in evolution.jsonl ------------------------------------------------------
def test_topology_records_equal_the_checkpoints_masks(tmp_path):
    t = make_trainer(tmp_path)
    t.fit(stop_after=2)                                  # epochs 1, 2 end with evolution; E_end = 3
    recs = records(t)
    assert [r["epoch"] for r in recs] == [1] * 13 + [2] * 13
    assert all(tuple(r) == EVOLUTION_KEYS and r["early_stop"] is False for r in recs)
    ck = checkpoint(t)                                   # written right after the evolution of epoch 2
    assert json.loads(str(ck["meta"]))["epoch"] == 2
    for r in recs[13:]:
        cv, empty, unused = topology_by_hand(ck[f"mask.{r['layer']}"])
        assert r["channel_cv"] == pytest.approx(cv, rel=1e-12, abs=1e-15), r["layer"]
        assert r["empty_kernels"] == pytest.approx(empty) and r["unused_inputs"] == unused
    assert any(r["channel_cv"] > 0 for r in recs) and any(r["empty_kernels"] > 0 for r in recs)


# -- early stop (docs/algorithm.md section 5.5) -------------------------------------------------
def scripted_overlaps(monkeypatch, script):
    """The real evolution step, with the overlap of layer i at call s set to ``script[s][i]``
    (``script[s][-1]`` for the layers after the given ones). Returns the list of calls."""
    calls = []

    def evolve(*args, **kw):
        logs = evolution.evolve(*args, **kw)
        given = script[len(calls)]
        for i, log in enumerate(logs):
            log["overlap"] = given[min(i, len(given) - 1)]
        calls.append([log["layer"] for log in logs])
        return logs
    monkeypatch.setattr(trainer_mod, "evolve", evolve)
    return calls


def test_early_stop_after_the_first_step_where_every_layer_reaches_T(tmp_path, monkeypatch):
    # step 1: one layer below T; step 2: every layer at T or above (T itself counts) -> no step 3
    calls = scripted_overlaps(monkeypatch, [[0.95, 0.5, 0.99], [0.91, 0.9], [1.0]])
    t = make_trainer(tmp_path, epochs=6, early_stop=0.9)             # E_end = 4.5: steps after 1..4 scheduled
    result = t.fit()
    assert len(calls) == 2
    recs = records(t)
    assert [(r["epoch"], r["early_stop"]) for r in recs] == [(1, False)] * 13 + [(2, True)] * 13
    assert result["evolution_stopped_after"] == 2 == json.load(open(t.path("result.json")))["evolution_stopped_after"]
    assert json.loads(str(checkpoint(t)["meta"]))["evolution_stopped_after"] == 2


def test_early_stop_off_or_never_reached(tmp_path, monkeypatch):
    calls = scripted_overlaps(monkeypatch, [[1.0]] * 3)
    t = make_trainer(tmp_path, "off", epochs=5)                      # early_stop None: steps after 1, 2, 3
    assert t.fit()["evolution_stopped_after"] is None and len(calls) == 3
    assert not any(r["early_stop"] for r in records(t))
    calls = scripted_overlaps(monkeypatch, [[1.0, 0.89]] * 3)
    t = make_trainer(tmp_path, "below", epochs=5, early_stop=0.9)
    assert t.fit()["evolution_stopped_after"] is None and len(calls) == 3


def test_early_stop_is_kept_across_a_resume(tmp_path, monkeypatch):
    script = [[0.2], [0.95], [1.0], [1.0]]
    calls = scripted_overlaps(monkeypatch, script)
    whole = make_trainer(tmp_path, "whole", epochs=6, early_stop=0.9)
    whole.fit()
    assert len(calls) == 2 and whole.evolution_stopped_after == 2
    calls = scripted_overlaps(monkeypatch, script)
    first = make_trainer(tmp_path, "part", epochs=6, early_stop=0.9)
    first.fit(stop_after=3)                                          # stopped at 2, interrupted after 3
    calls_before = len(calls)
    again = Trainer(first.cfg, tiny_data(), first.out, log=io.StringIO())
    again.load_checkpoint()
    assert again.evolution_stopped_after == 2 and again.scheduled_zeta(4) is None
    again.fit()
    assert len(calls) == calls_before == 2                            # no evolution after the resume
    a, b = checkpoint(whole), checkpoint(again)
    for k in a:
        if k != "meta":
            assert np.array_equal(a[k], b[k]), k
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(records(whole)) == strip(records(again))
    assert json.load(open(again.path("result.json")))["evolution_stopped_after"] == 2


def test_early_stop_end_to_end_with_run_py(tmp_path, capsys):
    """--early-stop T on the command line: T taken from a run without it, so that the stop falls
    on a known step; the records before it are those of the run without early stop."""
    from data.synthetic import write_idx_dataset
    write_idx_dataset(str(tmp_path / "data" / "mnist"), n_train=96, n_test=40, seed=0)
    args = ["--dataset", "mnist", "--width", "0.125", "--batch-size", "32", "--warmup-epochs", "1",
            "--method", "ch3", "--sparsity", "0.3", "--zeta", "0.6", "--epochs", "6",
            "--data-dir", str(tmp_path / "data")]
    assert run.entry(args + ["--out", str(tmp_path / "free")]) == 0
    free = [json.loads(l) for l in open(tmp_path / "free" / "evolution.jsonl")]
    steps = sorted({r["epoch"] for r in free})
    low = {e: min(r["overlap"] for r in free if r["epoch"] == e) for e in steps}
    stop = next((e for e in steps[1:] if low[e] > max(low[s] for s in steps if s < e)), None)
    assert stop is not None and stop < steps[-1], low                # a step to stop at, with steps after it
    T = low[stop]
    assert run.entry(args + ["--out", str(tmp_path / "stopped"), "--early-stop", repr(T)]) == 0
    capsys.readouterr()
    got = [json.loads(l) for l in open(tmp_path / "stopped" / "evolution.jsonl")]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "early_stop")} for r in rs]
    assert strip(got) == strip([r for r in free if r["epoch"] <= stop])
    assert [r["early_stop"] for r in got] == [r["epoch"] == stop for r in got]
    assert json.load(open(tmp_path / "stopped" / "result.json"))["evolution_stopped_after"] == stop
    assert json.load(open(tmp_path / "stopped" / "config.json"))["early_stop"] == T
    assert json.load(open(tmp_path / "free" / "result.json"))["evolution_stopped_after"] is None


@pytest.mark.parametrize("value", ["0", "1.5", "nan"])
def test_early_stop_bad_values_exit_2(tmp_path, capsys, value):
    code = run.entry(["--dataset", "mnist", "--early-stop", value, "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--early-stop" in err and not (tmp_path / "never").exists()


def test_early_stop_counts_only_the_layers_that_evolved(tmp_path, monkeypatch):
    """A layer that could not evolve (``evolved: false``, overlap 0) neither holds the stop back
    nor triggers it alone."""
    def patched(not_evolved, overlap):
        calls = []

        def evolve(*args, **kw):
            logs = evolution.evolve(*args, **kw)
            for i, log in enumerate(logs):
                log["evolved"] = i not in not_evolved
                log["overlap"] = 0.0 if i in not_evolved else overlap
            calls.append(1)
            return logs
        monkeypatch.setattr(trainer_mod, "evolve", evolve)
        return calls

    calls = patched({0, 5}, 0.95)                                    # the rest at 0.95 >= T
    t = make_trainer(tmp_path, "some", epochs=6, early_stop=0.9)
    assert t.fit()["evolution_stopped_after"] == 1 and len(calls) == 1
    calls = patched(set(range(13)), 1.0)                             # nothing evolved: no stop
    t = make_trainer(tmp_path, "none", epochs=5, early_stop=0.9)
    assert t.fit()["evolution_stopped_after"] is None and len(calls) == 3
    calls = patched({3}, 0.5)                                        # the evolving ones below T
    t = make_trainer(tmp_path, "below", epochs=5, early_stop=0.9)
    assert t.fit()["evolution_stopped_after"] is None and len(calls) == 3


# -- extreme sparsity, distributions, FLOPs (docs/algorithm.md sections 8 and 9) -----------------
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
@pytest.mark.parametrize("method", ["static", "set", "ch2", "ch3", "rigl"])
def test_every_method_finishes_at_sparsity_099_with_the_planned_densities(tmp_path, method, distribution):
    from cht.density import achieved, conv_densities
    t = make_trainer(tmp_path, sparsity=0.99, method=method, distribution=distribution, zeta=1.0)
    convs = [m for _, m in t.model.named_modules() if isinstance(m, trainer_mod.Conv2d)]
    plan = conv_densities(convs, 0.99, distribution)                 # section 8, from the shapes alone
    result = t.fit()
    want = achieved(plan)
    assert result["densities"] == want == json.load(open(t.path("config.json")))["densities"]
    assert json.load(open(t.path("result.json")))["densities"] == want
    ck = checkpoint(t)
    sparse = [p for p in plan if not p.dense]
    assert sorted(k[len("mask."):] for k in ck if k.startswith("mask.")) == sorted(p.name for p in sparse)
    for p in sparse:
        assert (ck[f"mask.{p.name}"].reshape(p.shape[0], -1).sum(axis=1) == p.k).all(), p.name
    if distribution == "uniform":                                    # k = 1 where (1 - S) F < 0.5
        assert {p.k for p in plan} == {1, 3} and want["global"] == pytest.approx(0.01, rel=0.5)
    else:
        assert len({round(p.density, 9) for p in plan}) > 3
    recs = records(t)
    if method == "static":
        assert recs == []
        return
    # zeta_t = 0.75 after epoch 1 (k >= 2 evolves), 0.25 after epoch 2 (k >= 4)
    assert [r["epoch"] for r in recs] == [1] * len(sparse) + [2] * len(sparse)
    for r, p in zip(recs, sparse + sparse):
        n = math.floor(trainer_mod.zeta_after(t.cfg, r["epoch"]) * p.k)
        assert r["evolved"] == (n > 0) and (r["reason"] is None) == r["evolved"], p.name
        assert r["removed"] == r["regrown"] == p.shape[0] * n and r["density"] == p.achieved
    assert any(r["evolved"] for r in recs) and any(not r["evolved"] for r in recs)
    if method in ("ch2", "ch3"):   # no candidate has a positive score here: every regrown entry is a random fill
        assert all(r["random_fill"] == r["regrown"] and r["score_macs"] > 0 for r in recs if r["evolved"])
    assert 0 < result["flops_inference"] < 0.2 and result["flops_training"] >= result["flops_inference"]


def test_flops_of_dense_set_ch3_and_rigl_runs(tmp_path):
    """Dense: exactly 1.0. Set and CH3 from the same seed hold the same masks' counts: the same
    inference FLOPs, equal to a count from the checkpoint's masks; CH3 pays for its scoring and
    RigL for its dense gradients on top of set's training FLOPs."""
    from cht import flops
    from test_flops import direct_count
    dense = make_trainer(tmp_path, "dense", method="dense").fit()
    assert dense["flops_inference"] == 1.0 and dense["flops_training"] == 1.0
    assert dense["densities"]["global"] == 1.0 and set(dense["densities"]["layers"].values()) == {1.0}
    runs = {m: make_trainer(tmp_path, m, method=m, sparsity=0.7) for m in ("set", "ch3", "rigl")}
    res = {m: t.fit() for m, t in runs.items()}
    model = vgg16(num_classes=10, in_channels=1, width=0.0625, rng=np.random.default_rng(0))
    model.eval()
    x = np.zeros((1, 1, 32, 32), dtype=np.float32)
    f_D = direct_count(model, {}, x)
    for m, t in runs.items():
        ck = checkpoint(t)
        masks = {k[len("mask."):]: v for k, v in ck.items() if k.startswith("mask.")}
        assert len(masks) == 13
        f_S = direct_count(model, masks, x)
        assert res[m]["flops_inference"] == f_S / f_D
        recs = records(t)
        steps = len({r["epoch"] for r in recs})
        scoring = sum(r["score_macs"] for r in recs)
        assert steps == 2 and (scoring > 0) == (m == "ch3")
        N = t.examples_per_epoch
        assert res[m]["flops_training"] == flops.training_fraction(m, f_S, f_D, 4, N, 32, steps, scoring)
    assert res["set"]["flops_inference"] == res["ch3"]["flops_inference"] == res["rigl"]["flops_inference"]
    assert res["set"]["flops_training"] == pytest.approx(res["set"]["flops_inference"], rel=1e-12)
    assert res["ch3"]["flops_training"] > res["set"]["flops_training"]
    assert res["rigl"]["flops_training"] > res["set"]["flops_training"]


def test_the_count_behind_a_full_width_runs_flops_is_section_9s(tmp_path):
    """The layers a run counts (its model on its padded input): 313,725,952 multiply-adds per
    32x32 image for full-width VGG16 with 10 classes; 28x28 images count as padded to 32x32."""
    from cht import flops
    t = make_trainer(tmp_path, "c10", data=tiny_data(n=4, n_test=2, channels=3, hw=32), dataset="cifar10",
                     method="dense", width=1.0, batch_size=2)
    assert t.input_shape == (3, 32, 32)
    assert flops.forward_macs(flops.model_layers(t.model, t.input_shape)) == 313_725_952
    assert make_trainer(tmp_path, "fm", data=tiny_data(n=4, n_test=2), method="dense").input_shape == (1, 32, 32)
