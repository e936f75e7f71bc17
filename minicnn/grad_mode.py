"""No-grad mode for evaluation (Chainer's ``no_backprop_mode``, PyTorch's ``torch.no_grad``).

    with minicnn.no_grad():
        logits = model.forward(x)      # no layer keeps a cache for backward

Under it, forward keeps nothing for backward (an evaluation pass then holds only the
activations in flight, not a full set of caches), and a backward after such a forward raises
RuntimeError. It is independent of ``train()`` / ``eval()``, which switch BatchNorm and Dropout
between batch and running behaviour, as in PyTorch. The mode is per thread.
"""
import contextlib
import threading

_STATE = threading.local()


def is_grad_enabled():
    """False inside ``no_grad()`` (on this thread), else True."""
    return getattr(_STATE, "enabled", True)


class no_grad(contextlib.ContextDecorator):
    """``with no_grad(): ...`` (or ``@no_grad()`` on a function): forwards inside keep no
    cache for backward. Nests; the previous mode comes back on exit."""

    def __init__(self):
        self._prev = []       # a stack: one decorated function may re-enter itself

    def __enter__(self):
        self._prev.append(is_grad_enabled())
        _STATE.enabled = False
        return self

    def __exit__(self, *exc):
        _STATE.enabled = self._prev.pop()
        return False
