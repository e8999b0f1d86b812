"""The robustness study (docs/robustness-study.rst): its measurements, its cost, its page.

Three things the study needs besides the experiment engine:

* :func:`measure_plateau`: the round where the unattacked mean's validation
  accuracy stops rising, which fixes the study's ``rounds``;
* :func:`probe_costs` and :func:`grid_cost`: a per-rule and per-attack cost
  model, measured on short runs, from which the cost of the whole design and
  of any cut of it is computed before anything runs (``flagagg experiment
  --check`` extrapolates three tasks; rules and attacks differ in cost by
  two orders of magnitude, so the cut is costed here, task by task);
* :func:`build_report`: the results page, made only from what the result
  store holds: the ranked worst-case table per setting (mean, spread over
  seeds, the top group), rules x attacks heatmaps, accuracy curves of the
  top rules under their worst attack, and the CPU hours the stored runs
  took.

Run it as ``python -m flagagg.sim._study {plateau,cost,report} ...``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..attacks import attack_parameters
from ..training._config import as_config
from ..training._results import Results
from ._cluster import simulate
from ._experiment import (
    ResultStore,
    Task,
    _dataset,
    _grid,
    _rows,
    _run_task,
    run_key,
    run_settings,
)

__all__ = ["STUDY_CONFIGS", "build_report", "collect", "grid_cost", "measure_plateau",
           "plateau_round", "probe_costs"]

#: The study's six settings, one shipped config each.
STUDY_CONFIGS = tuple(f"study_{part}_{mom}" for part in ("iid", "dirichlet", "extreme")
                      for mom in ("wm", "nowm"))

# Rule evaluations per round of the defence-aware attacks, at most (their
# docstrings' cost), from their parameters.
_CALLS = {
    "optimal_little_is_enough": lambda p: p["points"] + p["refine"],
    "optimal_fall_of_empires": lambda p: p["points"] + p["refine"],
    "optimal_flag_tilt": lambda p: 2 * (p["points"] + p["refine"]),
    "small_perturbation": lambda p: 2 + p["doublings"] + p["steps"],
}


# --------------------------------------------------------------------------
# the plateau


def plateau_round(rounds, accuracy, *, tail_from, within=0.01):
    """The first evaluated round from which accuracy stays within ``within`` of its plateau.

    Parameters
    ----------
    rounds : sequence of int
        Evaluated rounds, ascending.
    accuracy : sequence of float
        Accuracy at those rounds (e.g. the mean over seeds).
    tail_from : int
        The plateau's level is the mean accuracy over the rounds ``>= tail_from``.
    within : float, default=0.01
        Tolerance below the level (0.01: one point of accuracy).

    Returns
    -------
    round : int
    level : float
    """
    r = np.asarray(rounds)
    a = np.asarray(accuracy, dtype=float)
    if r.shape != a.shape or r.size == 0:
        raise ValueError("rounds and accuracy must be non-empty and of the same length")
    tail = r >= tail_from
    if not tail.any():
        raise ValueError(f"no evaluated round >= tail_from={tail_from}")
    level = float(a[tail].mean())
    ok = a >= level - within
    # the first index from which every later point is within the tolerance
    bad = np.flatnonzero(~ok)
    first = 0 if bad.size == 0 else int(bad[-1]) + 1
    return int(r[min(first, r.size - 1)]), level


def measure_plateau(config="study_iid_wm", *, rounds=3000, seeds=(100, 101, 102, 103),
                    eval_every=50, tail_from=2000, within=0.01, progress=False):
    """Train the unattacked mean (f = 0) long and find where its accuracy plateaus.

    The study's settings with the rule ``mean`` and no faulty worker, on the
    validation split and validation seeds (never the test split).

    Parameters
    ----------
    config : ExperimentConfig, str or path-like, default="study_iid_wm"
        The setting (data, model, optimiser, shards) measured.
    rounds : int, default=3000
    seeds : sequence of int, default=(100, 101, 102, 103)
    eval_every : int, default=50
    tail_from, within
        See :func:`plateau_round`.
    progress : bool, default=False
        One line per finished seed on stderr.

    Returns
    -------
    result : dict
        ``rounds``, ``curves`` (one accuracy list per seed), ``mean``,
        ``std`` (over seeds, ddof=1), ``plateau_round``, ``plateau_level``,
        ``cpu_seconds``.
    """
    config = as_config(config)
    curves, cpu0 = [], time.process_time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in seeds:
            res = simulate(
                _dataset(config), "mean", f=0, attack="none", workers=config.workers,
                model=config.model,
                model_params={"hidden": config.hidden, "channels": config.channels},
                partition_method=config.partition, alpha=config.alpha, rounds=rounds,
                batch_size=config.batch_size, lr=config.lr, momentum=config.momentum,
                weight_decay=config.weight_decay, worker_momentum=config.worker_momentum,
                seed=seed, eval_every=eval_every, evaluate_on="val", array=config.array,
                backend=None if config.backend == "auto" else config.backend)
            curves.append(list(res.accuracy))
            r = list(res.rounds)
            if progress:
                print(f"seed {seed}: final {100 * res.final_accuracy:.1f} %", file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
    A = np.asarray(curves)
    mean = A.mean(axis=0)
    std = A.std(axis=0, ddof=1) if len(seeds) > 1 else np.zeros_like(mean)
    at, level = plateau_round(r, mean, tail_from=tail_from, within=within)
    return {"rounds": r, "curves": curves, "mean": mean.tolist(), "std": std.tolist(),
            "plateau_round": at, "plateau_level": level,
            "cpu_seconds": time.process_time() - cpu0, "seeds": list(seeds),
            "lr": config.lr, "momentum": config.momentum,
            "worker_momentum": config.worker_momentum, "partition": config.partition}


# --------------------------------------------------------------------------
# cost


def probe_costs(config, *, rounds=5, f=None, progress=False):
    """CPU seconds per round of every rule (no attack) and every attack (rule: mean).

    Each probe is one run of ``rounds`` rounds on one thread, after a
    warm-up run; ``f`` is the config's largest by default.

    Returns
    -------
    costs : dict
        ``base`` (the mean, no attack), ``rule`` ({label: seconds per round}),
        ``attack`` ({label: seconds per round, under the mean}), ``calls``
        ({label: rule evaluations per round of a defence-aware attack}),
        ``rounds`` and ``f`` probed.
    """
    config = as_config(config)
    f = max(config.f) if f is None else f
    short = config.replace(rounds=rounds, eval_every=rounds)
    mean = next((r.label for r in config.rules if r.rule == "mean" and not r.params), None)
    if mean is None:
        raise ValueError("probe_costs needs a plain 'mean' rule in the config (the baseline)")
    none = next((a.label for a in config.attacks if a.attack == "none"), None)
    if none is None:
        raise ValueError("probe_costs needs the 'none' attack in the config (the baseline)")

    def per_round(rule, attack):
        c0 = time.process_time()
        _run_task(short, Task(rule, attack, f, config.validation_seeds[0], config.lr_of(rule),
                              "val"))
        return (time.process_time() - c0) / rounds

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_round(mean, none)  # warm-up: data, imports, kernels
        base = per_round(mean, none)
        rule_cost, attack_cost = {}, {}
        for r in config.rules:
            rule_cost[r.label] = per_round(r.label, none)
            if progress:
                print(f"rule {r.label}: {rule_cost[r.label]:.4f} s/round", file=sys.stderr)
        for a in config.attacks:
            attack_cost[a.label] = per_round(mean, a.label)
            if progress:
                print(f"attack {a.label}: {attack_cost[a.label]:.4f} s/round", file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
    calls = {}
    for a in config.attacks:
        if a.attack in _CALLS:
            calls[a.label] = _CALLS[a.attack]({**attack_parameters(a.attack), **a.params})
    return {"base": base, "rule": rule_cost, "attack": attack_cost, "calls": calls,
            "rounds": rounds, "f": f}


def task_seconds(costs, rule, attack, rounds):
    """Estimated CPU seconds of one run: the rule's round, the attack's extra, its rule calls."""
    base = costs["base"]
    rule_round = costs["rule"][rule]
    rule_only = max(rule_round - base, 0.0)
    extra = max(costs["attack"][attack] - base, 0.0)
    return rounds * (rule_round + extra + costs["calls"].get(attack, 0) * rule_only)


def grid_cost(config, costs, *, rules=None, attacks=None, f=None, rounds=None,
              held_out=None, tuning=None):
    """Estimated CPU seconds of a grid (or a cut of it), held-out runs and tuning runs.

    Parameters
    ----------
    config : ExperimentConfig, str or path-like
    costs : dict
        From :func:`probe_costs` on the same config.
    rules, attacks : sequence of str, optional
        Labels kept (all by default).
    f : sequence of int, optional
        The config's by default.
    rounds : int, optional
        The config's by default.
    held_out : int, optional
        Held-out seeds (the config's ``seeds`` by default).
    tuning : int, optional
        Tuning runs per (rule, attack, f): learning rates x validation seeds
        (the config's by default).

    Returns
    -------
    cost : dict
        ``runs_held_out``, ``runs_tuning``, ``cpu_seconds_held_out``,
        ``cpu_seconds_tuning``, ``cpu_seconds`` (both).
    """
    config = as_config(config)
    rules = [r.label for r in config.rules] if rules is None else list(rules)
    attacks = [a.label for a in config.attacks] if attacks is None else list(attacks)
    fs = list(config.f if f is None else f)
    rounds = config.rounds if rounds is None else rounds
    held_out = len(config.seeds) if held_out is None else held_out
    tuning = len(config.lr_grid) * len(config.validation_seeds) if tuning is None else tuning
    per_cell = sum(task_seconds(costs, r, a, rounds) for r in rules for a in attacks) * len(fs)
    cells = len(rules) * len(attacks) * len(fs)
    return {"runs_held_out": cells * held_out, "runs_tuning": cells * tuning,
            "cpu_seconds_held_out": per_cell * held_out,
            "cpu_seconds_tuning": per_cell * tuning,
            "cpu_seconds": per_cell * (held_out + tuning)}


# --------------------------------------------------------------------------
# the results page


def collect(config, store, *, seeds=None, split="test"):
    """The runs of a grid that a store holds, as :class:`Results`.

    Parameters
    ----------
    config : ExperimentConfig, str or path-like
        The grid (with the learning rates it ran with: the tuned config).
    store : str, path-like or ResultStore
    seeds : sequence of int, optional
        The config's ``seeds`` by default.
    split : {"test", "val"}, default="test"

    Returns
    -------
    results : Results
        Only the stored runs.
    missing : int
        Runs of the grid not in the store.
    cpu_seconds : float
        CPU time the stored runs took.
    """
    config = as_config(config)
    store = store if isinstance(store, ResultStore) else ResultStore(store)
    seeds = tuple(config.seeds if seeds is None else seeds)
    runs, curves, missing, cpu = [], [], 0, 0.0
    for task in _grid(config, seeds, split):
        record = store.get(run_key(run_settings(config, task)))
        if record is None:
            missing += 1
            continue
        run, curve = _rows(config, task, record["result"])
        runs.append(run)
        curves.extend(curve)
        c = record["result"].get("cpu_seconds")
        if c is not None and math.isfinite(c):
            cpu += float(c)
    return Results(config=config, runs=runs, curves=curves, split=split), missing, cpu


def ranked(results):
    """Per f, the rules ranked by worst-case accuracy, with the top group marked.

    The worst case of a rule is its worst attack's mean final accuracy over
    seeds; its spread is that attack's standard deviation over seeds. The
    top group is every rule whose gap to the best worst case is at most the
    sum of the two spreads (``Results.worst_case``'s ``within_spread``).

    Returns
    -------
    rows : list of dict
        ``f``, ``rank``, ``rule``, ``lr``, ``worst``, ``worst_std``,
        ``worst_attack``, ``average``, ``top``.
    """
    rows = []
    by_f = defaultdict(list)
    for r in results.worst_case():
        by_f[r["f"]].append(r)
    for f in sorted(by_f):
        for i, r in enumerate(by_f[f], 1):
            rows.append({**r, "rank": i, "top": r["within_spread"]})
    return rows


def _heatmap(results, f, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [s for s in results.summary() if s["f"] == f]
    rules = list(dict.fromkeys(r.label for r in results.config.rules
                               if any(s["rule"] == r.label for s in summary)))
    attacks = list(dict.fromkeys(a.label for a in results.config.attacks
                                 if any(s["attack"] == a.label for s in summary)))
    M = np.full((len(rules), len(attacks)), np.nan)
    for s in summary:
        M[rules.index(s["rule"]), attacks.index(s["attack"])] = 100 * s["mean"]
    fig, ax = plt.subplots(figsize=(0.45 * len(attacks) + 3, 0.32 * len(rules) + 2))
    im = ax.imshow(M, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rules)), rules, fontsize=7)
    for i in range(len(rules)):
        for j in range(len(attacks)):
            if np.isfinite(M[i, j]):
                ax.text(j, i, f"{M[i, j]:.0f}", ha="center", va="center", fontsize=5,
                        color="white" if M[i, j] < 60 else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curves(results, f, ranked_rows, path, title, top=5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    mine = [r for r in ranked_rows if r["f"] == f][:top]
    for r in mine:
        pts = defaultdict(list)
        for c in results.curves:
            if c["f"] == f and c["rule"] == r["rule"] and c["attack"] == r["worst_attack"]:
                pts[c["round"]].append(c["accuracy"])
        xs = sorted(pts)
        m = np.array([np.mean(pts[x]) for x in xs]) * 100
        s = np.array([np.std(pts[x]) for x in xs]) * 100
        ax.plot(xs, m, label=f"{r['rule']} under {r['worst_attack']}")
        ax.fill_between(xs, m - s, m + s, alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rst_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join("=" * w for w in widths)
    out = [line, "  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    out.append(line)
    return out


def build_report(configs, store, output, *, seeds=None, split="test", plots=True,
                 command=None, rounds=None):
    """Write the results page of a study from its result store.

    Parameters
    ----------
    configs : sequence of (ExperimentConfig, str or path-like)
        The settings, as they ran (tuned learning rates).
    store : str, path-like or ResultStore
        The store all of them wrote to.
    output : str or path-like
        Folder for ``results.rst`` (include it from a docs page), the
        figures it shows and ``ranked.csv``.
    seeds : sequence of int, optional
        Held-out seeds (each config's ``seeds`` by default).
    split : {"test", "val"}, default="test"
    plots : bool, default=True
    command : str, optional
        The command that reproduces the results, printed on the page.
    rounds : int, optional
        The rounds the held-out runs ran (``flagagg experiment --rounds``),
        when it is not the configs' (a config tuned with ``flagagg tune
        --rounds`` carries the tuning's).

    Returns
    -------
    summary : dict
        ``page`` (the path), ``ranked`` ({setting: rows of :func:`ranked`}),
        ``missing`` ({setting: runs not in the store}), ``cpu_hours``.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    lines = [".. This file is generated by flagagg.sim._study.build_report: do not edit.", ""]
    all_ranked, all_missing, cpu = {}, {}, 0.0
    csv_rows = []
    for cfg in configs:
        config = as_config(cfg)
        if rounds is not None:
            config = config.replace(rounds=rounds, eval_every=min(config.eval_every, rounds))
        results, missing, c = collect(config, store, seeds=seeds, split=split)
        cpu += c
        rows = ranked(results) if results.runs else []
        all_ranked[config.name], all_missing[config.name] = rows, missing
        title = (f"{config.name}: {config.dataset}, {config.model}, p={config.workers}, "
                 f"{config.partition}"
                 f"{f' (alpha={config.alpha:g})' if config.partition == 'dirichlet' else ''}, "
                 f"worker momentum {config.worker_momentum:g}")
        lines += [title, "-" * len(title), ""]
        total = len(results.runs) + missing
        lines += [f"{len(results.runs)} of {total} runs in the store"
                  + (f" ({missing} missing: the table covers only the stored runs)."
                     if missing else "."), ""]
        for f in sorted({r["f"] for r in rows}):
            mine = [r for r in rows if r["f"] == f]
            lines += [f"f = {f}: rules ranked by worst-case {split} accuracy (%), mean and "
                      "standard deviation over seeds of the worst attack; top = within the "
                      "spread of the best.", ""]
            body = [(r["rank"], r["rule"], f"{r['lr']:g}",
                     f"{100 * r['worst']:.1f} ± {100 * r['worst_std']:.1f}",
                     r["worst_attack"], f"{100 * r['average']:.1f}",
                     "yes" if r["top"] else "") for r in mine]
            lines += _rst_table(("rank", "rule", "lr", "worst case", "worst attack",
                                 "average", "top"), body)
            lines.append("")
            csv_rows += [{"setting": config.name, **r} for r in mine]
            if plots:
                heat = f"{config.name}_f{f}_heatmap.png"
                curve = f"{config.name}_f{f}_curves.png"
                _heatmap(results, f, output / heat, f"{config.name}, f = {f}: mean accuracy")
                _curves(results, f, rows, output / curve,
                        f"{config.name}, f = {f}: top rules under their worst attack")
                lines += [f".. image:: {heat}", f"   :alt: rules x attacks, {config.name}, "
                          f"f = {f}", "", f".. image:: {curve}",
                          f"   :alt: accuracy curves, {config.name}, f = {f}", ""]
    lines += [f"CPU time of the stored runs: {cpu / 3600:.2f} CPU hours ({cpu:.0f} CPU "
              "seconds, one core per run).", ""]
    if command:
        lines += ["Reproduce with::", "", f"    {command}", ""]
    page = output / "results.rst"
    page.write_text("\n".join(lines), encoding="utf-8")
    if csv_rows:
        import csv

        keys = ["setting", "f", "rank", "rule", "lr", "worst", "worst_std", "worst_attack",
                "average", "top"]
        with open(output / "ranked.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(csv_rows)
    return {"page": page, "ranked": all_ranked, "missing": all_missing,
            "cpu_hours": cpu / 3600}


# --------------------------------------------------------------------------
# command line


def main(argv=None):
    """``python -m flagagg.sim._study {plateau,cost,report}``."""
    parser = argparse.ArgumentParser(prog="python -m flagagg.sim._study",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("plateau", help="measure the unattacked mean's plateau")
    p.add_argument("config", nargs="?", default="study_iid_wm")
    p.add_argument("--rounds", type=int, default=3000)
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102, 103])
    p.add_argument("--output", help="JSON file for the curves")
    c = sub.add_parser("cost", help="probe per-rule and per-attack costs, cost the grid")
    c.add_argument("config")
    c.add_argument("--rounds", type=int, default=5, help="rounds per probe (default 5)")
    c.add_argument("--output", help="JSON file for the probed costs")
    r = sub.add_parser("report", help="write the results page from the store")
    r.add_argument("configs", nargs="+", help="the settings as they ran (tuned configs)")
    r.add_argument("--store", required=True)
    r.add_argument("--output", required=True)
    r.add_argument("--rounds", type=int, metavar="N",
                   help="the rounds the held-out runs ran, when not the configs' (as "
                        "flagagg experiment --rounds)")
    r.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    import json

    if args.what == "plateau":
        res = measure_plateau(args.config, rounds=args.rounds, seeds=tuple(args.seeds),
                              progress=True)
        print(f"plateau: {100 * res['plateau_level']:.1f} % from round {res['plateau_round']} "
              f"({res['cpu_seconds'] / 60:.1f} CPU minutes)")
        if args.output:
            Path(args.output).write_text(json.dumps(res), encoding="utf-8")
    elif args.what == "cost":
        costs = probe_costs(args.config, rounds=args.rounds, progress=True)
        cost = grid_cost(args.config, costs)
        print(f"{cost['runs_held_out']} held-out runs: "
              f"{cost['cpu_seconds_held_out'] / 3600:.1f} CPU hours; {cost['runs_tuning']} "
              f"tuning runs: {cost['cpu_seconds_tuning'] / 3600:.1f} CPU hours")
        if args.output:
            Path(args.output).write_text(json.dumps(costs), encoding="utf-8")
    else:
        again = ["python -m flagagg.sim._study report", *args.configs, "--store", args.store,
                 "--output", args.output]
        if args.rounds is not None:
            again += ["--rounds", str(args.rounds)]
        out = build_report(args.configs, args.store, args.output, plots=not args.no_plots,
                           rounds=args.rounds, command=" ".join(again))
        print(f"{out['page']} ({out['cpu_hours']:.2f} CPU hours in the store)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
