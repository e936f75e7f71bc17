"""The one place that knows CuPy exists.

Every array routine in the project is written once against an array module ``xp``
(NumPy on the CPU, CuPy on the GPU), as in Chainer and DeZero:

    xp = backend.get_array_module(x)      # the module that owns x
    y = xp.maximum(x, 0)

New arrays that belong to no input (parameters, masks, data batches) are created with
NumPy and moved with :func:`to_device`, or created with ``backend.xp`` (the module of the
device chosen by :func:`use`).
"""
import numpy

try:  # CuPy is optional: the NumPy path must work where it is absent.
    import cupy
except Exception:  # ImportError, or a CuPy without a working CUDA driver
    cupy = None

xp = numpy  # the array module of the current device; see use()


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


def tune_cpu_allocator():
    """Keep freed memory inside the process (glibc malloc) so NumPy reuses it without page faults.

    Why: NumPy allocates every activation and gradient of a step afresh, and glibc serves blocks
    above 32 MB with ``mmap`` (and gives freed ones straight back to the OS). A fresh 33 MB
    array then costs ~8000 page faults on first touch, which made ReLU backward 2.5x slower
    than the same arithmetic on reused memory (VGG16 at batch 128: ~0.1 s per step).
    ``M_MMAP_MAX = 0`` serves every block from the heap and a large ``M_TRIM_THRESHOLD``
    keeps freed heap memory, so the next step's arrays land on pages already mapped.
    The peak resident set is about the same (it is the live arrays at the peak either way).

    Call it once at start-up (run.py and the benchmark do); it changes the whole process. A
    no-op returning False where glibc's ``mallopt`` is missing (macOS, musl).
    """
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
