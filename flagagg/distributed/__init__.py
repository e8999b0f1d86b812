"""Parameter-server training that survives failing workers.

A parameter server (rank 0) and ``p`` workers (ranks 1..p), one process each,
started by ``flagagg train`` on one machine or by ``torchrun`` on many. Every
round the server sends the parameters to the workers, collects their
gradients until a deadline, aggregates them with any flagagg rule and takes
the simulator's SGD step (momentum and weight decay). Workers compute the
gradient of a minibatch of their shard; the Byzantine ones apply the
config's attack (:mod:`flagagg.attacks`). The runs reuse the simulator's
configs, data partitioning, models and random streams, so a distributed run
and :func:`flagagg.sim.simulate` with the same seed train the same model.

A worker that crashes, hangs, is slower than the deadline or sends a bad
gradient (wrong size, wrong dtype, NaN) is *missing* or *excluded* for that
round, and reported; the server never waits past a deadline and never
aggregates a partial or unchecked buffer.

The processes find each other through ``torch.distributed``'s TCP store
(``MASTER_ADDR:MASTER_PORT``, as set by ``torchrun``). Parameters and
gradients travel over gloo (CPU) or NCCL (GPU) point-to-point messages, one
two-rank process group per worker, each gradient announced on the store and
checked before it is received (:class:`CollectiveServer`), on trusted
clusters only; or, with ``transport="tcp"`` (the default), as raw bytes over
one mutual-TLS connection per worker (:class:`Server`), each process holding
its own certificate of the run's CA, so that a worker can only ever be
itself; it also withstands workers that attack the protocol. Nothing
received is ever unpickled.

Examples
--------
>>> from flagagg import distributed                                # doctest: +SKIP
>>> run = distributed.train("demo", rule="flag", attack="reverse", f=1,
...                         workers=4, rounds=20)                  # doctest: +SKIP
>>> run.final_accuracy                                             # doctest: +SKIP
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..training._config import as_config
from ._collective import CollectiveServer, run_collective_worker
from ._launch import launch
from ._node import run_node
from ._protocol import ProtocolError
from ._server import Server, load_checkpoint
from ._settings import TRANSPORTS, Fault, RunSpec, make_spec, parse_fault
from ._tls import issue as issue_certificates
from ._worker import run_worker

__all__ = [
    "TRANSPORTS",
    "issue_certificates",
    "CollectiveServer",
    "DistributedRun",
    "Fault",
    "ProtocolError",
    "RunSpec",
    "Server",
    "launch",
    "load_checkpoint",
    "make_spec",
    "parse_fault",
    "run_collective_worker",
    "run_node",
    "run_worker",
    "train",
]


@dataclass(frozen=True, eq=False)
class DistributedRun:
    """Outcome of :func:`train`.

    Attributes
    ----------
    status : int
        The server's exit status (0: trained every round; 3: stopped by a
        signal; 4: stopped because fewer gradients than the floor arrived
        for ``connect_timeout`` seconds).
    final_accuracy : float
        Test accuracy after the last round.
    curve : list of (int, float)
        (round, test accuracy) at the evaluated rounds.
    rounds : list of dict
        One per round: gradients used, ``missing``, ``excluded`` and
        ``rule_excluded`` workers, seconds (``wait_s``, ``compute_s``,
        ``comm_s``, ``aggregate_s``), bytes, accuracy.
    workers : list of dict
        One per round and worker: ``status`` (ok, missing, excluded),
        ``reason``, seconds, bytes, ``reconstruction_ratio``,
        ``coefficient``, ``rule_excluded``.
    events : list of dict
        Connections, disconnections, status changes, in order.
    parameters : ndarray of float32
        The final flat parameters.
    output : pathlib.Path or None
        Folder holding the result files, when one was given.
    transport : str
        How gradients travelled: ``"gloo"``, ``"nccl"`` or ``"tcp"``.
    """

    status: int
    final_accuracy: float
    curve: list
    rounds: list
    workers: list
    events: list
    parameters: np.ndarray
    output: Path | None
    transport: str


def train(config="demo", *, rule=None, attack=None, f=None, seed=None, rounds=None, workers=None,
          eval_every=None, faults=(), output=None, threads=1, timeout=None, quiet=False,
          **options):
    """Train one run on local processes (one server, ``workers`` workers) and wait for it.

    Parameters
    ----------
    config : ExperimentConfig, dict, str or path-like, default="demo"
        The experiment config (see :func:`flagagg.sim.load_config`).
    rule, attack : str, optional
        Labels in the config; the first of each by default.
    f, seed : int, optional
        Byzantine workers and seed; the config's first by default.
    rounds, workers, eval_every : int, optional
        Override the config's values.
    faults : sequence of str or Fault, default=()
        Injected failures, e.g. ``"2:crash@5"`` (see :func:`parse_fault`).
    output : str or path-like, optional
        Folder for the result files; none are kept by default.
    threads : int, default=1
        Torch threads per process.
    timeout : float, optional
        Seconds the run may take before every process is stopped and
        TimeoutError raised; no limit by default.
    quiet : bool, default=False
        Show what the processes print only if the server fails.
    **options
        ``round_timeout``, ``connect_timeout``, ``drop_nonfinite``, ``device``,
        ``transport``, ``quorum``, ``min_gradients`` (see :class:`RunSpec`).

    Returns
    -------
    run : DistributedRun
    """
    faults = tuple(x if isinstance(x, Fault) else parse_fault(x) for x in faults)
    spec = make_spec(as_config(config), rule=rule, attack=attack, f=f, seed=seed, rounds=rounds,
                     workers=workers, eval_every=eval_every, faults=faults, **options)
    with tempfile.TemporaryDirectory(prefix="flagagg-train-") as tmp:
        folder = Path(output) if output is not None else Path(tmp, "results")
        checkpoint = Path(tmp, "final.pt")
        status = launch(spec, output=folder, checkpoint=checkpoint, threads=threads,
                        timeout=timeout, quiet=quiet)
        if not (folder / "train.json").exists():
            raise RuntimeError(
                f"the server exited with status {status} and wrote no results; its output above "
                "says why"
            )
        doc = json.loads((folder / "train.json").read_text(encoding="utf-8"))
        curve = []
        for line in (folder / "curves.csv").read_text(encoding="utf-8").splitlines()[1:]:
            cells = line.split(",")
            curve.append((int(cells[-2]), float(cells[-1])))
        params = (load_checkpoint(checkpoint)["parameters"].numpy() if checkpoint.exists()
                  else np.full(0, np.nan, np.float32))
    return DistributedRun(
        status=status, final_accuracy=float(doc["run"]["final_accuracy"]), curve=curve,
        rounds=doc["rounds"], workers=doc["workers"], events=doc["events"], parameters=params,
        output=None if output is None else Path(output), transport=doc["transport"],
    )
