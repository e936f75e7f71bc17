"""``data.load``: the four datasets from their official files, as uint8 NCHW arrays.

Where files are looked for, under ``root`` (the first match wins):

- CIFAR-10/100: the extracted folder ``cifar-10-batches-py/`` (``cifar-100-python/``) in
  ``root`` or ``root/<name>/``; else the official archive ``cifar-10-python.tar.gz``
  (``cifar-100-python.tar.gz``) in ``root`` or ``root/<name>/``, read without extracting it.
- MNIST, Fashion-MNIST: each of the official ``*-ubyte.gz`` files (or its gunzipped twin) in
  ``root``, ``root/<name>/`` or torchvision's ``root/MNIST/raw/`` (``root/FashionMNIST/raw/``).
  So Debian's ``/usr/share/datasets/fashion-mnist`` works as a root.

Downloads (``download=True``, only for files not found) go to ``root/<name>/``.

``find_root(name, root)`` says which folder to read from: ``root`` when it holds the dataset,
else ``<folder>/<name>`` for the first folder of ``SYSTEM_FOLDERS`` that does (where system
packages install datasets: Debian's ``dataset-fashion-mnist`` puts the four official files in
``/usr/share/datasets/fashion-mnist``). ``run.py`` and the study tools find their data this way.

Checksums: a downloaded file is always checked against its official MD5 before it gets its
final name. Files already on disk are validated structurally instead (pickle contents, shapes,
IDX magic numbers and exact lengths, label ranges, gzip CRCs): re-packaged copies such as
Debian's re-gzipped Fashion-MNIST, and the small archives the tests build in the official
format, hold the right data under a different MD5.
"""
import os

import numpy as np

from . import checksums
from .download import download_file, url_for
from .errors import DatasetError
from .formats import cifar_member_parser, read_cifar_file, read_idx_pair, read_tar_members

_IDX_SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# name -> what load() needs; "shape" is (C, H, W) of one image as stored
DATASETS = {
    "cifar10": dict(classes=10, shape=(3, 32, 32), archive="cifar-10-python.tar.gz",
                    folder="cifar-10-batches-py", label_key="labels",
                    splits={"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}),
    "cifar100": dict(classes=100, shape=(3, 32, 32), archive="cifar-100-python.tar.gz",
                     folder="cifar-100-python", label_key="fine_labels",
                     splits={"train": ["train"], "test": ["test"]}),
    "mnist": dict(classes=10, shape=(1, 28, 28), torchvision="MNIST", splits=_IDX_SPLITS),
    "fashion-mnist": dict(classes=10, shape=(1, 28, 28), torchvision="FashionMNIST", splits=_IDX_SPLITS),
}


def num_classes(name):
    """The number of classes of dataset ``name`` (10, or 100 for CIFAR-100). ValueError if unknown."""
    return _info(name)["classes"]


# Folders where system packages install datasets, one sub-folder per dataset name.
SYSTEM_FOLDERS = ("/usr/share/datasets",)


def find_root(name, root=None):
    """The folder to read dataset ``name`` from: ``root`` if it holds the files of both splits,
    else ``<folder>/<name>`` for the first of ``SYSTEM_FOLDERS`` that does; None when none does.

    Looks for the files only, where ``load`` looks for them (the files are validated when
    loaded). Raises ValueError for an unknown name.
    """
    info = _info(name)
    candidates = ([] if root is None else [os.fspath(root)]) + [os.path.join(f, name) for f in SYSTEM_FOLDERS]
    for folder in candidates:
        if all(_locate(name, info, folder, split) is not None for split in ("train", "test")):
            return folder
    return None


def _info(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


def _locate(name, info, root, split):
    """Where ``load`` reads a split from under ``root``, or None when a file is missing:
    CIFAR ``("folder", path)`` or ``("archive", path)``, MNIST-style ``("idx", [path, path])``."""
    if "archive" in info:
        places = [root, os.path.join(root, name)]
        for folder in (os.path.join(p, info["folder"]) for p in places):
            if all(os.path.isfile(os.path.join(folder, m)) for m in info["splits"][split]):
                return "folder", folder
        archive = next((a for a in (os.path.join(p, info["archive"]) for p in places) if os.path.isfile(a)), None)
        return None if archive is None else ("archive", archive)
    paths = [_find_idx(root, name, info, f)[0] for f in info["splits"][split]]
    return None if None in paths else ("idx", paths)


def load(name, root, split="train", download=False, mirror=None):
    """Load a dataset split from its official files under ``root``.

    name: ``"cifar10"``, ``"cifar100"`` (fine labels), ``"fashion-mnist"`` or ``"mnist"``.
    split: ``"train"`` or ``"test"``. download: fetch missing files to ``root/<name>/`` from the
    official URLs (or ``mirror``, see :mod:`data.download`), verifying their MD5 first.

    Returns x: uint8 (N, C, H, W), exactly the stored pixels (no padding, no normalisation),
    and y: int64 (N,). Raises ValueError for an unknown name or split, DatasetError for a
    missing (with ``download=False``), truncated, corrupt or tampered file. A bad file already
    on disk is reported, never silently replaced: delete it to download it again.
    """
    info = _info(name)
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: expected 'train' or 'test'")
    root = os.fspath(root)
    if "archive" in info:
        x, y = _load_cifar(name, info, root, split, download, mirror)
    else:
        x, y = _load_idx(name, info, root, split, download, mirror)
    x = np.ascontiguousarray(x)
    if not x.flags.writeable:  # an array built on the pickle's bytes object
        x = x.copy()
    return x, y


def _fetch(name, root, filename, mirror):
    """Download ``filename`` of dataset ``name`` to ``root/<name>/``; returns its path."""
    url = url_for(checksums.BASE_URLS[name], name, filename, mirror)
    return download_file(url, os.path.join(root, name, filename), checksums.MD5[(name, filename)])


def _missing(name, filename, places):
    return DatasetError(f"{places[0]}: {name} file {filename} not found (looked in "
                        f"{', '.join(places)}); pass download=True (run.py --download) to fetch it")


def _load_cifar(name, info, root, split, download, mirror):
    members = info["splits"][split]
    places = [root, os.path.join(root, name)]
    found = _locate(name, info, root, split)
    if found is None:
        for folder in (os.path.join(p, info["folder"]) for p in places):
            if os.path.isdir(folder):  # a folder is there but incomplete: name what it lacks
                lack = next(m for m in members if not os.path.isfile(os.path.join(folder, m)))
                raise DatasetError(f"{os.path.join(folder, lack)}: file not found "
                                   f"(incomplete {info['folder']} folder, and no {info['archive']})")
        if not download:
            raise _missing(name, info["archive"], places)
        found = "archive", _fetch(name, root, info["archive"], mirror)
    kind, path = found
    rows = _Rows(len(members))
    if kind == "folder":  # an extracted folder: read the batch files directly
        for i, m in enumerate(members):
            rows.add(i, *read_cifar_file(os.path.join(path, m), info["label_key"], info["classes"]))
        return rows.result()
    wanted = [f"{info['folder']}/{m}" for m in members]
    parse = cifar_member_parser(info["label_key"], info["classes"])
    # members come in archive order (not sorted in the official tar): place each by its index
    read_tar_members(path, wanted, lambda f, name, where: rows.add(wanted.index(name), *parse(f, where)))
    return rows.result()


class _Rows:
    """Joins ``count`` batches ``(x, y)`` arriving in any order into one array.

    When all batches have the size of the first one (the official files: 10,000 images
    each), each is copied into one array allocated at the first batch and freed at once, so
    the peak memory is the result plus one batch, not twice the result as with a final
    ``np.concatenate``. Batches of other sizes (small test archives) fall back to concatenate.
    """

    def __init__(self, count):
        self.count, self.n, self.x, self.y, self.parts = count, None, None, None, {}

    def add(self, i, x, y):
        if self.n is None and self.count > 1:
            self.n = len(x)
            self.x = np.empty((self.count * self.n,) + x.shape[1:], x.dtype)  # (count*n, C, H, W)
            self.y = np.empty(self.count * self.n, y.dtype)
        if self.n is not None and len(x) == self.n:
            self.x[i * self.n:(i + 1) * self.n] = x
            self.y[i * self.n:(i + 1) * self.n] = y
            self.parts[i] = None  # stored in place
        else:
            self.parts[i] = (x, y)
        return True

    def result(self):
        if self.count == 1:
            return self.parts[0]
        if all(p is None for p in self.parts.values()):
            return self.x, self.y
        n = self.n
        parts = [self.parts[i] or (self.x[i * n:(i + 1) * n], self.y[i * n:(i + 1) * n])
                 for i in range(self.count)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _find_idx(root, name, info, filename):
    """The first existing path of an IDX file, gzipped or not, among the accepted layouts."""
    places = [root, os.path.join(root, name), os.path.join(root, info["torchvision"], "raw")]
    for p in places:
        for candidate in (filename, filename[:-3]):  # the .gz, or its gunzipped twin
            path = os.path.join(p, candidate)
            if os.path.isfile(path):
                return path, places
    return None, places


def _load_idx(name, info, root, split, download, mirror):
    paths = []
    for filename in info["splits"][split]:
        path, places = _find_idx(root, name, info, filename)
        if path is None:
            if not download:
                raise _missing(name, filename, places)
            path = _fetch(name, root, filename, mirror)
        paths.append(path)
    return read_idx_pair(paths[0], paths[1], info["classes"])
