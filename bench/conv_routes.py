"""Benchmark: minicnn's VGG16 training step with its conv routes as chosen (Winograd on the wide
small-map layers, im2col elsewhere) against im2col everywhere, in one process.

    python bench/conv_routes.py                    # width 1.0, batch 128, 8 pairs of steps
    python bench/conv_routes.py --width 0.5 --steps 12

The two settings take turns step by step on the same model and batch (auto, im2col, im2col,
auto, ...), so that a slow spell of a shared machine hits both; the figure to compare is the
median of the ratios of neighbouring steps. The setting changes only
``minicnn.performance.WINOGRAD_MIN_PAIRS`` (infinite: no layer takes Winograd); the layers
listed are those that take it.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.train_step import cpu_model  # noqa: E402
from minicnn import backend, performance  # noqa: E402
from minicnn.layers import Conv2d  # noqa: E402
from minicnn.losses import CrossEntropyLoss  # noqa: E402
from minicnn.models import vgg16  # noqa: E402
from minicnn.optim import Adam  # noqa: E402
from minicnn.utils.conv import output_hw  # noqa: E402


def winograd_layers(model):
    """Names of the conv layers that take Winograd, from the input size of their last forward."""
    return [f"features.{i} ({m.in_channels}->{m.out_channels}, {m.input_hw[0]}x{m.input_hw[1]})"
            for i, m in enumerate(model.features)
            if isinstance(m, Conv2d) and performance.winograd(
                m.kernel_size, m.stride, m.padding, output_hw(m.input_hw, m.kernel_size, m.stride, m.padding),
                m.in_channels, m.out_channels)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=1.0, help="VGG16 channel multiplier")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each setting")
    args = ap.parse_args()
    if args.width <= 0 or args.batch_size < 2 or args.steps < 1:
        ap.error("--width > 0, --batch-size >= 2, --steps >= 1")
    rng = np.random.default_rng(0)
    model = vgg16(width=args.width, rng=rng)
    model.train()
    model.features[0].needs_input_grad = False              # as the trainer: no gradient for the image
    loss_fn, opt = CrossEntropyLoss(), Adam(model.parameters(), lr=1e-3)
    x = rng.standard_normal((args.batch_size, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, size=args.batch_size)
    print(f"machine: {os.cpu_count()} CPUs ({cpu_model()}), {backend.cpu_workers()} workers, "
          f"load average {os.getloadavg()[0]:.1f}")
    settings = {"auto": performance.WINOGRAD_MIN_PAIRS, "im2col": float("inf")}

    def step(setting):
        performance.WINOGRAD_MIN_PAIRS = settings[setting]
        t = time.perf_counter()
        opt.zero_grad()
        loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward())
        opt.step()
        return time.perf_counter() - t

    for s in settings:                                       # warm-up: buffers of both routes
        step(s)
    performance.WINOGRAD_MIN_PAIRS = settings["auto"]
    print("layers taking Winograd:", ", ".join(winograd_layers(model)) or "none")
    times = {s: [] for s in settings}
    for i in range(args.steps):
        for s in (("auto", "im2col") if i % 2 == 0 else ("im2col", "auto")):
            times[s].append(step(s))
    performance.WINOGRAD_MIN_PAIRS = settings["auto"]
    ratios = [a / b for a, b in zip(times["auto"], times["im2col"])]
    print(f"VGG16 width {args.width}, batch {args.batch_size}, float32, Adam; seconds per step, median of {args.steps}:")
    for s, t in times.items():
        print(f"  {s:<7} {statistics.median(t):.3f}   steps " + " ".join(f"{v:.3f}" for v in t))
    print(f"  auto / im2col: {statistics.median(ratios):.3f} (median of the ratios of neighbouring steps)")


if __name__ == "__main__":
    main()
