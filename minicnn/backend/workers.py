"""Worker threads on the CPU: one pool, shared by every layer and optimizer.

NumPy runs every element-wise operation (copies, BatchNorm, im2col, Adam) on one core; only BLAS
uses the others. The layers and optimizers therefore split their work into parts (chunks of
images, blocks of channels, lists of parameters) that ``cpu_workers()`` threads take (NumPy
releases the GIL inside its loops and BLAS calls), each calling single-threaded BLAS: every part
of a step then uses every core.

Results never depend on the worker count: each part writes only its own outputs; parts whose
work sums values are fixed by the shapes alone (``minicnn.performance`` chooses them: NumPy can
round a channel's sum differently within another block of channels), while purely element-wise
parts (an optimizer's lists of parameters) may follow the worker count; and BLAS runs
single-threaded inside every part (see ``blas``), also with one worker.

The pool: the calling thread and ``cpu_workers() - 1`` pool threads take the parts. A call made
from inside a part runs its parts inline on that thread (the pool is busy already; waiting for it
would deadlock). Each thread keeps its own scratch buffers (:func:`worker_buffer`) for its life,
so there is one set per worker, whatever the work.
"""
import os
import threading

import numpy

from minicnn.backend.allocator import tune_cpu_allocator_once
from minicnn.backend.blas import blas_threads, single_threaded_blas
from minicnn.backend.device import is_gpu_array

_WORKERS = None          # chosen on first use, see cpu_workers()
_POOL = None             # ThreadPoolExecutor of _WORKERS - 1 threads (None for one worker)
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()   # per thread: .busy (inside a part), .buffers (scratch)
_STARTED = False         # the first CPU work has happened (see workers_for)


def default_cpu_workers():
    """The thread budget the environment gives: ``OMP_NUM_THREADS`` or ``OPENBLAS_NUM_THREADS``
    (as for BLAS itself), else the number of CPUs this process may run on."""
    budget = os.environ.get("OMP_NUM_THREADS") or os.environ.get("OPENBLAS_NUM_THREADS")
    if budget and budget.isdigit() and int(budget) > 0:
        return int(budget)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_cpu_workers(n=None):
    """Use ``n`` worker threads in the layers and optimizers on the CPU (default:
    :func:`default_cpu_workers`, which is also what the first CPU work chooses when this is
    never called). Results do not depend on ``n``. Returns the number set.

    Needs control over the BLAS thread count (NumPy's bundled OpenBLAS); where that is not found
    the workers would fight BLAS's own threads, so it stays at 1. Call it between steps, not
    while another thread runs layers. Do not ask for several workers in a process started with
    ``OPENBLAS_NUM_THREADS=1``: that OpenBLAS serialises concurrent calls (a VGG16 step took
    4.4 s instead of 2.3-2.8 s on a 2-core AMD EPYC); the default, which reads that variable,
    gives 1 worker there.
    """
    global _WORKERS, _POOL
    n = default_cpu_workers() if n is None else int(n)
    n = max(1, n) if blas_threads() is not None else 1
    with _POOL_LOCK:
        if n != _WORKERS and _POOL is not None:
            _POOL.shutdown(wait=False)       # its threads finish their parts and exit
            _POOL = None
        _WORKERS = n
    return n


def cpu_workers():
    """The number of worker threads on the CPU (see :func:`set_cpu_workers`)."""
    if _WORKERS is None:
        set_cpu_workers()
    return _WORKERS


def workers_for(a):
    """How many threads may share work on the array ``a``: ``cpu_workers()`` for NumPy arrays,
    1 for CuPy ones (the GPU runs each kernel on all its cores already).

    The first call on a NumPy array is the library's first CPU work: it chooses the worker count
    (unless set already) and tunes the allocator (the policy of ``allocator``).
    """
    if is_gpu_array(a):
        return 1
    if not _STARTED:
        _start_cpu()
    return _WORKERS


def _start_cpu():
    global _STARTED
    tune_cpu_allocator_once()
    cpu_workers()
    _STARTED = True


def _pool():
    """The pool of ``cpu_workers() - 1`` threads, created on first need."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor
            _POOL = ThreadPoolExecutor(_WORKERS - 1, thread_name_prefix="minicnn")
        return _POOL


def on_items(fn, items, like):
    """``[fn(item) for item in items]``, the items taken in order by up to ``workers_for(like)``
    threads (the caller among them), each taking the next one as soon as it is free (a worker
    slowed by the machine takes fewer items instead of holding up the others at the end); BLAS
    single-threaded inside.

    Which thread runs an item varies from run to run, so ``fn`` must write only that item's
    outputs (results come back in the order of ``items``): then the outcome never depends on it.
    Called from inside an item, it runs its items inline.
    """
    n = min(workers_for(like), len(items))
    with single_threaded_blas():          # whatever the device: one rule (no cost on a GPU)
        if n < 2 or getattr(_LOCAL, "busy", False):
            return [fn(item) for item in items]
        return _share(fn, items, n)


def _share(fn, items, n):
    """:func:`on_items` on the caller and ``n - 1`` pool threads; the first error is raised
    after every thread has stopped."""
    results, order, lock, stop = [None] * len(items), iter(range(len(items))), threading.Lock(), []

    def take(_=None):
        _LOCAL.busy = True
        try:
            while True:
                with lock:
                    i = None if stop else next(order, None)
                if i is None:
                    return
                results[i] = fn(items[i])
        except BaseException:
            stop.append(True)              # the others finish their item and stop
            raise
        finally:
            _LOCAL.busy = False

    pool = _pool()
    futures = [pool.submit(take) for _ in range(n - 1)]
    error = None
    try:
        take()
    except BaseException as e:
        error = e
    for f in futures:
        try:
            f.result()
        except BaseException as e:
            error = error or e
    if error is not None:
        raise error
    return results


def split(n, parts):
    """``parts`` contiguous ranges ``(i0, i1)`` covering ``range(n)``, as equal as can be
    (fewer when ``n < parts``)."""
    parts = max(1, min(parts, n))
    return [(n * t // parts, n * (t + 1) // parts) for t in range(parts)]


def worker_buffer(name, size, dtype, xp):
    """A flat scratch array of ``size`` elements for the calling thread alone, contents undefined.

    A view of the thread's buffer ``name`` (one per dtype and array module), grown to the
    largest request and kept for the thread's life: valid until the thread asks for ``name``
    again. Reusing it matters on the CPU, where a fresh array of a few MB costs a page fault
    per 4 KiB on first touch.
    """
    buffers = _LOCAL.__dict__.setdefault("buffers", {})
    key = (name, numpy.dtype(dtype).str, xp.__name__)
    buf = buffers.get(key)
    if buf is None or buf.size < size:
        buffers.pop(key, None)             # free the old one before allocating the bigger one
        buf = buffers[key] = xp.empty(size, dtype=dtype)
    return buf[:size]
