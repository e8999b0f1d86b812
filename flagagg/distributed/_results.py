"""Results of a distributed run, in the experiments' tidy format plus per-round tables."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ._settings import spec_to_dict

__all__ = ["write_results"]


def _cell(value):
    """A CSV cell: lists as space-separated values, None as empty."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value


def _write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        if rows:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    return path


def write_results(folder, spec, record, lr):
    """Write a run's results.

    The experiments' files (``runs.csv``, ``curves.csv``, ``summary.csv``,
    ``worst_case.csv``, ``results.json``, ``table.txt``, see
    :class:`flagagg.sim.Results`) for the one run, and

    ``rounds.csv``
        one row per round: gradients used, missing / excluded workers,
        seconds waiting, computing, communicating, aggregating, bytes moved,
        accuracy where evaluated;
    ``workers.csv``
        one row per round and worker: status (ok, missing, excluded) and why,
        compute and communication seconds, bytes, the rule's diagnostics
        (reconstruction ratio, coefficient, left out by the rule);
    ``train.json``
        the run's settings, the workers' processes and every event.

    Parameters
    ----------
    folder : str or path-like
        Created if needed.
    spec : RunSpec
        The run.
    record : dict
        What :meth:`Server.run` returned.
    lr : float
        The learning rate trained with.

    Returns
    -------
    paths : list of pathlib.Path
    """
    from ..sim._experiment import Results

    folder = Path(folder)
    config = spec.config
    key = {"f": spec.f, "rule": spec.rule, "attack": spec.attack, "seed": spec.seed, "lr": lr}
    run = {
        "experiment": config.name, "dataset": config.dataset, "model": config.model,
        "workers": config.workers, **key, "split": "test",
        "final_accuracy": record["final_accuracy"],
        "diverged": record["diverged_round"] is not None,
        "diverged_round": record["diverged_round"], "seconds": round(record["seconds"], 4),
    }
    curves = [{**key, "round": t, "accuracy": a} for t, a in record["curve"]]
    results = Results(config=config, runs=[run], curves=curves, split="test",
                      seconds=record["seconds"])
    paths = results.save(folder, plots=False)
    paths.append(_write_csv(folder / "rounds.csv", [{**key, **r} for r in record["rounds"]]))
    paths.append(_write_csv(folder / "workers.csv", [{**key, **r} for r in record["workers"]]))
    doc = {
        "spec": spec_to_dict(spec), "key": key, "run": run, "status": record["status"],
        "start_round": record["start_round"], "server_address": record["address"],
        "transport": record["transport"],
        "byzantine": record["byzantine"],
        "processes": {str(w): info for w, info in sorted(record["info"].items())},
        "events": record["events"], "rounds": record["rounds"], "workers": record["workers"],
    }
    path = folder / "train.json"
    path.write_text(json.dumps(doc, indent=1, allow_nan=True, default=str), encoding="utf-8")
    paths.append(path)
    return paths
