"""Where arrays live and how the CPU runs the work, one idea per module:

- ``device``: NumPy or CuPy (``xp``, :func:`use`, :func:`get_array_module`, :func:`to_device`,
  ...); the one place that knows CuPy exists.
- ``workers``: one pool of worker threads that the layers and optimizers share, with scratch
  buffers per worker (:func:`set_cpu_workers`, :func:`on_items`, :func:`worker_buffer`).
- ``blas``: the thread count of NumPy's OpenBLAS (:class:`single_threaded_blas`).
- ``allocator``: glibc malloc tuning for step-after-step allocation (:func:`tune_cpu_allocator`).

Everything is used as ``from minicnn import backend; backend.name``. ``backend.xp`` is the
array module of the device chosen by :func:`use`, ``backend.cupy`` the GPU module (or None) that
:func:`load_cupy` imported: read them there, do not import them (those calls change them).
"""
from minicnn.backend import device
from minicnn.backend.allocator import tune_cpu_allocator
from minicnn.backend.blas import blas_threads, set_blas_threads, single_threaded_blas
from minicnn.backend.device import (device_of, get_array_module, gpu_available, is_gpu_array, load_cupy,
                                    synchronize, to_device, to_numpy, use)
from minicnn.backend.workers import (cpu_workers, default_cpu_workers, on_items, set_cpu_workers,
                                     split, worker_buffer, workers_for)

__all__ = ["blas_threads", "cpu_workers", "cupy", "default_cpu_workers", "device_of", "get_array_module",
           "gpu_available", "is_gpu_array", "load_cupy", "on_items", "set_blas_threads", "set_cpu_workers",
           "single_threaded_blas", "split", "synchronize", "to_device", "to_numpy", "tune_cpu_allocator", "use",
           "worker_buffer", "workers_for", "xp"]


def __getattr__(name):
    """``backend.xp`` and ``backend.cupy``, as :func:`use` and :func:`load_cupy` last set them."""
    if name in ("xp", "cupy"):
        return getattr(device, name)
    raise AttributeError(f"module 'minicnn.backend' has no attribute {name!r}")
