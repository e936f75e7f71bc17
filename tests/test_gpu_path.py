"""The ``--device gpu`` path, run on the strict CuPy stand-in (``tests/strict_cupy.py``) and
compared with the NumPy path; with ``MINICNN_TEST_GPU=cupy`` the same tests run on CuPy and a
real GPU (``bench/gpu_check.sh``), where they fail rather than skip without one.

On the stand-in every device result equals the NumPy one bit for bit: the stand-in computes with
NumPy, and the GPU path runs the same operations in the same order (one chunk per conv layer and one
block per BatchNorm: the CPU path's plan on these small batches, set explicitly in-process). On a real GPU cuBLAS sums in another order,
so results agree to float32 rounding (see ``close``). The copies from device to host are counted
on the stand-in and bounded per training step and per evolution step (README.md, "The GPU path").
"""
import copy
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minicnn import backend, performance
from minicnn.layers import Conv2d
from cht.config import make_config
from cht.scores import ch_scores
from cht.trainer import EVOLUTION_KEYS, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN = "tests.strict_cupy"
REAL = os.environ.get("MINICNN_TEST_GPU") == "cupy"   # CuPy on a real GPU instead of the stand-in
METHODS = ("dense", "static", "set", "ch2", "ch3", "rigl")

# Copies from device to host, at most, of one training step (the label check, a bool, and the
# loss, a float32) and of one evolution step per sparse conv layer (its mask and weights, the
# regrowth scores for CH2/CH3 in float64, the layer's ever-active count as a float64).
STEP_D2H, STEP_D2H_BYTES = 2, 1 + 4


def evolution_d2h_bound(masks, method):
    """(copies, bytes) of one evolution step of every layer, at most."""
    scores = method in ("ch2", "ch3")
    copies = len(masks.layers) * (3 + scores)
    nbytes = sum(l.mask.nbytes + l.param.data.nbytes + 8 + scores * 8 * l.mask.size for l in masks.layers)
    return copies, nbytes


@pytest.fixture
def gpu(monkeypatch):
    """The GPU path (``backend.use("gpu")`` works) on the stand-in, or on CuPy when REAL.

    The CPU side of a comparison runs one chunk of images and one block of channels per layer, as
    the device path does (the worker count does not matter); NumPy and the CuPy module loaded
    before are restored afterwards.
    """
    if REAL:
        monkeypatch.delenv("MINICNN_CUPY_MODULE", raising=False)
    else:
        monkeypatch.setenv("MINICNN_CUPY_MODULE", STANDIN)
    monkeypatch.setattr(performance, "MIN_CHUNKS", 1)
    monkeypatch.setattr(performance, "MAX_BLOCKS", 1)
    monkeypatch.setattr(performance, "MAX_CHANNEL_BLOCKS", 1)
    cp = backend.load_cupy()
    if REAL and not backend.gpu_available():
        pytest.fail("MINICNN_TEST_GPU=cupy: no CuPy with a working CUDA GPU here")
    yield cp
    backend.use("cpu")
    monkeypatch.undo()
    backend.load_cupy()


class Copies:
    """Device-to-host copies counted by the stand-in (``None`` on a real GPU: nothing counts)."""

    def __init__(self, cp):
        self.t = getattr(cp, "transfers", None)

    def now(self):
        return None if self.t is None else (self.t.d2h, self.t.d2h_bytes)

    def since(self, mark):
        return (self.t.d2h - mark[0], self.t.d2h_bytes - mark[1])

    def log(self, n):
        return "\n".join(self.t.lines()[-n:]) if n > 0 else ""


def close(host, device, what, rtol=1e-4, atol=1e-6):
    """Equal bit for bit on the stand-in; on a real GPU within float32 rounding."""
    dev = backend.to_numpy(device)
    assert dev.dtype == np.asarray(host).dtype and dev.shape == np.shape(host), what
    if REAL:
        np.testing.assert_allclose(dev, host, rtol=rtol, atol=atol, err_msg=what)
    else:
        np.testing.assert_array_equal(dev, host, err_msg=what)


# -- the stand-in behaves as CuPy (these run on CuPy too, checking the stand-in's claims) ------
def test_device_arrays_refuse_what_cupy_refuses(gpu):
    xp = backend.use("gpu")
    x = xp.arange(6, dtype=xp.float32).reshape(2, 3)
    host = np.ones((2, 3), dtype=np.float32)
    refused = {
        "numpy.asarray": lambda: np.asarray(x),
        "numpy.array of device scalars": lambda: np.array([x[0, 0], x[0, 1]]),
        "operator with a NumPy array": lambda: x * host,
        "reflected operator": lambda: host + x,
        "in-place operator": lambda: x.__iadd__(host),
        "ufunc with a 0-d NumPy array": lambda: xp.add(x, np.array(1.0, dtype=np.float32)),
        "module function": lambda: xp.concatenate([x, host]),
        "out= a NumPy array": lambda: xp.multiply(x, 2, out=host),
        "a NumPy function CuPy lacks": lambda: np.insert(x, 0, 1.0),
        "a keyword CuPy's sum lacks": lambda: x.sum(where=True),
        "a keyword CuPy's lexsort lacks": lambda: xp.lexsort((x[0],), axis=-1),
        "a keyword a CuPy ufunc lacks": lambda: xp.add(x, 1, where=True),
        "device scalar as an index": lambda: list(range(3))[x[0, 1].astype(xp.int64)],
    }
    for what, f in refused.items():
        with pytest.raises(TypeError):
            f()
            pytest.fail(f"{what}: not refused")
    with pytest.raises(ValueError):                     # basic-index assignment: CuPy's fill
        x[...] = host
    for name in ("errstate", "insert", "nanpercentile", "geomspace"):    # NumPy's, not CuPy's
        assert not hasattr(xp, name), name
    assert not hasattr(x, "resize") and not hasattr(x, "__array_interface__") and not hasattr(x, "ctypes")


def test_device_arrays_work_as_cupy_arrays(gpu):
    xp = backend.use("gpu")
    copies = Copies(gpu)
    x = xp.arange(6, dtype=xp.float32).reshape(2, 3)
    s = x.sum()
    assert type(s) is xp.ndarray and s.shape == () and type(x[0, 1]) is xp.ndarray   # 0-d, not NumPy scalars
    assert type(np.sum(x)) is xp.ndarray and type(np.abs(x)) is xp.ndarray           # NumPy dispatches to CuPy
    assert type(x * np.float32(2)) is xp.ndarray                                       # NumPy scalars are fine
    assert (x == np.array(4.0)).sum() == 1                                 # a 0-d NumPy array compares as a scalar
    row = x[1]
    row += 10                                          # a view writes through
    out = xp.empty((2, 3), dtype=xp.float32)
    assert xp.multiply(x, np.float32(2), out=out) is out
    assert xp.get_array_module(x) is xp and xp.get_array_module(host := np.ones(2)) is np
    assert gpu.cuda.runtime.getDeviceCount() >= 1
    gpu.cuda.Device().synchronize()
    y = copy.deepcopy(x)
    y[0, 0] = -1.0
    mark = copies.now()
    assert float(x[0, 0]) == 0.0 and int(x[1, 2]) == 15 and bool(x[1, 0] > 12) and x[0, 2].item() == 2.0
    assert x.tolist()[1] == [13.0, 14.0, 15.0] and gpu.asnumpy(out)[1, 2] == 30.0 and y.get()[0, 0] == -1.0
    assert np.array_equal(backend.to_numpy(x), [[0, 1, 2], [13, 14, 15]]) and backend.to_numpy(host) is host
    if mark is not None:                               # each a copy to the host, counted with its bytes
        assert copies.since(mark) == (8, 4 + 4 + 1 + 4 + 24 + 24 + 24 + 24), copies.log(8)


def test_backend_treats_the_device_as_the_gpu(gpu):
    assert backend.gpu_available() and backend.use("gpu") is gpu and backend.xp is gpu
    x = backend.to_device(np.arange(4.0))
    assert backend.is_gpu_array(x) and backend.device_of(x) == "gpu" and backend.workers_for(x) == 1
    assert backend.get_array_module(x) is gpu and backend.get_array_module(np.ones(1)) is np
    assert np.array_equal(backend.to_numpy(x), np.arange(4.0)) and type(backend.to_numpy(x)) is np.ndarray
    backend.synchronize()


@pytest.mark.skipif(REAL, reason="the names of the stand-in")
def test_the_standin_offers_cupys_names_and_no_others(gpu):
    names = json.load(open(os.path.join(ROOT, "tests", "strict_cupy_names.json")))
    top = names["modules"][""]
    assert names["cupy"] == gpu.__version__
    for kind in ("function", "ufunc", "numpy", "class"):
        missing = [n for n in top[kind] if not hasattr(gpu, n)]
        assert not missing, (kind, missing)
    assert [n for n in names["ndarray"] if not n.startswith("_") and not hasattr(gpu.ndarray, n)] == []
    numpy_only = [n for n in dir(np) if not n.startswith("_") and callable(getattr(np, n))
                  and not any(n in top[k] for k in ("function", "ufunc", "numpy", "class"))]
    assert len(numpy_only) > 30 and [n for n in numpy_only if hasattr(gpu, n)] == []
    with open(os.path.join(ROOT, "bench", "gpu_check.sh")) as f:     # the check installs this CuPy
        assert "cupy-cuda12x==" + names["cupy"] in f.read()


# -- the library on the device ------------------------------------------------------------
def tiny_data(n_train=16, n_test=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n_train),
            rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n_test))


class Marking:
    """A trainer's loader that notes the copy counter as it hands out each batch, so that the
    copies of each training step (from one batch to the next) can be told apart."""

    def __init__(self, loader, copies):
        self.loader, self.copies, self.marks, self.logs = loader, copies, [], []

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self._mark()
            yield batch
        self._mark()

    def _mark(self):
        now = self.copies.now()
        if self.marks and now is not None:
            self.logs.append(self.copies.log(now[0] - self.marks[-1][0]))   # the last step's copies
        self.marks.append(now)

    def steps(self):
        """``[((copies, bytes), log)]`` of each training step."""
        return [((b[0] - a[0], b[1] - a[1]), log) for a, b, log in zip(self.marks, self.marks[1:], self.logs)]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("method", METHODS)
def test_training_and_evolution_on_the_device_equal_numpy(method, optimizer, gpu, tmp_path):
    kw = dict(dataset="cifar10", method=method, sparsity=0.5, optimizer=optimizer, batch_size=8, epochs=4,
              width=0.125, warmup_epochs=1, seed=14)
    if optimizer == "sgd":
        kw.update(lr=0.1, momentum=0.9, weight_decay=5e-4)
    data, copies, t = tiny_data(), Copies(gpu), {}
    for dev in ("cpu", "gpu"):
        backend.use(dev)
        os.makedirs(tmp_path / dev)
        t[dev] = Trainer(make_config(device=dev, **kw), data, str(tmp_path / dev), log=io.StringIO())
        t[dev].write_config()
    rigl = method == "rigl"
    t["gpu"].train_loader = marking = Marking(t["gpu"].train_loader, copies)
    loss, acc, grads = t["cpu"].train_epoch(keep_dense_grads=rigl)
    loss_d, acc_d, grads_d = t["gpu"].train_epoch(keep_dense_grads=rigl)
    t["gpu"].train_loader = marking.loader

    # two training steps: weights, buffers, optimizer state, loss and accuracy
    assert acc_d == acc or REAL and abs(acc_d - acc) <= 100.0 / 16        # a near tie may flip on a GPU
    assert loss_d == loss or REAL and loss_d == pytest.approx(loss, rel=1e-5)
    # Adam moves a weight by up to about lr per step whatever the size of its gradient, so on a
    # real GPU a gradient that is rounding noise (a conv bias before BatchNorm) may go either way
    atol = 4.2 * t["cpu"].cfg["lr"] if REAL and optimizer == "adam" else 1e-6
    state = t["cpu"].model.state_dict()
    for key, value in t["gpu"].model.state_dict().items():
        assert backend.is_gpu_array(value), key
        close(state[key], value, key, atol=atol)
    opt = t["cpu"].optimizer.state_dict()["state"]
    for i, st in t["gpu"].optimizer.state_dict()["state"].items():
        for name, v in st.items():
            if hasattr(v, "shape"):
                close(opt[i][name], v, f"optimizer {i} {name}", atol=1e-5)
    if rigl:
        for key, g in grads_d.items():
            close(grads[key], g, f"dense gradient {key}")
    if copies.t is not None:
        *steps, (last, log) = marking.steps()
        # RigL's last step also copies the dense conv gradients to the host
        layers = t["gpu"].masks.layers if rigl else []
        extra = (len(layers), sum(l.param.grad.nbytes for l in layers))
        for (n, nbytes), step_log in steps:
            assert n <= STEP_D2H and nbytes <= STEP_D2H_BYTES, step_log
        assert last[0] <= STEP_D2H + extra[0] and last[1] <= STEP_D2H_BYTES + extra[1], log

    # the evolution step, from the same state on both (the CPU's checkpoint loaded on the device)
    t["cpu"].epoch = 1
    t["cpu"].history = [dict(epoch=1, lr=0.0, train_loss=loss, train_acc=acc, test_acc=0.0, seconds=0.0)]
    t["cpu"].save_checkpoint()
    shutil.copy(tmp_path / "cpu" / "checkpoint.npz", tmp_path / "gpu" / "checkpoint.npz")
    t["gpu"].load_checkpoint()
    zeta = t["cpu"].scheduled_zeta(1)
    logs = t["cpu"].evolve(zeta, grads)
    mark = copies.now()
    logs_d = t["gpu"].evolve(zeta, grads)
    evo_copies = None if mark is None else (*copies.since(mark), copies.log(copies.since(mark)[0]))
    if method in ("dense", "static"):
        assert logs == logs_d == []
        return
    assert len(logs_d) == 13 and any(log["removed"] for log in logs_d)
    # SET and RigL select from host data only, so their masks are the CPU's on a real GPU too;
    # there CH scores, summed by cuBLAS in another order, may break a tie of the CPU's otherwise
    exact = not REAL or method in ("set", "rigl")
    keys = [k for k in EVOLUTION_KEYS if k != "seconds"] if exact else ["layer", "removed", "regrown", "density"]
    assert [{k: r[k] for k in keys} for r in logs_d] == [{k: r[k] for k in keys} for r in logs]
    for lc, lg in zip(t["cpu"].masks.layers, t["gpu"].masks.layers):
        assert backend.is_gpu_array(lg.mask) and backend.is_gpu_array(lg.ever_active)
        if not exact:
            assert (backend.to_numpy(lg.mask) == lc.mask).mean() >= 0.99, lc.name
            continue
        close(lc.mask, lg.mask, f"mask {lc.name}")
        close(lc.ever_active, lg.ever_active, f"ever-active {lc.name}")
        close(lc.param.data, lg.param.data, f"weights {lc.name}", atol=1e-6)
    opt = t["cpu"].optimizer.state_dict()["state"]
    for i, st in t["gpu"].optimizer.state_dict()["state"].items():
        for name, v in st.items():
            if hasattr(v, "shape") and exact:
                close(opt[i][name], v, f"optimizer {i} {name} after evolution", atol=1e-5)
    if evo_copies is not None:
        bound = evolution_d2h_bound(t["gpu"].masks, method)
        assert evo_copies[0] <= bound[0] and evo_copies[1] <= bound[1], (evo_copies[:2], bound, evo_copies[2])


@pytest.mark.parametrize("padding, hw", [(1, (4, 4)), (0, (6, 4)), (2, (2, 2))])
def test_winograd_conv_on_the_device_equals_the_host(padding, hw, gpu, monkeypatch):
    """The F(2x2, 3x3) route (taken by VGG16's wide small maps only, so forced here on a small
    layer): forward and backward on the device, no copy to the host."""
    monkeypatch.setattr(performance, "WINOGRAD_MIN_PAIRS", 1)
    rng = np.random.default_rng(0)
    x, host = rng.standard_normal((3, 4, *hw)).astype(np.float32), {}
    copies = Copies(gpu)
    for dev in ("cpu", "gpu"):
        xp = backend.use(dev)
        conv = Conv2d(4, 5, 3, padding=padding, rng=np.random.default_rng(1)).to(dev)
        y = conv.forward(backend.to_device(x, dev))
        dy = xp.ones(y.shape, dtype=xp.float32) * 0.5 + y
        mark = copies.now()
        out = (y, conv.backward(dy), conv.weight.grad, conv.bias.grad)
        if dev == "cpu":
            host = out
            continue
        if mark is not None:
            assert copies.since(mark)[0] == 0
        for name, h, d in zip(("y", "dx", "dW", "db"), host, out):
            assert backend.is_gpu_array(d), name
            close(h, d, name)


@pytest.mark.parametrize("shape, hw, stride, padding", [
    ((6, 5, 3, 3), (8, 8), 1, 1), ((4, 3, 3, 3), (9, 7), 2, 0), ((5, 4, 5, 5), (6, 6), 1, 2),
    ((7, 6, 1, 1), (5, 5), 1, 0)])
def test_ch_scores_on_the_device_equal_the_host(shape, hw, stride, padding, gpu):
    mask = np.random.default_rng(sum(shape)).random(shape) < 0.4
    copies = Copies(gpu)
    dmask = backend.to_device(mask, "gpu")
    for method in ("ch2", "ch3"):
        for impl, d2h in (("fast", 0), ("reference", 1)):          # the reference builds its graph on the host
            want = ch_scores(mask, hw, stride, padding, method, impl=impl)
            mark = copies.now()
            got = ch_scores(dmask, hw, stride, padding, method, impl=impl)
            if mark is not None:
                assert copies.since(mark)[0] <= d2h, copies.log(copies.since(mark)[0])
            assert backend.is_gpu_array(got)
            close(want, got, f"{method} {impl}", rtol=1e-12, atol=0)


def test_loader_batches_on_the_device_equal_the_host(gpu):
    import data
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 256, (20, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, 20)
    mean, std = data.channel_stats(x)
    copies = Copies(gpu)
    mark = copies.now()
    host = list(data.Loader(x, y, 8, mean, std, train=True, pad_to=32, seed=5))
    dev = list(data.Loader(x, y, 8, mean, std, train=True, pad_to=32, seed=5, device="gpu"))
    assert len(dev) == len(host) == 3
    if mark is not None:
        assert copies.since(mark) == (0, 0)
    for (a, ay), (b, by) in zip(host, dev):
        assert backend.is_gpu_array(b) and backend.is_gpu_array(by) and b.shape == (len(ay), 1, 32, 32)
        close(a, b, "images", rtol=0, atol=0)
        close(ay, by, "labels", rtol=0, atol=0)


def _run_env(device):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env.pop("MINICNN_CUPY_MODULE", None)
    if device == "gpu" and not REAL:
        env["MINICNN_CUPY_MODULE"] = STANDIN
    return env


def _read_run(out):
    with np.load(os.path.join(out, "checkpoint.npz")) as z:
        arrays = {k: z[k] for k in z.files if k != "meta"}
        epoch = json.loads(str(z["meta"]))["epoch"]
    with open(os.path.join(out, "metrics.csv")) as f:
        metrics = [line.rsplit(",", 1)[0] for line in f.read().splitlines()]      # less the seconds
    with open(os.path.join(out, "evolution.jsonl")) as f:
        evolution = [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in f if l.strip()]
    return arrays, epoch, metrics, evolution


def test_run_py_on_the_device_killed_and_resumed_equals_the_cpu_run(gpu, tmp_path):
    """On a real GPU the reference is a GPU run straight through: after an evolution step the
    GPU's rounding may have chosen other masks than the CPU's. Batches of 16 images: the CPU
    run then takes one chunk per layer, as the device does (``minicnn.performance``)."""
    from data.synthetic import write_idx_dataset
    write_idx_dataset(str(tmp_path / "data" / "mnist"), n_train=96, n_test=40, seed=0)
    args = [sys.executable, "run.py", "--dataset", "mnist", "--method", "ch3", "--sparsity", "0.5",
            "--width", "0.125", "--batch-size", "16", "--warmup-epochs", "1", "--epochs", "3",
            "--data-dir", str(tmp_path / "data")]
    cpu_out, gpu_out = str(tmp_path / "reference"), str(tmp_path / "gpu")
    reference = ["--device", "gpu"] if REAL else []
    done = subprocess.run(args + reference + ["--out", cpu_out], cwd=ROOT, env=_run_env("gpu" if REAL else "cpu"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen(args + ["--out", gpu_out, "--device", "gpu"], cwd=ROOT, env=_run_env("gpu"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not os.path.exists(os.path.join(gpu_out, "checkpoint.npz")):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)                         # in the second epoch, no chance to clean up
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(gpu_out, "result.json")) and _read_run(gpu_out)[1] < 3
    done = subprocess.run([sys.executable, "run.py", "--resume", gpu_out], cwd=ROOT, env=_run_env("gpu"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.load(open(os.path.join(gpu_out, "config.json")))["device"] == "gpu"
    arrays, epoch, metrics, evolution = _read_run(gpu_out)
    arrays_c, epoch_c, metrics_c, evolution_c = _read_run(cpu_out)
    assert epoch == epoch_c == 3 and sorted(arrays) == sorted(arrays_c)
    for key in arrays:
        close(arrays_c[key], arrays[key], key, atol=1e-4)
    if not REAL:
        assert metrics == metrics_c and evolution == evolution_c
    assert len(evolution) == 2 * 13


def test_study_trace_on_the_device_equals_the_host(gpu, tmp_path):
    from cht.study import trace
    from data.synthetic import write_idx_dataset
    import data
    write_idx_dataset(str(tmp_path / "mnist"), n_train=64, n_test=16, seed=1)
    tables = {}
    for dev in ("cpu", "gpu"):
        cfg = make_config(dataset="mnist", method="ch3", sparsity=0.5, width=0.125, batch_size=32, epochs=2,
                          warmup_epochs=1, data_dir=str(tmp_path), device=dev)
        xy = data.load("mnist", str(tmp_path), "train") + data.load("mnist", str(tmp_path), "test")
        rows, arrays, paths = trace.run(str(tmp_path), cfg, epoch=1, step=2, fd_entries=1, fd_batch=2, data=xy,
                                        device=dev, out=str(tmp_path / f"trace-{dev}"), echo=lambda *a: None)
        tables[dev] = rows, arrays
        with open(paths[0]) as f:   # the default layer: the first conv that computes dx, with its im2col
            assert json.load(f)["layer"] == "features.3" and "cols_image0" in arrays
    (rows, arrays), (rows_d, arrays_d) = tables["cpu"], tables["gpu"]
    assert [r["layer"] for r in rows_d] == [r["layer"] for r in rows]
    for r, rd in zip(rows, rows_d):
        for k, v in r.items():
            if isinstance(v, float):
                assert rd[k] == (v if not REAL else pytest.approx(v, rel=1e-3, abs=1e-6)), (r["layer"], k)
            else:
                assert rd[k] == v, (r["layer"], k)
    assert sorted(arrays_d) == sorted(arrays)
    for k in arrays:
        close(np.asarray(arrays[k]), np.asarray(arrays_d[k]), k, atol=1e-5)
