"""Write ``tests/strict_cupy_names.json``: what CuPy offers, read from CuPy's own namespace.

The strict stand-in ``tests/strict_cupy.py`` offers exactly these names: the functions, ufuncs
and other objects of ``cupy`` and of its submodules ``random``, ``linalg``, ``fft``, ``cuda``
and ``cuda.runtime``, the members of ``cupy.ndarray``, ``cupy.ufunc``, ``cupy.cuda.Device`` and
``cupy.random.Generator``, with the parameters of every function and method whose signature
CuPy exposes (Python functions through ``inspect``; Cython methods through the signature line
that Cython writes at the top of their docstrings).

CuPy imports without a GPU, so this runs anywhere. To regenerate (for another CuPy version,
change the pin here, in the file name's version check below and in ``bench/gpu_check.sh``):

    pip install --target /tmp/cupy-names cupy-cuda12x==14.2.0
    PYTHONPATH=/tmp/cupy-names python tests/make_strict_cupy_names.py
"""
import ast
import importlib
import inspect
import json
import os
import re
import sys
import types

import numpy

PIN = "14.2.0"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "strict_cupy_names.json")
SUBMODULES = ("random", "linalg", "fft", "cuda", "cuda.runtime")
_P = inspect.Parameter
KINDS = {_P.POSITIONAL_ONLY: "positional", _P.POSITIONAL_OR_KEYWORD: "either", _P.VAR_POSITIONAL: "*args",
         _P.KEYWORD_ONLY: "keyword", _P.VAR_KEYWORD: "**kwargs"}


def params_of(obj):
    """``[[name, kind, has_default], ...]`` of a callable, or None where CuPy exposes none."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return params_from_docstring(obj)
    return [[q.name, KINDS[q.kind], q.default is not q.empty] for q in sig.parameters.values()]


def params_from_docstring(obj):
    """The parameters of Cython's embedded signature line ``Class.name(self, a, b=None) -> T``."""
    first = (getattr(obj, "__doc__", None) or "").lstrip().split("\n", 1)[0]
    name = getattr(obj, "__name__", "")
    head = first.split(" -> ")[0]
    if not name or "(" not in head or not head.split("(", 1)[0].endswith(name) or not head.endswith(")"):
        return None
    # Cython types its arguments (``int axis=-1``, ``_ndarray_base b``): keep the names
    text = ", ".join(re.sub(r"^[\w.]+\s+(?=[*\w])", "", a.strip()) for a in head.split("(", 1)[1][:-1].split(","))
    try:
        args = ast.parse(f"def f({text}): pass").body[0].args
    except SyntaxError:
        return None
    out = [[a.arg, "positional", False] for a in args.posonlyargs]
    out += [[a.arg, "either", False] for a in args.args]
    for row, default in zip(reversed(out), reversed(args.defaults)):
        row[2] = True
    if args.vararg:
        out.append([args.vararg.arg, "*args", False])
    out += [[a.arg, "keyword", d is not None] for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        out.append([args.kwarg.arg, "**kwargs", False])
    return out


def namespace(mod, numpy_mod, ufunc_type):
    """Every public name of ``mod`` by kind. ``numpy``: the very object NumPy has under that name
    (CuPy re-exports NumPy's dtypes, scalar types, constants, ``finfo``...); ``class``: a class
    and where it is defined (``float_`` is ``numpy.float64``)."""
    out = {"numpy": [], "ufunc": {}, "function": {}, "class": {}, "module": [], "value": {}}
    for name in sorted(dir(mod)):
        if name.startswith("_"):
            continue
        obj = getattr(mod, name)
        if type(obj).__name__ == "_Feature":        # `from __future__ import annotations`
            continue
        if numpy_mod is not None and getattr(numpy_mod, name, None) is obj and not isinstance(obj, types.ModuleType):
            out["numpy"].append(name)
        elif isinstance(obj, types.ModuleType) or type(obj).__name__ == "_LazyModule":
            out["module"].append(name)
        elif ufunc_type is not None and isinstance(obj, ufunc_type):
            out["ufunc"][name] = {"nin": obj.nin, "nout": obj.nout}
        elif isinstance(obj, type):                    # where it comes from: numpy.float64, cupy...
            out["class"][name] = f"{obj.__module__}.{obj.__qualname__}"
        elif callable(obj):
            out["function"][name] = params_of(obj)
        elif isinstance(obj, (bool, int, float, str)) or obj is None:
            out["value"][name] = obj
        else:
            out["value"][name] = f"<{type(obj).__name__}>"
    return out


def members(cls):
    """``{name: params | "attribute"}`` of a class, dunders included (methods: their parameters)."""
    out = {}
    for name in sorted(dir(cls)):
        raw = inspect.getattr_static(cls, name)
        if callable(getattr(cls, name)) and not isinstance(raw, (property, staticmethod)) \
                and type(raw).__name__ not in ("getset_descriptor", "member_descriptor"):
            out[name] = params_of(getattr(cls, name))
        else:
            out[name] = "attribute"
    return out


def main():
    import cupy
    if cupy.__version__ != PIN:
        sys.exit(f"found CuPy {cupy.__version__}; this script writes the names of {PIN} (change PIN first)")
    data = {"cupy": cupy.__version__, "numpy": numpy.__version__,
            "python": ".".join(map(str, sys.version_info[:2])),
            "modules": {"": namespace(cupy, numpy, cupy.ufunc)}}
    for sub in SUBMODULES:
        numpy_mod = importlib.import_module(f"numpy.{sub}") if sub in ("random", "linalg", "fft") else None
        data["modules"][sub] = namespace(importlib.import_module(f"cupy.{sub}"), numpy_mod, cupy.ufunc)
    data["ndarray"] = members(cupy.ndarray)
    data["ufunc"] = sorted(n for n in dir(cupy.add) if not n.startswith("_"))
    data["cuda.Device"] = members(cupy.cuda.Device)
    data["random.Generator"] = members(cupy.random.Generator)
    with open(OUT, "w") as f:
        json.dump(data, f, indent=0, sort_keys=True)
        f.write("\n")
    print(f"wrote {OUT}: CuPy {cupy.__version__}, {len(data['modules']['']['function'])} functions, "
          f"{len(data['modules']['']['ufunc'])} ufuncs, {len(data['ndarray'])} ndarray members")


if __name__ == "__main__":
    main()
