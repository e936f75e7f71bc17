"""``python -m cht.sweep OUT ...``: see the package docstring."""
import sys

from cht.runlock import stop_on_sigterm
from cht.sweep import entry

stop_on_sigterm()   # SIGTERM stops the sweep as Ctrl-C does: every run keeps its last checkpoint
sys.exit(entry())
