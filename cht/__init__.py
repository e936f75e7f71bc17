"""cht: Cannistraci-Hebb dynamic sparse training of conv layers (CHT-Conv).

- ``cht.masks``: per-filter masks shared by all sliding windows, and their invariants.
- ``cht.topology``: the layer's bipartite graph drawn by the sliding windows (paper Fig. 1).
- ``cht.scores``: CH2-L3n / CH3-L3n link prediction on that graph, averaged over windows.
- ``cht.evolution``: remove by magnitude, score, regrow (set, ch2, ch3, rigl).
- ``cht.density``: layer-wise densities (uniform, ERK, dense first layer) and per-filter counts.
- ``cht.flops``: multiply-adds of inference and training, as fractions of the dense network's.
- ``cht.trainer``: the training loop of the paper's experiments (used by ``run.py``).
- ``cht.rundir``: the run directory's files, written so that a fault loses nothing, read with checks.
- ``cht.runlock``: one process per run directory (``run.lock``).
- ``cht.config``: the per-dataset presets and the checks of every setting.
- ``cht.report``: a folder of runs as the paper's Table 1 (``python -m cht.report``).
- ``cht.sweep``: grids of runs on this machine or a Ray cluster (``python -m cht.sweep``).
- ``cht.study``: one training step and one evolution step taken apart (``python -m cht.study``).
"""
from cht.scores import ch_scores
from cht.topology import conv_topology

__all__ = ["ch_scores", "conv_topology"]
