"""Benchmark: CH3-L3n scoring of VGG16's 13 conv layers (32x32 inputs) against one training step.

    PYTHONPATH=. python bench/ch_scores.py [--densities 0.5 0.7] [--steps 2] [--no-step]

For each density (fraction of active kernel entries; sparsity = 1 - density) it draws the masks
as training does (``cht.masks.random_mask``: exactly k = max(1, floor(density * C_in*9 + 0.5))
active entries per filter, docs/algorithm.md section 1), times
``cht.scores.ch_scores(..., method="ch3")`` per layer (fast path, NumPy), then measures its peak
memory in a second pass with ``tracemalloc`` (NumPy reports its array allocations to
tracemalloc; the figure is the peak of traced memory during the call above the level before it).
"cpu s" is the process CPU time (all threads): on a shared machine it shows the work when the
wall time is inflated by other jobs. The training step is one forward + backward + optimizer step
of minicnn's VGG16 (``vgg16``, ``CrossEntropyLoss``, ``Adam``) on a random batch of 128 float32
images; the scoring time is reported in units of that step.
"""
import argparse
import os
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cht.masks import random_mask  # noqa: E402
from cht.scores import ch_scores  # noqa: E402
from minicnn.layers import Conv2d  # noqa: E402
from minicnn.losses import CrossEntropyLoss  # noqa: E402
from minicnn.models import vgg16  # noqa: E402
from minicnn.optim import Adam  # noqa: E402


def vgg16_convs():
    """VGG16's 13 conv layers, as minicnn builds them, after one forward of a 32x32 image (which
    records each layer's input size)."""
    model = vgg16(rng=np.random.default_rng(0)).eval()
    model.forward(np.zeros((1, 3, 32, 32), np.float32))
    return [m for m in model.features if isinstance(m, Conv2d)]


def score_layers(convs, density, seed=0):
    """Wall and CPU (all threads) seconds and peak traced MiB of CH3 scoring per conv layer."""
    rng = np.random.default_rng(seed)
    rows = []
    for idx, conv in enumerate(convs):
        mask = random_mask(conv.weight.shape, 1.0 - density, rng)
        geometry = dict(input_hw=conv.input_hw, stride=conv.stride, padding=conv.padding, method="ch3")
        t, c = time.perf_counter(), time.process_time()
        scores = ch_scores(mask, **geometry)
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
        del scores
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        ch_scores(mask, **geometry)
        peak = (tracemalloc.get_traced_memory()[1] - base) / 2 ** 20
        tracemalloc.stop()
        rows.append(dict(layer=idx + 1, c_in=conv.in_channels, c_out=conv.out_channels,
                         hw=conv.input_hw[0], seconds=seconds, cpu=cpu, peak_mib=peak))
    return rows


def time_training_step(n_steps):
    """Seconds per VGG16 training step: the median of ``n_steps`` after one warm-up step."""
    rng = np.random.default_rng(0)
    model = vgg16(num_classes=10, rng=rng)
    model.train()
    loss_fn, opt = CrossEntropyLoss(), Adam(model.parameters(), lr=0.01)
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
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--steps", type=int, default=2, help="timed training steps (after one warm-up)")
    ap.add_argument("--no-step", action="store_true", help="skip the training-step timing")
    args = ap.parse_args()
    print(f"numpy {np.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    totals, convs = {}, vgg16_convs()
    for density in args.densities:
        rows = score_layers(convs, density)
        print(f"\nCH3 scoring, density {density:.2f} (sparsity {1 - density:.2f}): "
              f"seconds (wall) and peak memory (tracemalloc, NumPy allocations)")
        print(f"{'layer':>5} {'C_in->C_out':>12} {'map':>6} {'seconds':>8} {'cpu s':>7} {'peak MiB':>9}")
        for r in rows:
            print(f"{r['layer']:>5} {r['c_in']:>5}->{r['c_out']:<6} {r['hw']:>3}x{r['hw']:<2} "
                  f"{r['seconds']:>8.3f} {r['cpu']:>7.3f} {r['peak_mib']:>9.1f}")
        total, peak = sum(r["seconds"] for r in rows), max(r["peak_mib"] for r in rows)
        totals[density] = total
        print(f"total {total:.2f} s wall, {sum(r['cpu'] for r in rows):.2f} s CPU; "
              f"largest per-layer peak {peak:.1f} MiB")
    if args.no_step:
        return
    step_s = time_training_step(args.steps)
    print(f"\none VGG16 training step (batch 128, float32, Adam): {step_s:.2f} s")
    for density, total in totals.items():
        print(f"density {density:.2f} (sparsity {1 - density:.2f}): scoring all 13 layers = "
              f"{total / step_s:.2f} training steps")


if __name__ == "__main__":
    main()
