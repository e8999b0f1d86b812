"""Arguments and output shared by ``flagagg demo | experiment | tune``."""

from __future__ import annotations

from .._cli_errors import report_error
from ..training._config import load_config

__all__ = ["add_common_arguments", "check_executor", "load_from_args", "report_error",
           "resume_command"]


def add_common_arguments(parser, *, seeds=True):
    """Add --rules, --attacks, --seeds, --rounds, --jobs and --quiet to ``parser``."""
    parser.add_argument("--rules", nargs="+", metavar="LABEL",
                        help="run only these rules of the config (labels of [rules.*])")
    parser.add_argument("--attacks", nargs="+", metavar="LABEL",
                        help="run only these attacks of the config (labels of [attacks.*])")
    if seeds:
        parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                            help="seeds to report on (default: the config's seeds)")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help="override the number of training rounds (quick looks)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="processes to run on (default: 1); with --executor ray, the "
                             "CPUs of the private Ray it starts. Results do not depend on it")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: this machine's processes (--jobs); ray: every run is "
                             "a Ray task of one CPU (default: local)")
    parser.add_argument("--address", metavar="ADDR",
                        help="with --executor ray: the Ray cluster to run on ('auto', "
                             "HOST:6379 or ray://HOST:10001); default: a private Ray on "
                             "this machine, on loopback")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def check_executor(args):
    """The executor arguments' error message, or None when they fit together."""
    if args.jobs < 1:
        return f"--jobs must be >= 1: got {args.jobs}"
    if args.address is not None and args.executor != "ray":
        return "--address is a Ray cluster's address: it needs --executor ray"
    return None


def resume_command(args):
    """The command line that ran (and resumes) this grid, as a shell would take it."""
    import shlex

    argv = getattr(args, "argv", None)
    if argv is None:
        return None
    return shlex.join(["flagagg", *argv])


def load_from_args(source, args):
    """Load and validate the config named by ``source`` with the CLI's selections."""
    config = load_config(source, rules=args.rules, attacks=args.attacks)
    if args.rounds is not None:
        config = config.replace(rounds=args.rounds, eval_every=min(config.eval_every, args.rounds))
    return config

