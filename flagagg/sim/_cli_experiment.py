"""``flagagg experiment CONFIG``: run a rules x attacks x f x seeds grid."""

from __future__ import annotations

import time

from ._cli_common import add_common_arguments, load_from_args, report_error


def add_arguments(parser):
    """Declare the command-line arguments of ``flagagg experiment``."""
    parser.add_argument("config",
                        help="TOML config file, or the name of a shipped config "
                             "(e.g. demo, fa_ablation, hard)")
    parser.add_argument("--output", default="results", metavar="DIR",
                        help="folder for results and plots (default: results)")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="split to measure accuracy on (default: test)")
    parser.add_argument("--no-plots", action="store_true", help="skip the figures")
    parser.add_argument("--check", action="store_true",
                        help="only validate the config and list the grid, run nothing")
    add_common_arguments(parser)


def run(args):
    """Run the experiment; return the exit status."""
    from ..training._config import ConfigError
    from ._experiment import run_experiment

    t0 = time.perf_counter()
    try:
        config = load_from_args(args.config, args)
    except (ConfigError, FileNotFoundError) as exc:
        return report_error(exc)
    seeds = args.seeds or config.seeds
    n = len(config.rules) * len(config.attacks) * len(config.f) * len(seeds)
    print(f"{config.source}: {n} runs: rules {', '.join(r.label for r in config.rules)}; "
          f"attacks {', '.join(a.label for a in config.attacks)}; f {list(config.f)}; "
          f"seeds {list(seeds)}")
    if args.check:
        return 0
    try:
        results = run_experiment(config, seeds=args.seeds, split=args.split,
                                 output=args.output, plots=not args.no_plots,
                                 progress=False if args.quiet else None, jobs=args.jobs)
    except (FileNotFoundError, ValueError) as exc:
        return report_error(exc)
    print()
    print(results.table())
    print()
    print(f"results in {args.output}/ ({time.perf_counter() - t0:.0f} s)")
    return 0
