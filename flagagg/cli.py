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
    whole_process = argv is None  # the console script or python -m flagagg
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
    status = int(module.run(args) or 0)
    if whole_process:
        _before_exit()
    return status


def _before_exit():
    """Spare the process the garbage collector's passes of its shutdown.

    The interpreter's shutdown runs full collections over every object left,
    about 170,000 once PyTorch is imported: 0.4 to 0.5 s of CPU (measured:
    ``python -c "import torch"`` takes 1.6 s of CPU, 1.1 s when it freezes
    its objects first), a tenth of a short grid's. The command has finished
    and written everything; frozen objects are skipped by those passes and
    freed with the process. Only when the command line is the whole process.
    """
    import gc

    gc.freeze()
