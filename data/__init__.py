"""Datasets from their official files: CIFAR-10/100, MNIST, Fashion-MNIST.

``load(name, root, split)`` returns the stored uint8 images ``(N, C, H, W)`` and int64 labels;
``find_root(name, root)`` says where a dataset is (``root``, else a system folder such as
Debian's ``/usr/share/datasets/<name>``); :class:`Loader` turns them into normalised, augmented,
shuffled float batches on the chosen device. Every file problem is a :class:`DatasetError` with
a one-line message.
"""
from .datasets import DATASETS, find_root, load, num_classes
from .errors import DatasetError
from .pipeline import Loader, channel_stats, pad_images

__all__ = ["DATASETS", "DatasetError", "Loader", "channel_stats", "find_root", "load", "num_classes",
           "pad_images"]
