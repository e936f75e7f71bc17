"""VGG16 for 32x32 inputs, exactly as docs/algorithm.md section 6 describes it.

features: per number c, ``Conv2d(c_in, c, 3, padding=1)``, ``BatchNorm2d(c)``, ``ReLU()``;
per "M", ``MaxPool2d(2)``. classifier: ``Flatten, Linear(512, 512), ReLU, BatchNorm1d(512),
Linear(512, 512), ReLU, BatchNorm1d(512), Linear(512, classes)``. The state_dict keys are those
of the same model built from ``torch.nn`` (``features.0.weight``, ``features.1.running_mean``,
``classifier.1.weight``, ...).
"""
import numpy as np

from minicnn.layers import (BatchNorm1d, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, Module, ReLU,
                            Sequential)

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def scaled(c, width):
    """A channel count times ``width``, at least 1: ``max(1, int(round(c * width)))``."""
    return max(1, int(round(c * width)))


class VGG(Module):
    """A VGG network: ``features`` (conv-bn-relu blocks and max-pools) then ``classifier``.

    Args:
        cfg: channel counts and ``"M"`` (max-pool 2x2), e.g. ``VGG16_CFG``.
        num_classes, in_channels: output classes, input channels.
        width: multiplies every channel count and the hidden size.
        hidden: the classifier's hidden size before ``width``.
        input_size: input height = width; the flattened size is ``c_last * (input_size / 2^pools)^2``.
        rng: NumPy Generator for the initialisation (default: ``minicnn.init``'s).
        dtype: of the parameters.
    Shapes: x ``(N, in_channels, input_size, input_size)`` -> logits ``(N, num_classes)``.
    ``backward`` returns dx like every Module. A training loop, which needs no gradient for the
    image, sets ``model.features[0].needs_input_grad = False`` to skip the first conv's dx.
    """

    def __init__(self, cfg, num_classes=10, in_channels=3, width=1.0, hidden=512, input_size=32,
                 rng=None, dtype=np.float32):
        super().__init__()
        layers, c_in, size = [], in_channels, input_size
        for v in cfg:
            if v == "M":
                layers.append(MaxPool2d(2))
                size //= 2
            else:
                c = scaled(v, width)
                layers += [Conv2d(c_in, c, 3, padding=1, rng=rng, dtype=dtype), BatchNorm2d(c, dtype=dtype), ReLU()]
                c_in = c
        h = scaled(hidden, width)
        self.features = Sequential(*layers)
        self.classifier = Sequential(
            Flatten(),
            Linear(c_in * size * size, h, rng=rng, dtype=dtype), ReLU(), BatchNorm1d(h, dtype=dtype),
            Linear(h, h, rng=rng, dtype=dtype), ReLU(), BatchNorm1d(h, dtype=dtype),
            Linear(h, num_classes, rng=rng, dtype=dtype))

    def forward(self, x):
        """x ``(N, C, H, W)`` -> logits ``(N, num_classes)``."""
        return self.classifier.forward(self.features.forward(x))

    def backward(self, dy):
        """dlogits ``(N, num_classes)`` -> dx ``(N, C, H, W)`` (None when the first conv skips it)."""
        return self.features.backward(self.classifier.backward(dy))


def vgg16(num_classes=10, in_channels=3, width=1.0, rng=None, dtype=np.float32):
    """VGG16 with batch norm for 32x32 inputs (docs/algorithm.md section 6); ``width`` scales channels."""
    return VGG(VGG16_CFG, num_classes, in_channels, width, rng=rng, dtype=dtype)
