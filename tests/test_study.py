"""Study mode (cht/study): traces and pictures are produced and agree with the run they study."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cht import ch_scores
from cht.config import make_config
from cht.study import evotrace, plots, trace
from cht.study.__main__ import entry
from cht.trainer import Trainer

quiet = lambda *a: None


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 3-epoch ch3 run of a quarter-width-of-0.125 VGG16 on random 28x28 images."""
    rng = np.random.default_rng(0)
    data = (rng.integers(0, 256, (64, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, 64),
            rng.integers(0, 256, (32, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, 32))
    cfg = make_config(dataset="fashion-mnist", method="ch3", width=0.0625, epochs=3, batch_size=32,
                      warmup_epochs=1)
    out = str(tmp_path_factory.mktemp("run"))
    t = Trainer(cfg, data, out, log=io.StringIO())
    t.write_config()
    t.fit()
    return out, cfg, data


def test_window_scores_average_to_ch_scores():
    rng = np.random.default_rng(1)
    for shape, hw, stride, pad in [((3, 2, 3, 3), (5, 5), 1, 1), ((2, 3, 3, 2), (6, 5), (2, 1), (0, 1))]:
        M = rng.random(shape) < 0.5
        total, count = np.zeros(shape), np.zeros(shape)
        Ho = (hw[0] + 2 * np.broadcast_to(pad, 2)[0] - shape[2]) // np.broadcast_to(stride, 2)[0] + 1
        Wo = (hw[1] + 2 * np.broadcast_to(pad, 2)[1] - shape[3]) // np.broadcast_to(stride, 2)[1] + 1
        for i in range(Ho):
            for j in range(Wo):
                s = evotrace.window_scores(M, hw, stride, pad, (i, j), "ch3")
                total += np.nan_to_num(s)
                count += ~np.isnan(s)
        assert np.isnan(evotrace.window_scores(M, hw, stride, pad, (0, 0))).any() == (np.max(pad) > 0)
        np.testing.assert_allclose(total / np.maximum(count, 1), ch_scores(M, hw, stride, pad, "ch3"),
                                   rtol=1e-12, atol=1e-12)


def test_trace_gradients_equal_finite_differences(run_dir):
    out, cfg, data = run_dir
    rows, arrays, paths = trace.run(out, cfg, epoch=2, step=1, layer="features.3", data=data, echo=quiet)
    checked = [r for r in rows if "fd_err" in r]
    assert len(checked) == 13 + 13 + 3 + 2                   # every conv, BN and linear weight
    for r in checked:
        assert r["fd_err"] < 1e-4, r                       # float64 backward = finite differences
        # (a wrong backward gives O(1); 1e-4 leaves room for one ReLU/max-pool kink within eps)
        assert r["f32_err"] < 1e-3, r                      # the float32 gradient of the step too
        assert r["update_ratio"] > 0
    assert np.median([r["fd_err"] for r in checked]) < 1e-6
    np.testing.assert_allclose(arrays["fd_analytic64"], arrays["fd_numeric"], rtol=1e-4, atol=1e-8)
    # masked step: the applied gradient is the dense one on active entries only
    np.testing.assert_array_equal(arrays["grad_applied"], arrays["grad_dense"] * arrays["mask"])
    assert not arrays["weight_after"][~arrays["mask"]].any()
    for v in trace.im2col_identities({**arrays, "cols": _cols(arrays)}).values():
        assert v < 1e-4
    saved = np.load(paths[1])
    assert {"x", "y", "dy", "dx", "weight_before", "cols_image0"} <= set(saved.files)
    assert json.load(open(paths[0]))["layer"] == "features.3"


def _cols(arrays):
    from minicnn.utils.conv import im2col
    c = im2col(arrays["x"], (3, 3), (1, 1), (1, 1))
    return c.reshape(-1, c[0, 0, 0].size)


def test_evotrace_replays_the_logged_step(run_dir):
    out, cfg, data = run_dir
    printed = []
    tr, logs, path = evotrace.run(out, cfg, epoch=1, layer="features.10", window=(1, 2), data=data,
                                  echo=printed.append)
    logged = [json.loads(l) for l in open(os.path.join(out, "evolution.jsonl"))]
    logged = {r["layer"]: r for r in logged if r["epoch"] == 1}
    for log in logs:
        for k in ("removed", "regrown", "random_fill", "overlap", "density", "itop", "channel_cv", "empty_kernels",
                  "unused_inputs"):
            assert log[k] == logged[log["layer"]][k], (log["layer"], k)
    assert tr["removed"].sum() == logged["features.10.weight"]["removed"] > 0
    assert not (tr["removed"] & ~tr["mask_before"]).any()
    assert not (tr["regrown"] & tr["mask_removed"]).any()
    assert (tr["mask_after"] == (tr["mask_removed"] | tr["regrown"])).all()
    ws = tr["window_scores"]
    assert np.array_equal(tr["window"], [1, 2]) and (ws[tr["mask_removed"]] == 0).all()
    assert np.isfinite(ws).all() and (ws[~tr["mask_removed"]] >= 0).all()   # window (1, 2) of 2x2: inside
    z = np.load(path)
    assert z["features.10.weight.removed"].sum() == logged["features.10.weight"]["removed"]
    # the active count per input channel, before and after the step, as printed
    text = "\n".join(printed)
    assert "evolution.jsonl, epoch 1:" in text and text.count("the same") == 1
    lines = text.splitlines()
    for label, M in (("before", tr["mask_before"]), ("after", tr["mask_after"])):
        shown = [int(v) for l in lines if l.startswith(f"  {label} ") for v in l.split()[1:]]
        assert shown == [int(M[:, c].sum()) for c in range(M.shape[1])], label
    assert f"channel_cv " in text and f"-> {logged['features.10.weight']['channel_cv']:.4f}" in text


def test_plots_match_the_logs(run_dir):
    out, cfg, data = run_dir
    evotrace.run(out, cfg, epoch=1, layer="features.3", data=data, echo=quiet)
    written = plots.run(out, echo=quiet)
    logged = [json.loads(l) for l in open(os.path.join(out, "evolution.jsonl"))]
    assert os.path.join(out, "plots", "curves.png") in written
    topo = written[os.path.join(out, "plots", "topology.png")]                # what each panel drew
    for key in ("channel_cv", "empty_kernels", "unused_inputs"):
        assert sorted(topo[key]) == sorted(r["layer"].replace(".weight", "") for r in logged if r["epoch"] == 1)
        for layer, (xs, ys) in topo[key].items():
            assert [(r["epoch"], r[key]) for r in logged if r["layer"] == f"{layer}.weight"] == list(zip(xs, ys))
    for p in written:
        im = Image.open(p)
        assert im.size[0] >= 600 and im.size[1] >= 150
        assert len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 3       # not blank
    for rec in (r for r in logged if r["epoch"] == 1):
        counts = written[os.path.join(out, "plots", f"mask-{rec['layer']}-e1.png")]
        assert counts["removed"] + counts["removed and regrown"] == rec["removed"]
        assert counts["regrown"] + counts["removed and regrown"] == rec["regrown"]
        assert counts["removed and regrown"] == round(rec["overlap"] * rec["regrown"])
    final = written[os.path.join(out, "plots", "mask-features.3.weight.png")]
    z = np.load(os.path.join(out, "checkpoint.npz"))
    assert final["active"] == z["mask.features.3.weight"].sum()


def test_cli_errors_exit_2(run_dir, capsys):
    out = run_dir[0]
    assert entry(["trace", os.path.join(out, "missing")]) == 2
    assert entry(["evotrace", out, "--epoch", "3"]) == 2          # no evolution after the last epoch
    assert entry(["evotrace", out, "--layer", "classifier.1"]) == 2
    assert entry(["plots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(l.startswith("python -m cht.study: error:") for l in err)
    r = subprocess.run([sys.executable, "-m", "cht.study", "evotrace", "--help"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "--window" in r.stdout
