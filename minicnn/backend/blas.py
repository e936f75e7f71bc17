"""BLAS thread control: the thread count of the OpenBLAS that NumPy loaded, through ctypes.

OpenBLAS splits one GEMM over its threads, and the split changes the rounding: the same
product computed with 1 and with 2 threads differs in the last bits (float64 at most shapes,
float32 at some). The layers therefore call BLAS single-threaded (:class:`single_threaded_blas`)
and get their parallelism from the worker threads (``minicnn.backend.workers``), whose split is
fixed by the shapes: the results then depend neither on the worker count nor on the number of
cores. Where no OpenBLAS is found (NumPy built on MKL or Accelerate) the thread count cannot be
set: the layers run on one worker and BLAS keeps its own threads.
"""
import ctypes
import threading

import numpy  # noqa: F401  (NumPy loads its OpenBLAS, which _openblas() then finds)

_OPENBLAS = []
_LOCK = threading.Lock()
_DEPTH = [0, None]     # open single_threaded_blas blocks, and the thread count before the first


def _openblas():
    """``(get_num_threads, set_num_threads)`` of the OpenBLAS that NumPy loaded, or None."""
    if not _OPENBLAS:
        found = None
        try:
            with open("/proc/self/maps") as f:
                paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower()})
        except OSError:
            paths = []
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix in ("scipy_openblas", "openblas"):
                for suffix in ("64_", ""):
                    get, put = f"{prefix}_get_num_threads{suffix}", f"{prefix}_set_num_threads{suffix}"
                    if found is None and hasattr(lib, get) and hasattr(lib, put):
                        found = (getattr(lib, get), getattr(lib, put))
        _OPENBLAS.append(found)
    return _OPENBLAS[0]


def blas_threads():
    """OpenBLAS's current thread count, or None when it cannot be read."""
    api = _openblas()
    return None if api is None else int(api[0]())


def set_blas_threads(n):
    """Set OpenBLAS's thread count (for the whole process); False when it cannot be set."""
    api = _openblas()
    if api is not None:
        api[1](int(n))
    return api is not None


class single_threaded_blas:
    """``with single_threaded_blas(): ...`` runs BLAS on one thread inside, as before outside.

    The setting is the process's: BLAS calls from other threads inside the block are
    single-threaded too (the worker threads rely on it). Blocks may nest and overlap (threads of
    their own running layers): the first to enter saves the count, the last to leave restores it.
    """

    def __enter__(self):
        with _LOCK:
            if _DEPTH[0] == 0:
                _DEPTH[1] = blas_threads()
                if _DEPTH[1] not in (None, 1):
                    set_blas_threads(1)
            _DEPTH[0] += 1
        return self

    def __exit__(self, *exc):
        with _LOCK:
            _DEPTH[0] -= 1
            if _DEPTH[0] == 0 and _DEPTH[1] not in (None, 1):
                set_blas_threads(_DEPTH[1])
