"""Device choice: the one place that knows CuPy exists.

Every array routine in the project is written once against an array module ``xp`` (NumPy on
the CPU, CuPy on the GPU), as in Chainer and DeZero:

    xp = backend.get_array_module(x)      # the module that owns x
    y = xp.maximum(x, 0)

New arrays that belong to no input (parameters, masks, data batches) are created with NumPy and
moved with :func:`to_device`, or created with ``backend.xp`` (the module of the device chosen by
:func:`use`).

CuPy is imported in :func:`cupy_module` alone, on first need. The environment variable
``MINICNN_CUPY_MODULE`` names another module to import in its place (a test stand-in with
CuPy's interface); unset, CuPy is optional and the NumPy path works without it.
"""
import importlib
import os

import numpy

xp = numpy  # the array module of the current device; see use()

_UNSET = object()
_CUPY = _UNSET


def cupy_module():
    """The CuPy module, or None where it is not installed or has no working CUDA driver.

    Imported once, on the first call: ``MINICNN_CUPY_MODULE`` (default ``"cupy"``) names the
    module. A module named there explicitly must import: its ImportError is raised, not hidden.
    """
    global _CUPY
    if _CUPY is _UNSET:
        name = os.environ.get("MINICNN_CUPY_MODULE")
        if name:
            _CUPY = importlib.import_module(name)
        else:
            try:
                _CUPY = importlib.import_module("cupy")
            except Exception:  # ImportError, or a CuPy without a working CUDA driver
                _CUPY = None
    return _CUPY


def gpu_available():
    """True when CuPy imports and sees at least one CUDA device."""
    cupy = cupy_module()
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def use(device):
    """Select the device for new arrays: ``"cpu"`` (NumPy) or ``"gpu"`` (CuPy).

    Raises RuntimeError with a one-line message when the GPU is asked for but unusable.
    """
    global xp
    if device == "cpu":
        xp = numpy
    elif device == "gpu":
        if not gpu_available():
            raise RuntimeError("--device gpu needs CuPy with a working CUDA GPU; none was found")
        xp = cupy_module()
    else:
        raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'gpu'")
    return xp


def get_array_module(*arrays):
    """The array module (numpy or cupy) that owns the given arrays."""
    cupy = cupy_module()
    if cupy is not None:
        return cupy.get_array_module(*arrays)
    return numpy


def is_gpu_array(a):
    cupy = cupy_module()
    return cupy is not None and isinstance(a, cupy.ndarray)


def to_numpy(a):
    """A NumPy copy (or view) of ``a``, wherever it lives. Scalars pass through."""
    if is_gpu_array(a):
        return cupy_module().asnumpy(a)
    return numpy.asarray(a)


def to_device(a, device=None):
    """Move ``a`` to ``device`` (``"cpu"``/``"gpu"``; default: the one chosen by use())."""
    if device is None:
        device = "gpu" if xp is not numpy else "cpu"
    if device == "cpu":
        return to_numpy(a)
    cupy = cupy_module()
    if cupy is None:
        raise RuntimeError("CuPy is not installed")
    return cupy.asarray(a)


def device_of(a):
    """``"gpu"`` for a CuPy array, else ``"cpu"``."""
    return "gpu" if is_gpu_array(a) else "cpu"


def synchronize():
    """Wait for queued GPU work (for timing); a no-op on the CPU."""
    if xp is not numpy:
        cupy_module().cuda.Device().synchronize()
