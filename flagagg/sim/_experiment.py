"""Experiment grids: rules x attacks x f x seeds, tidy results, tables, plots."""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import NamedTuple

from ..training._config import as_config
from ..training._results import Results

__all__ = ["run_experiment"]


class Task(NamedTuple):
    """One training run of a grid."""

    rule: str
    attack: str
    f: int
    seed: int
    lr: float
    split: str


# datasets are loaded once per process and reused by every run of the grid
_DATASETS: dict = {}


def _dataset(config):
    from ..training._data import load_dataset

    kwargs = config.data_kwargs()
    key = (config.dataset, tuple(sorted(kwargs.items())))
    if key not in _DATASETS:
        _DATASETS.clear()
        _DATASETS[key] = load_dataset(config.dataset, **kwargs)
    return _DATASETS[key]


def _run_task(config, task):
    """Run one task; returns (run row, curve rows)."""
    from ._cluster import simulate

    rule, attack = config.rule(task.rule), config.attack(task.attack)
    res = simulate(
        _dataset(config), rule.rule, f=task.f, attack=attack.attack,
        rule_params=rule.params, attack_params=attack.params, workers=config.workers,
        model=config.model, model_params={"hidden": config.hidden, "channels": config.channels},
        partition_method=config.partition, alpha=config.alpha, rounds=config.rounds,
        batch_size=config.batch_size, lr=task.lr, momentum=config.momentum,
        weight_decay=config.weight_decay, seed=task.seed, eval_every=config.eval_every,
        evaluate_on=task.split, array=config.array,
        backend=None if config.backend == "auto" else config.backend,
    )
    key = {"f": task.f, "rule": task.rule, "attack": task.attack, "seed": task.seed,
           "lr": task.lr}
    run = {
        "experiment": config.name, "dataset": config.dataset, "model": config.model,
        "workers": config.workers, **key, "split": task.split,
        "final_accuracy": res.final_accuracy, "diverged": res.diverged,
        "diverged_round": res.diverged_round, "seconds": round(res.seconds, 4),
    }
    curve = [{**key, "round": t, "accuracy": a}
             for t, a in zip(res.rounds, res.accuracy, strict=True)]
    return run, curve


def _init_process():
    import torch

    torch.set_num_threads(1)


def _run_tasks(config, tasks, *, progress=None, jobs=1, desc="runs"):
    """Run tasks in order (or on ``jobs`` processes); results come back in task order."""
    import torch
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc=desc, unit="run",
               disable=None if progress is None else not progress)
    out = [None] * len(tasks)
    threads = torch.get_num_threads()
    try:
        if jobs is None or jobs <= 1:
            # small models: one thread per run is fastest and keeps runs repeatable
            torch.set_num_threads(1)
            for i, task in enumerate(tasks):
                out[i] = _run_task(config, task)
                bar.update()
        else:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_process) as pool:
                futures = {pool.submit(_run_task, config, t): i for i, t in enumerate(tasks)}
                for fut in as_completed(futures):
                    out[futures[fut]] = fut.result()
                    bar.update()
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return out


def _grid(config, seeds, split, lrs=None):
    tasks = []
    for f in config.f:
        for attack in config.attacks:
            for rule in config.rules:
                rule_lrs = [config.lr_of(rule.label)] if lrs is None else lrs[rule.label]
                for lr in rule_lrs:
                    for seed in seeds:
                        tasks.append(Task(rule.label, attack.label, f, seed, lr, split))
    return tasks


def run_experiment(config, *, seeds=None, split="test", output=None, plots=True,
                   progress=None, jobs=1):
    """Run a rules x attacks x f x seeds grid.

    Parameters
    ----------
    config : ExperimentConfig, dict, str or path-like
        The experiment (see :func:`flagagg.sim.load_config`).
    seeds : sequence of int, optional
        Seeds to run; the config's ``seeds`` by default.
    split : {"test", "val"}, default="test"
        Split the accuracy is measured on.
    output : str or path-like, optional
        Folder to write ``runs.csv``, ``curves.csv``, ``summary.csv``,
        ``results.json`` and (with ``plots``) PNG figures into.
    plots : bool, default=True
        Whether to draw figures into ``output``.
    progress : bool, optional
        Show a progress bar; by default only on a terminal.
    jobs : int, default=1
        Processes to run on. Results do not depend on it.

    Returns
    -------
    results : Results
    """
    config = as_config(config)
    seeds = tuple(config.seeds if seeds is None else seeds)
    t0 = time.perf_counter()
    tasks = _grid(config, seeds, split)
    out = _run_tasks(config, tasks, progress=progress, jobs=jobs)
    results = Results(
        config=config,
        runs=[run for run, _ in out],
        curves=[row for _, curve in out for row in curve],
        split=split,
        seconds=time.perf_counter() - t0,
    )
    if output is not None:
        results.save(output, plots=plots)
    return results
