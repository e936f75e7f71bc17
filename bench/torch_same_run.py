"""The same dense run in PyTorch: identical initial weights, batches and schedule (a check, not a test).

    python bench/torch_same_run.py --dataset fashion-mnist --width 0.25 --epochs 10 --seed 14

Builds minicnn's VGG16 exactly as ``run.py`` does for the seed (the same initial weights), copies
its state_dict into an equivalent ``torch.nn`` model, and trains it with ``torch.optim.Adam`` and
PyTorch's ``SequentialLR(LinearLR, LinearLR)`` on the batches of ``data.Loader`` with the same
seed. Prints the test accuracy per epoch. Compared with ``metrics.csv`` of
``python run.py --dataset fashion-mnist --method dense --width 0.25 --epochs 10 --seed 14``, it
tells a difference of implementation (a bug) from the noise of one seed: both runs start from the
same weights and see the same batches, so they should end within floating-point drift of each
other.

``--init torch`` starts instead from PyTorch's own initial weights for the seed (drawn from
torch's RNG): the same recipe trained by PyTorch alone, to compare the mean over seeds of the two
frameworks.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from bench.torch_vgg import to_torch
from cht.config import make_config
from cht.trainer import Trainer
from run import load_data


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--init", choices=("minicnn", "torch"), default="minicnn",
                   help="initial weights: minicnn's for the seed (default), or PyTorch's own "
                        "after torch.manual_seed(seed) (same batches either way)")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    cfg = make_config(dataset=a.dataset, method="dense", width=a.width, epochs=a.epochs, seed=a.seed,
                      limit_train=a.limit_train)
    trainer = Trainer(cfg, load_data(cfg, False), out=None)   # minicnn's model and loaders for this seed
    net = to_torch(trainer.model, copy_weights=a.init == "minicnn")
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    w = cfg["warmup_epochs"]
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=w),
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=max(1, cfg["epochs"] - w))],
        milestones=[w])
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, cfg["epochs"] + 1):
        t0, lr = time.perf_counter(), opt.param_groups[0]["lr"]
        net.train()
        for xb, yb in trainer.train_loader:
            opt.zero_grad()
            loss = loss_fn(net(torch.from_numpy(xb)), torch.from_numpy(yb))
            loss.backward()
            opt.step()
        net.eval()
        correct = total = 0
        with torch.no_grad():
            for xb, yb in trainer.test_loader:
                correct += int((net(torch.from_numpy(xb)).argmax(1).numpy() == yb).sum())
                total += len(yb)
        sched.step()
        print(f"epoch {epoch} lr {lr:.3g} test {100.0 * correct / total:.2f}% {time.perf_counter() - t0:.1f}s",
              flush=True)


if __name__ == "__main__":
    main()
