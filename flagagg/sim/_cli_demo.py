"""``flagagg demo``: the shipped robustness comparison, in a few minutes on a laptop."""

from __future__ import annotations

import time

from ..training._config import ConfigError
from ._cli_common import add_common_arguments, check_executor, load_from_args, report_error
from ._experiment import run_experiment


def add_arguments(parser):
    """Declare the demo's command-line arguments."""
    parser.description = (
        "Train softmax regression on scikit-learn's digits with 15 workers, 3 of them "
        "faulty, under each rule and attack of the shipped 'demo' config (learning rates "
        "tuned per rule with `flagagg tune demo`), print final test accuracy with each "
        "rule's worst case, and write CSV, JSON and plots."
    )
    parser.add_argument("--output", default="demo-output", metavar="DIR",
                        help="folder for results and plots (default: demo-output)")
    parser.add_argument("--no-plots", action="store_true", help="skip the figures")
    add_common_arguments(parser)


def run(args):
    """Run the demo; return the exit status."""
    t0 = time.perf_counter()
    problem = check_executor(args)
    if problem:
        return report_error(ValueError(problem))
    try:
        config = load_from_args("demo", args)
    except (ConfigError, FileNotFoundError) as exc:
        return report_error(exc)
    n = len(config.rules) * len(config.attacks) * len(config.f) * len(args.seeds or config.seeds)
    if not args.quiet:
        print(f"flagagg demo: {n} training runs ({len(config.rules)} rules x "
              f"{len(config.attacks)} attacks x {len(args.seeds or config.seeds)} seeds)")
    results = run_experiment(config, seeds=args.seeds, output=args.output,
                             plots=not args.no_plots, progress=False if args.quiet else None,
                             jobs=args.jobs, executor=args.executor, address=args.address,
                             store=False)  # minutes to run: measured afresh every time
    print()
    print(results.table())
    print()
    print(f"results, table and plots in {args.output}/ ({time.perf_counter() - t0:.0f} s)")
    return 0
