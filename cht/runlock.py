"""One trainer per run directory: a lock file naming its holder, refreshed while it trains.

    with RunLock(run_dir):          # raises LockHeld (one line naming the holder) if taken
        trainer.fit()

The lock is the file ``run_dir/run.lock``, a JSON object ``{pid, host, started, token, ...}``:

- created atomically (``O_CREAT | O_EXCL``: of several processes exactly one creates it, on a
  local disk and on NFS alike);
- held for as long as the ``with`` block runs, and removed when it ends, whatever ends it: a
  normal return, an exception, Ctrl-C, or SIGTERM once :func:`stop_on_sigterm` turned it into
  KeyboardInterrupt;
- refreshed by a heartbeat thread, which sets the file's mtime every ``HEARTBEAT`` seconds and
  checks that the file still names this holder;
- taken over when its holder is gone. On the holder's own host a dead pid tells (checked with
  the process's start time, so a reused pid does not count as alive). From another host the pid
  cannot be checked, as when a sweep on a shared filesystem retries a lost worker's run on
  another node: there a lock whose mtime is older than ``STALE_AFTER`` seconds counts as
  abandoned. This assumes the nodes' clocks agree to within a few seconds (NTP).

A holder whose lock was taken over meanwhile (its heartbeat stalled for ``STALE_AFTER``
seconds: a suspended machine, a network partition) finds out at its next heartbeat and stops:
a line on stderr, then ``LockLost`` (a KeyboardInterrupt) in the main thread, so two processes
never keep training one directory. It arrives through a handler of its own (``LOST_SIGNAL``,
simulated by ``_thread.interrupt_main``, never sent by the system), because Ctrl-C's SIGINT is
ignored in a process started in the background by a script (``nohup python run.py ... &``).
"""
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid

LOCK_NAME = "run.lock"
HEARTBEAT = 10.0      # seconds between two refreshes of the lock's mtime
STALE_AFTER = 60.0    # a lock not refreshed for this long (another host's) is abandoned
LOST_SIGNAL = signal.SIGUSR1  # what the heartbeat raises LockLost through, in the main thread


class LockHeld(Exception):
    """The run directory is being trained by another live process; the message is one line."""

    def __init__(self, path, holder):
        self.holder = holder
        super().__init__(f"{os.path.dirname(path) or '.'} is being trained by {describe(holder)}")


def describe(holder):
    """``pid 123 on host h (since 2025-01-02 10:11:12)`` for a lock's content."""
    if not holder:
        return "another process (its lock file is being written)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {since})"


def _proc_start(pid):
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after "pid (comm)"
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid, proc_start):
    """Whether process ``pid`` (started at ``proc_start`` ticks, if known) runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # alive, another user's
        pass
    now = _proc_start(pid)
    return proc_start is None or now is None or now == proc_start   # else: the pid was reused


def read(path):
    """The lock file's content, ``{}`` while it is being written or unreadable, None if absent."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def is_stale(path, holder, stale_after=None):
    """Whether the lock at ``path`` with content ``holder`` was abandoned (module docstring)."""
    stale_after = STALE_AFTER if stale_after is None else stale_after
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return True
    if holder and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return not _alive(holder["pid"], holder.get("proc_start"))
    return age > stale_after


def holder(run_dir, stale_after=None):
    """The content of ``run_dir``'s live lock (``{}`` while being written), None when free or stale."""
    path = os.path.join(run_dir, LOCK_NAME)
    content = read(path)
    if content is None or is_stale(path, content, stale_after):
        return None
    return content


class LockLost(KeyboardInterrupt):
    """Another process took this run directory's lock over; raised in the main thread, where
    Ctrl-C raises KeyboardInterrupt (a subclass, so that the same clean-up runs)."""


def _raise_lost(signum, frame):
    raise LockLost


class RunLock:
    """The lock of one run directory (module docstring). ``acquire`` / ``release``, or ``with``.

    ``log``: where a takeover or a lost lock is reported (default stderr).
    """

    def __init__(self, run_dir, heartbeat=None, stale_after=None, log=None):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.heartbeat = HEARTBEAT if heartbeat is None else heartbeat
        self.stale_after = STALE_AFTER if stale_after is None else stale_after
        self.log = log or sys.stderr
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread = None
        self._replaced = None    # (the LOST_SIGNAL handler ours replaced,) in the main thread

    def content(self):
        return dict(pid=os.getpid(), host=socket.gethostname(), started=time.time(),
                    proc_start=_proc_start(os.getpid()), token=self.token)

    def _create(self):
        """Create the lock file with our content; False if it exists."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.content()) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self):
        """Take the lock, taking over an abandoned one. Raises LockHeld. Returns self."""
        for _ in range(10):                              # each turn loses only to another process's progress
            if self._create():
                self._start_heartbeat()
                return self
            seen = read(self.path)
            if seen is None:                             # released meanwhile
                continue
            if not is_stale(self.path, seen, self.stale_after):
                raise LockHeld(self.path, seen)
            # Move the abandoned file aside under a name only we use, then check that what moved
            # is the file judged abandoned: another process may have taken it over in between.
            aside = f"{self.path}.{self.token}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            moved = read(aside) or {}
            if moved.get("token") != seen.get("token"):  # a fresh lock: put it back
                try:
                    os.link(aside, self.path)
                except OSError:
                    pass                                 # its holder sees the loss at its next heartbeat
                os.unlink(aside)
                raise LockHeld(self.path, moved)
            os.unlink(aside)
            self.log.write(f"taking over the lock of {os.path.dirname(self.path)} from {describe(seen)}, "
                           f"which is gone\n")
        raise LockHeld(self.path, read(self.path))

    def _start_heartbeat(self):
        if threading.current_thread() is threading.main_thread():
            self._replaced = (signal.signal(LOST_SIGNAL, _raise_lost),)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="runlock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self):
        import _thread
        while not self._stop.wait(self.heartbeat):
            if (read(self.path) or {}).get("token") != self.token:
                self.lost = True
                self.log.write(f"\nlost the lock of {os.path.dirname(self.path)} to "
                               f"{describe(read(self.path))}; stopping\n")
                # LockLost in the training loop (off the main thread: Ctrl-C's KeyboardInterrupt)
                _thread.interrupt_main(LOST_SIGNAL if self._replaced else signal.SIGINT)
                return
            try:
                os.utime(self.path)
            except OSError:
                pass                                     # checked again at the next beat

    def release(self):
        """Stop the heartbeat and remove the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        if self._replaced and threading.current_thread() is threading.main_thread():
            prev = self._replaced[0]
            signal.signal(LOST_SIGNAL, signal.SIG_DFL if prev is None else prev)   # None: not set from Python
            self._replaced = None
        if (read(self.path) or {}).get("token") == self.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler), raised where Ctrl-C raises KeyboardInterrupt; a
    subclass, so that a message can tell the two apart."""


def stop_on_sigterm():
    """Make SIGTERM raise ``Terminated`` in the main thread, so ``finally`` blocks (the lock's
    release, a temporary file's removal, an interrupted run's message) run as for Ctrl-C; a
    second SIGTERM during that shutdown is ignored (SIGKILL still ends the process). Returns the
    handler it replaced; off the main thread it changes nothing and returns None."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    return signal.signal(signal.SIGTERM, handler)
