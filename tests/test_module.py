"""Module and Parameter: names given at registration, and load_state_dict with PyTorch's semantics."""
import numpy as np
import pytest

from cht.masks import SparseConvMasks
from minicnn.layers import BatchNorm2d, Conv2d, Linear, Module, Parameter, ReLU, Sequential
from minicnn.models import vgg16
from minicnn.optim import Adam
from torchref import import_torch


def small(seed=0, dtype=np.float32):
    return vgg16(width=0.0625, rng=np.random.default_rng(seed), dtype=dtype)


def param_keys(model):
    """The state_dict keys of the parameters (buffers left out), in order."""
    buffers = {f"{name}.{b}" if name else b for name, m in model.named_modules() for b in m._buffers}
    return [k for k in model.state_dict() if k not in buffers]


def own_params(model):
    """``[(expected key, Parameter)]`` read off the attributes, without ``parameters()``."""
    return [(f"{name}.{attr}" if name else attr, getattr(m, attr))
            for name, m in model.named_modules() for attr in ("weight", "bias")
            if isinstance(getattr(m, attr, None), Parameter)]


# ---------------------------------------------------------------- Parameter.name


def test_vgg16_names_are_state_dict_keys_once_built():
    model = small()
    named = own_params(model)                                    # parameters() never called
    assert [p.name for _, p in named] == [key for key, _ in named] == param_keys(model)
    assert model.features[0].weight.name == "features.0.weight"
    assert model.classifier[7].bias.name == "classifier.7.bias"
    model.features[0].weight.name = "renamed"                    # traversal names nothing
    model.parameters()
    model.named_parameters()
    model.state_dict()
    assert model.features[0].weight.name == "renamed"


def test_nested_sequentials_and_late_assignments():
    inner = Sequential(Conv2d(2, 3, 3), BatchNorm2d(3), ReLU())
    assert inner[0].weight.name == "0.weight"                   # named within what exists so far
    net = Sequential(Sequential(inner, ReLU()), Linear(4, 2))
    assert inner[0].weight.name == "0.0.0.weight" and net[1].bias.name == "1.bias"

    class Head(Module):
        def __init__(self):
            super().__init__()
            self.body = net
            self.scale = Parameter(np.ones(1))

    head = Head()
    head.body[1].extra = Parameter(np.zeros(2))                  # added after the tree was built
    head.tail = Sequential(Linear(2, 2))                         # a child added later
    expected = {"body.0.0.0.weight", "body.0.0.0.bias", "body.0.0.1.weight", "body.0.0.1.bias",
                "body.1.weight", "body.1.bias", "body.1.extra", "scale", "tail.0.weight", "tail.0.bias"}
    named = own_params(head) + [("scale", head.scale), ("body.1.extra", head.body[1].extra)]
    assert {p.name for _, p in named} == {key for key, _ in named} == expected == set(param_keys(head))
    assert [p.name for p in head.parameters()] == param_keys(head)


def test_masks_read_names_without_parameters_call():
    model = small()
    masks = SparseConvMasks(model, 0.5, np.random.default_rng(0))
    convs = [f"features.{i}.weight" for i, m in enumerate(model.features) if isinstance(m, Conv2d)]
    assert [l.name for l in masks.layers] == convs and len(convs) == 13


# ---------------------------------------------------------------- load_state_dict


def loaded_pair(dtype=np.float32):
    """(destination model, source state with other values): the source has trained a step."""
    src = small(seed=1, dtype=dtype)
    src.forward(np.random.default_rng(2).standard_normal((4, 3, 32, 32)).astype(dtype))
    return small(seed=0), {k: v.copy() for k, v in src.state_dict().items()}


def test_load_copies_into_the_same_arrays_and_leaves_grads():
    dst, state = loaded_pair()
    rng = np.random.default_rng(3)
    params = dst.parameters()
    for p in params:
        p.grad[...] = rng.standard_normal(p.grad.shape)
    grads = [(p.grad, p.grad.copy()) for p in params]
    arrays = dst.state_dict()
    view = dst.features[0].weight.data[0]                        # a view, as masks and optimizers hold
    opt = Adam(params, lr=0.1)
    opt.step()                                                   # optimizer state keyed by Parameter
    dst.load_state_dict(state)
    for k, v in dst.state_dict().items():
        assert v is arrays[k], k                                  # identity kept
        np.testing.assert_array_equal(v, state[k])
        assert v.dtype == state[k].dtype
    np.testing.assert_array_equal(view, state["features.0.weight"][0])
    assert dst.parameters() == params and set(opt.state) == set(params)
    for p, (g, g0) in zip(params, grads):
        assert p.grad is g
        np.testing.assert_array_equal(g, g0)                     # .grad untouched
    state["features.0.weight"][...] = 7                          # nothing shared with the caller
    assert not (dst.features[0].weight.data == 7).any()


def test_load_takes_the_dtype_given():
    dst, state32 = loaded_pair()
    state = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in state32.items()}
    p = dst.features[0].weight
    p.grad[...] = np.random.default_rng(4).standard_normal(p.grad.shape).astype(np.float32)
    g0 = p.grad.copy()
    dst.load_state_dict(state)
    for k, v in dst.state_dict().items():
        assert v.dtype == state[k].dtype, k
        np.testing.assert_array_equal(v, state[k])
    assert all(q.data.dtype == q.grad.dtype == np.float64 for q in dst.parameters())
    np.testing.assert_array_equal(p.grad, g0.astype(np.float64))   # cast, values kept
    state["features.0.weight"][...] = 7
    assert not (p.data == 7).any()                               # a copy, not the caller's array
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32))
    assert dst.eval().forward(x).dtype == np.float64


def test_load_refuses_a_wrong_shape_and_changes_nothing():
    dst, state = loaded_pair()
    before = {k: v.copy() for k, v in dst.state_dict().items()}
    state["classifier.7.weight"] = state["classifier.7.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"classifier\.7\.weight has shape \(10, 31\), expected \(10, 32\)"):
        dst.load_state_dict(state)
    with pytest.raises(ValueError, match="classifier.7.weight"):
        dst.load_state_dict({"classifier.7.weight": np.zeros((3, 3))}, strict=False)
    for k, v in dst.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_load_strict_keys():
    dst, state = loaded_pair()
    del state["features.0.bias"]
    state["features.0.extra"] = np.zeros(1)
    with pytest.raises(KeyError, match=r"missing keys \['features.0.bias'\], unexpected keys \['features.0.extra'\]"):
        dst.load_state_dict(state)
    before = dst.features[0].bias.data.copy()
    dst.load_state_dict(state, strict=False)                     # the rest loads, unknown keys ignored
    np.testing.assert_array_equal(dst.features[0].weight.data, state["features.0.weight"])
    np.testing.assert_array_equal(dst.features[0].bias.data, before)
    dst, state = loaded_pair()
    counts = {k: state.pop(k) for k in list(state) if k.endswith("num_batches_tracked")}
    dst.load_state_dict(state)                                   # checkpoints without the counters
    assert counts and all(v == 0 for k, v in dst.state_dict().items() if k in counts)


def test_load_accepts_torch_tensors():
    torch = import_torch()
    dst, state = loaded_pair()
    arrays = dst.state_dict()

    def tensors(dtype=None):  # parameters as a torch module holds them: leaves that require grad
        out = {}
        for k, v in state.items():
            t = torch.from_numpy(v.copy())
            out[k] = t.to(dtype).requires_grad_() if v.dtype.kind == "f" and dtype else t
        return out

    dst.load_state_dict(tensors(torch.float32))
    for k, v in dst.state_dict().items():
        assert v is arrays[k] and v.dtype == state[k].dtype, k
        np.testing.assert_array_equal(v, state[k])
    dst.load_state_dict(tensors(torch.float64))
    assert dst.features[0].weight.data.dtype == np.float64
    np.testing.assert_array_equal(dst.features[0].weight.data, state["features.0.weight"])
