"""Per-rule learning-rate tuning on validation seeds, by worst case over attacks.

Rules return aggregates on different scales (the Flag Aggregator's published
output is built from unit vectors), so one shared learning rate compares step
sizes rather than robustness. Every rule gets the learning rate that
maximises its worst-case validation accuracy over the grid's attacks and f
values (the protocol ByzFL uses), measured on seeds that are not the ones
results are reported on and on the validation split, never the test split.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from ..training._config import ExperimentConfig, as_config
from ..training._results import Results
from ._experiment import _grid, _rows, _run_tasks

__all__ = ["TuneResult", "tune"]


@dataclass(eq=False)
class TuneResult:
    """Outcome of :func:`tune`.

    Attributes
    ----------
    config : ExperimentConfig
        The input config with every tuned rule's ``lr`` set to its best value.
    best : dict
        Rule label -> chosen learning rate.
    scores : list of dict
        One per (rule, lr): ``worst`` (validation accuracy of the worst
        attack and f, mean over validation seeds), ``worst_attack``,
        ``average`` over attacks and f.
    results : Results
        All validation runs.
    seconds : float
    """

    config: ExperimentConfig
    best: dict
    scores: list
    results: Results
    seconds: float

    def table(self):
        """Worst-case validation accuracy (%) per rule and learning rate."""
        lrs = sorted({s["lr"] for s in self.scores})
        labels = list(dict.fromkeys(s["rule"] for s in self.scores))
        by_key = {(s["rule"], s["lr"]): s for s in self.scores}
        rule_w = max(4, *(len(label) for label in labels))
        seeds = self.config.validation_seeds
        lines = [
            f"worst-case validation accuracy (%) over attacks and f, mean over validation "
            f"seeds {list(seeds)}; * = chosen",
            "",
            f"{'rule':<{rule_w}}  " + "  ".join(f"{lr:>8.3g}" for lr in lrs),
        ]
        lines.append("-" * len(lines[-1]))
        for label in labels:
            cells = []
            for lr in lrs:
                s = by_key.get((label, lr))
                if s is None:
                    cells.append(f"{'':>8}")
                else:
                    mark = "*" if self.best[label] == lr else " "
                    cells.append(f"{100 * s['worst']:>7.1f}{mark}")
            lines.append(f"{label:<{rule_w}}  " + "  ".join(cells))
        edge = self.at_grid_edge()
        if edge:
            lines += ["", "chosen at the edge of the grid, the best may lie beyond it (widen "
                      "the grid with --lr-grid or lr_grid): " + ", ".join(edge)]
        return "\n".join(lines)

    def at_grid_edge(self):
        """Labels of rules whose chosen learning rate is the smallest or largest tried."""
        edge = []
        for label, lr in self.best.items():
            tried = sorted(s["lr"] for s in self.scores if s["rule"] == label)
            if len(tried) > 1 and lr in (tried[0], tried[-1]):
                edge.append(label)
        return edge

    def snippet(self):
        """The ``lr = ...`` lines to paste into the config's rule tables."""
        return "\n".join(f"[rules.{label}]\nlr = {lr!r}" for label, lr in self.best.items())


def tune(config, *, lr_grid=None, rules=None, progress=None, jobs=1, store=None,
         executor="local", address=None):
    """Choose each rule's learning rate by worst-case validation accuracy.

    Parameters
    ----------
    config : ExperimentConfig, dict, str or path-like
        The experiment; its ``validation_seeds``, attacks and f values are used.
    lr_grid : sequence of float, optional
        Learning rates to try; by default each rule's ``lr_grid``, else the
        config's ``[tune] lr_grid``.
    rules : sequence of str, optional
        Labels of the rules to tune; all by default.
    progress : bool, optional
        Show a progress bar; by default only on a terminal.
    jobs : int, default=1
        Processes to run on.
    store : str, path-like or ResultStore, optional
        Keep every validation run there and skip those already there (see
        :func:`run_experiment`); none by default.
    executor : {"local", "ray"}, default="local"
    address : str, optional
        As in :func:`run_experiment`.

    Returns
    -------
    result : TuneResult
    """
    config = as_config(config)
    t0 = time.perf_counter()
    labels = [r.label for r in config.rules] if rules is None else list(rules)
    for label in labels:
        config.rule(label)  # a clear KeyError for an unknown label
    grids = {}
    for r in config.rules:
        if r.label in labels:
            grid = lr_grid if lr_grid is not None else (r.lr_grid or config.lr_grid)
            grids[r.label] = tuple(float(lr) for lr in grid)
    sub = dataclasses.replace(
        config, rules=tuple(r for r in config.rules if r.label in labels))
    tasks = _grid(sub, config.validation_seeds, "val", lrs=grids)
    out = _run_tasks(sub, tasks, progress=progress, jobs=jobs, desc="tuning", store=store,
                     executor=executor, address=address)
    rows = [_rows(sub, t, r) for t, r in zip(tasks, out, strict=True)]
    results = Results(sub, [run for run, _ in rows], [row for _, c in rows for row in c],
                      split="val", seconds=time.perf_counter() - t0)
    scores = []
    cells = {}
    for s in results.summary():
        cells.setdefault((s["rule"], s["lr"]), []).append(s)
    for (label, lr), group in cells.items():
        worst = min(group, key=lambda c: c["mean"])
        scores.append({"rule": label, "lr": lr, "worst": worst["mean"],
                       "worst_attack": f"{worst['attack']} (f={worst['f']})",
                       "average": float(np.mean([c["mean"] for c in group]))})
    best = {}
    for label in labels:
        mine = [s for s in scores if s["rule"] == label]
        # ties (accuracy is quantised by the validation size) go to the better
        # average, then to the smaller, safer step
        pick = max(mine, key=lambda s: (s["worst"], s["average"], -s["lr"]))
        best[label] = pick["lr"]
    return TuneResult(config.with_learning_rates(best), best, scores, results,
                      time.perf_counter() - t0)
