"""Results records of training runs: tidy rows, summaries, worst cases, tables, files.

A grid of simulated runs (:func:`flagagg.sim.run_experiment`) and one
distributed run (:func:`flagagg.distributed.train`) are both written as
:class:`Results`, so their tables and files read the same.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._config import ExperimentConfig
from ._plots import plot_curves, plot_worst_case

__all__ = ["Results"]


def _mean_std(values):
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


@dataclass(eq=False)
class Results:
    """Tidy results of an experiment grid.

    Attributes
    ----------
    config : ExperimentConfig
    runs : list of dict
        One row per run: f, rule, attack, seed, lr, final_accuracy, diverged, ...
    curves : list of dict
        One row per run and evaluation round: f, rule, attack, seed, round, accuracy.
    split : str
        ``"test"`` or ``"val"``.
    seconds : float
        Wall-clock time of the grid.
    """

    config: ExperimentConfig
    runs: list
    curves: list = field(default_factory=list)
    split: str = "test"
    seconds: float = 0.0

    def summary(self):
        """Mean and standard deviation over seeds of the final accuracy.

        Returns
        -------
        rows : list of dict
            One per (f, rule, attack): ``mean``, ``std`` (``ddof=1``), ``n``
            seeds and ``diverged`` (runs whose parameters became non-finite).
        """
        groups = defaultdict(list)
        for r in self.runs:
            groups[(r["f"], r["rule"], r["attack"], r["lr"])].append(r)
        rows = []
        for (f, rule, attack, lr), runs in groups.items():
            mean, std = _mean_std([r["final_accuracy"] for r in runs])
            rows.append({"f": f, "rule": rule, "attack": attack, "lr": lr, "mean": mean,
                         "std": std, "n": len(runs),
                         "diverged": sum(bool(r["diverged"]) for r in runs)})
        return rows

    def worst_case(self):
        """The worst attack for every (f, rule): the ranking criterion.

        Returns
        -------
        rows : list of dict
            One per (f, rule, lr), sorted by f then worst-case accuracy
            (best first): ``worst`` and ``worst_std`` (the mean and spread of
            the worst attack), ``worst_attack``, ``average`` over attacks, and
            ``within_spread``: whether the gap to the best rule's worst case
            is at most the sum of their standard deviations.
        """
        groups = defaultdict(list)
        for s in self.summary():
            groups[(s["f"], s["rule"], s["lr"])].append(s)
        rows = []
        for (f, rule, lr), cells in groups.items():
            worst = min(cells, key=lambda c: c["mean"])
            rows.append({"f": f, "rule": rule, "lr": lr, "worst": worst["mean"],
                         "worst_std": worst["std"], "worst_attack": worst["attack"],
                         "average": float(np.mean([c["mean"] for c in cells]))})
        rows.sort(key=lambda r: (r["f"], -r["worst"], -r["average"]))
        for f in {r["f"] for r in rows}:
            mine = [r for r in rows if r["f"] == f]
            best = mine[0]
            for r in mine:
                gap = best["worst"] - r["worst"]
                r["within_spread"] = bool(gap <= best["worst_std"] + r["worst_std"])
        return rows

    def table(self, f=None):
        """Final accuracy (%) per rule and attack, with each rule's worst case.

        Parameters
        ----------
        f : int, optional
            Only this number of faulty workers; all by default.

        Returns
        -------
        text : str
        """
        cfg = self.config
        cells = {(s["f"], s["rule"], s["attack"]): s for s in self.summary()}
        attacks = [a.label for a in cfg.attacks]
        seeds = sorted({r["seed"] for r in self.runs})
        fs = sorted({r["f"] for r in self.runs}) if f is None else [f]
        blocks = []
        for fv in fs:
            worst = [w for w in self.worst_case() if w["f"] == fv]
            if not worst:
                continue
            head = (
                f"{cfg.dataset}, {cfg.model}, p={cfg.workers}, f={fv}, {cfg.partition}"
                f"{f' (alpha={cfg.alpha})' if cfg.partition == 'dirichlet' else ''}, "
                f"{cfg.rounds} rounds: final {self.split} accuracy (%), "
                + (f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else
                   f"one seed ({seeds[0]}), no spread")
            )
            one = len(seeds) == 1
            rule_w = max(4, *(len(w["rule"]) for w in worst))
            col_w = {a: max(len(a), 10) for a in attacks}
            lines = [head, ""]
            header = f"{'rule':<{rule_w}}  {'lr':>6}  " + "  ".join(
                f"{a:>{col_w[a]}}" for a in attacks) + "  worst case"
            lines += [header, "-" * len(header)]
            for w in worst:
                row = f"{w['rule']:<{rule_w}}  {_fmt_lr(w['lr']):>6}  "
                row += "  ".join(
                    f"{_fmt_cell(cells.get((fv, w['rule'], a)), one):>{col_w[a]}}"
                    for a in attacks)
                # one seed has no spread, hence no top group to mark
                mark = " *" if w["within_spread"] and not one else ""
                row += (f"  {_fmt_pct(w['worst'], w['worst_std'], one)} "
                        f"({w['worst_attack']}){mark}")
                lines.append(row)
            diverged = [s for s in self.summary() if s["f"] == fv and s["diverged"]]
            lines.append("")
            lines.append(
                "Rules sorted by worst case. * = top group: the gap to the best worst case is "
                "within the spread (<= the sum of the two stds), so these rules are not "
                "separated by this experiment." if not one else
                "Rules sorted by worst case. One seed: no spread, so no rule is shown as "
                "separated from another; run more seeds to tell them apart."
            )
            if diverged:
                lines.append(
                    "0.0 means the model's parameters became non-finite (diverged): "
                    + ", ".join(f"{s['rule']}/{s['attack']} ({s['diverged']}/{s['n']})"
                                for s in diverged)
                )
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)

    def to_csv(self, folder):
        """Write ``runs.csv``, ``curves.csv`` and ``summary.csv``; return their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, rows in (("runs", self.runs), ("curves", self.curves),
                           ("summary", self.summary()), ("worst_case", self.worst_case())):
            path = folder / f"{name}.csv"
            with open(path, "w", newline="", encoding="utf-8") as fh:
                if rows:
                    writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)
            paths.append(path)
        return paths

    def to_json(self, path):
        """Write the config, runs, summary and worst cases as one JSON file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"config": self.config.to_dict(), "source": self.config.source,
               "split": self.split, "seconds": self.seconds, "runs": self.runs,
               "summary": self.summary(), "worst_case": self.worst_case(),
               "curves": self.curves}
        path.write_text(json.dumps(doc, indent=1, allow_nan=True), encoding="utf-8")
        return path

    def plot(self, folder):
        """Draw accuracy curves per attack and the worst-case bar chart per f.

        Returns
        -------
        paths : list of pathlib.Path
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for f in sorted({r["f"] for r in self.runs}):
            paths.append(plot_curves(self, f, folder / f"curves_f{f}.png"))
            paths.append(plot_worst_case(self, f, folder / f"worst_case_f{f}.png"))
        return paths

    def save(self, folder, plots=True):
        """Write CSV, JSON, the table (``table.txt``) and, with ``plots``, the figures."""
        folder = Path(folder)
        paths = self.to_csv(folder)
        paths.append(self.to_json(folder / "results.json"))
        table = folder / "table.txt"
        table.write_text(self.table() + "\n", encoding="utf-8")
        paths.append(table)
        if plots:
            paths += self.plot(folder)
        return paths


def _fmt_pct(mean, std, one_seed=False):
    return f"{100 * mean:.1f}" if one_seed else f"{100 * mean:.1f}±{100 * std:.1f}"


def _fmt_cell(cell, one_seed=False):
    return "n/a" if cell is None else _fmt_pct(cell["mean"], cell["std"], one_seed)


def _fmt_lr(lr):
    return f"{lr:.3g}" if math.isfinite(lr) else str(lr)
