"""Benchmark: CH3-L3n and CH2-L3n scoring of VGG16's 13 conv layers (32x32 inputs) against one
training step of the same process.

    python bench/ch_scores.py                               # ch3 and ch2, density 0.5
    python bench/ch_scores.py --methods ch3 --densities 0.5 0.3 --steps 5

First the training step: one forward + backward + Adam step of minicnn's VGG16 (``vgg16``,
``CrossEntropyLoss``, ``Adam``, the first conv computing no gradient for the image, as the
trainer sets it) on a random batch of 128 float32 images; the median of ``--steps`` steps after
one warm-up. Then, as an evolution step does after training steps, the scoring: for each method
and density (fraction of active kernel entries; sparsity = 1 - density) the masks are drawn as
training draws them (``cht.masks.random_mask``: exactly k = max(1, floor(density * C_in*9 + 0.5))
active entries per filter, docs/algorithm.md section 1) and ``cht.scores.ch_scores`` (the fast
route) scores every layer in turn. Its total is reported in units of that step. "cpu s" is the
process CPU time (all threads): the work, where the wall time is inflated by other jobs.

Peak memory (``--peak``, a second pass): ``tracemalloc`` during each layer's scoring (NumPy
reports its array allocations to it), the peak of traced memory above the level before the call.

The floor (``--floor``, another pass): the multiply-adds of every matrix product of the scoring,
by precision (the common-neighbour counts are float32, exact as integers; the weighted sums
float64, to agree with the brute force to 1e-9), over the float32 and float64 GEMM rates of the
same machine measured with every worker multiplying at once, as the scoring runs its products:
the time no implementation of these products can beat, in units of the training step.
"""
import argparse
import os
import statistics
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.train_step import cpu_model, gemm_rate  # noqa: E402
from cht import fast_scores  # noqa: E402
from cht.masks import random_mask  # noqa: E402
from cht.scores import ch_scores  # noqa: E402
from minicnn import backend  # noqa: E402
from minicnn.layers import Conv2d  # noqa: E402
from minicnn.losses import CrossEntropyLoss  # noqa: E402
from minicnn.models import vgg16  # noqa: E402
from minicnn.optim import Adam  # noqa: E402


def time_training_step(model, n_steps, seed=0):
    """Seconds per VGG16 training step of ``model``: the median of ``n_steps`` after one warm-up."""
    rng = np.random.default_rng(seed)
    model.train()
    model.features[0].needs_input_grad = False          # as the trainer: no gradient for the image
    loss_fn, opt = CrossEntropyLoss(), Adam(model.parameters(), lr=1e-3)
    x = rng.standard_normal((128, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, size=128)

    def step():
        opt.zero_grad()
        loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward())
        opt.step()

    step()                                                   # warm-up (allocations, caches)
    times = []
    for _ in range(n_steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def score_layers(convs, method, density, seed=0, peak=False):
    """Per conv layer: wall and CPU (all threads) seconds of its scoring, and with ``peak`` the
    peak traced MiB of a second call."""
    rng = np.random.default_rng(seed)
    rows = []
    for idx, conv in enumerate(convs):
        mask = random_mask(conv.weight.shape, 1.0 - density, rng)
        geometry = dict(input_hw=conv.input_hw, stride=conv.stride, padding=conv.padding, method=method)
        t, c = time.perf_counter(), time.process_time()
        ch_scores(mask, **geometry)
        row = dict(layer=idx + 1, c_in=conv.in_channels, c_out=conv.out_channels, hw=conv.input_hw[0],
                   seconds=time.perf_counter() - t, cpu=time.process_time() - c, peak_mib=None)
        if peak:
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            ch_scores(mask, **geometry)
            row["peak_mib"] = (tracemalloc.get_traced_memory()[1] - base) / 2 ** 20
            tracemalloc.stop()
        rows.append(row)
    return rows


def product_flops(convs, method, density, seed=0):
    """``{dtype name: FLOPs}`` (2 per multiply-add) of the matrix products of scoring every
    layer, counted by wrapping ``cht.fast_scores._dot``, through which the scoring runs them all."""
    rng, flops, dot = np.random.default_rng(seed), {}, fast_scores._dot

    def counting_dot(a, b, macs, out=None):
        name = np.result_type(a.dtype, b.dtype).name
        flops[name] = flops.get(name, 0) + 2 * a.size * (b.size // b.shape[0])
        return dot(a, b, macs, out)

    fast_scores._dot = counting_dot
    try:
        for conv in convs:
            ch_scores(random_mask(conv.weight.shape, 1.0 - density, rng), conv.input_hw,
                      stride=conv.stride, padding=conv.padding, method=method)
    finally:
        fast_scores._dot = dot
    return flops


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", choices=["ch3", "ch2"], default=["ch3", "ch2"])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.5])
    ap.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    ap.add_argument("--peak", action=argparse.BooleanOptionalAction, default=True,
                    help="measure each layer's peak memory in a second pass")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                    help="count the products' FLOPs by precision and print the time they take at this "
                         "machine's GEMM rates")
    args = ap.parse_args()
    if args.steps < 1 or not all(0.0 < d <= 1.0 for d in args.densities):
        ap.error("--steps >= 1 and densities in (0, 1]")
    print(f"machine: {os.cpu_count()} CPUs ({cpu_model()}), {backend.cpu_workers()} workers, numpy "
          f"{np.__version__}, load average {os.getloadavg()[0]:.1f}")
    model = vgg16(rng=np.random.default_rng(0))
    step_s = time_training_step(model, args.steps)          # also records each conv's input size
    print(f"one VGG16 training step (batch 128, width 1.0, float32, Adam): {step_s:.3f} s "
          f"(median of {args.steps})")
    convs = [m for m in model.features if isinstance(m, Conv2d)]
    rates = {}
    for method in args.methods:
        for density in args.densities:
            rows = score_layers(convs, method, density, peak=args.peak)
            print(f"\n{method.upper()} scoring, density {density:.2f} (sparsity {1 - density:.2f}): seconds "
                  f"(wall, CPU of all threads) and peak memory (tracemalloc, NumPy allocations)")
            print(f"{'layer':>5} {'C_in->C_out':>12} {'map':>6} {'seconds':>8} {'cpu s':>7} {'peak MiB':>9}")
            for r in rows:
                peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
                print(f"{r['layer']:>5} {r['c_in']:>5}->{r['c_out']:<6} {r['hw']:>3}x{r['hw']:<2} "
                      f"{r['seconds']:>8.3f} {r['cpu']:>7.3f} {peak:>9}")
            total = sum(r["seconds"] for r in rows)
            peaks = [r["peak_mib"] for r in rows if r["peak_mib"] is not None]
            print(f"all 13 layers: {total:.2f} s wall ({sum(r['cpu'] for r in rows):.2f} s CPU) = "
                  f"{total / step_s:.2f} training steps" + (f"; largest peak {max(peaks):.0f} MiB" if peaks else ""))
            if args.floor:
                flops = product_flops(convs, method, density)
                for name in flops:
                    if name not in rates:
                        rates[name] = gemm_rate(np, lambda: None, dtype=name)
                floor = sum(flops[name] / rates[name] for name in flops)
                print("floor: " + " + ".join(f"{flops[n] / 1e9:.1f} GFLOP {n} / {rates[n] / 1e9:.0f} GFLOP/s"
                                             for n in sorted(flops)) +
                      f" = {floor:.2f} s = {floor / step_s:.2f} training steps (GEMM rates: xp.matmul "
                      f"(512, 4608) x (4608, 8192) on every worker at once, best of 3)")


if __name__ == "__main__":
    main()
