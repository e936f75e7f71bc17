"""``python -m cht.study {trace,evotrace,plots} RUN_DIR ...``: see ``docs/walkthrough.md``.

A user mistake (bad flag, missing run directory, unknown layer) prints one line on stderr and
exits with status 2.
"""
import argparse
import sys

from cht.study.common import StudyError, read_config

USAGE_ERROR = 2


class Parser(argparse.ArgumentParser):
    def error(self, message):                      # one line instead of argparse's usage block
        raise StudyError(message)


def build_parser():
    p = Parser(prog="python -m cht.study", description="Study mode: trace one training step, one "
               "evolution step, or draw a run directory's pictures. Each command replays the run "
               "from its config.json (deterministic on the CPU).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    t = sub.add_parser("trace", help="one training step, layer by layer, with finite-difference checks")
    t.add_argument("run_dir", help="a run directory written by run.py")
    t.add_argument("--epoch", type=int, default=1, help="epoch of the traced step (1-based; default: 1)")
    t.add_argument("--step", type=int, default=1, help="batch of that epoch (1-based; default: 1)")
    t.add_argument("--layer", default=None, help="layer whose raw arrays are saved, e.g. features.3 "
                   "(default: the first conv that computes dx)")
    t.add_argument("--fd-entries", type=int, default=3, help="finite-difference entries per weight (default: 3)")
    t.add_argument("--fd-batch", type=int, default=8, help="images of the batch used by the check (default: 8)")
    t.add_argument("--eps", type=float, default=1e-6, help="finite-difference step, float64 (default: 1e-6)")
    t.add_argument("--out", default=None, help="where trace.json and trace-<layer>.npz go (default: RUN_DIR)")
    e = sub.add_parser("evotrace", help="one evolution step of one layer, taken apart")
    e.add_argument("run_dir", help="a run directory written by run.py (method set, ch2, ch3 or rigl)")
    e.add_argument("--epoch", type=int, default=1, help="the evolution after this epoch (default: 1)")
    e.add_argument("--layer", default=None, help="sparse conv layer, e.g. features.17 (default: the second)")
    e.add_argument("--window", type=int, nargs=2, metavar=("I", "J"), default=None,
                   help="output window whose own CH scores are shown (default: the centre)")
    e.add_argument("--filters", type=int, default=2, help="filters printed in full (default: 2)")
    e.add_argument("--out", default=None, help="where evotrace-e<epoch>.npz goes (default: RUN_DIR)")
    g = sub.add_parser("plots", help="draw curves, density/ITOP and mask pictures into RUN_DIR/plots")
    g.add_argument("run_dir", help="a run directory written by run.py")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "plots":
        from cht.study import plots
        plots.run(args.run_dir)
        return 0
    cfg = read_config(args.run_dir)
    if args.command == "trace":
        from cht.study import trace
        if args.fd_entries < 1 or args.fd_batch < 1 or not args.eps > 0:
            raise StudyError("--fd-entries and --fd-batch must be >= 1 and --eps > 0")
        trace.run(args.run_dir, cfg, args.epoch, args.step, args.layer, args.fd_entries, args.eps,
                  args.fd_batch, args.out)
    else:
        from cht.study import evotrace
        evotrace.run(args.run_dir, cfg, args.epoch, args.layer, args.window, args.filters, args.out)
    return 0


def entry(argv=None):
    try:
        return main(argv)
    except StudyError as e:
        print(f"python -m cht.study: error: {e}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(entry())
