"""``with workers(n):`` runs the layers on ``n`` CPU worker threads, then restores the count.

Skips the test where ``n`` workers cannot be had (no OpenBLAS whose thread count can be set:
the library then keeps one worker), instead of comparing one worker with itself.
"""
import contextlib

import pytest

from minicnn import backend


@contextlib.contextmanager
def workers(n):
    before = backend.cpu_workers()
    try:
        if backend.set_cpu_workers(n) != n:
            pytest.skip(f"{n} CPU workers need an OpenBLAS whose thread count can be set")
        yield n
    finally:
        backend.set_cpu_workers(before)
