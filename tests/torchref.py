"""PyTorch for the reference tests: skipped only where it is not installed, never hidden.

``pytest.importorskip("torch")`` skips on any ImportError raised while importing torch, so a
broken install (or an ImportError of ours reached through it) would turn every reference test
into a quiet skip. Here only a missing package skips, with the reason; a torch that is there but
fails to import fails the test. With ``MINICNN_REQUIRE_TORCH=1`` (set by ``.ci/run``, which
installs the pinned wheel) a missing torch fails too.
"""
import importlib.util
import os

import pytest

PIN = "torch==2.13.0"


def import_torch():
    """The ``torch`` module; skips the calling test (or module) only when it is not installed."""
    if importlib.util.find_spec("torch") is None:
        if os.environ.get("MINICNN_REQUIRE_TORCH") == "1":
            pytest.fail(f"PyTorch is not installed but MINICNN_REQUIRE_TORCH=1 (pip install {PIN})")
        pytest.skip(f"PyTorch is not installed (pip install {PIN} for the reference tests)",
                    allow_module_level=True)
    import torch
    return torch
