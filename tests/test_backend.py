"""The backend: one pool of worker threads (order, errors, nesting, its size), per-worker buffers,
the defaults chosen on first CPU use, and the one import of CuPy."""
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from minicnn import backend
from worker_count import workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pool_threads():
    return [t for t in threading.enumerate() if t.name.startswith("minicnn")]


def run_with_timeout(fn, seconds=20):
    """``fn()`` on a thread of its own; fails (instead of hanging the suite) on a deadlock."""
    out = []

    def run():
        try:
            out.append((True, fn()))
        except Exception as e:
            out.append((False, e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"no result after {seconds} s: deadlock"
    ok, value = out[0]
    if not ok:
        raise value
    return value


def test_on_items_runs_every_item_once_and_returns_them_in_order():
    calls, threads = [], set()

    def square(i):
        time.sleep(0.002 * (i % 3))               # uneven items: the free thread takes the next
        calls.append(i)
        threads.add(threading.get_ident())
        return i * i

    like = np.zeros(1)
    with workers(3):
        assert backend.on_items(square, list(range(40)), like) == [i * i for i in range(40)]
        assert sorted(calls) == list(range(40)) and len(threads) > 1
        assert threading.get_ident() in threads      # the caller takes items too
        assert backend.on_items(square, [], like) == []


def test_a_nested_call_runs_inline_instead_of_deadlocking():
    like = np.zeros(1)

    def outer(i):                                    # every worker busy, each asking for the pool
        me = threading.get_ident()
        inner = backend.on_items(lambda j: (j, threading.get_ident()), list(range(3)), like)
        assert {t for _, t in inner} == {me}         # inline, on the worker that asked
        return sum(j for j, _ in inner) + i

    with workers(3):
        assert run_with_timeout(lambda: backend.on_items(outer, list(range(3)), like)) == [3, 4, 5]


def test_one_pool_whatever_the_part_counts():
    like = np.zeros(1)
    with workers(3):
        for parts in (2, 3, 5, 7, 11, 3, 2):
            backend.on_items(lambda i: time.sleep(0.001), list(range(parts)), like)
        assert len(pool_threads()) <= 2              # the caller and 2 pool threads
        with workers(2):
            backend.on_items(lambda i: time.sleep(0.001), list(range(5)), like)
            time.sleep(0.05)                         # the old pool's threads exit when idle
            assert len(pool_threads()) <= 1


def test_an_error_in_an_item_is_raised_and_the_pool_still_works():
    like = np.zeros(1)

    def fail_at_5(i):
        if i == 5:
            raise KeyError("item 5")
        return i

    with workers(3):
        with pytest.raises(KeyError, match="item 5"):
            run_with_timeout(lambda: backend.on_items(fail_at_5, list(range(20)), like))
        assert backend.on_items(lambda i: -i, list(range(6)), like) == [0, -1, -2, -3, -4, -5]


def test_worker_buffers_are_per_thread_and_reused():
    like = np.zeros(1)
    seen = {}

    def take(i):
        buf = backend.worker_buffer("test.buf", 100, np.float32, np)
        buf[:] = i                                   # a shared buffer would mix items' values
        time.sleep(0.002)
        assert (buf == i).all()
        seen.setdefault(threading.get_ident(), set()).add(buf.__array_interface__["data"][0])
        return i

    with workers(3):
        backend.on_items(take, list(range(30)), like)
    assert len(seen) > 1
    assert all(len(addresses) == 1 for addresses in seen.values())      # one buffer per thread
    assert len({a for addresses in seen.values() for a in addresses}) == len(seen)
    small = backend.worker_buffer("test.buf", 10, np.float32, np)
    assert small.size == 10 and small.base is backend.worker_buffer("test.buf", 100, np.float32, np).base


def run_python(code, **env):
    """Run ``code`` in a fresh interpreter (a fresh backend); returns its stdout."""
    full = {**os.environ, "PYTHONPATH": ROOT, **env}
    for k, v in env.items():
        if v is None:
            del full[k]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


FIRST_USE = """
import numpy as np
from minicnn import backend
from minicnn.backend import allocator, workers
from minicnn.layers import ReLU
before = (workers._WORKERS, list(allocator._TUNED))
ReLU().forward(np.ones((2, 3), np.float32))
print(before, backend.cpu_workers(), allocator._TUNED)
"""


@pytest.mark.skipif(backend.blas_threads() is None, reason="needs an OpenBLAS whose thread count can be set")
def test_first_cpu_use_chooses_the_workers_and_tunes_the_allocator():
    glibc = backend.tune_cpu_allocator()                # this process: whether mallopt exists
    out = run_python(FIRST_USE, OMP_NUM_THREADS="3", OPENBLAS_NUM_THREADS=None)
    assert out.split() == ["(None,", "[])", "3", f"[{glibc}]"]       # import alone changes nothing
    out = run_python(FIRST_USE, OMP_NUM_THREADS=None, OPENBLAS_NUM_THREADS="2", MINICNN_TUNE_MALLOC="0")
    assert out.split() == ["(None,", "[])", "2", "[False]"]


FAKE_CUPY = """
import numpy
class ndarray(numpy.ndarray):
    pass
def get_array_module(*arrays):
    return __import__(__name__)
def asarray(a):
    return numpy.asarray(a).view(ndarray)
"""


def test_the_cupy_module_comes_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "fake_cupy_mod.py").write_text(FAKE_CUPY)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        monkeypatch.setenv("MINICNN_CUPY_MODULE", "fake_cupy_mod")
        fake = backend.load_cupy()
        assert fake.__name__ == "fake_cupy_mod" and backend.cupy is fake
        assert backend.is_gpu_array(backend.to_device(np.ones(2), "gpu"))
        assert backend.device_of(np.ones(2)) == "cpu"
        monkeypatch.setenv("MINICNN_CUPY_MODULE", "no_such_cupy_mod")
        assert backend.load_cupy() is None and backend.cupy is None
        with pytest.raises(RuntimeError, match="needs CuPy"):          # one line for run.py
            backend.use("gpu")
    finally:
        monkeypatch.undo()
        backend.load_cupy()


def test_nothing_but_the_backend_imports_cupy():
    pattern = re.compile(r"^\s*(import|from)\s+cupy\b|import_module\(.*cupy", re.M)
    found = []
    for top in ("minicnn", "cht", "data", "bench", "run.py"):
        path = os.path.join(ROOT, top)
        files = [path] if path.endswith(".py") else [os.path.join(d, f) for d, _, fs in os.walk(path)
                                                        for f in fs if f.endswith(".py")]
        found += [os.path.relpath(f, ROOT) for f in files if pattern.search(open(f).read())]
    assert found == [os.path.join("minicnn", "backend", "device.py")]
