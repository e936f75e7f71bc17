"""minicnn: a from-scratch CNN framework in NumPy/CuPy with hand-written backward passes."""
__version__ = "0.1.0"
