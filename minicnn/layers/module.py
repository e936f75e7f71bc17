"""Module, Parameter and Sequential: the containers every layer is built from.

A Module maps ``x -> y`` in ``forward`` and ``dy -> dx`` in ``backward``. Backward
*accumulates* (``+=``) into each Parameter's ``.grad``, so gradients of several backward
passes add up until ``zero_grad()``, as in PyTorch. Forward keeps exactly what backward needs
(the cache: ``save_for_backward``), and backward takes it once (``saved_for_backward``), so it
may be called once per forward; under ``minicnn.no_grad()`` forward keeps nothing.

Parameters, buffers and children register themselves on attribute assignment, in the order
they are assigned, so ``state_dict()`` keys and order are PyTorch's: own parameters, own
buffers, then children, joined with dots (``features.0.weight``). Registration also names
each Parameter by its key: a module built bottom-up (layers, then the containers that hold
them) ends with every ``Parameter.name`` equal to its state_dict key in the outermost module.
"""
from collections import OrderedDict

import numpy as np

from minicnn import backend
from minicnn.grad_mode import is_grad_enabled


class Parameter:
    """A trainable array.

    Attributes:
        data: the values, any shape.
        grad: the accumulated gradient dL/d(data), same shape and dtype, zero at creation.
        name: the state_dict key (``features.0.weight``), set when the Parameter is assigned
            to a module and extended each time that module is assigned to a parent.
    """

    def __init__(self, data, name=""):
        self.data = data
        self.grad = backend.get_array_module(data).zeros_like(data)
        self.name = name

    @property
    def shape(self):
        return self.data.shape

    def zero_grad(self):
        self.grad[...] = 0

    def __repr__(self):
        return f"Parameter(name={self.name!r}, shape={tuple(self.data.shape)}, dtype={self.data.dtype})"


class Module:
    """Base class: ``forward(x) -> y``, ``backward(dy) -> dx``, parameters, state_dict."""

    training = True

    def __init__(self):
        object.__setattr__(self, "_params", OrderedDict())
        object.__setattr__(self, "_buffers", [])
        object.__setattr__(self, "_children", OrderedDict())
        object.__setattr__(self, "_prefix", "")  # this module's key in its parent, plus "."
        object.__setattr__(self, "_saved", None)    # what forward kept for backward

    # -- registration ---------------------------------------------------------------------
    def __setattr__(self, key, value):
        if "_params" not in self.__dict__:
            raise AttributeError("call Module.__init__() before assigning attributes")
        if isinstance(value, Parameter):
            self._params[key] = value
            value.name = self._prefix + key
        elif isinstance(value, Module):
            self._children[key] = value
            value._set_prefix(f"{self._prefix}{key}.")
        object.__setattr__(self, key, value)

    def _set_prefix(self, prefix):
        """Name this module's Parameters, and its descendants', under ``prefix``."""
        object.__setattr__(self, "_prefix", prefix)
        for key, p in self._params.items():
            p.name = prefix + key
        for key, child in self._children.items():
            child._set_prefix(f"{prefix}{key}.")

    def register_buffer(self, name, array):
        """A state array that is saved and moved with the module but not trained."""
        if name not in self._buffers:
            self._buffers.append(name)
        object.__setattr__(self, name, array)

    # -- the two passes -------------------------------------------------------------------
    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    def save_for_backward(self, *values):
        """In forward: keep ``values`` (exactly what backward needs) for the next backward;
        nothing under ``minicnn.no_grad()``. Replaces what an earlier forward kept."""
        self._saved = values if is_grad_enabled() else None

    def saved_for_backward(self):
        """In backward: the values forward saved, as a tuple, handed over once (then dropped).

        RuntimeError when there are none: the forward ran under ``no_grad()``, or backward ran
        already.
        """
        saved, self._saved = self._saved, None
        if saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward: nothing saved by a forward; the last "
                               "forward ran under minicnn.no_grad(), or backward already ran")
        return saved

    # -- traversal ------------------------------------------------------------------------
    def named_children(self):
        return list(self._children.items())

    def named_modules(self, prefix=""):
        """Yield ``(name, module)`` for self and every descendant, depth first."""
        yield prefix, self
        for key, child in self._children.items():
            yield from child.named_modules(f"{prefix}.{key}" if prefix else key)

    def named_parameters(self, prefix=""):
        """``[(key, Parameter)]`` in state_dict order, keys relative to this module."""
        return [(f"{name}.{key}" if name else key, p)
                for name, module in self.named_modules(prefix) for key, p in module._params.items()]

    def parameters(self):
        """All trainable Parameters, in state_dict order."""
        return [p for _, p in self.named_parameters()]

    def zero_grad(self):
        for p in self.parameters():
            p.zero_grad()

    def train(self, mode=True):
        for _, m in self.named_modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    # -- state ----------------------------------------------------------------------------
    def _state_items(self):
        """``[(key, owner_module, attr_name, is_param)]`` in PyTorch's state_dict order."""
        items = []
        for name, module in self.named_modules():
            pre = f"{name}." if name else ""
            items += [(pre + k, module, k, True) for k in module._params]
            items += [(pre + k, module, k, False) for k in module._buffers]
        return items

    def state_dict(self):
        """``{key: array}``: parameters and buffers, the arrays themselves (not copies)."""
        out = OrderedDict()
        for key, module, attr, is_param in self._state_items():
            value = getattr(module, attr)
            out[key] = value.data if is_param else value
        return out

    def load_state_dict(self, state, strict=True):
        """Copy ``state`` (``{key: array}``) into the module's arrays, as PyTorch does.

        Each value is copied INTO the existing array, so whatever holds a reference to it (an
        optimizer's state, a sparse mask's layer, a view) keeps seeing the parameter; ``.grad``
        is left alone. The module takes the dtype of the arrays given: where a value's dtype
        differs from the array's (float64 weights for a gradient check), the parameter becomes
        a new array of that dtype and its ``.grad`` is cast (values kept). Values move to the
        device of the array they fill; NumPy/CuPy arrays, scalars and torch tensors are
        accepted. Keys must match exactly when ``strict`` (``num_batches_tracked`` may be
        absent, as in older checkpoints); shapes always (ValueError).
        """
        items = self._state_items()
        known = {key for key, *_ in items}
        if strict:
            unexpected = sorted(set(state) - known)
            missing = sorted(k for k in known - set(state) if not k.endswith("num_batches_tracked"))
            if unexpected or missing:
                raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        checked = []                     # every shape first: a refused state changes nothing
        for key, module, attr, is_param in items:
            if key not in state:
                continue
            old = getattr(module, attr)
            dst, src = (old.data if is_param else old), _as_array(state[key])
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"load_state_dict: {key} has shape {tuple(src.shape)}, "
                                 f"expected {tuple(dst.shape)}")
            checked.append((module, attr, old, dst, src, is_param))
        for module, attr, old, dst, src, is_param in checked:
            src = backend.to_device(src, backend.device_of(dst))
            if src.dtype == dst.dtype:
                dst[...] = src                               # in place: references stay valid
            elif is_param:
                old.data = src.copy()                        # never alias the caller's array
                old.grad = old.grad.astype(src.dtype)
            else:
                object.__setattr__(module, attr, src.copy())

    def to(self, device):
        """Move every parameter (and its gradient) and buffer to ``"cpu"`` or ``"gpu"``."""
        for _, module in self.named_modules():
            for p in module._params.values():
                p.data = backend.to_device(p.data, device)
                p.grad = backend.to_device(p.grad, device)
            for b in module._buffers:
                object.__setattr__(module, b, backend.to_device(getattr(module, b), device))
        return self

    def astype(self, dtype):
        """Cast every floating parameter and buffer to ``dtype`` (e.g. float64 for gradcheck)."""
        for _, module in self.named_modules():
            for p in module._params.values():
                p.data = p.data.astype(dtype)
                p.grad = p.grad.astype(dtype)
            for b in module._buffers:
                v = getattr(module, b)
                if v.dtype.kind == "f":
                    object.__setattr__(module, b, v.astype(dtype))
        return self

    def extra_repr(self):
        return ""

    def __repr__(self):
        if not self._children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"  ({k}): " + repr(c).replace("\n", "\n  ") for k, c in self._children.items()]
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"


def _as_array(v):
    """Accept NumPy/CuPy arrays, Python scalars and objects with ``.numpy()`` (torch tensors)."""
    if hasattr(v, "detach") and hasattr(v, "numpy"):
        v = v.detach().cpu().numpy()
    if backend.is_gpu_array(v):
        return v
    return np.asarray(v)


class Sequential(Module):
    """Chains modules: ``forward`` runs them in order, ``backward`` in reverse.

    Children are named ``"0"``, ``"1"``, ... so state_dict keys are ``"{index}.{param}"``
    exactly as PyTorch's ``nn.Sequential``.
    """

    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            setattr(self, str(i), layer)

    def __len__(self):
        return len(self._children)

    def __getitem__(self, i):
        return list(self._children.values())[i]

    def __iter__(self):
        return iter(self._children.values())

    def forward(self, x):
        for layer in self._children.values():
            x = layer.forward(x)
        return x

    def backward(self, dy):
        for layer in reversed(self._children.values()):
            dy = layer.backward(dy)
        return dy
