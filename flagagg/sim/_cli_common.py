"""Arguments and output shared by ``flagagg demo | experiment | tune``."""

from __future__ import annotations

from ..cli import report_error

__all__ = ["add_common_arguments", "load_from_args", "report_error"]


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
                        help="processes to run on (default: 1); results do not depend on it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def load_from_args(source, args):
    """Load and validate the config named by ``source`` with the CLI's selections."""
    from ..training._config import load_config

    config = load_config(source, rules=args.rules, attacks=args.attacks)
    if args.rounds is not None:
        config = config.replace(rounds=args.rounds, eval_every=min(config.eval_every, args.rounds))
    return config

