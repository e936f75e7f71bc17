"""Layer-wise sparsity distributions of the conv layers (docs/algorithm.md section 8).

Legend: conv layer ``l`` with weight shape ``(C_out, C_in, kh, kw)``, ``F = C_in*kh*kw`` the
fan-in of one filter, ``n = C_out*F`` its weights, ``S`` the requested sparsity, ``d`` a layer's
density, ``k`` its active entries per filter. The *budget* is the set of layers whose active
weights must total ``(1 - S)`` of their weights: every conv layer, but the first one when it is
kept dense (``dense_first_layer``).

- ``uniform`` (the paper's): ``d = 1 - S`` for every budget layer.
- ``erk`` (Erdős–Rényi-Kernel, as in RigL): ``d = eps * (C_in + C_out + kh + kw) / n``, with
  ``eps`` such that ``sum_l d_l n_l = (1 - S) sum_l n_l`` over the budget; a layer whose density
  would exceed 1 is made dense and ``eps`` is solved again over the rest, until none exceeds 1.

Every filter then holds ``k = max(1, floor(d*F + 0.5))`` entries (section 1 with the layer's
density), so the achieved density of a layer is ``k / F`` and the achieved global density
differs from ``1 - S`` by at most half an entry per filter, except where ``k = 1`` is forced
(``d*F < 0.5``). A layer whose every entry is active (``k = F``, which ``d = 1`` gives, and so
may a density just below 1 after rounding) is *dense*: it gets no mask and never evolves (a full
mask has no disabled entry: its step could only regrow what it removed, at the cost of scoring).

Everything is computed from the weight shapes alone, so a distribution can be checked without
building a model; ``conv_densities`` takes a model's Conv2d layers.
"""
import math
from dataclasses import dataclass

DISTRIBUTIONS = ("uniform", "erk")


def filter_count(fan_in, density):
    """Active entries of one filter at ``density``: ``k = max(1, floor(density*F + 0.5))``.

    The half is rounded up as written even where binary floats fall just short of it:
    ``1 - 0.9`` is ``0.0999...98``, so ``(1 - 0.9) * 45`` is ``4.4999...`` (hence the ``1e-9``).
    """
    return max(1, math.floor(density * fan_in + 0.5 + 1e-9))


@dataclass(frozen=True)
class LayerDensity:
    """What a distribution gives one conv layer.

    Attributes:
        name: the weight's state_dict key (``features.0.weight``) or the layer's index.
        shape: ``(C_out, C_in, kh, kw)``.
        density: ``d``, the distribution's density for the layer (1.0 when made dense).
        k: active entries per filter, ``filter_count(F, d)`` (``F`` when dense).
        dense: every entry active (``k == F``): no mask, no evolution.
        in_budget: False only for a first layer kept dense by ``dense_first_layer``.
    """
    name: str
    shape: tuple
    density: float
    k: int
    dense: bool
    in_budget: bool

    @property
    def fan_in(self):
        """``F = C_in*kh*kw``."""
        return math.prod(self.shape[1:])

    @property
    def size(self):
        """``n = C_out*F``, the layer's weights."""
        return math.prod(self.shape)

    @property
    def active(self):
        """Active weights, ``C_out*k``."""
        return self.shape[0] * self.k

    @property
    def achieved(self):
        """The density the masks have: ``k / F``."""
        return self.k / self.fan_in


def erk_densities(shapes, density):
    """ERK densities of layers with ``shapes`` whose active weights total ``density`` of theirs.

    ``d_l = eps * (C_in + C_out + kh + kw) / n_l`` on the layers not yet dense, with
    ``eps = (density * sum n - sum_{dense} n) / sum_{not dense} (C_in + C_out + kh + kw)``
    (``d_l n_l = eps * (C_in + C_out + kh + kw)``). Each round makes dense every layer whose
    ``d_l`` exceeds 1 and solves ``eps`` again; making such a layer dense frees budget, so
    ``eps`` only grows and no layer leaves the dense set. (RigL makes only the layer of the
    largest ratio dense per round; since a layer over 1 stays over 1 as ``eps`` grows, both
    end with the same dense set.) Returns a list of float densities, 1.0 for dense layers.
    """
    n = [math.prod(s) for s in shapes]
    erk = [C_out + C_in + kh + kw for C_out, C_in, kh, kw in shapes]   # d_l n_l / eps
    budget = density * sum(n)
    dense, eps = set(), 0.0
    while len(dense) < len(shapes):
        rest = [l for l in range(len(shapes)) if l not in dense]
        eps = (budget - sum(n[l] for l in dense)) / sum(erk[l] for l in rest)
        over = {l for l in rest if eps * erk[l] > n[l]}                  # d_l > 1
        if not over:
            break
        dense |= over
    return [1.0 if l in dense else eps * erk[l] / n[l] for l in range(len(shapes))]


def layer_densities(shapes, sparsity, distribution="uniform", dense_first_layer=False, names=None):
    """Per-layer densities and per-filter counts of conv layers under a distribution.

    Args:
        shapes: the conv weights' shapes ``(C_out, C_in, kh, kw)``, in model order.
        sparsity: ``S`` in ``[0, 1)``; ``S = 0`` makes every layer dense.
        distribution: "uniform" or "erk".
        dense_first_layer: keep the first layer dense and out of the budget.
        names: one name per layer (default: the indices as strings).
    Returns: a list of ``LayerDensity``, one per layer, in the given order.
    """
    shapes = [tuple(int(v) for v in s) for s in shapes]
    names = [str(i) for i in range(len(shapes))] if names is None else [str(v) for v in names]
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not shapes:
        raise ValueError("no conv layer to distribute a density over")
    if len(names) != len(shapes):
        raise ValueError(f"{len(names)} names for {len(shapes)} layers")
    for s in shapes:
        if len(s) != 4 or min(s) < 1:
            raise ValueError(f"a conv weight shape is (C_out, C_in, kh, kw) of positive sizes, got {s}")
    first = 1 if dense_first_layer else 0                    # layers before the budget
    budget = shapes[first:]
    if distribution == "erk":
        d = erk_densities(budget, 1.0 - sparsity) if budget else []
    else:
        d = [1.0 - sparsity] * len(budget)
    out = []
    for i, (shape, name) in enumerate(zip(shapes, names)):
        dens = 1.0 if i < first else d[i - first]
        F = math.prod(shape[1:])
        k = filter_count(F, dens)
        out.append(LayerDensity(name, shape, dens, k, k == F, i >= first))
    return out


def conv_densities(convs, sparsity, distribution="uniform", dense_first_layer=False):
    """``layer_densities`` of a model's Conv2d layers (``convs``, in model order).

    The names are the weights' state_dict keys (``conv.weight.name``, set by
    ``model.named_parameters()``).
    """
    return layer_densities([c.weight.data.shape for c in convs], sparsity, distribution,
                           dense_first_layer, names=[c.weight.name for c in convs])


def achieved(plan):
    """The densities the masks of ``plan`` (a list of ``LayerDensity``) achieve.

    Returns ``{"global": active / weights over the budget layers (1.0 when the budget is
    empty: nothing is pruned), "conv": the same over every conv layer, "layers": {name: k/F}}``.
    """
    budget = [p for p in plan if p.in_budget]

    def fraction(layers):
        total = sum(p.size for p in layers)
        return sum(p.active for p in layers) / total if total else 1.0

    return {"global": fraction(budget), "conv": fraction(plan),
            "layers": {p.name: p.achieved for p in plan}}
