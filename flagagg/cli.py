"""Command-line interface: ``flagagg demo | experiment | tune | train | certs``.

Each sub-command lives in the module that implements it; that module offers
``add_arguments(parser)`` and ``run(args) -> int`` and is imported only when
its sub-command runs, so ``flagagg --help`` does not import torch. The speed
report is not a sub-command: it runs from a source checkout (``make bench``,
``asv_bench/report.py``), where the asv suite it shares its data with lives.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# sub-command -> (module, one-line help)
COMMANDS = {
    "demo": ("flagagg.sim._cli_demo", "short robust-training comparison: a table and a plot"),
    "experiment": ("flagagg.sim._cli_experiment", "run a rules x attacks x f x seeds grid"),
    "tune": ("flagagg.sim._cli_tune", "tune each rule's learning rate on validation seeds"),
    "train": ("flagagg.distributed._cli", "parameter-server training on torch.distributed"),
    "certs": ("flagagg.distributed._cli_certs", "issue a training run's TLS certificates, "
              "one file per process"),
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    status : int
        The process exit status.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    top = argparse.ArgumentParser(
        prog="flagagg",
        description="Byzantine-robust gradient aggregation.",
        epilog="\n".join(f"  {name:<11} {text}" for name, (_, text) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"flagagg {__version__}")
    top.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND",
                     help="one of: " + ", ".join(COMMANDS))
    top.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the command")
    if not argv:
        # no command: say what there is, rather than a usage error
        top.print_help()
        return 0
    ns = top.parse_args(argv)
    module_name, text = COMMANDS[ns.command]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"flagagg {ns.command}", description=text)
    module.add_arguments(sub)
    args = sub.parse_args(ns.args)
    # the exact command, for messages that say how to run it again (resume a grid)
    args.argv = [ns.command, *ns.args]
    return int(module.run(args) or 0)
