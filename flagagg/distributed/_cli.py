"""``flagagg train``: parameter-server training, on local processes or under torchrun."""

from __future__ import annotations

import time

from .._cli_errors import report_error
from ..training._config import ConfigError, load_config
from ._launch import launch
from ._node import in_launched_process, run_node
from ._settings import make_spec, parse_fault

__all__ = ["add_arguments", "run"]


def add_arguments(parser):
    """Declare the command-line arguments of ``flagagg train``."""
    parser.description = (
        "Parameter-server training with robust aggregation. Without torchrun, starts the "
        "server and the workers as local processes; under torchrun (RANK and WORLD_SIZE set) "
        "runs this process's part: rank 0 serves, ranks 1..p are the workers. Trains one cell "
        "of an experiment config: one rule, one attack, one f, one seed."
    )
    run_ = parser.add_argument_group("what to train")
    run_.add_argument("--config", default="demo", metavar="CONFIG",
                      help="TOML config file or shipped config name, as for `flagagg "
                           "experiment` (default: demo)")
    run_.add_argument("--rule", metavar="LABEL",
                      help="rule label of the config (default: its first rule)")
    run_.add_argument("--attack", metavar="LABEL",
                      help="attack label of the config (default: its first attack)")
    run_.add_argument("--f", type=int, metavar="F",
                      help="number of Byzantine workers (default: the config's first f)")
    run_.add_argument("--seed", type=int, metavar="SEED",
                      help="seed (default: the config's first seed)")
    run_.add_argument("--workers", type=int, metavar="P",
                      help="override the config's number of workers")
    run_.add_argument("--rounds", type=int, metavar="N", help="override the number of rounds")
    run_.add_argument("--eval-every", type=int, metavar="N",
                      help="evaluate test accuracy every N rounds (default: the config's)")
    faults = parser.add_argument_group("failures")
    faults.add_argument("--round-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="deadline of a round: gradients later than this are missing "
                             "(default: 30)")
    faults.add_argument("--connect-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="how long the server waits for the workers to join, and the "
                             "workers for the server (default: 120)")
    faults.add_argument("--quorum", type=int, metavar="Q",
                        help="close a round once Q gradients are in (plus a grace as long "
                             "as the median round, at least 50 ms) "
                             "instead of waiting for the deadline; later ones are reported "
                             "as missing, never waited for (default: workers - f). With Q "
                             "below the number of workers, which gradients make a round "
                             "depends on timing, so the run is not bit for bit the "
                             "simulator's; --quorum P (all P workers) makes it so")
    faults.add_argument("--min-gradients", type=int, metavar="M",
                        help="never step with fewer than M accepted gradients: below it a "
                             "round does not step, and after --connect-timeout seconds "
                             "without a step the run stops with exit status 4 (default: the "
                             "fewest the rule accepts with --f, at least 2f+1 when f > 0)")
    faults.add_argument("--keep-nonfinite", action="store_true",
                        help="hand gradients with NaN or Inf to the rule instead of excluding "
                             "them (what the simulator does)")
    faults.add_argument("--inject-fault", action="append", default=[], metavar="W:KIND[@R]",
                        help="make worker W fail, for tests and demos: KIND is crash, hang, "
                             "slow=SECONDS, nan, wrong_size or bad_frame; @R (round R), @R-S "
                             "or @R- (from R on) picks the rounds, every round without it. "
                             "Repeatable.")
    where = parser.add_argument_group("where")
    where.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                       help="device of each process's model (cuda: cuda:LOCAL_RANK)")
    where.add_argument("--transport", choices=("tcp", "gloo", "nccl"), default="tcp",
                       help="how parameters and gradients travel: tcp (default: mutual TLS "
                            "with one certificate per process, so a worker can only ever be "
                            "itself, and outsiders get nothing). gloo or nccl: TRUSTED "
                            "CLUSTERS ONLY. Their rendezvous store lets anyone who can reach "
                            "it join, crash or stall the run, and one edited store message "
                            "aborts the server")
    where.add_argument("--threads", type=int, default=1, metavar="N",
                       help="torch threads per process (default: 1)")
    where.add_argument("--server-addr", metavar="HOST[:PORT]",
                       help="address the server listens on and tells the workers (default: "
                            "127.0.0.1 on one machine, else this node's address towards "
                            "MASTER_ADDR, on a free port); also FLAGAGG_SERVER_ADDR")
    sec = parser.add_argument_group("security (tcp transport)")
    sec.add_argument("--certs", metavar="DIR",
                     help="folder holding this node's files from `flagagg certs` (server.pem "
                          "on the server's node, worker-W.pem on the node of rank W+1); also "
                          "FLAGAGG_CERTS. Needed under torchrun; `flagagg train` on one "
                          "machine makes the run's CA and certificates itself")
    out = parser.add_argument_group("output")
    out.add_argument("--output", default="train-results", metavar="DIR",
                     help="folder for the results, appended to round by round (default: "
                          "train-results); one holding another run is moved aside to "
                          "DIR.previous-N")
    out.add_argument("--checkpoint", metavar="PATH",
                     help="save parameters and momentum here, every --checkpoint-every "
                          "rounds and at the end (default: DIR/checkpoint.pt)")
    out.add_argument("--checkpoint-every", type=int, default=10, metavar="N",
                     help="checkpoint every N rounds; 0: only at the end (default: 10)")
    out.add_argument("--resume", metavar="PATH",
                     help="continue a run from a checkpoint, e.g. DIR/checkpoint.pt after "
                          "the server died; the records in DIR then cover every round")


def run(args):
    """Build the run from the arguments and start it; return the exit status."""
    t0 = time.perf_counter()
    try:
        faults = tuple(parse_fault(x) for x in args.inject_fault)
        if args.round_timeout <= 0 or args.connect_timeout <= 0:
            raise ValueError("--round-timeout and --connect-timeout must be > 0 seconds")
        spec = make_spec(
            load_config(args.config), rule=args.rule, attack=args.attack, f=args.f,
            seed=args.seed, rounds=args.rounds, workers=args.workers,
            eval_every=args.eval_every, round_timeout=args.round_timeout,
            connect_timeout=args.connect_timeout, drop_nonfinite=not args.keep_nonfinite,
            device=args.device, transport=args.transport, faults=faults, quorum=args.quorum,
            min_gradients=args.min_gradients,
        )
        if args.checkpoint_every < 0:
            raise ValueError("--checkpoint-every must be >= 0")
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        return report_error(exc)
    checkpoint = args.checkpoint
    if checkpoint is None:
        from pathlib import Path

        checkpoint = str(Path(args.output, "checkpoint.pt"))
    node = {"output": args.output, "checkpoint": checkpoint,
            "checkpoint_every": args.checkpoint_every, "resume": args.resume,
            "threads": args.threads}
    if in_launched_process():
        return run_node(spec, server_addr=args.server_addr, certs=args.certs, **node)
    if args.certs:
        return report_error(ValueError(
            "--certs is for runs over several machines (under torchrun); on one machine "
            "`flagagg train` makes the run's certificates for its processes itself"))

    config = spec.config
    print(f"flagagg train: {config.source}: rule {spec.rule} (lr {config.lr_of(spec.rule):g}), "
          f"attack {spec.attack}, f={spec.f}, seed {spec.seed}; {config.dataset}, "
          f"{config.model}, {config.workers} workers, {config.rounds} rounds; starting "
          f"{config.workers + 1} local processes", flush=True)
    status = launch(spec, **node)
    print(f"results in {args.output}/ ({time.perf_counter() - t0:.0f} s)"
          if status == 0 else f"flagagg train: the server exited with status {status}",
          flush=True)
    return status
