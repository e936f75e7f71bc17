"""minicnn's models in ``torch.nn``, layer for layer: the PyTorch side of benchmarks and reference tests.

    from bench.torch_vgg import to_torch, torch_vgg16
    net = to_torch(model)                      # the same layers and weights as a minicnn model
    net = torch_vgg16(width=0.25)              # the same VGG16, PyTorch's own initial weights

``to_torch`` walks a minicnn model and builds each layer's ``torch.nn`` twin (Conv2d, BatchNorm2d,
BatchNorm1d, Linear, ReLU, MaxPool2d, Dropout, Flatten, inside Sequentials; a VGG's ``features``
and ``classifier``) with the same hyper-parameters, so the state_dict keys are the same and
weights move either way by ``load_state_dict``. The architecture is defined once, in
``minicnn.models``; nothing here repeats it.
"""
import numpy as np
import torch
from torch import nn

from minicnn import backend
from minicnn import layers as L
from minicnn.models import VGG, vgg16


class TorchVGG(nn.Module):
    """``classifier(features(x))``: the forward of ``minicnn.models.VGG``."""

    def __init__(self, features, classifier):
        super().__init__()
        self.features, self.classifier = features, classifier

    def forward(self, x):
        return self.classifier(self.features(x))


def _twin(m, inplace_relu):
    """The ``torch.nn`` module equivalent to the minicnn module ``m`` (fresh PyTorch weights)."""
    if isinstance(m, VGG):
        return TorchVGG(_twin(m.features, inplace_relu), _twin(m.classifier, inplace_relu))
    if isinstance(m, L.Sequential):
        return nn.Sequential(*(_twin(c, inplace_relu) for c in m))
    if isinstance(m, L.Conv2d):
        return nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                         padding=m.padding, bias=m.bias is not None)
    if isinstance(m, (L.BatchNorm2d, L.BatchNorm1d)):
        kind = nn.BatchNorm2d if isinstance(m, L.BatchNorm2d) else nn.BatchNorm1d
        return kind(m.num_features, eps=m.eps, momentum=m.momentum)
    if isinstance(m, L.Linear):
        return nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    if isinstance(m, L.ReLU):
        return nn.ReLU(inplace=inplace_relu)
    if isinstance(m, L.MaxPool2d):
        return nn.MaxPool2d(m.kernel_size, m.stride)
    if isinstance(m, L.Dropout):
        return nn.Dropout(m.p)
    if isinstance(m, L.Flatten):
        return nn.Flatten()
    raise TypeError(f"no torch.nn twin for {type(m).__name__}")


def to_torch(model, copy_weights=True, inplace_relu=False):
    """A ``torch.nn`` copy of the minicnn ``model`` (same layer list, same state_dict keys).

    copy_weights: load the model's parameters and buffers (strictly, every key), in their dtype
    (a float64 model gives a float64 net); otherwise the net keeps PyTorch's own float32 initial
    weights, drawn from torch's RNG. inplace_relu: ``ReLU(inplace=True)`` as torchvision's VGG
    (one activation less per ReLU), for timing what a PyTorch user trains.
    """
    net = _twin(model, inplace_relu)
    if copy_weights:
        state = model.state_dict()
        dtypes = {v.dtype for k, v in state.items() if v.dtype.kind == "f"}
        if dtypes == {np.dtype(np.float64)}:
            net = net.double()
        net.load_state_dict({k: torch.from_numpy(backend.to_numpy(v).copy()) for k, v in state.items()})
    return net


def torch_vgg16(num_classes=10, in_channels=3, width=1.0, inplace_relu=False):
    """``minicnn.models.vgg16(num_classes, in_channels, width)`` in ``torch.nn``, float32, with
    PyTorch's own initial weights (seed them with ``torch.manual_seed``)."""
    model = vgg16(num_classes, in_channels, width, rng=np.random.default_rng(0))  # its layer list only
    return to_torch(model, copy_weights=False, inplace_relu=inplace_relu)
