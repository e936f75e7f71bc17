"""Multiply-adds of a network's inference and training (docs/algorithm.md section 9).

RigL's convention (Evci et al. 2020, appendix H): count the multiply-adds of the convolutions
(active weights x output positions: every window multiplies every active entry, padding
included) and of the linear layers (dense); BatchNorm, ReLU and pooling are left out.

Legend: ``f_S`` the multiply-adds of one example's forward through the sparse network (from the
masks actually used), ``f_D`` the same network dense; ``E`` epochs, ``N`` examples per epoch,
``B`` the batch size, ``n_ev`` evolution steps. Per example seen, training costs ``3 f``
(forward, backward to the inputs, backward to the weights):

    dense                 3 f_D N E
    static, set           3 f_S N E
    rigl                  3 f_S N E + (f_D - f_S) b n_ev   (b: the examples of the batch whose
                                                            dense gradient feeds a step)
    ch2, ch3              3 f_S N E + the multiply-adds of the scoring's matrix products
                          (``cht.scores.ch_scores(..., macs=list)`` counts them as it runs)

Runs are reported as fractions of the dense run of the same recipe: ``f_S / f_D`` and
``training_macs(method, ...) / training_macs("dense", ...)``.
"""
import math
from dataclasses import dataclass

from minicnn import backend
from minicnn.layers import Conv2d, Linear
from minicnn.utils import conv
from cht.evolution import METHODS

TRAINING_METHODS = ("dense",) + METHODS


@dataclass(frozen=True)
class Layer:
    """A layer that multiplies, as the count sees it.

    Attributes:
        name: its weight's state_dict key (``features.0.weight``), the key of its mask.
        shape: the weight's shape, ``(C_out, C_in, kh, kw)`` or ``(out, in)``.
        positions: output positions per example: ``oh*ow`` for a conv, 1 for a linear layer
            (each position multiplies every active weight once).
    """
    name: str
    shape: tuple
    positions: int


def conv_layer(name, shape, input_hw, stride=1, padding=0):
    """A conv ``Layer`` with weight ``shape`` on an ``input_hw`` map: ``positions = oh*ow``."""
    stride, padding = conv.pair(stride, "stride", 1), conv.pair(padding, "padding", 0)
    oh, ow = conv.output_hw(input_hw, tuple(shape[2:]), stride, padding)
    return Layer(name, tuple(int(v) for v in shape), oh * ow)


def linear_layer(name, shape):
    """A linear ``Layer`` with weight ``shape`` ``(out, in)``: one position per example."""
    return Layer(name, tuple(int(v) for v in shape), 1)


def model_layers(model, input_shape):
    """The conv and linear layers of ``model``, in module order, for examples of ``input_shape``.

    ``input_shape``: one example's ``(C, H, W)``. One forward pass of a zero example, in eval
    mode (the modes are restored after), gives every conv its input size. Do not call it
    between a forward and its backward: the pass replaces the layers' caches.
    """
    modes = [(m, m.training) for _, m in model.named_modules()]
    p = model.parameters()[0].data                            # the dtype and device of the zero example
    x = backend.get_array_module(p).zeros((1,) + tuple(input_shape), dtype=p.dtype)
    try:
        model.eval()
        model.forward(x)
    finally:
        for m, mode in modes:
            m.training = mode
    layers = []
    for _, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, Conv2d):
            layers.append(conv_layer(w.name, w.data.shape, m.input_hw, m.stride, m.padding))
        elif isinstance(m, Linear):
            layers.append(linear_layer(w.name, w.data.shape))
    return layers


def forward_macs(layers, masks=None):
    """Multiply-adds of one example's forward: ``sum_l active_l * positions_l``.

    ``masks``: ``{weight key: bool mask of the weight's shape}`` (NumPy or CuPy), e.g.
    ``{l.name: l.mask for l in sparse_masks}`` or a checkpoint's ``mask.<key>`` arrays with the
    prefix dropped; a layer without a mask counts every weight (dense). None: ``f_D``.
    Returns a Python int.
    """
    masks = dict(masks or {})
    known = {l.name for l in layers}
    stray = sorted(set(masks) - known)
    if stray:
        raise ValueError(f"masks for weights that are not among the layers: {', '.join(stray)}")
    total = 0
    for l in layers:
        m = masks.get(l.name)
        if m is not None and tuple(m.shape) != l.shape:
            raise ValueError(f"{l.name}: mask of shape {tuple(m.shape)} for a weight of shape {l.shape}")
        active = math.prod(l.shape) if m is None else int(m.sum())
        total += active * l.positions                        # every position uses every active weight
    return total


def inference_fraction(layers, masks):
    """``f_S / f_D``: the sparse network's forward over the dense one's."""
    return forward_macs(layers, masks) / forward_macs(layers)


def training_macs(method, f_S, f_D, epochs, examples, batch_size, evolutions=0, scoring_macs=0):
    """Multiply-adds of a training run (see the module docstring for the formulas).

    Args:
        method: "dense", "static", "set", "ch2", "ch3" or "rigl".
        f_S, f_D: one example's sparse and dense forward (``forward_macs``).
        epochs: epochs trained; examples: examples seen per epoch; batch_size: ``B``.
        evolutions: evolution steps taken. RigL's step uses the dense gradient of the epoch's
            last batch, ``b = examples - B*(ceil(examples/B) - 1)`` examples.
        scoring_macs: ch2/ch3: the scoring's multiply-adds summed over every step and layer
            (what ``ch_scores(..., macs=...)`` counted); 0 for the other methods.
    Returns a Python int (or float when f_S, f_D are floats).
    """
    if method not in TRAINING_METHODS:
        raise ValueError(f"method must be one of {TRAINING_METHODS}, got {method!r}")
    if scoring_macs and method not in ("ch2", "ch3"):
        raise ValueError(f"{method} has no CH scoring; scoring_macs must be 0")
    if method == "dense":
        return 3 * f_D * examples * epochs
    total = 3 * f_S * examples * epochs + scoring_macs
    if method == "rigl":
        last = examples - batch_size * (math.ceil(examples / batch_size) - 1)
        total += (f_D - f_S) * last * evolutions             # the dense backward to the weights
    return total


def training_fraction(method, f_S, f_D, epochs, examples, batch_size, evolutions=0, scoring_macs=0):
    """``training_macs`` of the run over that of a dense run of the same recipe."""
    run = training_macs(method, f_S, f_D, epochs, examples, batch_size, evolutions, scoring_macs)
    return run / training_macs("dense", f_D, f_D, epochs, examples, batch_size)
