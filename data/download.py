"""Downloading one file safely: temporary file, checksum, atomic rename.

Only ``urllib`` is used. The file is written to a hidden ``.<name>.*.part`` file in the
destination folder (the same file system, so the final ``os.replace`` is atomic), its MD5 is
computed while it streams in, and it is renamed into place only when the byte count and the
checksum both match. On any failure, Ctrl-C included, the temporary file is removed: a file
with the final name is always complete and verified.

Mirrors: ``MINICNN_DATA_MIRROR=<base>`` (or ``mirror=`` in :func:`data.load`) replaces the
official base URLs by ``<base>/<dataset>/`` (e.g. ``http://host/fashion-mnist/t10k-...gz``),
``file://`` URLs included; the official checksums still apply.
"""
import hashlib
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from http.client import HTTPException

from .errors import DatasetError

MIRROR_ENV = "MINICNN_DATA_MIRROR"
CHUNK = 1 << 20


def url_for(base, dataset, filename, mirror=None):
    """The URL of ``filename``: ``<mirror>/<dataset>/<filename>`` when a mirror is given (the
    argument, else $MINICNN_DATA_MIRROR), else the official ``<base><filename>``."""
    mirror = mirror or os.environ.get(MIRROR_ENV)
    if mirror:
        return f"{mirror.rstrip('/')}/{dataset}/{filename}"
    return base + filename


class _Progress:
    """One progress line on stderr: ``\\r``-updated on a tty, start and end lines otherwise."""

    def __init__(self, name, total, stream=None):
        self.name, self.total, self.stream = name, total, stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.last = 0.0
        if not self.tty:
            self._write(f"downloading {name} ({self._mb(total)})\n")

    @staticmethod
    def _mb(n):
        return "size unknown" if n is None else f"{n / 1e6:.1f} MB"

    def _write(self, s):
        self.stream.write(s)
        self.stream.flush()

    def update(self, done):
        """Redraw the line with ``done`` bytes received (tty only)."""
        now = time.monotonic()
        if self.tty and now - self.last > 0.1:  # at most 10 redraws per second
            self.last = now
            pct = f" {100 * done / self.total:3.0f}%" if self.total else ""
            self._write(f"\rdownloading {self.name}: {done / 1e6:.1f}/{self._mb(self.total)}{pct}")

    def finish(self, done, ok):
        """End the line: ``done`` bytes, and whether the file was kept."""
        status = "done" if ok else "failed"
        line = f"downloading {self.name}: {done / 1e6:.1f} MB {status}"
        self._write("\r" + line + " " * 20 + "\n" if self.tty else line + "\n")


def download_file(url, dest, md5, timeout=60.0, progress=True):
    """Fetch ``url`` to the path ``dest``, verify its MD5, and rename it into place atomically.

    Raises DatasetError (one line, naming the URL and the destination) when the server cannot
    be reached, answers with an HTTP error, closes early, or sends bytes whose MD5 is not
    ``md5``. Leaves no partial file behind, nor a folder it made. Returns ``dest``.
    """
    folder = os.path.dirname(os.path.abspath(dest))
    name = os.path.basename(dest)
    made, p = [], folder  # the folders made here, innermost first: removed again if nothing is kept
    while not os.path.exists(p):
        made.append(p)
        p = os.path.dirname(p)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"{dest}: cannot create the folder {folder} ({e.strerror or e})") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
    bar, done, ok = None, 0, False
    try:
        h = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    length = r.headers.get("Content-Length") if hasattr(r, "headers") else None
                    total = int(length) if length and length.isdigit() else None
                    bar = _Progress(name, total) if progress else None
                    for chunk in iter(lambda: r.read(CHUNK), b""):
                        out.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        if bar:
                            bar.update(done)
            except urllib.error.HTTPError as e:
                raise DatasetError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
            except urllib.error.URLError as e:
                raise DatasetError(f"cannot download {url}: {e.reason} (offline? put {name} in "
                                   f"{folder} by hand, or set ${MIRROR_ENV})") from None
            except (HTTPException, socket.timeout, OSError) as e:
                raise DatasetError(f"cannot download {url}: connection broken after {done} bytes "
                                   f"({type(e).__name__}: {e})") from None
        if total is not None and done != total:
            raise DatasetError(f"cannot download {url}: connection closed after {done} of {total} bytes")
        digest = h.hexdigest()
        if digest != md5:
            raise DatasetError(f"downloaded {url} has MD5 {digest}, expected {md5} "
                               "(corrupt or tampered download; nothing kept)")
        os.replace(tmp, dest)  # atomic on one file system: dest is complete or absent
        ok = True
    finally:
        if not ok:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            for d in made:
                try:
                    os.rmdir(d)
                except OSError:
                    break
        if bar:
            bar.finish(done, ok)
    return dest
