"""The run directory's files, written so that a fault loses nothing, and read back with checks.

A run directory (docs/api.md) holds ``config.json``, ``metrics.csv``, ``evolution.jsonl``,
``checkpoint.npz`` and ``result.json``. ``cht.trainer`` decides what goes into them; this module
only moves it to and from the disk.

Writing. Whole files (config, checkpoint, result, a log rewritten on resume) go to a temporary
file of their own, ``<name>.<random>.tmp``, are flushed and fsynced, then renamed over
``<name>``: a reader sees the old file or the new one, never a mix, and two writers of the same
file (two reports of one folder) never write into each other's temporary file. The two logs are appended, fsynced, and cut back to their
previous length when an append fails. Any failure (a full disk: ENOSPC, EDQUOT; EIO; Ctrl-C or
SIGTERM in the middle) removes the temporary file; an OSError becomes ``WriteError``, one line
naming the file, and the files already there stay as they were.

Reading (``--resume``). Every file is checked as it is read: ``CorruptFile`` names the file and
what is wrong with it. A torn last line of ``evolution.jsonl`` (an append cut short where the
cut could not be undone) is not an error: that line belongs to an epoch after the checkpoint,
which resume drops anyway.

Order of the writes after an epoch (``RunDir.save_epoch``): logs, then checkpoint, and the log
lines undone when the checkpoint fails. The logs are never behind the checkpoint, and ahead of
it only after a crash between the two writes (or a failed undo): resume cuts them back to the
checkpoint's epoch.
"""
import csv
import io
import json
import os
import secrets
import zipfile
import zlib

import numpy as np

CONFIG, METRICS, EVOLUTION, CHECKPOINT, RESULT = (
    "config.json", "metrics.csv", "evolution.jsonl", "checkpoint.npz", "result.json")


class WriteError(RuntimeError):
    """A file of the run directory could not be written; the message is one line naming it."""

    def __init__(self, path, err):
        self.path = path
        super().__init__(f"cannot write {path}: {err.strerror or err}")


class CorruptFile(ValueError):
    """A file of the run directory cannot be used; the message is one line naming it."""

    def __init__(self, path, what):
        self.path = path
        super().__init__(f"{path}: {what}")


class RunDir:
    """The files of one run directory ``out`` (an existing folder)."""

    def __init__(self, out):
        self.out = out

    def path(self, name):
        return os.path.join(self.out, name)

    # -- writing ----------------------------------------------------------------------------
    def write_new(self, cfg, columns):
        """A new run's files: the metrics header, an empty evolution log, then ``config.json``.

        ``config.json`` comes last: a folder holding it holds a complete new run. On failure the
        files made here are removed again (the caller then removes the folder if it made it).
        """
        try:
            write_atomic(self.path(METRICS), csv_line(columns))
            write_atomic(self.path(EVOLUTION), "")
            write_atomic(self.path(CONFIG), json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        except BaseException:
            for name in (METRICS, EVOLUTION):
                _remove(self.path(name))
            raise

    def save_epoch(self, row, records, arrays):
        """The end of an epoch: its log lines (``append_epoch``), then its checkpoint
        (``write_checkpoint``). When the checkpoint fails the appends are undone too, so the logs
        stay at the last checkpoint."""
        sizes = self.append_epoch(row, records)
        try:
            self.write_checkpoint(arrays)
        except BaseException:
            for path, size in sizes:
                _truncate(path, size)
            raise

    def append_epoch(self, row, records):
        """Append one metrics row (a list of values) and the epoch's evolution records (dicts).

        Both logs or neither: when one append fails, both are cut back to their previous length.
        Returns ``[(path, length before)]`` of the two logs.
        """
        logs = [(self.path(METRICS), csv_line(_fmt(v) for v in row)),
                (self.path(EVOLUTION), "".join(json.dumps(r) + "\n" for r in records))]
        done = []  # (path, length before) of the logs touched so far
        try:
            for path, text in logs:
                done.append((path, os.path.getsize(path) if os.path.exists(path) else 0))
                _append(path, text.encode())
        except BaseException as e:
            for path, size in done:
                _truncate(path, size)
            if isinstance(e, OSError):
                raise WriteError(done[-1][0], e) from None
            raise
        return done

    def write_checkpoint(self, arrays):
        """``checkpoint.npz`` from ``{key: array}`` (``meta`` a JSON-able dict), atomically."""
        arrays = dict(arrays)
        arrays["meta"] = np.array(json.dumps(arrays["meta"], default=_py))
        write_atomic(self.path(CHECKPOINT), lambda f: np.savez(f, **arrays))

    def write_json(self, name, obj):
        write_atomic(self.path(name), json.dumps(obj, indent=2) + "\n")

    def rewrite_logs(self, rows, epoch):
        """Cut the logs back to the checkpoint of ``epoch``: ``rows`` (value lists, header first)
        become ``metrics.csv``; ``evolution.jsonl`` keeps its records of epochs <= ``epoch``."""
        kept = [line for line, rec in self._evolution_lines() if rec["epoch"] <= epoch]
        write_atomic(self.path(METRICS), "".join(csv_line(_fmt(v) for v in row) for row in rows))
        write_atomic(self.path(EVOLUTION), "".join(line + "\n" for line in kept))

    # -- reading ----------------------------------------------------------------------------
    def read_config(self):
        """``config.json`` as a dict. Raises CorruptFile (a missing file included)."""
        path = self.path(CONFIG)
        try:
            with open(path, "rb") as f:
                cfg = json.loads(f.read())
        except FileNotFoundError:
            raise CorruptFile(path, "not found (is this a run directory?)") from None
        except OSError as e:
            raise CorruptFile(path, f"cannot read it ({e.strerror or e})") from None
        except ValueError as e:  # bad UTF-8 or JSON
            raise CorruptFile(path, f"not valid JSON ({_first_line(e)})") from None
        if not isinstance(cfg, dict):
            raise CorruptFile(path, f"not a JSON object (a {type(cfg).__name__})")
        return cfg

    def read_checkpoint(self):
        """``checkpoint.npz`` as ``{key: NumPy array}``, with ``meta`` parsed into a dict.

        Raises CorruptFile for a missing, truncated or damaged file (the zip's CRC of every
        member is checked on reading) and for a missing or unreadable ``meta``.
        """
        path = self.path(CHECKPOINT)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise CorruptFile(path, "not found") from None
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
            raise CorruptFile(path, f"not a readable checkpoint ({_first_line(e)})") from None
        meta = arrays.get("meta")
        if meta is None or meta.shape != () or meta.dtype.kind != "U":
            raise CorruptFile(path, "no meta record (a JSON string)")
        try:
            arrays["meta"] = json.loads(str(meta))
        except ValueError as e:
            raise CorruptFile(path, f"meta is not valid JSON ({_first_line(e)})") from None
        if not isinstance(arrays["meta"], dict):
            raise CorruptFile(path, "meta is not a JSON object")
        return arrays

    def read_evolution(self):
        """The records (dicts) of ``evolution.jsonl``; none when it is missing. See below."""
        return [rec for _, rec in self._evolution_lines()]

    def _evolution_lines(self):
        """``[(line, record)]`` of ``evolution.jsonl`` (none when it is missing).

        A last line without its newline that does not parse is a torn append and is dropped;
        any other line must be a JSON object with an integer ``epoch``.
        """
        path = self.path(EVOLUTION)
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return []
        except OSError as e:
            raise CorruptFile(path, f"cannot read it ({e.strerror or e})") from None
        lines = text.split("\n")
        torn = lines.pop()  # "" after a complete last line
        records = []
        for number, line in enumerate(lines + [torn], 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                if number == len(lines) + 1:
                    break
                raise CorruptFile(path, f"line {number} is not valid JSON") from None
            if not (isinstance(rec, dict) and isinstance(rec.get("epoch"), int)):
                raise CorruptFile(path, f"line {number} is not a record with an integer epoch")
            records.append((line, rec))
        return records


def make_dirs(out):
    """Create the folder ``out`` and its missing parents; returns those created, outermost first."""
    made, p = [], os.path.abspath(out)
    while not os.path.isdir(p):
        made.insert(0, p)
        p = os.path.dirname(p)
    os.makedirs(out, exist_ok=True)
    return made


def remove_dirs(made):
    """Remove the folders ``make_dirs`` created, innermost first, as far as they are empty."""
    for d in reversed(made):
        try:
            os.rmdir(d)
        except OSError:
            return


def write_atomic(path, content):
    """Write ``path`` through a temporary file ``path.<random>.tmp``: write, flush, fsync, rename.

    content: a str (written as UTF-8) or a function ``fill(f)`` that writes to the binary file
    ``f``. On any failure the temporary file is removed and ``path`` is untouched; an OSError
    is raised as WriteError. The random part (``temporary_name``) is drawn per call, so writers
    of the same path in several threads, processes or hosts each have their own file.
    """
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError):
            raise WriteError(path, e) from None
        raise


def temporary_name(path):
    """``path.<12 random hex digits>.tmp``: where ``write_atomic`` writes before the rename."""
    return f"{path}.{secrets.token_hex(6)}.tmp"


def as_json(obj):
    """``obj`` as it reads back from JSON (tuples become lists, NumPy scalars numbers)."""
    return json.loads(json.dumps(obj, default=_py))


def check_like(value, ref, where):
    """Raise ValueError unless ``value`` has the structure of ``ref`` (both as from JSON).

    Dicts need the same keys, except that a key whose ``ref`` value is ``None`` may be absent. A
    list as long as ``ref``'s matches it item by item; a list of another length must have items
    that each look like ``ref``'s first (any items when ``ref``'s is empty). Numbers match
    numbers (not booleans), strings strings, and ``None`` in ``ref`` matches anything.
    ``where`` names the place in messages.
    """
    def kind(v):
        if isinstance(v, bool):
            return "a boolean"
        if isinstance(v, (int, float)):
            return "a number"
        return {dict: "an object", list: "a list", str: "a string"}.get(type(v), type(v).__name__)

    if ref is None:
        return
    if kind(value) != kind(ref):
        raise ValueError(f"{where} is {kind(value)}, expected {kind(ref)}")
    if isinstance(ref, dict):
        missing = sorted(k for k in set(ref) - set(value) if ref[k] is not None)
        extra = sorted(set(value) - set(ref))
        if missing or extra:
            raise ValueError(f"{where} " + (f"lacks {missing[0]!r}" if missing else f"has an unknown {extra[0]!r}"))
        for k in [k for k in ref if k in value]:
            check_like(value[k], ref[k], f"{where}.{k}")
    elif isinstance(ref, list) and ref:
        for i, v in enumerate(value):
            check_like(v, ref[i] if len(value) == len(ref) else ref[0], f"{where}[{i}]")


def csv_line(values):
    """One CSV line, ended by csv.writer's CRLF."""
    buf = io.StringIO()
    csv.writer(buf).writerow(list(values))
    return buf.getvalue()


def _append(path, data):
    """Append ``data`` (bytes) to ``path`` and fsync it, unbuffered so a short write is seen."""
    with open(path, "ab", buffering=0) as f:
        view = memoryview(data)
        while view:
            view = view[f.write(view):]
        os.fsync(f.fileno())


def _truncate(path, size):
    """Cut ``path`` back to ``size`` bytes, as well as the fault allows (resume copes if not)."""
    try:
        os.truncate(path, size)
    except OSError:
        pass


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _first_line(e):
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _py(v):
    """A JSON-able Python value from Python numbers, NumPy scalars and 0-d arrays."""
    if isinstance(v, (int, float, bool, str)):
        return v
    if hasattr(v, "item"):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v)}")


def _fmt(v):
    """Numbers in metrics.csv: integers as such, floats with full precision (repr)."""
    return v if isinstance(v, (int, str)) else repr(float(v))
