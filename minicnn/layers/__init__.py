"""Layers of minicnn: each a Module with ``forward(x)`` and a hand-written ``backward(dy)``."""
from minicnn.layers.module import Module, Parameter, Sequential
from minicnn.layers.conv import Conv2d
from minicnn.layers.batchnorm import BatchNorm1d, BatchNorm2d
from minicnn.layers.linear import Linear
from minicnn.layers.activation import Dropout, Flatten, ReLU
from minicnn.layers.pool import MaxPool2d

__all__ = ["Module", "Parameter", "Sequential", "Conv2d", "BatchNorm2d", "BatchNorm1d", "Linear",
           "ReLU", "MaxPool2d", "Dropout", "Flatten"]
