"""minicnn: a from-scratch CNN framework in NumPy/CuPy with hand-written backward passes."""
from minicnn.grad_mode import is_grad_enabled, no_grad

__version__ = "0.1.0"
__all__ = ["is_grad_enabled", "no_grad"]
