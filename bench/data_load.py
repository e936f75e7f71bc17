"""Benchmark: time and peak memory of data.load("cifar10") on a full-size archive.

Writes a random CIFAR-10 archive in the official format (50,000 + 10,000 images, the same
layout and about the size of the real 163 MB file, random pixels) to a temporary folder, then
loads it in a fresh process and reports wall time and peak resident memory, both for the
archive and for the extracted folder, plus channel_stats and one epoch of the Loader.

    python bench/data_load.py [--n-train 50000] [--n-test 10000]
"""
import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CHILD = r"""
import sys, time
import numpy as np
import data

def hwm():  # peak resident memory of this process in MB (VmHWM restarts at exec, ru_maxrss does not)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024

base = hwm()
t = time.perf_counter()
x, y = data.load("cifar10", sys.argv[1], "train")
t_load = time.perf_counter() - t
peak = hwm()
t = time.perf_counter()
mean, std = data.channel_stats(x)
t_stats = time.perf_counter() - t
t = time.perf_counter()
for xb, yb in data.Loader(x, y, 128, mean, std, train=True, seed=0):
    pass
t_epoch = time.perf_counter() - t
print(f"{x.shape} {x.dtype}: load {t_load:.2f} s, peak RSS {peak:.0f} MB "
      f"(after imports {base:.0f} MB, arrays {(x.nbytes + y.nbytes) / 2**20:.0f} MB); "
      f"channel_stats {t_stats:.2f} s; one Loader epoch (batch 128, flip+normalise) {t_epoch:.2f} s")
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=50000)
    p.add_argument("--n-test", type=int, default=10000)
    a = p.parse_args()
    from data import synthetic
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        batches = synthetic.random_cifar("cifar10", a.n_train, a.n_test)
        # 7 random bits per pixel: gzip then really codes the data (ratio ~0.9, the real archive's
        # is 163/178 = 0.92) instead of storing incompressible blocks, so inflating costs as much
        batches = {m: (x & 0xFE, y) for m, (x, y) in batches.items()}
        path = synthetic.write_cifar_archive(os.path.join(d, "cifar-10-python.tar.gz"), "cifar10",
                                             batches, compresslevel=1)
        del batches
        print(f"wrote {path} ({os.path.getsize(path) / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s")
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        print("archive:", end=" ", flush=True)
        subprocess.run([sys.executable, "-c", CHILD, d], check=True, env=env)
        with tarfile.open(path) as tf:
            tf.extractall(os.path.join(d, "x"), filter="data")
        print("folder: ", end=" ", flush=True)
        subprocess.run([sys.executable, "-c", CHILD, os.path.join(d, "x")], check=True, env=env)


if __name__ == "__main__":
    main()
