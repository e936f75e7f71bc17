"""Brute-force CH-L3n scores for tests: walk the local community node by node (slow; small layers).

Nothing here uses the matrix identities of docs/algorithm.md section 3: for an absent link (u, v)
every L3 path u - a - b - v is enumerated, LC is the set of its intermediate nodes, and
d, di, de are counted from adjacency sets exactly as the definitions read.
"""
import numpy as np

from cht.topology import conv_topology


def adjacency(edges_out, edges_in, n_out, n_in):
    """Neighbour sets: ``nbr[("o", u)]`` / ``nbr[("i", v)]`` -> set of ("i", v) / ("o", u) nodes."""
    nbr = {("o", u): set() for u in range(n_out)}
    nbr.update({("i", v): set() for v in range(n_in)})
    for u, v in zip(edges_out.tolist(), edges_in.tolist()):
        nbr[("o", u)].add(("i", v))
        nbr[("i", v)].add(("o", u))
    return nbr


def ch_pair(nbr, u, v):
    """Both CH-L3n scores of the absent link (u, v) (nodes as keys of ``nbr``): dict ch2/ch3."""
    assert v not in nbr[u], "scores are defined for absent links only"
    lc = set()
    for a in nbr[u]:                     # every L3 path u - a - b - v
        for b in nbr[a]:
            if v in nbr[b]:
                lc.update((a, b))
    ch2 = ch3 = 0.0
    for z in lc:
        d = len(nbr[z])
        di = len(nbr[z] & lc)
        de = d - di - (u in nbr[z]) - (v in nbr[z])
        ch3 += 1.0 / (1 + de)
        ch2 += (1.0 + di) / (1 + de)
    return {"ch2": ch2, "ch3": ch3}


def ch_matrix_brute(X):
    """Scores of every absent link of the 0/1 matrix X (rows outputs): dict ch2/ch3 of arrays."""
    X = np.asarray(X) != 0
    rows, cols = np.nonzero(X)
    nbr = adjacency(rows, cols, X.shape[0], X.shape[1])
    out = {m: np.zeros(X.shape) for m in ("ch2", "ch3")}
    for u in range(X.shape[0]):
        for v in range(X.shape[1]):
            if not X[u, v]:
                for m, s in ch_pair(nbr, ("o", u), ("i", v)).items():
                    out[m][u, v] = s
    return out


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def ch_scores_brute(mask, input_hw, stride=1, padding=0):
    """Window-averaged scores of a conv layer, by walking every (entry, window) link.

    Returns dict ch2/ch3 of float64 (C_out, C_in, kh, kw) arrays (0 on active entries).
    """
    mask = np.asarray(mask, dtype=bool)
    C_out, C_in, kh, kw = mask.shape
    (H, W), (sh, sw), (ph, pw) = _pair(input_hw), _pair(stride), _pair(padding)
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    ei, eo, n_in, n_out = conv_topology(mask, (H, W), (sh, sw), (ph, pw))
    nbr = adjacency(eo, ei, n_out, n_in)
    out = {m: np.zeros(mask.shape) for m in ("ch2", "ch3")}
    for o, c, dy, dx in zip(*np.nonzero(~mask)):
        total, n = {"ch2": 0.0, "ch3": 0.0}, 0
        for i in range(Ho):
            for j in range(Wo):
                y, x = i * sh + dy - ph, j * sw + dx - pw
                if 0 <= y < H and 0 <= x < W:
                    n += 1
                    s = ch_pair(nbr, ("o", o * Ho * Wo + i * Wo + j), ("i", c * H * W + y * W + x))
                    for m in total:
                        total[m] += s[m]
        for m in total:
            out[m][o, c, dy, dx] = total[m] / n if n else 0.0
    return out
