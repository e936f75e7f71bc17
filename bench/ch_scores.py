"""Benchmark: CH3-L3n scoring of VGG16's 13 conv layers (32x32 inputs) against one training step.

    PYTHONPATH=. python bench/ch_scores.py [--densities 0.5 0.7] [--steps 2] [--no-step]

For each density (fraction of active kernel entries; sparsity = 1 - density) it draws the
masks of CHT_SPEC.md section 1 (exactly k = max(1, floor(density * C_in*9 + 0.5)) active entries
per filter), times ``cht.scores.ch_scores(..., method="ch3")`` per layer (fast path, NumPy),
then measures its peak memory in a second pass with ``tracemalloc`` (NumPy reports its array
allocations to tracemalloc; the figure is the peak of traced memory during the call above the
level before it). "cpu s" is the process CPU time (all threads): on a shared machine it shows the
work when the wall time is inflated by other jobs. The training step is one forward + backward +
optimizer step of VGG16 on a random batch of 128 float32 images: ``minicnn`` (vgg16,
CrossEntropyLoss, Adam) when it imports and runs, else a torch VGG16 (CPU) if torch is
installed; the script says which.
Target (CHT_SPEC.md / issue 5): all 13 layers within 8 training steps, under 1 GB peak.
"""
import argparse
import os
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cht.scores import ch_scores  # noqa: E402

# (C_in, C_out, input map) of VGG16's conv layers on 32x32 inputs; all 3x3, stride 1, padding 1
VGG16_CONVS = [(3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8),
               (256, 256, 8), (256, 256, 8), (256, 512, 4), (512, 512, 4), (512, 512, 4),
               (512, 512, 2), (512, 512, 2), (512, 512, 2)]


def random_mask(rng, c_out, c_in, density, k=3):
    """CHT_SPEC.md section 1: each filter holds exactly k active entries, a uniform subset."""
    fan_in = c_in * k * k
    active = max(1, int(np.floor(density * fan_in + 0.5)))
    order = np.argsort(rng.random((c_out, fan_in)), axis=1)        # a random permutation per row
    mask = np.zeros((c_out, fan_in), dtype=bool)
    np.put_along_axis(mask, order[:, :active], True, axis=1)
    return mask.reshape(c_out, c_in, k, k)


def score_layers(density, seed=0):
    """Wall and CPU (all threads) seconds and peak traced MiB of CH3 scoring per layer."""
    rng = np.random.default_rng(seed)
    rows = []
    for idx, (c_in, c_out, hw) in enumerate(VGG16_CONVS):
        mask = random_mask(rng, c_out, c_in, density)
        t, c = time.perf_counter(), time.process_time()
        scores = ch_scores(mask, (hw, hw), stride=1, padding=1, method="ch3")
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
        del scores
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        ch_scores(mask, (hw, hw), stride=1, padding=1, method="ch3")
        peak = (tracemalloc.get_traced_memory()[1] - base) / 2 ** 20
        tracemalloc.stop()
        rows.append(dict(layer=idx + 1, c_in=c_in, c_out=c_out, hw=hw, seconds=seconds, cpu=cpu,
                         peak_mib=peak))
    return rows


def _minicnn_step():
    """A closure running one minicnn VGG16 training step (raises if minicnn is not ready)."""
    from minicnn.losses import CrossEntropyLoss
    from minicnn.models import vgg16
    from minicnn.optim import Adam
    rng = np.random.default_rng(0)
    model = vgg16(num_classes=10)
    model.train()
    loss_fn, opt = CrossEntropyLoss(), Adam(model.parameters(), lr=0.01)
    x = rng.standard_normal((128, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, size=128)

    def step():
        opt.zero_grad()
        loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward())
        opt.step()
    return step


def _torch_step():
    """A closure running one torch VGG16 (CHT_SPEC.md section 6) training step on the CPU."""
    import torch
    from torch import nn
    layers, c_in = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            c_in = v
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, 512), nn.ReLU(), nn.BatchNorm1d(512),
                          nn.Linear(512, 512), nn.ReLU(), nn.BatchNorm1d(512), nn.Linear(512, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def time_training_step(n_steps):
    """(seconds per step: the median of n_steps after one warm-up step, which framework)."""
    for name, make in (("minicnn", _minicnn_step), ("torch (minicnn not usable)", _torch_step)):
        try:
            step = make()
            step()                                           # warm-up (allocations, caches)
        except Exception as err:                            # not written yet, or broken: fall back
            print(f"training step with {name.split()[0]} unavailable: {type(err).__name__}: {err}")
            continue
        times = []
        for _ in range(n_steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        return float(np.median(times)), name
    return None, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--steps", type=int, default=2, help="timed training steps (after one warm-up)")
    ap.add_argument("--no-step", action="store_true", help="skip the training-step timing")
    args = ap.parse_args()
    print(f"numpy {np.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    totals = {}
    for density in args.densities:
        rows = score_layers(density)
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
    step_s, name = time_training_step(args.steps)
    if step_s is None:
        print("\nno training step could be timed (neither minicnn nor torch usable)")
        return
    print(f"\none VGG16 training step (batch 128, float32, Adam) with {name}: {step_s:.2f} s")
    for density, total in totals.items():
        print(f"density {density:.2f} (sparsity {1 - density:.2f}): scoring all 13 layers = "
              f"{total / step_s:.2f} training steps (target <= 8)")


if __name__ == "__main__":
    main()
