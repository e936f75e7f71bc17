"""PyTorch's default initialisations, drawn from a seedable NumPy Generator.

Every layer constructor takes ``rng=None``; ``None`` means this module's default generator,
which ``seed(s)`` resets, so ``init.seed(14); model = vgg16()`` builds the same weights
every time. Parameters are created on the CPU (NumPy); ``Module.to("gpu")`` moves them.

PyTorch's defaults, reproduced here (not its random stream: values differ, distributions match):
- Conv2d / Linear weight: ``kaiming_uniform_(w, a=sqrt(5))``. gain = sqrt(2 / (1 + a^2)) =
  sqrt(1/3), bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in), so ``U(-1/sqrt(fan_in), +)``.
- Conv2d / Linear bias: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
- BatchNorm: weight 1, bias 0, running_mean 0, running_var 1.
``fan_in`` = ``C_in * kh * kw`` for a conv, ``in_features`` for a linear layer.
"""
import math

import numpy as np

_default_rng = np.random.default_rng()


def seed(s):
    """Reset the default generator to ``np.random.default_rng(s)``; returns it."""
    global _default_rng
    _default_rng = np.random.default_rng(s)
    return _default_rng


def default_rng():
    """The module-level Generator that layers use when given ``rng=None``."""
    return _default_rng


def _rng(rng):
    return _default_rng if rng is None else rng


def uniform(shape, bound, rng=None, dtype=np.float32):
    """An array of ``shape`` drawn from ``U(-bound, bound)``, cast to ``dtype``."""
    return _rng(rng).uniform(-bound, bound, size=shape).astype(dtype)


def kaiming_uniform(shape, fan_in, a=math.sqrt(5), rng=None, dtype=np.float32):
    """PyTorch's ``kaiming_uniform_(w, a)`` (leaky_relu gain): ``U(-b, b)``,
    ``b = sqrt(2 / (1 + a^2)) * sqrt(3 / fan_in)``; with the default ``a = sqrt(5)``,
    ``b = 1 / sqrt(fan_in)``."""
    gain = math.sqrt(2.0 / (1.0 + a * a))
    return uniform(shape, gain * math.sqrt(3.0 / fan_in), rng, dtype)


def bias_uniform(shape, fan_in, rng=None, dtype=np.float32):
    """PyTorch's default bias: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (0 when fan_in is 0)."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return uniform(shape, bound, rng, dtype)
