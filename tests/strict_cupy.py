"""A strict CuPy stand-in: CuPy's API and CuPy's refusals, computed by NumPy on the host.

``MINICNN_CUPY_MODULE=tests.strict_cupy`` makes ``minicnn.backend`` load this module in place of
``cupy`` (``backend.load_cupy()``), so ``--device gpu`` runs the GPU code path on a machine
without a GPU, and the mistakes that NumPy forgives but CuPy does not fail here as they would on
a GPU. Always import it as ``tests.strict_cupy`` (one module, one ``ndarray`` class).

What it offers: exactly the names of CuPy 14.2.0 (``strict_cupy_names.json``, written by
``make_strict_cupy_names.py`` from CuPy's own namespace): module functions and ufuncs, the
submodules ``random``, ``linalg``, ``fft``, ``cuda`` and ``cuda.runtime``, the members of
``ndarray``; calls are checked against CuPy's signatures where CuPy exposes them (``lexsort``
takes no ``axis``, ``ndarray.sum`` no ``where``, a ufunc only ``out``, ``dtype``, ``casting``).
Functions NumPy has and CuPy lacks are absent (``AttributeError``); functions CuPy has and NumPy
lacks, and those that need a real GPU (kernels, streams, memory), raise ``NotImplementedError``
unless written here. Each device array holds a private NumPy array: views, strides, ``out=``
and in-place operations behave as NumPy's, and so do the numbers (the stand-in's results equal
the NumPy path bit for bit when the same operations run in the same order).

What it refuses, as CuPy 14.2.0 does (``cupy/_core/core.pyx``, ``_kernel.pyx``, ``_scalar.pyx``,
``_routines_indexing.pyx``):

- implicit conversion to NumPy: ``__array__`` raises TypeError and there is no
  ``__array_interface__``, ``__array_struct__`` or buffer, so ``numpy.asarray(x)``,
  ``numpy.savez(f, w=x)``, ``numpy.array([x0, x1])`` raise TypeError; no ``__index__``;
- NumPy arrays (0-d ones included) as operands of ufuncs, operators and in-place operators
  (``TypeError: Unsupported type <class 'numpy.ndarray'>``); comparisons accept 0-d ones, as
  CuPy's do. NumPy scalars (``numpy.float32(2)``) and Python numbers are fine;
- NumPy arrays in module functions (all but the explicit conversions ``asarray``, ``array``,
  ``asanyarray``), as ``out=``, and as values of ``x[...] = v`` (ValueError as CuPy's ``fill``
  for basic indices; TypeError for advanced ones, where CuPy copies them to the device: stricter);
- a NumPy function on a device array dispatches (``__array_function__``, ``__array_ufunc__``) to
  the stand-in's function of the same name, as CuPy does; one that CuPy lacks raises TypeError.

What it allows, as CuPy does, and counts in ``transfers`` (count, bytes and the calling line):
device to host ``get()``, ``asnumpy``, ``float()``, ``int()``, ``bool()``, ``complex()``,
``item()``, ``tolist()``, ``tobytes()``, ``repr``/``str``/``format``, pickling; host to device
``asarray``/``array`` of host data, ``set()``, NumPy or list index arrays.

Like CuPy, reductions and integer indexing give 0-d device arrays, never NumPy scalars.
Not emulated: CuPy's wrap-around of out-of-bounds integer indices (NumPy raises), duplicate
indices in a scatter (CuPy's stored value is undefined), asynchrony (every call completes).
"""
import builtins as _builtins
import functools as _functools
import inspect as _inspect
import json as _json
import os as _os
import sys as _sys
import threading as _threading
import types as _types
import warnings as _warnings
import weakref as _weakref
from collections import deque as _deque

import numpy as _np

_NAMES = _json.load(open(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "strict_cupy_names.json")))
__version__ = _NAMES["cupy"]
_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
_SCALARS = (bool, int, float, complex, _np.generic)
# CuPy's names shadow builtins here (all, any, bool, max, min, abs, round, sum, pow, divmod):
# the code below calls the builtins as _builtins.all, ...


# -- transfers ------------------------------------------------------------------------------
class Transfers:
    """Copies between host and device since the last ``reset()``.

    ``d2h``, ``d2h_bytes``: device-to-host copies and their bytes; ``h2d``, ``h2d_bytes``: the
    other way. ``log[direction]``: the last 1000 copies as ``(what, bytes, "file:line")``, the
    line being the caller's outside this module and the backend.
    """

    def __init__(self):
        self._lock = _threading.Lock()
        self.reset()

    def reset(self):
        self.d2h = self.d2h_bytes = self.h2d = self.h2d_bytes = 0
        self.log = {"d2h": _deque(maxlen=1000), "h2d": _deque(maxlen=1000)}

    def record(self, direction, what, nbytes):
        where = _caller()
        with self._lock:
            if direction == "d2h":
                self.d2h += 1
                self.d2h_bytes += int(nbytes)
            else:
                self.h2d += 1
                self.h2d_bytes += int(nbytes)
            self.log[direction].append((what, int(nbytes), where))

    def lines(self, direction="d2h"):
        """The logged copies of one direction, one string each (for assertion messages)."""
        return [f"{what} {n} B at {where}" for what, n, where in self.log[direction]]


transfers = Transfers()


def _caller():
    """The line that asked for the copy: the first frame outside this module and the backend."""
    f = _sys._getframe(2)
    while f is not None and (f.f_code.co_filename == __file__ or
                             _os.path.join("minicnn", "backend") in f.f_code.co_filename):
        f = f.f_back
    if f is None:
        return "?"
    return f"{_os.path.relpath(f.f_code.co_filename, _ROOT)}:{f.f_lineno} ({f.f_code.co_name})"


# -- device memory (host memory underneath) -------------------------------------------------
class _MemoryPool:
    """``cupy.get_default_memory_pool()``: the bytes of the live device arrays that own memory."""

    def __init__(self):
        self._used = 0
        self._live = {}          # id(NumPy array) -> bytes

    def _alloc(self, a):
        if id(a) not in self._live:
            self._live[id(a)] = a.nbytes
            self._used += a.nbytes
            _weakref.finalize(a, self._free, id(a))

    def _free(self, key):
        self._used -= self._live.pop(key, 0)

    def used_bytes(self):
        return self._used

    def total_bytes(self):
        return self._used

    def free_bytes(self):
        return 0

    def free_all_blocks(self, stream=None):
        pass

    def n_free_blocks(self):
        return 0

    def set_limit(self, size=None, fraction=None):
        pass

    def get_limit(self):
        return 0


_POOL = _MemoryPool()
_PINNED_POOL = _MemoryPool()


def _wrap(a):
    """A device array holding the NumPy array ``a`` (not a copy)."""
    x = object.__new__(ndarray)
    x._a = a
    if a.base is None:
        _POOL._alloc(a)
    return x


def _unsupported(x):
    return TypeError(f"Unsupported type {type(x)} (strict CuPy stand-in: a NumPy array in a device "
                     f"operation is an implicit host-to-device copy, which CuPy refuses; use cupy.asarray)")


def _operand(x):
    """A ufunc operand: a device array's NumPy array, or a Python/NumPy scalar (CuPy's CScalar)."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _SCALARS):
        return x
    raise _unsupported(x) if isinstance(x, _np.ndarray) else TypeError(f"Unsupported type {type(x)}")


def _unwrap(obj):
    """Arguments of a module function or method: device arrays to their NumPy arrays, through
    lists, tuples and dicts; a NumPy array anywhere raises TypeError."""
    if isinstance(obj, ndarray):
        return obj._a
    if isinstance(obj, _np.ndarray):
        raise _unsupported(obj)
    if type(obj) in (list, tuple):
        return type(obj)(_unwrap(o) for o in obj)
    if type(obj) is dict:
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


def _devices_in(obj, found):
    """``{id(numpy array): device array}`` of the device arrays among the arguments."""
    if isinstance(obj, ndarray):
        found[id(obj._a)] = obj
    elif type(obj) in (list, tuple):
        for o in obj:
            _devices_in(o, found)
    elif type(obj) is dict:
        for o in obj.values():
            _devices_in(o, found)
    return found


def _wrap_result(r, given):
    """NumPy results as device results: arrays (the given device array where NumPy returned its
    own array, e.g. ``out=``), NumPy scalars as 0-d arrays (CuPy never returns NumPy scalars)."""
    if isinstance(r, _np.ndarray):
        return given.get(id(r)) if id(r) in given and given[id(r)]._a is r else _wrap(r)
    if isinstance(r, _np.generic):
        return _wrap(_np.asarray(r))
    if type(r) is tuple:
        return tuple(_wrap_result(x, given) for x in r)
    if type(r) is list:
        return [_wrap_result(x, given) for x in r]
    return r


class _Default:
    def __repr__(self):
        return "..."


_DEFAULT = _Default()      # a default value the names file does not record


def _signature(params):
    """An ``inspect.Signature`` from the recorded ``[[name, kind, has_default], ...]``, or None."""
    if params is None:
        return None
    P = _inspect.Parameter
    kinds = {"positional": P.POSITIONAL_ONLY, "either": P.POSITIONAL_OR_KEYWORD, "*args": P.VAR_POSITIONAL,
             "keyword": P.KEYWORD_ONLY, "**kwargs": P.VAR_KEYWORD}
    try:
        return _inspect.Signature([P(n, kinds[k], default=_DEFAULT if d else P.empty) for n, k, d in params])
    except ValueError:
        return None


def _check_call(name, sig, args, kwargs):
    if sig is not None:
        try:
            sig.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"cupy {name}{sig}: {e} (CuPy {__version__}'s signature)") from None


def _not_emulated(name):
    def f(*args, **kwargs):
        raise NotImplementedError(f"cupy {name} is not emulated by the strict CuPy stand-in")
    f.__name__ = name.rsplit(".", 1)[-1]
    return f


# -- ufuncs ---------------------------------------------------------------------------------
class ufunc:
    """A CuPy ufunc: ``f(*inputs, out=None, dtype=None, casting='same_kind')`` and nothing else."""

    _SCATTER = {"add", "subtract", "maximum", "minimum"}

    def __init__(self, name, nin, nout):
        self.__name__ = name
        self.name = f"cupy_{name}"
        self.nin, self.nout, self.nargs = nin, nout, nin + nout
        self._np = getattr(_np, name)

    @property
    def types(self):
        return getattr(self._np, "types", [])

    def __repr__(self):
        return f"<ufunc '{self.name}'>"

    def __call__(self, *args, out=None, dtype=None, casting="same_kind", **kwargs):
        if kwargs:
            raise TypeError(f"Wrong arguments {kwargs}")
        if not self.nin <= len(args) <= self.nargs:
            raise TypeError(f"Wrong number of arguments for {self.name!r}. It must be either {self.nin} "
                            f"or {self.nargs} (with outputs), but given {len(args)}.")
        ins = [_operand(a) for a in args[:self.nin]]
        outs = args[self.nin:]
        if out is not None:
            if outs:
                raise ValueError("Cannot specify 'out' as both a positional and keyword argument")
            outs = out if isinstance(out, tuple) else (out,)
        for o in outs:
            if not isinstance(o, ndarray):
                raise _unsupported(o) if isinstance(o, _np.ndarray) else TypeError(f"Unsupported type {type(o)}")
        if not isinstance(self._np, _np.ufunc):            # fix, i0, sinc: NumPy functions
            r = self._np(*ins)
            if outs:
                outs[0]._a[...] = r
                return outs[0]
            return _wrap_result(r, {})
        kw = {"casting": casting}
        if dtype is not None:
            kw["dtype"] = dtype
        if outs:
            self._np(*ins, out=tuple(o._a for o in outs), **kw)
            return outs[0] if self.nout == 1 else tuple(outs)
        return _wrap_result(self._np(*ins, **kw), {})

    def reduce(self, array, axis=0, dtype=None, out=None, keepdims=False):
        if self.__name__ == "add":
            return array.sum(axis, dtype, out, keepdims)
        if self.__name__ == "multiply":
            return array.prod(axis, dtype, out, keepdims)
        raise NotImplementedError(f"`{self.name}.reduce` is not supported yet")

    def accumulate(self, array, axis=0, dtype=None, out=None):
        if self.__name__ == "add":
            return array.cumsum(axis, dtype, out)
        if self.__name__ == "multiply":
            return array.cumprod(axis, dtype, out)
        raise NotImplementedError(f"`{self.name}.accumulate` is not supported yet")

    def reduceat(self, array, indices, axis=0, dtype=None, out=None):
        if self.__name__ != "add":
            raise NotImplementedError(f"`{self.name}.reduceat` is not supported yet")
        kw = {} if out is None else {"out": _unwrap(out)}
        return _wrap_result(_np.add.reduceat(_unwrap(array), _unwrap(indices), axis, dtype, **kw), {})

    def outer(self, A, B, **kwargs):
        A, B = _unwrap(A), _unwrap(B)      # CuPy copies NumPy operands here; refused (stricter)
        A, B = _wrap(_np.asarray(A)), _wrap(_np.asarray(B))
        return self(A.reshape(A.shape + (1,) * B.ndim), B.reshape((1,) * A.ndim + B.shape), **kwargs)

    def at(self, a, indices, b=None):
        if self.__name__ not in self._SCATTER:
            raise NotImplementedError(f"`{self.name}.at` is not supported yet")
        self._np.at(a._a, _index(indices), _operand(b))


# -- the array ------------------------------------------------------------------------------
def _index(slices):
    """An index for the NumPy array underneath: device arrays unwrapped; NumPy arrays and lists
    allowed (CuPy copies them to the device: counted host-to-device)."""
    items = slices if isinstance(slices, tuple) else (slices,)
    out = []
    for s in items:
        if isinstance(s, ndarray):
            s = s._a
        elif isinstance(s, (_np.ndarray, list)):
            s = _np.asarray(s)
            transfers.record("h2d", "index array", s.nbytes)
        out.append(s)
    return tuple(out) if isinstance(slices, tuple) else out[0]


def _advanced(idx):
    items = idx if isinstance(idx, tuple) else (idx,)
    return _builtins.any(isinstance(s, _np.ndarray) for s in items)


class _Flags:
    def __init__(self, a):
        self.c_contiguous = a.flags.c_contiguous
        self.f_contiguous = a.flags.f_contiguous
        self.owndata = a.flags.owndata

    def __getitem__(self, name):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "OWNDATA": self.owndata}[name]

    def __repr__(self):
        return (f"  C_CONTIGUOUS : {self.c_contiguous}\n  F_CONTIGUOUS : {self.f_contiguous}\n"
                f"  OWNDATA : {self.owndata}")


class _MemoryPointer:
    """``ndarray.data``: where the array lives (a host address underneath)."""

    def __init__(self, a):
        self.ptr = a.__array_interface__["data"][0]
        self.device_id = 0

    @property
    def device(self):
        return cuda.Device(0)


def _binary(ufname, reflected=False):
    def op(self, other):
        if getattr(other, "__array_ufunc__", False) is None:
            return NotImplemented
        f = getattr(_this, ufname)
        return f(other, self) if reflected else f(self, other)
    return op


def _inplace(ufname):
    def op(self, other):
        return getattr(_this, ufname)(self, other, out=self)
    return op


def _compare(ufname, none_value):
    def op(self, other):
        if isinstance(other, _np.ndarray) and other.ndim == 0:
            other = other.item()           # CuPy's workaround: a 0-d NumPy array compares as a scalar
        elif not isinstance(other, (ndarray, _np.ndarray) + _SCALARS):
            if getattr(other, "__array_ufunc__", False) is None:
                return NotImplemented
            if other is None or type(other).__eq__ is object.__eq__:
                return (_this.ones if none_value else _this.zeros)(self.shape, dtype=_np.bool_)
        return getattr(_this, ufname)(self, other)
    return op


def _view_property(name):
    """``x.real``, ``x.imag``: views on the device, assignable from device arrays and scalars."""
    def set_(self, value):
        setattr(self._a, name, _operand(value))
    return property(lambda self: _wrap(getattr(self._a, name)), set_)


def _via_host(convert):
    """``int(x)``, ``repr(x)``...: CuPy's, ``convert(x.get(), ...)``, a copy to the host."""
    def method(self, *args):
        return convert(self._to_host(f"{convert.__name__}()"), *args)
    return method


class ndarray:
    """``cupy.ndarray``: a device array (a NumPy array underneath, never handed out)."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("cupy.ndarray(memptr=, strides=) is not emulated by the stand-in")
        self._a = _np.empty(shape, dtype=dtype, order=order)
        _POOL._alloc(self._a)

    # -- refused: implicit conversion ----------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        raise BufferError("strict CuPy stand-in: device memory is not readable through DLPack on the host; "
                          "use .get()")

    def __dlpack_device__(self):
        return (2, 0)       # kDLCUDA, device 0

    def __array_ufunc__(self, uf, method, *inputs, **kwargs):
        """NumPy ufuncs on device arrays run the stand-in's ufunc of the same name (CuPy's rule)."""
        inout = inputs
        if "out" in kwargs:
            out = kwargs["out"]
            if len(out) != 1:
                raise ValueError("The 'out' parameter must have exactly one array value")
            inout += out
            kwargs["out"] = out[0]
        if method not in ("__call__", "outer", "at", "reduce", "accumulate", "reduceat"):
            return NotImplemented
        func = getattr(_this, uf.__name__, None)
        if func is None or (method != "__call__" and not hasattr(func, method)):
            return NotImplemented
        if method != "__call__":
            func = getattr(func, method)
        if not _builtins.all(isinstance(x, (ndarray, _np.ndarray) + _SCALARS) for x in inout):
            return NotImplemented
        if uf.__name__ in ("greater", "greater_equal", "less", "less_equal", "equal", "not_equal"):
            inputs = tuple(x.item() if isinstance(x, _np.ndarray) and x.ndim == 0 else x for x in inputs)
        return func(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        """``numpy.f(device array)`` runs the stand-in's ``f`` where CuPy has one (CuPy's rule)."""
        try:
            module = _functools.reduce(getattr, func.__module__.split(".")[1:], _this)
            f = getattr(module, func.__name__)
        except AttributeError:
            return NotImplemented
        if f is func or not _builtins.all(issubclass(t, (ndarray, _np.ndarray)) for t in types):
            return NotImplemented
        return f(*args, **kwargs)

    # -- allowed and counted: device to host -------------------------------------------------
    def _to_host(self, what):
        transfers.record("d2h", what, self._a.nbytes)
        return self._a

    def get(self, stream=None, order="C", out=None, blocking=True):
        """A host copy (a device-to-host transfer)."""
        a = self._to_host("get()")
        if out is not None:
            if not isinstance(out, _np.ndarray):
                raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
            _np.copyto(out, a)
            return out
        return _np.array(a, order=order, copy=True)

    def item(self):
        if self.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        return self._to_host("item()").item()

    def tolist(self):
        return self._to_host("tolist()").tolist()

    def tobytes(self, order="C"):
        return self._to_host("tobytes()").tobytes(order)

    def tofile(self, fid, sep="", format="%s"):
        self._to_host("tofile()").tofile(fid, sep, format)

    def dump(self, file):
        self._to_host("dump()").dump(file)

    def dumps(self):
        return self._to_host("dumps()").dumps()

    def __bool__(self):
        if self.size == 0:
            _warnings.warn("The truth value of an empty array is ambiguous. Returning False, but in "
                           "future this will result in an error. Use `array.size > 0` to check that an "
                           "array is not empty.", DeprecationWarning)
            return False
        if self.size > 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous. "
                             "Use a.any() or a.all()")
        return _builtins.bool(self._to_host("bool()"))

    __int__, __float__, __complex__ = _via_host(int), _via_host(float), _via_host(complex)
    __bytes__, __repr__, __str__, __format__ = _via_host(bytes), _via_host(repr), _via_host(str), _via_host(format)

    def __reduce__(self):
        return array, (self.get(order="A"),)

    # -- allowed and counted: host to device -------------------------------------------------
    def set(self, arr, stream=None):
        """Copy the host array ``arr`` (same shape and dtype) into this array."""
        if not isinstance(arr, _np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if self.shape != arr.shape:
            raise ValueError("Shape mismatch. Old shape: {}, new shape: {}".format(self.shape, arr.shape))
        transfers.record("h2d", "set()", arr.nbytes)
        self._a[...] = arr

    # -- attributes -------------------------------------------------------------------------
    @property
    def shape(self):
        return self._a.shape

    @shape.setter
    def shape(self, value):
        self._a.shape = value

    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    T = property(lambda self: _wrap(self._a.T))
    mT = property(lambda self: _wrap(self._a.mT))
    flags = property(lambda self: _Flags(self._a))
    data = property(lambda self: _MemoryPointer(self._a))
    device = property(lambda self: cuda.Device(0))

    @property
    def base(self):
        return _wrap(self._a.base) if isinstance(self._a.base, _np.ndarray) else None

    real, imag = _view_property("real"), _view_property("imag")

    # -- copies and views -------------------------------------------------------------------
    def copy(self, order="C"):
        return _wrap(self._a.copy(order))

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()          # on the device, as CuPy

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        return _wrap_result(self._a.astype(dtype, order, casting or "unsafe", copy=copy), {id(self._a): self})

    def view(self, dtype=None, array_class=None):
        if array_class is not None:
            raise NotImplementedError("ndarray.view(array_class=) is not emulated by the strict CuPy stand-in")
        return _wrap(self._a.view() if dtype is None else self._a.view(dtype))

    def fill(self, value):
        if isinstance(value, _np.ndarray):
            if value.ndim:
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            value = value.item()
        elif isinstance(value, ndarray):
            if value.ndim:
                raise ValueError("non-scalar cupy.ndarray cannot be used for fill")
            value = value._a
        self._a.fill(value)

    # -- container --------------------------------------------------------------------------
    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of unsized object")
        return len(self._a)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self._a)))

    def __getitem__(self, slices):
        idx = _index(slices)
        r = self._a[idx]
        if isinstance(r, _np.generic):      # an element: a 0-d view, as CuPy's (NumPy gives a scalar)
            r = self._a[(idx if isinstance(idx, tuple) else (idx,)) + (Ellipsis,)]
        return _wrap(r)

    def __setitem__(self, slices, value):
        idx = _index(slices)
        if isinstance(value, _np.ndarray) and value.ndim == 0:
            value = value.item()
        elif isinstance(value, (_np.ndarray, list, tuple)):
            if not _advanced(idx):
                raise ValueError(f"non-scalar {type(value).__module__}.{type(value).__name__} cannot be "
                                 f"used for fill (strict CuPy stand-in: copy host data with cupy.asarray)")
            raise _unsupported(value)
        elif isinstance(value, ndarray):
            value = value._a
        elif not isinstance(value, _SCALARS):
            raise TypeError(f"Unsupported type {type(value)}")
        self._a[idx] = value

    # -- operators (CuPy's: ufuncs, so NumPy operands are refused; see _install_operators) --
    __rpow__, __ipow__ = _binary("power", True), _inplace("power")
    __lt__, __le__ = _compare("less", False), _compare("less_equal", False)
    __gt__, __ge__ = _compare("greater", False), _compare("greater_equal", False)
    __eq__, __ne__ = _compare("equal", False), _compare("not_equal", True)

    def __pow__(self, other, modulo=None):
        if modulo is not None:
            raise NotImplementedError("pow() with modulo is not supported")
        return _binary("power")(self, other)

    def __neg__(self):
        return _this.negative(self)

    def __pos__(self):
        return _this.positive(self)

    def __abs__(self):
        return _this.absolute(self)

    def __invert__(self):
        return _this.invert(self)

    # the other methods of CuPy's ndarray (sum, reshape, transpose, ...) are added below,
    # delegating to NumPy's with CuPy's signatures


def _install_operators():
    """``x + y``, ``y + x``, ``x += y`` and the like, by CuPy's ufuncs (no ``@=``: CuPy has none)."""
    ops = {"add": "add", "sub": "subtract", "mul": "multiply", "truediv": "true_divide",
           "floordiv": "floor_divide", "mod": "remainder", "and": "bitwise_and", "or": "bitwise_or",
           "xor": "bitwise_xor", "lshift": "left_shift", "rshift": "right_shift", "divmod": "divmod",
           "matmul": "matmul"}
    for op, uf in ops.items():
        setattr(ndarray, f"__{op}__", _binary(uf))
        setattr(ndarray, f"__r{op}__", _binary(uf, True))
        if op not in ("divmod", "matmul"):
            setattr(ndarray, f"__i{op}__", _inplace(uf))


_install_operators()


def _method(name, params):
    """An ndarray method of CuPy's list, run by NumPy's method (or function) of that name."""
    sig = _signature(params)
    np_method = getattr(_np.ndarray, name, None)
    np_function = getattr(_np, name, None)

    def method(self, *args, **kwargs):
        _check_call(f"ndarray.{name}", sig, (self,) + args, kwargs)
        given = _devices_in((args, kwargs), {id(self._a): self})
        args, kwargs = _unwrap(args), _unwrap(kwargs)
        r = np_method(self._a, *args, **kwargs) if np_method else np_function(self._a, *args, **kwargs)
        return _wrap_result(r, given)

    method.__name__ = name
    return method


def _install_ndarray_methods():
    own = set(vars(ndarray))
    for name, params in _NAMES["ndarray"].items():
        if name in own or name.startswith("_") or params == "attribute":
            continue
        if hasattr(_np.ndarray, name) or callable(getattr(_np, name, None)):
            setattr(ndarray, name, _method(name, params))
        else:                                                  # reduced_view, toDlpack, scatter_*...
            setattr(ndarray, name, _not_emulated(f"ndarray.{name}"))
    for name in ("flat", "cstruct", "mdspan"):
        setattr(ndarray, name, property(lambda self, n=name: _not_emulated(f"ndarray.{n}")()))


_install_ndarray_methods()


# -- module functions -----------------------------------------------------------------------
def _function(qualname, np_func, params):
    """A module function of CuPy's list, run by NumPy's namesake on the arrays underneath."""
    sig = _signature(params)
    name = qualname.rsplit(".", 1)[-1]

    def f(*args, **kwargs):
        _check_call(qualname, sig, args, kwargs)
        given = _devices_in((args, kwargs), {})
        if name in _TO_HOST:                                       # CuPy saves/prints a host copy
            for x in given.values():
                x._to_host(f"{name}()")
        r = np_func(*_unwrap(args), **_unwrap(kwargs))
        if name in _DEVICE_SCALAR and isinstance(r, (bool, int, float)):   # CuPy returns 0-d arrays
            r = _np.asarray(r)
        if name in _FROM_HOST and isinstance(r, _np.ndarray):
            transfers.record("h2d", f"{name}()", r.nbytes)
        return _wrap_result(r, given)

    f.__name__ = qualname.rsplit(".", 1)[-1]
    f.__qualname__ = qualname
    return f


def _host_data(obj, dtype, order, copy):
    """``asarray``/``array`` of host data: a device copy (host-to-device, counted); of device
    arrays: on the device, no transfer."""
    if isinstance(obj, ndarray):
        r = _np.array(obj._a, dtype=dtype, order=order, copy=copy)
        return obj if r is obj._a else _wrap(r)
    if type(obj) in (list, tuple) and _devices_in(obj, {}):
        return _wrap(_np.array(_unwrap(obj), dtype=dtype, order=order))      # stacked on the device
    a = _np.array(obj, dtype=dtype, order=order, copy=True)
    transfers.record("h2d", "asarray()", a.nbytes)
    return _wrap(a)


def asarray(a, dtype=None, order=None, *, copy=None, blocking=False):
    """A device array from a device array (as it is when nothing changes) or from host data (a copy)."""
    if copy is False and not isinstance(a, ndarray):
        raise ValueError("copy=False: host data cannot reach the device without a copy")
    return _host_data(a, dtype, order or "K", copy)


def asanyarray(a, dtype=None, order=None, *, copy=None, blocking=False):
    return asarray(a, dtype, order, copy=copy)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    r = _host_data(obj, dtype, order, True if copy else None)
    return r if ndmin <= r.ndim else r.reshape((1,) * (ndmin - r.ndim) + r.shape)


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    """A host copy of a device array (a device-to-host transfer); host data as ``numpy.asarray``."""
    if isinstance(a, ndarray):
        return a.get(stream, order, out, blocking)
    a = _np.asarray(a, order=order)
    if out is not None:
        out[...] = a
        return out
    return a


def get_array_module(*args):
    """This module when any argument is a device array, else NumPy."""
    return _this if _builtins.any(isinstance(a, ndarray) for a in args) else _np


def is_available():
    return True


def get_default_memory_pool():
    return _POOL


def get_default_pinned_memory_pool():
    return _PINNED_POOL


def fuse(*args, **kwargs):
    """``cupy.fuse``: the function itself (fusing kernels changes no result)."""
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda f: f


_ALIASES = {  # CuPy functions whose NumPy namesake is gone in NumPy 2: what they compute
    "alltrue": _np.all, "sometrue": _np.any, "product": _np.prod, "cumproduct": _np.cumprod,
    "round_": _np.round, "trapz": _np.trapezoid, "msort": lambda a: _np.sort(a, axis=0),
    "in1d": lambda a, b, assume_unique=False, invert=False: _np.isin(_np.ravel(a), b, assume_unique, invert),
    "asfarray": lambda a, dtype=_np.float64: _np.asarray(a, dtype if _np.dtype(dtype).kind in "fc"
                                                         else _np.float64),
}
_DEVICE_SCALAR = {"count_nonzero", "array_equal", "array_equiv", "allclose"}
_TO_HOST = {"save", "savez", "savez_compressed", "savetxt", "array_repr", "array_str", "array2string"}
_FROM_HOST = {"load", "loadtxt", "genfromtxt", "fromfile", "frombuffer", "fromstring", "fromiter"}
_OWN = {"asarray": asarray, "asanyarray": asanyarray, "array": array, "asnumpy": asnumpy,
        "get_array_module": get_array_module, "is_available": is_available, "fuse": fuse,
        "get_default_memory_pool": get_default_memory_pool,
        "get_default_pinned_memory_pool": get_default_pinned_memory_pool}


def _populate(module, names, numpy_module, prefix):
    """Set on ``module`` every name CuPy's namespace ``names`` has."""
    for name in names["numpy"]:
        setattr(module, name, getattr(numpy_module, name))
    for name, info in names["ufunc"].items():
        setattr(module, name, ufunc(name, info["nin"], info["nout"]))
    for name, params in names["function"].items():
        target = _ALIASES.get(name) or (getattr(numpy_module, name, None) if numpy_module else None)
        f = _OWN.get(name) if module is _this else None
        if f is None:
            f = (_function(f"{prefix}{name}", target, params) if callable(target)
                 else _not_emulated(f"{prefix}{name}"))
        setattr(module, name, f)
    for name, where in names["class"].items():
        mod, _, qual = where.rpartition(".")
        if mod.split(".")[0] == "numpy":                   # float_ is numpy.float64, AxisError...
            setattr(module, name, getattr(_import(mod), qual))
        elif not hasattr(module, name):
            setattr(module, name, _not_emulated(f"{prefix}{name}"))
    for name, value in names["value"].items():
        setattr(module, name, value if not isinstance(value, str) or not value.startswith("<")
                else _not_emulated(f"{prefix}{name}"))


def _import(name):
    __import__(name)
    return _sys.modules[name]


_this = _sys.modules[__name__]


# -- cuda -----------------------------------------------------------------------------------
class _Device:
    """``cupy.cuda.Device``: the one stand-in device (id 0)."""

    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            raise RuntimeError("cudaErrorInvalidDevice: invalid device ordinal (the stand-in has one device)")

    def synchronize(self):
        """Every stand-in operation has completed when it returns: nothing to wait for."""

    def use(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    compute_capability = "90"

    @property
    def mem_info(self):
        return (8 << 30) - _POOL.used_bytes(), 8 << 30

    def __int__(self):
        return self.id

    def __eq__(self, other):
        return isinstance(other, _Device) and other.id == self.id

    __hash__ = object.__hash__

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


cuda = _types.ModuleType(f"{__name__}.cuda", "The CUDA side of the strict CuPy stand-in.")
cuda.runtime = _types.ModuleType(f"{__name__}.cuda.runtime")
random = _types.ModuleType(f"{__name__}.random")
linalg = _types.ModuleType(f"{__name__}.linalg")
fft = _types.ModuleType(f"{__name__}.fft")

_RUNTIME = {
    "getDeviceCount": lambda: 1,
    "getDevice": lambda: 0,
    "setDevice": lambda device: _Device(device) and None,
    "deviceSynchronize": lambda: None,
    "runtimeGetVersion": lambda: 12080,
    "driverGetVersion": lambda: 12080,
    "memGetInfo": lambda: _Device().mem_info,
    "getDeviceProperties": lambda device: {"name": b"strict CuPy stand-in (NumPy on the host)",
                                           "totalGlobalMem": 8 << 30, "major": 9, "minor": 0,
                                           "multiProcessorCount": 1},
}


def _install_submodules():
    _populate(_this, _NAMES["modules"][""], _np, "")
    _populate(random, _NAMES["modules"]["random"], _np.random, "random.")
    _populate(linalg, _NAMES["modules"]["linalg"], _np.linalg, "linalg.")
    _populate(fft, _NAMES["modules"]["fft"], _np.fft, "fft.")
    _populate(cuda, _NAMES["modules"]["cuda"], None, "cuda.")
    _populate(cuda.runtime, _NAMES["modules"]["cuda.runtime"], None, "cuda.runtime.")
    for name, f in _RUNTIME.items():
        setattr(cuda.runtime, name, f)
    cuda.Device = _Device
    cuda.is_available = lambda: True
    cuda.get_device_id = lambda: 0
    _this.ndarray = ndarray
    _this.ufunc = ufunc
    for name in ("random", "linalg", "fft", "cuda"):
        setattr(_this, name, globals()[name])
    random.default_rng = _default_rng


class _Generator:
    """``cupy.random.Generator``: CuPy's methods, NumPy's generator underneath (its stream, not CuPy's)."""

    def __init__(self, rng):
        self._rng = rng


def _generator_method(name, params):
    sig = _signature(params)

    def method(self, *args, **kwargs):
        _check_call(f"random.Generator.{name}", sig, (self,) + args, kwargs)
        given = _devices_in((args, kwargs), {})
        return _wrap_result(getattr(self._rng, name)(*_unwrap(args), **_unwrap(kwargs)), given)
    method.__name__ = name
    return method


for _name, _params in _NAMES["random.Generator"].items():
    if not _name.startswith("_") and _params != "attribute" and hasattr(_np.random.Generator, _name):
        setattr(_Generator, _name, _generator_method(_name, _params))


def _default_rng(seed=None):
    return _Generator(_np.random.default_rng(seed))


_install_submodules()


def __getattr__(name):
    if not name.startswith("__") and hasattr(_np, name):
        raise AttributeError(f"module 'cupy' (strict stand-in of CuPy {__version__}) has no attribute "
                             f"{name!r}: NumPy has it, CuPy does not")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
