"""Device choice: the one place that knows CuPy exists.

Every array routine in the project is written once against an array module ``xp`` (NumPy on
the CPU, CuPy on the GPU), as in Chainer and DeZero:

    xp = backend.get_array_module(x)      # the module that owns x
    y = xp.maximum(x, 0)

New arrays that belong to no input (parameters, masks, data batches) are created with NumPy and
moved with :func:`to_device`, or created with ``backend.xp`` (the module of the device chosen by
:func:`use`).

CuPy is imported in :func:`load_cupy` alone. The environment variable ``MINICNN_CUPY_MODULE``
names another module to import in its place (a test stand-in with CuPy's interface); unset,
CuPy is optional and the NumPy path works without it.
"""
import importlib
import os

import numpy

cupy = None  # the CuPy module, None where it is absent; see load_cupy()
xp = numpy   # the array module of the current device; see use()


def load_cupy():
    """Import the GPU array module: ``cupy``, or the module that ``MINICNN_CUPY_MODULE`` names
    (the tests name a strict CuPy stand-in that runs on the host). None where it does not import:
    CuPy is optional, and the NumPy path must work without it (``use("gpu")`` then says so in one
    line). Called on import; call it again after changing the variable. Returns the module."""
    global cupy
    try:
        cupy = importlib.import_module(os.environ.get("MINICNN_CUPY_MODULE") or "cupy")
    except Exception:  # ImportError, or a CuPy without a working CUDA driver
        cupy = None
    return cupy


load_cupy()


def gpu_available():
    """True when CuPy imports and sees at least one CUDA device."""
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
        xp = cupy
    else:
        raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'gpu'")
    return xp


def get_array_module(*arrays):
    """The array module (numpy or cupy) that owns the given arrays."""
    if cupy is not None:
        return cupy.get_array_module(*arrays)
    return numpy


def is_gpu_array(a):
    return cupy is not None and isinstance(a, cupy.ndarray)


def to_numpy(a):
    """A NumPy copy (or view) of ``a``, wherever it lives. Scalars pass through."""
    if is_gpu_array(a):
        return cupy.asnumpy(a)
    return numpy.asarray(a)


def to_device(a, device=None):
    """Move ``a`` to ``device`` (``"cpu"``/``"gpu"``; default: the one chosen by use())."""
    if device is None:
        device = "gpu" if xp is not numpy else "cpu"
    if device == "cpu":
        return to_numpy(a)
    if cupy is None:
        raise RuntimeError("CuPy is not installed")
    return cupy.asarray(a)


def device_of(a):
    """``"gpu"`` for a CuPy array, else ``"cpu"``."""
    return "gpu" if is_gpu_array(a) else "cpu"


def synchronize():
    """Wait for queued GPU work (for timing); a no-op on the CPU."""
    if xp is not numpy:
        cupy.cuda.Device().synchronize()
