"""``flagagg tune CONFIG``: each rule's learning rate, by worst case on validation seeds."""

from __future__ import annotations

from pathlib import Path

from ..training._config import ConfigError
from ._cli_common import add_common_arguments, check_executor, load_from_args, report_error
from ._tune import tune


def add_arguments(parser):
    """Declare the command-line arguments of ``flagagg tune``."""
    parser.description = (
        "Try each learning rate of the grid for every rule on the config's validation "
        "seeds, measuring validation accuracy, and choose the one with the best worst case "
        "over attacks and f. Prints the scores and the chosen values."
    )
    parser.add_argument("config", help="TOML config file, or the name of a shipped config")
    parser.add_argument("--lr-grid", nargs="+", type=float, metavar="LR",
                        help="learning rates to try (default: each rule's lr_grid, else the "
                             "config's [tune] lr_grid)")
    parser.add_argument("--output", metavar="FILE.toml",
                        help="write the config with the tuned learning rates to this file")
    add_common_arguments(parser, seeds=False)


def run(args):
    """Tune; return the exit status."""
    problem = check_executor(args)
    if problem:
        return report_error(ValueError(problem))
    try:
        config = load_from_args(args.config, args)
    except (ConfigError, FileNotFoundError) as exc:
        return report_error(exc)
    result = tune(config, lr_grid=args.lr_grid, progress=False if args.quiet else None,
                  jobs=args.jobs, executor=args.executor, address=args.address)
    print(result.table())
    print()
    print(f"chosen learning rates ({result.seconds:.0f} s):")
    print(result.snippet())
    if args.output:
        header = (f"written by `flagagg tune` from {config.source}: learning rates chosen by "
                  f"worst-case validation accuracy on seeds {list(config.validation_seeds)}")
        Path(args.output).write_text(result.config.to_toml(header), encoding="utf-8")
        print(f"tuned config written to {args.output}")
    return 0
