"""Benchmark: one VGG16 training step of minicnn against PyTorch, same shapes.

A step is forward, cross-entropy loss, backward, (masks.apply_to_grads() when sparse), Adam
update (lr 1e-3), (masks.apply_to_weights()): the training loop of run.py. For each framework
the script reports

- the end-to-end step time: median of ``--steps`` steps after ``--warmup`` steps (the number
  that counts; nothing in it is instrumented). With PyTorch the two frameworks' timed steps
  are taken in turn (``--paired``, the default; each turn an untimed step, then the timed
  one), and the median of the ratios of neighbouring steps is reported too: a shared machine's
  speed drifts 10-25% over minutes, which a comparison of two runs made minutes apart would take
  for a difference between the frameworks;
- per-layer forward and backward times (median over ``--steps`` more, instrumented, steps);
- peak memory: each framework runs in its own subprocess (peaks do not mix, thread pools are
  the process's own);
- the GEMM floor: the FLOPs of every conv/linear GEMM minicnn's step runs (forward, dW, dx; the
  first conv has no dx; im2col or Winograd, the route each layer takes) divided by a NumPy/CuPy
  float32 GEMM rate measured in the same run, and the same GEMMs timed one by one on their real
  shapes (no step of minicnn can be faster than that).

    python bench/train_step.py                       # batch 128, width 1.0, dense, CPU
    python bench/train_step.py --width 0.25 --steps 3
    python bench/train_step.py --sparsity 0 0.5      # dense, then 50% sparse conv masks
    python bench/train_step.py --rounds 2            # two pairs of fresh worker processes
    python bench/train_step.py --device gpu          # minicnn-CuPy against PyTorch-CUDA
    python bench/train_step.py --conv im2col         # minicnn without its Winograd layers
    python bench/train_step.py --json bench/out/before.json

PyTorch (CPU, or CUDA with --device gpu) is optional: without it, or with --no-torch, only
minicnn is measured. This is a measurement, not a test: it asserts nothing.
"""
import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

KINDS = {"Conv2d": "conv", "BatchNorm2d": "bn", "BatchNorm1d": "bn", "ReLU": "relu", "MaxPool2d": "pool",
         "Linear": "linear", "Flatten": "flatten", "Dropout": "dropout"}
MB = 2 ** 20


# -- measurement helpers (used in the worker processes) -------------------------------------
def proc_status_mb(key):
    """``VmRSS`` (current) or ``VmHWM`` (peak) resident memory of this process in MB.

    VmHWM restarts at exec, so a worker's peak is its own; ``ru_maxrss`` is the fallback where
    /proc is missing (it may carry the parent's peak over a fork).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_steps(step, n, sync):
    """Run ``step()`` n times; the wall time of each in seconds (GPU work waited for)."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        sync()
        out.append(time.perf_counter() - t)
    return out


def step_times(step, a, sync):
    """The timed steps of a worker: ``--steps`` in a row, or, paired (``--paired``: the driver
    alternates the two frameworks), for each ``step`` line on stdin an untimed step then a timed
    one, answered with its time on stdout, until any other line. The untimed step: PyTorch's
    first step after the pause (while the other framework ran) is slower, 2.2-2.3 s against
    1.9-2.1 s back to back, as measured here; the second is not (1.75-1.86 s)."""
    if not a.paired:
        return timed_steps(step, a.steps, sync)
    out = []
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        timed_steps(step, 1, sync)
        out += timed_steps(step, 1, sync)
        print(out[-1], flush=True)
    return out


class Clock:
    """Seconds of named phases, one entry per step: ``with clock("features.3", "fwd"): ...``.

    ``sync`` (a no-op on the CPU) waits for queued GPU work before the clock is read.
    """

    def __init__(self, sync):
        self.sync, self.times = sync, {}

    @contextlib.contextmanager
    def __call__(self, name, phase):
        t = time.perf_counter()
        yield
        self.sync()
        self.times.setdefault((name, phase), []).append(time.perf_counter() - t)

    def rows(self, layers):
        """Median ms per layer (and the loss and optimizer) as a list of row dicts."""
        entries = [(name, type(layer).__name__) for name, layer in layers] + [("loss", ""), ("optimizer", "")]
        return [{"name": name, "type": typ, "kind": KINDS.get(typ, name),
                 "fwd_ms": 1000.0 * statistics.median(self.times[name, "fwd"]),
                 "bwd_ms": 1000.0 * statistics.median(self.times[name, "bwd"])} for name, typ in entries]


def model_layers(model):
    """``[(name, layer)]``: the children of ``model.features`` then ``model.classifier``, in the
    order VGG's forward runs them (``classifier(features(x))``); names as in the state_dict."""
    return ([(f"features.{i}", l) for i, l in enumerate(model.features)]
            + [(f"classifier.{i}", l) for i, l in enumerate(model.classifier)])


def gemm_shapes(layers, out_hw, batch):
    """The GEMMs of one training step, per conv/linear layer, as
    ``(name, [(M, K, N, ta, tb, count), ...])``: ``count`` products ``A (M, K) @ B (K, N)``,
    ``2*M*N*K`` FLOPs each; ``ta``/``tb`` say that the operand is stored transposed (a ``.T``
    view, as the layer passes it to BLAS). The route is the layer's own
    (``minicnn.performance.winograd``). im2col (conv.py's layouts, ``K = C*kh*kw``,
    ``P = N*oh*ow``): forward ``W (F, K) @ cols (K, P)``, ``dW = dy (F, P) @ cols^T``,
    ``dcols = W^T @ dy`` (skipped by the first conv); the layer runs them per chunk of images,
    ``dW`` as ``cols @ dy^T`` for at most 64 filters and, at stride 1, ``dx`` as a convolution
    of ``dy`` (``(C, F*kh*kw) @ (F*kh*kw, P)``): the same FLOPs. Winograd F(2x2, 3x3), with
    ``T = N*oh*ow/4`` tiles: 16 each of ``U (F, C) @ V (C, T)``, ``dU = dM (F, T) @ V^T`` and,
    for dx, the forward of dy ``(C, F) @ (F, T)``. Linear: ``x (N, I) @ W^T``,
    ``dW = dy^T @ x``, ``dx = dy (N, O) @ W``.
    """
    from minicnn import performance
    out = []
    for name, layer in layers:
        kind = type(layer).__name__
        if kind == "Conv2d":
            F, C, kh, kw = layer.weight.data.shape
            oh, ow = out_hw[name]
            if performance.winograd(layer.kernel_size, layer.stride, layer.padding, (oh, ow), C, F):
                T = batch * oh * ow // 4
                g = [(F, C, T, False, False, 16), (F, T, C, False, True, 16)]
                if layer.needs_input_grad:
                    g.append((C, F, T, False, False, 16))
            else:
                K, P = C * kh * kw, batch * oh * ow
                g = [(F, K, P, False, False, 1), (F, P, K, False, True, 1)]
                if layer.needs_input_grad:
                    g.append((K, F, P, True, False, 1))
            out.append((name, g))
        elif kind == "Linear":
            O, I = layer.weight.data.shape
            out.append((name, [(batch, I, O, False, True, 1), (O, batch, I, True, False, 1),
                               (batch, O, I, False, False, 1)]))
    return out


def cpu_model():
    """The CPU's name and vector extensions (from /proc/cpuinfo on Linux): BLAS and oneDNN pick
    their kernels by them, so ratios measured on two machines differ."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown CPU"
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    simd = sorted({f for f in flags.group(1).split() if f.startswith(("avx", "amx"))} if flags else ())
    return f"{name.group(1).strip() if name else 'unknown CPU'}; {' '.join(simd) or 'no AVX'}"


def gemm_rate(xp, sync, shape=(512, 4608, 8192), repeats=3, dtype="float32"):
    """GEMM rate (FLOP/s) of ``xp.matmul`` on ``(M, K) x (K, N)`` in ``dtype``: best of ``repeats``.

    On the CPU every worker multiplies its own operands at the same time, each on one BLAS thread
    (``backend.on_items``), as the layers run their GEMMs; on the GPU one product. The default
    shape is a middle VGG16 conv layer's forward (F=512, K=512*9, P=128*8*8).
    """
    from minicnn import backend
    M, K, N = shape
    parts = backend.workers_for(xp.empty(0, dtype=dtype))
    ops = [(xp.ones((M, K), dtype=dtype), xp.ones((K, N), dtype=dtype),
            xp.empty((M, N), dtype=dtype)) for _ in range(parts)]

    def run():
        backend.on_items(lambda abc: xp.matmul(abc[0], abc[1], out=abc[2]), ops, ops[0][0])

    run()    # warm-up: first touch of the outputs, thread pool start
    sync()
    best = min(timed_steps(run, repeats, sync))
    return 2.0 * M * N * K * parts / best


def gemm_times(xp, sync, shapes):
    """Seconds of each layer's GEMMs on their real shapes and layouts (best of 3 after a warm-up)."""
    def operand(rows, cols, transposed):
        return xp.ones((cols, rows), dtype=xp.float32).T if transposed else xp.ones((rows, cols), dtype=xp.float32)

    out = {}
    for name, gemms in shapes:
        total = 0.0
        for M, K, N, ta, tb, count in gemms:
            a, b, c = operand(M, K, ta), operand(K, N, tb), xp.empty((M, N), dtype=xp.float32)
            xp.matmul(a, b, out=c)
            sync()
            total += count * min(timed_steps(lambda: xp.matmul(a, b, out=c), 3, sync))
            del a, b, c
        out[name] = total
    return out


# -- minicnn worker ---------------------------------------------------------------------------
def run_minicnn(a):
    """Build VGG16 in minicnn, time the step end to end and per layer, measure memory and GEMMs."""
    import numpy as np
    from minicnn import backend, losses, models, optim

    workers = backend.set_cpu_workers(a.workers) if a.workers else backend.cpu_workers()
    if a.conv == "im2col":
        from minicnn import performance
        performance.WINOGRAD_MIN_PAIRS = float("inf")          # no layer takes Winograd
    if a.device == "gpu":
        backend.use("gpu")        # one clear RuntimeError when CuPy or the GPU is missing
    xp, sync = backend.xp, backend.synchronize
    rss_import = proc_status_mb("VmRSS")
    rng = np.random.default_rng(a.seed)
    model = models.vgg16(width=a.width, rng=rng).to(a.device)
    model.features[0].needs_input_grad = False   # as cht/trainer.py (and PyTorch): no dx for the image
    model.train()
    opt = optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = losses.CrossEntropyLoss()
    masks = None
    if a.sparsity > 0:
        from cht.masks import SparseConvMasks
        masks = SparseConvMasks(model, a.sparsity, rng)
    x = backend.to_device(rng.standard_normal((a.batch_size, 3, 32, 32), dtype=np.float32), a.device)
    y = backend.to_device(rng.integers(0, 10, a.batch_size), a.device)
    sync()
    rss_base = proc_status_mb("VmRSS")

    def update():                 # run.py's order: masked grads, step, masked weights
        if masks is not None:
            masks.apply_to_grads()
        opt.step()
        if masks is not None:
            masks.apply_to_weights()

    def step():
        opt.zero_grad()
        loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward())
        update()

    timed_steps(step, a.warmup, sync)
    step_s = step_times(step, a, sync)
    peak = proc_status_mb("VmHWM")
    pool = backend.cupy.get_default_memory_pool().total_bytes() / MB if a.device == "gpu" else None

    # per layer: the same calls as step(), one layer at a time
    layers, clock = model_layers(model), Clock(sync)
    for _ in range(a.steps if a.layers else 0):
        with clock("optimizer", "fwd"):                 # the "fwd" column of the optimizer: zero_grad
            opt.zero_grad()
        h = x
        for name, layer in layers:
            with clock(name, "fwd"):
                h = layer.forward(h)
        with clock("loss", "fwd"):
            loss_fn.forward(h, y)
        with clock("loss", "bwd"):
            dy = loss_fn.backward()
        for name, layer in reversed(layers):
            with clock(name, "bwd"):
                dy = layer.backward(dy)
        with clock("optimizer", "bwd"):                 # ... and its "bwd" column: masks + Adam
            update()
    rows = clock.rows(layers) if a.layers else []

    # GEMM floor (after the peak was read: these arrays do not count)
    out_hw, h = {}, x
    for name, layer in layers:    # the output size of every layer
        h = layer.forward(h)
        out_hw[name] = h.shape[2:]
    shapes = gemm_shapes(layers, out_hw, a.batch_size)
    flops = sum(2.0 * M * K * N * count for _, g in shapes for M, K, N, _, _, count in g)
    rate = gemm_rate(xp, sync)
    per_layer_gemm = gemm_times(xp, sync, shapes) if a.layers else {}
    for r in rows:
        r["gemm_ms"] = 1000.0 * per_layer_gemm[r["name"]] if r["name"] in per_layer_gemm else None
    return {
        "framework": "minicnn-CuPy" if a.device == "gpu" else "minicnn-NumPy",
        "threads": backend.blas_threads(), "workers": workers, "step_s": step_s, "rows": rows,
        "rss_import_mb": rss_import, "rss_base_mb": rss_base, "peak_mb": peak, "gpu_pool_mb": pool,
        "gemm_flops": flops, "gemm_rate": rate, "gemm_floor_s": flops / rate,
        "gemm_measured_s": sum(per_layer_gemm.values()) if per_layer_gemm else None,
        "loadavg": os.getloadavg(),
    }


# -- PyTorch worker ---------------------------------------------------------------------------
def run_torch(a):
    """Time the same step in PyTorch, end to end and per layer.

    Per layer: each layer's forward runs on ``prev_output.detach().requires_grad_()`` (a leaf,
    no copy), so the layer has its own small autograd graph; backward is ``out.backward(dy)``
    on that graph alone with the upstream gradient ``dy`` (the leaf's ``.grad`` from the layer
    after it), which also accumulates the layer's parameter gradients as a full backward does.
    Same shapes and kernels as the whole-model step; the first conv's input needs no gradient,
    so (as in minicnn) it computes no dx. ReLUs run out of place in this pass (an in-place op
    on a leaf that requires grad is an error).
    """
    import numpy as np
    import torch
    import torch.nn.functional as Fn

    from bench.torch_vgg import torch_vgg16

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = "cuda" if a.device == "gpu" else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("PyTorch has no CUDA device")
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    rss_import = proc_status_mb("VmRSS")
    torch.manual_seed(a.seed)
    model = torch_vgg16(width=a.width, inplace_relu=True).to(dev).train()  # as torchvision's VGG
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    masks = []
    if a.sparsity > 0:   # the same per-filter density as cht.masks (k active entries per filter)
        from cht.masks import random_mask
        rng = np.random.default_rng(a.seed)
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                M = torch.from_numpy(random_mask(tuple(m.weight.shape), a.sparsity, rng))
                masks.append((m.weight, M.to(device=dev, dtype=m.weight.dtype)))
        with torch.no_grad():
            for p, M in masks:
                p.mul_(M)
    x = torch.randn(a.batch_size, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (a.batch_size,), device=dev)
    sync()
    rss_base = proc_status_mb("VmRSS")

    def update():
        with torch.no_grad():
            for p, M in masks:
                p.grad.mul_(M)
        opt.step()
        with torch.no_grad():
            for p, M in masks:
                p.mul_(M)

    def step():
        opt.zero_grad()
        Fn.cross_entropy(model(x), y).backward()
        update()

    timed_steps(step, a.warmup, sync)
    step_s = step_times(step, a, sync)
    peak = proc_status_mb("VmHWM")
    cuda_peak = torch.cuda.max_memory_allocated() / MB if dev == "cuda" else None

    layers, clock = model_layers(model), Clock(sync)
    for _, layer in layers:
        if isinstance(layer, torch.nn.ReLU):
            layer.inplace = False
    for _ in range(a.steps if a.layers else 0):
        with clock("optimizer", "fwd"):
            opt.zero_grad()
        h, graphs = x, []
        for i, (name, layer) in enumerate(layers):
            inp = h.detach().requires_grad_(i > 0)      # the image needs no gradient
            with clock(name, "fwd"):
                h = layer(inp)
            graphs.append((inp, h))
        logits = h.detach().requires_grad_()
        with clock("loss", "fwd"):
            loss = Fn.cross_entropy(logits, y)
        with clock("loss", "bwd"):
            loss.backward()
        dy = logits.grad
        for i in reversed(range(len(layers))):
            inp, out = graphs[i]
            graphs[i] = None                            # free the layer's graph, as backward does
            with clock(layers[i][0], "bwd"):
                out.backward(dy)
            dy = inp.grad
        with clock("optimizer", "bwd"):
            update()
    rows = clock.rows(layers) if a.layers else []
    return {
        "framework": "PyTorch-CUDA" if dev == "cuda" else "PyTorch-CPU",
        "version": torch.__version__, "threads": torch.get_num_threads(), "step_s": step_s, "rows": rows,
        "rss_import_mb": rss_import, "rss_base_mb": rss_base, "peak_mb": peak, "gpu_pool_mb": cuda_peak,
        "loadavg": os.getloadavg(),
    }


# -- driver -----------------------------------------------------------------------------------
def start_worker(name, a, sparsity, paired):
    """Start one framework's measurement in a fresh Python process (its own memory peak and
    thread pools); returns ``(process, folder of its result)``. Paired, it waits for 'step' lines."""
    d = tempfile.mkdtemp()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--worker-out", os.path.join(d, "result.json"),
           "--batch-size", str(a.batch_size), "--width", str(a.width), "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--sparsity", str(sparsity), "--device", a.device,
           "--threads", str(a.threads), "--workers", str(a.workers), "--seed", str(a.seed), "--conv", a.conv,
           "--layers" if a.layers else "--no-layers", "--paired" if paired else "--no-paired"]
    env = dict(os.environ)
    if a.threads:   # BLAS/OpenMP pools read these at load time, so they are set before import
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(a.threads)
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, d


def ask(proc, line):
    """Send ``line`` to a paired worker; its one-line answer (None when it died)."""
    try:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
    except (BrokenPipeError, OSError):
        return None
    return proc.stdout.readline().strip() or None


def finish_worker(name, proc, d):
    """Let a worker finish (per-layer pass, GEMMs) and return its result dict, or None."""
    out, err = proc.communicate()        # closes its stdin: a paired worker's step loop ends
    try:
        if proc.returncode != 0:
            lines = (err.strip() or out.strip() or "no output").splitlines()
            print(f"{name}: failed ({lines[-1]})", file=sys.stderr)
            return None
        with open(os.path.join(d, "result.json")) as f:
            return json.load(f)
    finally:
        import shutil
        shutil.rmtree(d, ignore_errors=True)


def run_round(a, sparsity, with_torch):
    """One round: ``(minicnn result, torch result or None, [(minicnn s, torch s)] paired steps)``.

    Paired (with torch): both workers set up and warm up, then take turns, the order
    alternating, each turn an untimed and a timed step (see ``step_times``): a busy or slow
    spell of this shared machine hits both frameworks alike. Then each runs its per-layer pass
    alone. Unpaired: one worker after the other."""
    names = ["minicnn"] + (["torch"] if with_torch else [])
    paired = with_torch and a.paired
    if not paired:
        results = [finish_worker(n, *start_worker(n, a, sparsity, False)) for n in names]
        return results[0], (results[1] if with_torch else None), []
    workers, ready = {}, []
    for n in names:          # one at a time: set-up and warm-up do not overlap either
        workers[n] = start_worker(n, a, sparsity, True)
        if workers[n][0].stdout.readline().strip() == "ready":
            ready.append(n)
    pairs = []
    for i in range(a.steps):
        t = {}
        for n in (ready if i % 2 == 0 else ready[::-1]):
            answer = ask(workers[n][0], "step")
            t[n] = float(answer) if answer else None
        if len(t) == 2 and None not in t.values():
            pairs.append((t["minicnn"], t["torch"]))
    results = {n: finish_worker(n, *workers[n]) for n in names}   # per-layer passes one after the other
    return results["minicnn"], results.get("torch"), pairs


def merge_rounds(results):
    """One result from the workers' results of several rounds: all timed steps together, the
    median over rounds of each per-layer median, the round with the largest peak, the best GEMM
    rate and the least GEMM times."""
    if len(results) <= 1:
        return results[0] if results else None
    out = dict(results[-1])
    out["step_s"] = [t for r in results for t in r["step_s"]]
    top = max(results, key=lambda r: r["peak_mb"])          # memory figures of the same round
    out.update({key: top[key] for key in ("peak_mb", "rss_base_mb", "rss_import_mb", "gpu_pool_mb")})
    if "gemm_rate" in out:
        best = max(results, key=lambda r: r["gemm_rate"])
        out.update(gemm_rate=best["gemm_rate"], gemm_floor_s=best["gemm_floor_s"])
        if out["gemm_measured_s"] is not None:
            out["gemm_measured_s"] = min(r["gemm_measured_s"] for r in results)
    rows = []
    for i, row in enumerate(out["rows"]):
        row = dict(row, fwd_ms=statistics.median(r["rows"][i]["fwd_ms"] for r in results),
                   bwd_ms=statistics.median(r["rows"][i]["bwd_ms"] for r in results))
        if row.get("gemm_ms") is not None:   # a floor: the least disturbed round
            row["gemm_ms"] = min(r["rows"][i]["gemm_ms"] for r in results)
        rows.append(row)
    out["rows"] = rows
    return out


def fmt(v, spec=".1f", width=9):
    return f"{'-':>{width}}" if v is None else f"{v:{width}{spec}}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def report(a, sparsity, mc, pt, pairs=()):
    """Print the tables of one configuration; return the summary figures."""
    print(f"\n=== VGG16 training step: batch {a.batch_size}, width {a.width}, float32, "
          f"sparsity {sparsity}, device {a.device}, minicnn conv route {a.conv} ===")
    for r in (mc, pt):
        if r:
            extra = f" {r['version']}" if "version" in r else ""
            workers = f" x {r['workers']} workers" if r.get("workers", 1) > 1 else ""
            print(f"{r['framework']}{extra}: {r['threads']} threads{workers}, load average at end "
                  f"{' '.join(f'{v:.1f}' for v in r['loadavg'])}")
    tr = {row["name"]: row for row in pt["rows"]} if pt else {}
    if mc["rows"]:
        print("\nper layer, median ms (mc = minicnn, pt = PyTorch; ratio = mc (fwd+bwd) / pt (fwd+bwd); "
              "gemm = minicnn's GEMMs alone on the layer's shapes and layouts)")
        print(f"{'layer':<14}{'type':<12}{'mc fwd':>9}{'pt fwd':>9}{'mc bwd':>9}{'pt bwd':>9}"
              f"{'ratio':>7}{'gemm':>9}")
        by_kind = {}
        for row in mc["rows"]:
            t = tr.get(row["name"])
            pf, pb = (t["fwd_ms"], t["bwd_ms"]) if t else (None, None)
            rt = ratio(row["fwd_ms"] + row["bwd_ms"], None if t is None else pf + pb)
            print(f"{row['name']:<14}{row['type']:<12}{fmt(row['fwd_ms'])}{fmt(pf)}{fmt(row['bwd_ms'])}"
                  f"{fmt(pb)}{fmt(rt, '.2f', 7)}{fmt(row['gemm_ms'])}")
            k = by_kind.setdefault(row["kind"], [0.0, 0.0, 0.0, 0.0, 0.0])
            k[0] += row["fwd_ms"]
            k[2] += row["bwd_ms"]
            k[4] += row["gemm_ms"] or 0.0
            if t:
                k[1] += pf
                k[3] += pb
        print("\nby layer type, summed ms")
        total = [0.0] * 5
        for kind, k in by_kind.items():
            total = [s + v for s, v in zip(total, k)]
            print(f"{kind:<26}{fmt(k[0])}{fmt(k[1] if tr else None)}{fmt(k[2])}{fmt(k[3] if tr else None)}"
                  f"{fmt(ratio(k[0] + k[2], (k[1] + k[3]) if tr else None), '.2f', 7)}{fmt(k[4] or None)}")
        print(f"{'sum of the per-layer times':<26}{fmt(total[0])}{fmt(total[1] if tr else None)}"
              f"{fmt(total[2])}{fmt(total[3] if tr else None)}"
              f"{fmt(ratio(total[0] + total[2], (total[1] + total[3]) if tr else None), '.2f', 7)}"
              f"{fmt(total[4])}")
        conv = by_kind.get("conv")
        if conv:
            print(f"conv time spent in GEMM: {100 * conv[4] / (conv[0] + conv[2]):.0f}%")

    print("\nend-to-end step (not instrumented), seconds")
    ms, ps = statistics.median(mc["step_s"]), statistics.median(pt["step_s"]) if pt else None
    for r in (mc, pt):
        if r:
            print(f"  {r['framework']:<14} median {statistics.median(r['step_s']):.3f}   min {min(r['step_s']):.3f}"
                  f"   steps {' '.join(f'{s:.3f}' for s in r['step_s'])}")
    paired = statistics.median(m / t for m, t in pairs) if pairs else None
    if pt:   # paired: the figure to compare; the minimum is the least disturbed step
        first = (f"{paired:.2f} (median of the {len(pairs)} ratios of steps taken in turn: the "
                 f"figure to compare), " if pairs else "")
        print(f"  ratio minicnn / torch: {first}{ms / ps:.2f} (medians), "
              f"{min(mc['step_s']) / min(pt['step_s']):.2f} (minima)")

    print("\npeak memory, MB (resident set of the worker process: peak over the whole run up to the "
          "end of the timed steps, and that peak minus the resident set after imports, model, "
          "optimizer and batch were created)")
    for r in (mc, pt):
        if r:
            dev = ""
            if r["gpu_pool_mb"] is not None:   # CuPy: memory pool size; torch: max_memory_allocated
                dev = f"   GPU {'pool' if 'CuPy' in r['framework'] else 'max allocated'} {r['gpu_pool_mb']:.0f}"
            print(f"  {r['framework']:<14} peak {r['peak_mb']:7.0f}"
                  f"   peak - base {r['peak_mb'] - r['rss_base_mb']:7.0f}"
                  f"   (after imports {r['rss_import_mb']:.0f}, base {r['rss_base_mb']:.0f}){dev}")
    mem_ratio = ratio(mc["peak_mb"], pt["peak_mb"]) if pt else None
    if pt:
        print(f"  ratio minicnn / torch: peak {mem_ratio:.2f}, "
              f"peak - base {ratio(mc['peak_mb'] - mc['rss_base_mb'], pt['peak_mb'] - pt['rss_base_mb']):.2f}")

    print(f"\nGEMM floor: {mc['gemm_flops'] / 1e9:.4g} GFLOP of minicnn's conv/linear GEMMs per step "
          f"(fwd, dW, dx; im2col or Winograd; 2*M*N*K each) / {mc['gemm_rate'] / 1e9:.0f} GFLOP/s "
          f"(xp.matmul float32 (512, 4608) x (4608, 8192) on every worker at once, best of 3) = "
          f"{mc['gemm_floor_s']:.3f} s")
    if mc["gemm_measured_s"] is not None:
        print(f"            the same GEMMs timed on their own shapes: {mc['gemm_measured_s']:.3f} s")
    print(f"            minicnn step / floor: {ms / mc['gemm_floor_s']:.2f}"
          + (f",  torch step / floor: {ps / mc['gemm_floor_s']:.2f}" if pt else ""))
    return {"sparsity": sparsity, "minicnn_step_s": ms, "torch_step_s": ps,
            "step_ratio": ratio(ms, ps), "step_ratio_paired": paired, "step_ratio_min": ratio(min(mc["step_s"]), min(pt["step_s"]) if pt else None),
            "peak_ratio": mem_ratio, "gemm_floor_s": mc["gemm_floor_s"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128, help="images per step (32x32, 3 channels, float32)")
    p.add_argument("--width", type=float, default=1.0, help="VGG16 channel multiplier")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median), and as many per-layer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0],
                   help="conv sparsity; several values run one after the other (e.g. 0 0.5)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="gpu: minicnn-CuPy against PyTorch-CUDA")
    p.add_argument("--no-torch", action="store_true", help="measure minicnn only")
    p.add_argument("--threads", type=int, default=0,
                   help="BLAS/OpenMP threads of both frameworks (0: the machine's default)")
    p.add_argument("--workers", type=int, default=0,
                   help="minicnn's CPU worker threads (backend.set_cpu_workers; 0: as run.py, the "
                        "thread budget of --threads or the environment, else every CPU; 1: off)")
    p.add_argument("--layers", action=argparse.BooleanOptionalAction, default=True,
                   help="per-layer table (costs --steps more steps and one pass of GEMMs)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the pair of measurements (minicnn, torch, minicnn, ...) on a noisy machine")
    p.add_argument("--paired", action=argparse.BooleanOptionalAction, default=True,
                   help="with PyTorch: both frameworks resident, taking turns (minicnn, torch, torch, "
                        "minicnn, ...; each turn an untimed then a timed step), so that a slow spell "
                        "of the machine hits both")
    p.add_argument("--conv", choices=["auto", "im2col"], default="auto",
                   help="minicnn's conv route: auto, each layer's own (minicnn.performance.winograd: "
                        "Winograd on wide small maps, im2col elsewhere); im2col, im2col everywhere")
    p.add_argument("--seed", type=int, default=0, help="model initialisation, batch and masks")
    p.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    p.add_argument("--worker", choices=["minicnn", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for s in a.sparsity:
        if not 0.0 <= s < 1.0:
            p.error(f"--sparsity must be in [0, 1), got {s}")
    if a.batch_size < 2 or a.width <= 0 or a.steps < 1 or a.warmup < 0 or a.threads < 0 or a.workers < 0 or a.rounds < 1:
        p.error("--batch-size >= 2, --width > 0, --steps >= 1, --warmup >= 0, --threads >= 0, --workers >= 0, --rounds >= 1")
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.worker:                     # inside a worker process: measure one framework, write JSON
        a.sparsity = a.sparsity[0]
        result = (run_minicnn if a.worker == "minicnn" else run_torch)(a)
        with open(a.worker_out, "w") as f:
            json.dump(result, f)
        return 0

    if a.device == "gpu":
        from minicnn import backend
        if not backend.gpu_available():
            print("--device gpu: no CuPy with a working CUDA GPU on this machine; "
                  "run it where there is one (the code path is minicnn-CuPy vs PyTorch-CUDA)", file=sys.stderr)
            return 2
    have_torch = False
    if not a.no_torch:
        import importlib.util
        have_torch = importlib.util.find_spec("torch") is not None
        if not have_torch:
            print("PyTorch is not installed: measuring minicnn only")
    print(f"machine: {os.cpu_count()} CPUs ({cpu_model()}), load average at start "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())} (other work on the machine adds noise)")
    results = []
    for s in a.sparsity:
        mcs, pts, pairs = [], [], []
        for _ in range(a.rounds):    # alternate the frameworks, so a busy spell hits both alike
            mc, pt, pr = run_round(a, s, have_torch)
            if mc is None:
                return 1
            mcs.append(mc)
            pts += [pt] if pt else []
            pairs += pr
        mc, pt = merge_rounds(mcs), merge_rounds(pts) if pts else None
        summary = report(a, s, mc, pt, pairs)
        results.append({"summary": summary, "minicnn": mcs, "torch": pts, "pairs": pairs})
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        config = {k: v for k, v in vars(a).items() if not k.startswith("worker")}
        with open(a.json, "w") as f:
            json.dump({"config": config, "runs": results}, f, indent=1)
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
