"""``flagagg experiment CONFIG``: run a rules x attacks x f x seeds grid, resumably."""

from __future__ import annotations

import time
from pathlib import Path

from ..training._config import ConfigError
from ._cli_common import (
    add_common_arguments,
    check_executor,
    load_from_args,
    report_error,
    resume_command,
)
from ._experiment import (
    LOCKSTEP,
    GridInterrupted,
    _print_interrupted,
    grid_status,
    probe_cpu_seconds,
    run_experiment,
)


def add_arguments(parser):
    """Declare the command-line arguments of ``flagagg experiment``."""
    parser.description = (
        "Run a grid of training runs. Every finished run is stored in OUTPUT/store at once "
        "(keyed by a hash of its settings and the flagagg version): running the same "
        "command again skips the stored runs, so a stopped grid resumes where it stopped."
    )
    parser.add_argument("config",
                        help="TOML config file, or the name of a shipped config "
                             "(e.g. demo, fa_ablation, hard)")
    parser.add_argument("--output", default="results", metavar="DIR",
                        help="folder for results and plots (default: results)")
    parser.add_argument("--store", metavar="DIR",
                        help="result store (default: OUTPUT/store)")
    parser.add_argument("--no-store", action="store_true",
                        help="keep no store: run every run, even those stored before")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="split to measure accuracy on (default: test)")
    parser.add_argument("--no-plots", action="store_true", help="skip the figures")
    parser.add_argument("--lockstep", type=int, default=LOCKSTEP, metavar="R",
                        help=f"runs stepped together per process or Ray task: one gradient "
                             f"call per round for all of them (default: {LOCKSTEP}, every run "
                             f"alone; pays for small models; the results are the same)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, say how many runs are done and how many "
                             "remain with a CPU-time estimate; run nothing")
    add_common_arguments(parser)


def _fmt_cpu(seconds):
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} CPU hours"
    if seconds >= 60:
        return f"{seconds / 60:.1f} CPU minutes"
    return f"{seconds:.1f} CPU seconds"


def _check(config, args, store):
    status = grid_status(config, seeds=args.seeds, split=args.split, store=store)
    where = f" in {store}" if store is not None else " (no store)"
    print(f"{status['done']} done{where}, {status['remaining']} to run")
    if status["remaining"] == 0:
        return 0
    per_run = status["cpu_seconds_per_run"]
    if per_run is not None:
        how = f"the mean of the {status['done']} stored runs"
    else:
        per_run = probe_cpu_seconds(config, split=args.split)
        how = (f"extrapolated from {min(10, config.rounds)}-round runs of the grid's first, "
               "middle and last settings on this machine")
    print(f"estimated cost of the rest: {status['remaining']} x {per_run:.3g} s = "
          f"{_fmt_cpu(status['remaining'] * per_run)} ({how}, one core per run)")
    return 0


def run(args):
    """Run the experiment; return the exit status."""
    t0 = time.perf_counter()
    problem = check_executor(args)
    if problem:
        return report_error(ValueError(problem))
    try:
        config = load_from_args(args.config, args)
    except (ConfigError, FileNotFoundError) as exc:
        return report_error(exc)
    if args.lockstep < 1:
        return report_error(ValueError(f"--lockstep must be >= 1: got {args.lockstep}"))
    seeds = args.seeds or config.seeds
    n = len(config.rules) * len(config.attacks) * len(config.f) * len(seeds)
    print(f"{config.source}: {n} runs: rules {', '.join(r.label for r in config.rules)}; "
          f"attacks {', '.join(a.label for a in config.attacks)}; f {list(config.f)}; "
          f"seeds {list(seeds)}")
    store = None if args.no_store else Path(args.store or Path(args.output) / "store")
    if args.check:
        return _check(config, args, store)
    if store is not None:
        status = grid_status(config, seeds=args.seeds, split=args.split, store=store)
        if status["done"]:
            print(f"{status['done']} of {status['total']} runs are stored in {store} already: "
                  f"running the other {status['remaining']}")
    try:
        results = run_experiment(config, seeds=args.seeds, split=args.split,
                                 output=args.output, plots=not args.no_plots,
                                 progress=False if args.quiet else None, jobs=args.jobs,
                                 store=False if store is None else store,
                                 executor=args.executor, address=args.address,
                                 lockstep=args.lockstep)
    except GridInterrupted as exc:
        _print_interrupted(exc, resume_command(args) if store is not None else None)
        return 130
    except (FileNotFoundError, ValueError, ImportError) as exc:
        return report_error(exc)
    print()
    print(results.table())
    print()
    print(f"results in {args.output}/ ({time.perf_counter() - t0:.0f} s)")
    return 0
