"""``python -m cht.sweep.child PARENT_PID RUN_PY ARGS...``: run.py as one run of a sweep.

It is run.py itself (``RUN_PY`` executed as ``__main__`` with ``ARGS``, as ``python RUN_PY
ARGS`` would), plus one thing: when its parent (the sweep, or the Ray worker that started it)
is gone, killed even with SIGKILL, it stops as on SIGTERM, at once: the lock of its run
directory is released, the checkpoint of the last finished epoch stays, and no orphan keeps
training a run that the next sweep would find locked.
"""
import os
import runpy
import signal
import sys
import threading

POLL = 0.2  # seconds between two looks at the parent


def watch_parent(parent):
    """Send SIGTERM to this process as soon as its parent is no longer ``parent``."""
    def loop():
        while os.getppid() == parent:
            threading.Event().wait(POLL)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=loop, name="watch-parent", daemon=True).start()


def main(argv):
    parent, script, args = int(argv[0]), argv[1], argv[2:]
    from cht.runlock import stop_on_sigterm
    stop_on_sigterm()
    watch_parent(parent)
    sys.argv = [script] + args
    sys.path[0] = os.path.dirname(os.path.abspath(script))   # as for ``python run.py``
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
