"""Readers of the two official on-disk formats, validating everything they read.

- CIFAR "python version": pickles written by Python 2 ``cPickle`` (protocol 2), a dict with
  ``b"data"`` (uint8 ``(N, 3072)``, each row the R, G, B planes of a 32x32 image) and
  ``b"labels"`` (CIFAR-10) or ``b"fine_labels"``/``b"coarse_labels"`` (CIFAR-100), packed in a
  ``.tar.gz``. Read with :class:`RestrictedUnpickler`, which builds only containers, bytes,
  strings, numbers and NumPy arrays, and members are read straight from the tar (nothing is
  extracted to disk, so nothing can be left half-extracted).
- IDX (MNIST, Fashion-MNIST): big-endian header ``0, 0, dtype=0x08, ndim`` then ``ndim``
  uint32 sizes, then the uint8 values; gzipped.

Every problem raises :class:`DatasetError` with one line naming the file.
"""
import _codecs
import contextlib
import gzip
import pickle
import posixpath
import struct
import tarfile
import zlib

import numpy as np

from .errors import DatasetError

try:  # NumPy >= 2 moved the module; the old name warns on import, so resolve it ourselves
    from numpy._core.multiarray import _reconstruct
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import _reconstruct

# The only globals a CIFAR pickle may name, mapped to the objects we hand back. Python 2's
# pickles name numpy.core.multiarray, NumPy 2's name numpy._core.multiarray. Python 3 writes
# bytes at protocol 2 as _codecs.encode(str, "latin1") (what torch's weights_only loader allows
# too); it only converts a string with a text codec.
SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs.encode,
}

CIFAR_ROW = 3 * 32 * 32  # bytes per image: R, G, B planes of 32x32
CHUNK = 1 << 20
_CORRUPT = (OSError, EOFError, zlib.error, tarfile.TarError, struct.error)


@contextlib.contextmanager
def _file_errors(path, what):
    """Turn a missing, truncated or corrupt ``what`` at ``path`` into a one-line DatasetError."""
    try:
        yield
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except _CORRUPT as e:
        raise DatasetError(f"{path}: truncated or corrupt {what} ({type(e).__name__}: {e})") from None


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only :data:`SAFE_GLOBALS` and refuses everything else.

    A pickle runs code only through the callables it names (GLOBAL/STACK_GLOBAL, then
    REDUCE/BUILD/NEWOBJ); every name passes through ``find_class``, so refusing it there means
    ``os.system`` and friends are never even imported. Persistent ids are refused too.
    """

    def __init__(self, file, where):
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes, as the originals need
        self.where = where

    def find_class(self, module, name):
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise DatasetError(f"{self.where}: refusing to unpickle {module}.{name} "
                               "(a CIFAR batch holds only arrays, lists, bytes and numbers)") from None

    def persistent_load(self, pid):
        raise DatasetError(f"{self.where}: refusing a pickle with persistent ids")


def safe_unpickle(f, where):
    """Unpickle ``f`` with :class:`RestrictedUnpickler`; any failure is a DatasetError."""
    try:
        return RestrictedUnpickler(f, where).load()
    except DatasetError:
        raise
    except Exception as e:  # truncated stream, bad opcode, wrong arguments to an allowed global
        raise DatasetError(f"{where}: not a valid pickle ({type(e).__name__}: {e})") from None


def parse_cifar_batch(obj, where, label_key, num_classes):
    """Validate an unpickled CIFAR batch and return ``(x, y)``.

    Returns x: uint8 (N, 3, 32, 32) and y: int64 (N,), labels checked to lie in
    ``[0, num_classes)``.
    """
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a dict, found {type(obj).__name__}")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    for key in ("data", label_key):
        if key not in d:
            raise DatasetError(f"{where}: missing key {key!r} (found {sorted(map(str, d))})")
    data = d["data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == CIFAR_ROW):
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{where}: 'data' must be uint8 (N, {CIFAR_ROW}), found {desc}")
    labels = d[label_key]
    if not isinstance(labels, (list, np.ndarray)):
        raise DatasetError(f"{where}: {label_key!r} must be a list of ints, found {type(labels).__name__}")
    try:
        y = np.asarray(labels)
    except Exception:
        raise DatasetError(f"{where}: {label_key!r} is not a list of ints") from None
    if y.ndim != 1 or (y.dtype.kind not in "iu" and y.size > 0):
        raise DatasetError(f"{where}: {label_key!r} is not a flat list of ints ({y.dtype} {y.shape})")
    y = y.astype(np.int64)
    check_labels(y, num_classes, where, label_key)
    if len(y) != len(data):
        raise DatasetError(f"{where}: {len(data)} images but {len(y)} labels")
    x = data.reshape(-1, 3, 32, 32)  # (N, 3072) -> (N, C, H, W): rows are the R, G, B planes
    return x, y


def check_labels(y, num_classes, where, what="labels"):
    """Raise DatasetError unless every label of y (int (N,)) lies in ``[0, num_classes)``."""
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DatasetError(f"{where}: {what} outside 0..{num_classes - 1} "
                           f"(found {int(y.min())}..{int(y.max())})")


def read_cifar_file(path, label_key, num_classes):
    """Read one CIFAR batch file from an extracted folder; returns ``(x, y)``."""
    try:
        with open(path, "rb") as f:
            obj = safe_unpickle(f, path)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_cifar_batch(obj, path, label_key, num_classes)


def _unsafe_reason(m):
    """Why a tar member would be unsafe to extract, or None. We never extract, but an
    archive holding such members is not the official one: refuse it whole."""
    name = m.name
    if name.startswith(("/", "\\")) or posixpath.isabs(name) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "a '..' path"
    if m.issym() or m.islnk():
        return f"a link to {m.linkname!r}"
    if not (m.isfile() or m.isdir()):
        return "a device, fifo or other special file"
    return None


def read_tar_members(path, wanted, parse):
    """Read the members named in ``wanted`` from the tar at ``path`` in one streaming pass.

    ``parse(fileobj, name, where)`` turns member ``name`` into a value (``where`` names it in
    messages: ``archive:member``); returns ``{name: value}``. The
    members are read in archive order as the gzip stream goes by (seeking back in a .tar.gz
    would decompress it again from the start). Any unsafe member anywhere, a missing member,
    or a truncated/corrupt archive raises DatasetError; nothing is written to disk.
    """
    found = {}
    with _file_errors(path, "archive"), tarfile.open(path, "r:*") as tf:
        for m in tf:
            reason = _unsafe_reason(m)
            if reason:
                raise DatasetError(f"{path}: unsafe archive member {m.name!r} ({reason}); "
                                   "not the official archive")
            name = posixpath.normpath(m.name)
            if name in wanted and m.isfile():
                f = tf.extractfile(m)
                found[name] = parse(f, name, f"{path}:{name}")
        # Iteration stops at the tar's end marker; read on to the end of the gzip stream so
        # that gzip checks its CRC and length: a flipped byte anywhere is then an error.
        while tf.fileobj.read(CHUNK):
            pass
    missing = [w for w in wanted if w not in found]
    if missing:
        raise DatasetError(f"{path}: archive lacks {', '.join(missing)}")
    return found


IDX_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic number of uint8 images / labels


def read_idx(path, ndim):
    """Read an IDX file of uint8 values (gzipped when the name ends in ``.gz``).

    Checks the magic number (2051 for ``ndim=3`` images, 2049 for ``ndim=1`` labels), that the
    body holds exactly ``prod(dims)`` bytes (no truncation, no trailing bytes), and the gzip CRC.
    Returns a writable uint8 array of shape ``dims``. Only the size the header announces is
    allocated, so a forged header cannot make us read without bound.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with _file_errors(path, "file"), opener(path, "rb") as f:
        head = _read_exact(f, 4 + 4 * ndim)
        if len(head) < 4:
            raise DatasetError(f"{path}: truncated header ({len(head)} bytes)")
        magic = struct.unpack(">I", head[:4])[0]
        if magic != IDX_MAGIC[ndim]:
            raise DatasetError(f"{path}: wrong magic number {magic} (expected {IDX_MAGIC[ndim]} "
                               f"for uint8 {'images' if ndim == 3 else 'labels'})")
        if len(head) < 4 + 4 * ndim:
            raise DatasetError(f"{path}: truncated header ({len(head)} bytes)")
        dims = struct.unpack(f">{ndim}I", head[4:])
        size = int(np.prod(dims, dtype=np.int64))
        if size > 2**33:
            raise DatasetError(f"{path}: implausible dimensions {dims}")
        buf = np.empty(size, np.uint8)
        got = _readinto_exact(f, buf)
        if got < size:
            raise DatasetError(f"{path}: truncated: {got} of {size} data bytes "
                               f"for dimensions {dims}")
        if f.read(1):
            raise DatasetError(f"{path}: trailing bytes after {size} data bytes for dimensions {dims}")
    return buf.reshape(dims)


def _read_exact(f, n):
    out = b""
    while len(out) < n:
        chunk = f.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def _readinto_exact(f, buf):
    """Fill ``buf`` from ``f`` (gzip returns short reads); returns the bytes read."""
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def read_idx_pair(images_path, labels_path, num_classes):
    """Read matching IDX images and labels; returns x uint8 (N, 1, H, W), y int64 (N,)."""
    x = read_idx(images_path, 3)  # (N, H, W)
    y = read_idx(labels_path, 1).astype(np.int64)  # (N,)
    if len(x) != len(y):
        raise DatasetError(f"{labels_path}: {len(y)} labels but {images_path} holds {len(x)} images")
    check_labels(y, num_classes, labels_path)
    return x[:, None], y  # (N, H, W) -> (N, 1, H, W)


def cifar_member_parser(label_key, num_classes):
    """A function ``parse(fileobj, where) -> (x, y)`` reading one CIFAR batch."""
    def parse(f, where):
        return parse_cifar_batch(safe_unpickle(f, where), where, label_key, num_classes)
    return parse
