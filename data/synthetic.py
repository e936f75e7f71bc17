"""Small (or full-size) random datasets written in the official file formats.

For tests and benchmarks: CIFAR archives whose pickles are byte-for-byte in the style of the
originals (Python 2 ``cPickle`` protocol 2: ``SHORT_BINSTRING``/``BINSTRING`` strings, the global
``numpy.core.multiarray._reconstruct``), and gzipped big-endian IDX files. Nothing here is
used by :func:`data.load` itself.
"""
import gzip
import io
import os
import struct
import tarfile

import numpy as np

from .datasets import DATASETS


def py2_pickle(obj):
    """Pickle ``obj`` as Python 2's cPickle (protocol 2) wrote the CIFAR batches.

    Handles dicts, lists, tuples, ints, bools, None, bytes (Python 2 ``str``) and C-contiguous
    NumPy arrays. Returns the pickle as bytes.
    """
    out = [b"\x80\x02"]  # PROTO 2

    def w(o):
        if o is None:
            out.append(b"N")
        elif isinstance(o, bool):
            out.append(b"\x88" if o else b"\x89")  # NEWTRUE / NEWFALSE
        elif isinstance(o, int):
            if 0 <= o < 256:
                out.append(b"K" + bytes([o]))  # BININT1
            elif 0 <= o < 65536:
                out.append(b"M" + struct.pack("<H", o))  # BININT2
            else:
                out.append(b"J" + struct.pack("<i", o))  # BININT
        elif isinstance(o, bytes):
            if len(o) < 256:
                out.append(b"U" + bytes([len(o)]) + o)  # SHORT_BINSTRING
            else:
                out.append(b"T" + struct.pack("<I", len(o)) + o)  # BINSTRING
        elif isinstance(o, tuple):
            out.append(b"(")
            for e in o:
                w(e)
            out.append(b"t")  # MARK ... TUPLE
        elif isinstance(o, list):
            out.append(b"](")
            for e in o:
                w(e)
            out.append(b"e")  # EMPTY_LIST MARK ... APPENDS
        elif isinstance(o, dict):
            out.append(b"}(")
            for k, v in o.items():
                w(k)
                w(v)
            out.append(b"u")  # EMPTY_DICT MARK ... SETITEMS
        elif isinstance(o, np.dtype):
            out.append(b"cnumpy\ndtype\n")
            w((o.str[1:].encode(), 0, 1))
            out.append(b"R")  # dtype('u1', 0, 1)
            w((3, o.str[:1].encode(), None, None, None, -1, -1, 0))
            out.append(b"b")  # BUILD: dtype.__setstate__
        elif isinstance(o, np.ndarray):
            out.append(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            w((0,))
            w(b"b")
            out.append(b"\x87R")  # _reconstruct(ndarray, (0,), 'b')
            w((1, o.shape, o.dtype, False, np.ascontiguousarray(o).tobytes()))
            out.append(b"b")  # BUILD: ndarray.__setstate__
        else:
            raise TypeError(f"py2_pickle cannot write {type(o).__name__}")

    w(obj)
    out.append(b".")
    return b"".join(out)


def cifar_batch(x, y, label_key="labels", batch_label=b"training batch 1 of 5"):
    """The dict of one CIFAR batch: x uint8 (n, 3, 32, 32), y (n,) ints."""
    d = {b"batch_label": batch_label, b"data": x.reshape(len(x), -1)}
    if label_key == "fine_labels":
        d[b"coarse_labels"] = [int(v) // 5 for v in y]
    d[label_key.encode()] = [int(v) for v in y]
    d[b"filenames"] = [f"img_{i:05d}.png".encode() for i in range(len(x))]
    return d


def random_cifar(name, n_train, n_test, seed=0):
    """Random images and labels for a CIFAR dataset: ``{member: (x, y)}`` (train split evenly
    over the official batch files)."""
    info = DATASETS[name]
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        members = info["splits"][split]
        for m, k in zip(members, np.array_split(np.arange(n), len(members))):
            x = rng.integers(0, 256, (len(k), 3, 32, 32), dtype=np.uint8)
            y = rng.integers(0, info["classes"], len(k))
            out[m] = (x, y)
    return out


def write_cifar_archive(path, name, batches, pickler=py2_pickle, extra=(), compresslevel=6):
    """Write an official-style ``cifar-*-python.tar.gz`` at ``path``.

    batches: ``{member: (x, y)}`` (see :func:`random_cifar`) or ``{member: raw pickle bytes}``.
    extra: further ``tarfile.TarInfo``/bytes pairs to append (for malicious archives).
    """
    info = DATASETS[name]
    with tarfile.open(path, "w:gz", compresslevel=compresslevel) as tf:
        d = tarfile.TarInfo(info["folder"])
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(d)
        for m, v in batches.items():
            blob = v if isinstance(v, bytes) else pickler(cifar_batch(*v, info["label_key"]))
            t = tarfile.TarInfo(f"{info['folder']}/{m}")
            t.size = len(blob)
            tf.addfile(t, io.BytesIO(blob))
        for t, blob in extra:
            tf.addfile(t, io.BytesIO(blob) if blob is not None else None)
    return path


def idx_bytes(a):
    """The IDX encoding of a uint8 array: magic ``0x0800 | ndim``, big-endian sizes, values."""
    a = np.ascontiguousarray(a, dtype=np.uint8)
    return struct.pack(f">I{a.ndim}I", 0x800 | a.ndim, *a.shape) + a.tobytes()


def write_idx_dataset(folder, n_train, n_test, seed=0, classes=10):
    """Write the four official ``*-ubyte.gz`` files of random 28x28 images into ``folder``.

    Returns ``{"train": (x, y), "test": (x, y)}`` with x uint8 (n, 1, 28, 28).
    """
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, classes, n).astype(np.uint8)
        images, labels = DATASETS["mnist"]["splits"][split]
        for fname, a in ((images, x), (labels, y)):
            with gzip.open(os.path.join(folder, fname), "wb", compresslevel=1) as f:
                f.write(idx_bytes(a))
        out[split] = (x[:, None], y.astype(np.int64))
    return out
