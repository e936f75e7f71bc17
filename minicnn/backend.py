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

cupy = None  # the CuPy module, None where it is absent; see load_cupy()
xp = numpy  # the array module of the current device; see use()


def load_cupy():
    """Import the GPU array module: ``cupy``, or the module that ``MINICNN_CUPY_MODULE`` names
    (the tests name a strict CuPy stand-in that runs on the host). None where it does not import:
    CuPy is optional, and the NumPy path must work without it. Called on import; call it again
    after changing the variable. Returns the module."""
    global cupy
    import importlib
    import os
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


# -- CPU threads ----------------------------------------------------------------------------
# NumPy runs every element-wise operation (copies, BatchNorm, im2col, Adam) on one core; only
# BLAS uses the others. The layers and optimizers therefore split their work (chunks of images,
# channel blocks, parameters) over ``cpu_workers()`` Python threads (NumPy releases the GIL
# inside its loops and BLAS calls), each calling single-threaded BLAS: every part of a step then
# uses every core. Off (1) unless a program asks for it with ``set_cpu_workers`` (run.py and the
# benchmark do).
_CPU_WORKERS = 1
_POOLS = {}


def set_cpu_workers(n=None):
    """Use ``n`` worker threads in the layers and optimizers on the CPU. Default: the thread budget the
    environment gives (``OMP_NUM_THREADS`` or ``OPENBLAS_NUM_THREADS``, as for BLAS itself),
    else the number of CPUs this process may run on.

    Needs control over the BLAS thread count (NumPy's bundled OpenBLAS); where that is not
    found the workers would fight BLAS's own threads, so it stays at 1. Returns the number set.
    Do not ask for several workers in a process started with ``OPENBLAS_NUM_THREADS=1``: that
    OpenBLAS serialises concurrent calls (a VGG16 step took 4.4 s instead of 2.3-2.8 s here);
    the default, which reads that variable, gives 1 worker there.
    """
    global _CPU_WORKERS
    import os
    if n is None:
        budget = os.environ.get("OMP_NUM_THREADS") or os.environ.get("OPENBLAS_NUM_THREADS")
        if budget and budget.isdigit():
            n = int(budget)
        else:
            n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _CPU_WORKERS = max(1, int(n)) if _openblas() is not None else 1
    return _CPU_WORKERS


def cpu_workers():
    """The number of worker threads on the CPU (see :func:`set_cpu_workers`)."""
    return _CPU_WORKERS


def workers_for(a):
    """How many parts to split work on the array ``a`` into: ``cpu_workers()`` for NumPy
    arrays, 1 for CuPy ones (the GPU runs each kernel on all its cores already)."""
    return 1 if is_gpu_array(a) else _CPU_WORKERS


def on_workers(work, parts):
    """``[work(part) for part in parts]``, each part on a thread of its own when there are
    several, with single-threaded BLAS inside (n threads x 1 BLAS thread, not n x n).

    Each part must write only its own outputs; results come back in the order of ``parts``.
    """
    if len(parts) < 2:
        return [work(part) for part in parts]
    from concurrent.futures import ThreadPoolExecutor
    n = len(parts)
    pool = _POOLS.get(n) or _POOLS.setdefault(n, ThreadPoolExecutor(n, thread_name_prefix="minicnn"))
    with single_threaded_blas():
        return list(pool.map(work, parts))


def on_items(fn, items, like):
    """``[fn(item) for item in items]``, the items taken in order by ``workers_for(like)``
    threads, each taking the next one as soon as it is free (dynamic scheduling: a worker slowed
    by the machine takes fewer items instead of holding up the others at the end).

    Which thread runs an item varies from run to run, so ``fn`` must write only that item's
    outputs (results come back in the order of ``items``): then the outcome never depends on it.
    """
    n = min(workers_for(like), len(items))
    if n < 2:
        return [fn(item) for item in items]
    import threading
    results, taken, lock = [None] * len(items), [0], threading.Lock()

    def run(_):
        while True:
            with lock:
                i = taken[0]
                taken[0] += 1
            if i >= len(items):
                return
            results[i] = fn(items[i])

    on_workers(run, [None] * n)
    return results


def over_ranges(fn, n, like, min_size=1 << 16):
    """``fn(i0, i1)`` for contiguous ranges covering ``range(n)`` (images or channels of
    ``like``), one range per worker; a single call ``fn(0, n)`` on the GPU or when ``like`` has
    fewer than ``min_size`` elements (a thread hand-off costs more than such work)."""
    parts = workers_for(like) if like.size >= min_size else 1
    on_workers(lambda r: fn(*r), split(n, parts))


def split(n, parts):
    """``parts`` contiguous ranges ``(i0, i1)`` covering ``range(n)``, as equal as can be
    (fewer when ``n < parts``)."""
    parts = max(1, min(parts, n))
    return [(n * t // parts, n * (t + 1) // parts) for t in range(parts)]


_OPENBLAS = []


def _openblas():
    """``(get_num_threads, set_num_threads)`` of the OpenBLAS that NumPy loaded, or None."""
    if not _OPENBLAS:
        import ctypes
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


class single_threaded_blas:
    """``with single_threaded_blas(): ...`` runs BLAS on one thread inside, as before outside
    (for code that runs several BLAS calls at once on its own threads)."""

    def __enter__(self):
        api = _openblas()
        self.saved = None if api is None else int(api[0]())
        if self.saved is not None and self.saved != 1:
            api[1](1)
        return self

    def __exit__(self, *exc):
        if self.saved is not None and self.saved != 1:
            _openblas()[1](self.saved)
