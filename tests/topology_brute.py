"""The topology measures of docs/algorithm.md section 7 counted by hand, for tests (small masks).

Nothing here uses ``cht.masks.topology_measures`` or array reductions over axes: every count
is a loop over filters ``o`` and input channels ``c``, as the definitions read.
"""
import math


def topology_by_hand(M):
    """``(channel_cv, empty_kernels, unused_inputs)`` of a bool ``(C_out, C_in, kh, kw)`` mask."""
    C_out, C_in = M.shape[:2]
    n = [[int(M[o, c].sum()) for c in range(C_in)] for o in range(C_out)]   # n[o][c]
    deg = [sum(n[o][c] for o in range(C_out)) for c in range(C_in)]          # deg[c]
    mean = sum(deg) / C_in
    std = math.sqrt(sum((d - mean) ** 2 for d in deg) / C_in)               # population std
    empty = sum(n[o][c] == 0 for o in range(C_out) for c in range(C_in)) / (C_out * C_in)
    return std / mean, empty, sum(d == 0 for d in deg)
