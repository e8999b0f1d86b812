"""Experiment grids: rules x attacks x f x seeds, a resumable result store, executors.

Every run of a grid is keyed by a hash of everything that decides its result
(:func:`run_settings`: data, cluster, model, optimiser, rounds, the rule's and
the attack's names and parameters, f, seed, learning rate, split, the flagagg
version, a hash of flagagg's source files, and the NumPy and PyTorch
versions). With a :class:`ResultStore`, a run's result is written the moment
it finishes, so a grid that is stopped loses only the runs in flight, running
it again skips every stored run, and a changed setting (or changed code)
re-runs only the runs it changes. Tables and plots are made from the
store's records.

Runs execute one after the other, on ``jobs`` local processes, or as Ray
tasks of one CPU each (on a local Ray, or on an existing cluster); the
results do not depend on where they ran.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NamedTuple

import flagagg

from ..training._config import as_config
from ..training._data import load_dataset
from ..training._results import Results
from ._cluster import cpu_threads, simulate, simulate_lockstep

__all__ = ["GridInterrupted", "ResultStore", "grid_status", "run_experiment", "run_settings",
           "source_fingerprint"]

EXECUTORS = ("local", "ray")

# runs of a grid stepped together by default (run_experiment's lockstep). 1:
# measured in fresh processes on the MNIST-1D CNN grid (p = 15, 2 rules x 3
# seeds), groups of 3 took 1.05 to 1.21 times the CPU of runs alone (the
# engine's products do the same flops, and 3 runs' im2col arrays, about 4 MB
# each, leave the core's caches), against 1 / 1.29 for a small MLP on
# digits in one process; so groups are asked for, not the default
LOCKSTEP = 1

# bump when a stored record's layout or meaning changes: old records are then re-run
_STORE_FORMAT = 1

_CODE: dict = {}


class Task(NamedTuple):
    """One training run of a grid."""

    rule: str
    attack: str
    f: int
    seed: int
    lr: float
    split: str


class GridInterrupted(KeyboardInterrupt):
    """A grid stopped by SIGINT or SIGTERM; every finished run is in its store.

    Attributes
    ----------
    done : int
        Runs of the grid in the store (including those stored before).
    total : int
        Runs of the grid.
    lost : int
        Runs that were in flight and have to run again.
    store : pathlib.Path or None
        Where the finished runs are.
    """

    def __init__(self, done, total, lost, store):
        self.done, self.total, self.lost, self.store = done, total, lost, store
        where = f" in {store}" if store is not None else " (no store: nothing was kept)"
        super().__init__(
            f"grid interrupted: {done} of {total} runs done{where}; {lost} run(s) in flight "
            "were lost and will run again"
        )


# --------------------------------------------------------------------------
# what decides a run's result, and where it is kept


def source_fingerprint(root=None):
    """A hash of the Python source files of a package folder (flagagg's by default).

    The version string alone does not change between commits of a working
    tree, so a stored result is also keyed by the code that computed it: an
    edit of any ``.py`` file under ``root`` gives another fingerprint, while
    documentation, caches and byte code do not.

    Parameters
    ----------
    root : str or path-like, optional
        The package folder; the installed ``flagagg`` by default (computed
        once per process).

    Returns
    -------
    fingerprint : str
        32 hexadecimal digits.
    """
    if root is None:
        if "flagagg" not in _CODE:
            _CODE["flagagg"] = source_fingerprint(Path(flagagg.__file__).parent)
        return _CODE["flagagg"]
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "__pycache__" in rel.split("/"):
            continue
        data = path.read_bytes()
        # name and length first, so that moving bytes between files changes the hash
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:32]


def _file_fingerprint(path):
    """Hash of a data file's bytes (a changed file is another data set), cached by mtime."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return None  # loading it will say what is wrong
    key = ("file", str(p.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _CODE:
        _CODE[key] = hashlib.sha256(p.read_bytes()).hexdigest()[:32]
    return _CODE[key]


def _library_versions():
    if "versions" not in _CODE:
        import numpy
        import torch

        _CODE["versions"] = {"numpy": numpy.__version__, "torch": torch.__version__}
    return _CODE["versions"]


def run_settings(config, task):
    """Everything that decides the result of one run, as a JSON-able dict.

    Besides the run's settings it holds the flagagg version, a hash of
    flagagg's source files (:func:`source_fingerprint`), the NumPy and
    PyTorch versions, and for a data set read from a file a hash of its
    bytes: a changed setting, code or data set re-runs what it changes.
    Labels, the experiment's name and the other runs of the grid are not in
    it: renaming a rule or adding a seed re-runs nothing. Settings a run
    does not read (the MLP's width for a CNN, Dirichlet's alpha for iid
    shards, ...) are left out, so changing them re-runs nothing either.

    Parameters
    ----------
    config : ExperimentConfig
    task : Task

    Returns
    -------
    settings : dict
    """
    rule, attack = config.rule(task.rule), config.attack(task.attack)
    data = {"dataset": config.dataset, "split_seed": config.split_seed,
            "validation_fraction": config.validation_fraction, "max_train": config.max_train}
    if config.dataset in ("digits", "breast_cancer", "synthetic"):
        data["test_fraction"] = config.test_fraction
    if config.dataset in ("synthetic", "mnist1d"):
        data["n_samples"] = config.n_samples
    if config.dataset == "synthetic":
        data.update(n_features=config.n_features, n_classes=config.n_classes)
    if config.path is not None:
        data["path"] = str(config.path)
        data["file_sha256"] = _file_fingerprint(config.path)
    cluster = {"workers": config.workers, "partition": config.partition,
               "batch_size": config.batch_size}
    if config.partition == "dirichlet":
        cluster["alpha"] = config.alpha
    model = {"model": config.model}
    if config.model == "mlp":
        model["hidden"] = config.hidden
    if config.model in ("cnn", "cnn1d"):
        model["channels"] = list(config.channels)
    return {
        "format": _STORE_FORMAT,
        "flagagg": flagagg.__version__,
        "source": source_fingerprint(),
        "libraries": _library_versions(),
        "data": data,
        "cluster": cluster,
        "model": model,
        "optimizer": {"lr": task.lr, "momentum": config.momentum,
                      "weight_decay": config.weight_decay,
                      "worker_momentum": config.worker_momentum},
        "run": {"rounds": config.rounds, "eval_every": config.eval_every,
                "array": config.array, "backend": config.backend},
        "rule": {"rule": rule.rule, "params": rule.params},
        "attack": {"attack": attack.attack, "params": attack.params},
        "f": task.f, "seed": task.seed, "split": task.split,
    }


def run_key(settings):
    """The store key of a run: a hash of its :func:`run_settings`."""
    text = json.dumps(settings, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ResultStore:
    """A folder of finished runs, one JSON file each, named by the run's key.

    Files are written to a temporary name and renamed into place, so a
    stopped grid leaves only whole records, and several grids (or several
    machines' drivers sharing a folder) can write to one store.

    Parameters
    ----------
    folder : str or path-like
    """

    def __init__(self, folder):
        self.folder = Path(folder)

    def __repr__(self):
        return f"ResultStore({str(self.folder)!r})"

    def _path(self, key):
        return self.folder / f"{key}.json"

    def get(self, key):
        """The stored record of a run, or None (absent, unreadable, or another format)."""
        try:
            record = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("key") != key \
                or record.get("format") != _STORE_FORMAT:
            return None
        return record

    def put(self, key, settings, result):
        """Write a run's result (atomically); return the file's path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"format": _STORE_FORMAT, "key": key, "settings": settings,
                  "result": result, "written": time.time()}
        fd, tmp = tempfile.mkstemp(prefix=".run-", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(record, fh, allow_nan=True)
            os.replace(tmp, self._path(key))
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
        return self._path(key)


# --------------------------------------------------------------------------
# running one task


# datasets are loaded once per process and reused by every run of the grid
# (and generated data sets come from the disk cache, see load_dataset)
_DATASETS: dict = {}


def _dataset(config):
    kwargs = config.data_kwargs()
    key = (config.dataset, tuple(sorted(kwargs.items())))
    if key not in _DATASETS:
        _DATASETS.clear()
        _DATASETS[key] = load_dataset(config.dataset, **kwargs)
    return _DATASETS[key]


def _run_task(config, task):
    """Run one task alone (:func:`simulate`); return its result (a JSON-able dict)."""
    cpu0 = time.process_time()
    rule, attack = config.rule(task.rule), config.attack(task.attack)
    res = simulate(
        _dataset(config), rule.rule, f=task.f, attack=attack.attack,
        rule_params=rule.params, attack_params=attack.params, seed=task.seed, lr=task.lr,
        evaluate_on=task.split, **_common(config),
    )
    return _result(res, time.process_time() - cpu0)


def _common(config):
    """The :func:`simulate` arguments every run of a grid shares."""
    return dict(
        workers=config.workers, model=config.model,
        model_params={"hidden": config.hidden, "channels": config.channels},
        partition_method=config.partition, alpha=config.alpha, rounds=config.rounds,
        batch_size=config.batch_size, momentum=config.momentum,
        weight_decay=config.weight_decay, worker_momentum=config.worker_momentum,
        eval_every=config.eval_every, array=config.array,
        backend=None if config.backend == "auto" else config.backend,
    )


def _result(res, cpu_seconds, group=1):
    return {
        "final_accuracy": res.final_accuracy, "diverged": res.diverged,
        "diverged_round": res.diverged_round, "seconds": res.seconds,
        "cpu_seconds": cpu_seconds,
        "rounds": list(res.rounds), "accuracy": list(res.accuracy),
        "faulty": list(res.faulty), "lockstep": group,
    }


def _run_group(config, tasks, on_done=None):
    """Run tasks in lockstep (:func:`simulate_lockstep`); return their results in order.

    ``on_done(j, result)`` is called as task ``j`` finishes. One task runs
    alone, through :func:`simulate`. A run's ``seconds`` and
    ``cpu_seconds`` are its share of the group's (the data set's loading
    and every shared gradient call divided among the runs they served).
    """
    if len(tasks) == 1:
        out = _run_task(config, tasks[0])
        if on_done is not None:
            on_done(0, out)
        return [out]
    w0, c0 = time.perf_counter(), time.process_time()
    dataset = _dataset(config)
    load_wall = (time.perf_counter() - w0) / len(tasks)
    load_cpu = (time.process_time() - c0) / len(tasks)
    runs = []
    for task in tasks:
        rule, attack = config.rule(task.rule), config.attack(task.attack)
        runs.append({"rule": rule.rule, "f": task.f, "attack": attack.attack,
                     "rule_params": rule.params, "attack_params": attack.params,
                     "lr": task.lr, "seed": task.seed, "evaluate_on": task.split})
    out = [None] * len(tasks)

    def finished(j, res, cpu):
        res = dataclasses.replace(res, seconds=res.seconds + load_wall)
        out[j] = _result(res, cpu + load_cpu, group=len(tasks))
        if on_done is not None:
            on_done(j, out[j])

    simulate_lockstep(dataset, runs, on_done=finished, **_common(config))
    return out


def _rows(config, task, result):
    """The run row and curve rows of a task's result, labelled as the grid labels them."""
    key = {"f": task.f, "rule": task.rule, "attack": task.attack, "seed": task.seed,
           "lr": task.lr}
    run = {
        "experiment": config.name, "dataset": config.dataset, "model": config.model,
        "workers": config.workers, **key, "split": task.split,
        "final_accuracy": result["final_accuracy"], "diverged": result["diverged"],
        "diverged_round": result["diverged_round"], "seconds": round(result["seconds"], 4),
        "cpu_seconds": round(result.get("cpu_seconds", math.nan), 4),
    }
    curve = [{**key, "round": t, "accuracy": a}
             for t, a in zip(result["rounds"], result["accuracy"], strict=True)]
    return run, curve


@contextmanager
def _one_cpu():
    """The setting of a grid's runs.

    One PyTorch and one BLAS thread (see :func:`cpu_threads`), and the objects
    alive at the start kept out of the garbage collector's full passes
    (:func:`_quiet_gc`).
    """
    with cpu_threads(1), _quiet_gc():
        yield


@contextmanager
def _quiet_gc():
    """:func:`gc.freeze` for the block, :func:`gc.unfreeze` after.

    A full pass of the cyclic garbage collector walks every object the process
    holds, about 170,000 once PyTorch is imported; in a grid process it comes
    once every few hundred rounds, costs 35 to 80 ms and frees nothing of them
    (they are the modules' own). Frozen, they are left out of every pass; what
    the runs leave behind is collected as before. A process that froze objects
    itself keeps its own arrangement.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _init_process():
    # the parent handles Ctrl-C (and ends the workers), the workers ignore it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # one CPU per process for the process's life (see _one_cpu)
    _ONE_CPU.append(_one_cpu())
    _ONE_CPU[-1].__enter__()


_ONE_CPU: list = []


def _ray_group(config, tasks):
    with _one_cpu():
        return _run_group(config, tasks)


# --------------------------------------------------------------------------
# executors: each calls done(i, result) as task i finishes


def _serial(config, tasks, groups, done):
    with _one_cpu():
        for group in groups:
            # each run is stored the moment it finishes (a diverged run before its group)
            _run_group(config, [tasks[i] for i in group],
                       on_done=lambda j, result, group=group: done(group[j], result))
    return 0


def _processes(config, tasks, groups, done, jobs):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_process)
    futures = {}
    try:
        futures = {pool.submit(_run_group, config, [tasks[i] for i in g]): g for g in groups}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                for i, result in zip(futures[fut], fut.result(), strict=True):
                    done(i, result)
    except BaseException:
        # stop now: the runs in flight end with their processes (they are what
        # an interrupted grid loses); the pool then fails the queued runs itself
        # (cancelling them first races its manager thread)
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            with suppress(Exception):
                proc.terminate()
        pool.shutdown(wait=True)
        raise
    pool.shutdown()
    return 0


def _ray(config, tasks, groups, done, jobs, address):
    try:
        import ray
    except ImportError as exc:
        raise ImportError("executor 'ray' needs Ray: pip install 'ray[default]'") from exc
    started = False
    if not ray.is_initialized():
        with warnings.catch_warnings():
            # Ray's tip about how it will treat GPU variables for tasks that ask for no
            # GPU: the grid's tasks ask for none and use none, so it concerns nothing here
            warnings.filterwarnings("ignore", "Tip: In future versions of Ray",
                                    FutureWarning)
            if address is None:
                # a private Ray on this machine, reachable from loopback only
                ray.init(num_cpus=jobs if jobs and jobs > 1 else None,
                         include_dashboard=False, _node_ip_address="127.0.0.1",
                         log_to_driver=False, logging_level="ERROR")
            else:
                ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        started = True
    # a task steps a group of runs in lockstep on one CPU
    remote = ray.remote(num_cpus=1, max_retries=2)(_ray_group)
    refs = {}
    try:
        config_ref = ray.put(config)
        refs = {remote.remote(config_ref, [tasks[i] for i in g]): g for g in groups}
        pending = list(refs)
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            for ref in finished:
                for i, result in zip(refs[ref], ray.get(ref), strict=True):
                    done(i, result)
    except BaseException:
        for ref in refs:
            with suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
    return 0


def _groups(n, lockstep, at_once):
    """Consecutive groups of the ``n`` runs to step in lockstep.

    At most ``lockstep`` runs each, and small enough that ``at_once``
    processes (None: a cluster of unknown size) all get a group: the grid's
    order puts the seeds of one cell next to each other, then its
    neighbours (rules, attacks). All runs of a grid share the data, the
    model, the workers and the rounds, which is what lockstep needs.
    """
    size = max(1, min(lockstep, math.ceil(n / at_once) if at_once else lockstep))
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


@contextmanager
def _sigterm_interrupts():
    """SIGTERM stops a grid the way Ctrl-C does (in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _fmt_seconds(s):
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def _run_tasks(config, tasks, *, progress=None, jobs=1, desc="runs", store=None,
               executor="local", address=None, lockstep=LOCKSTEP):
    """Run tasks; return their results in task order.

    Stored runs are read back, the others run on the executor, in groups of
    at most ``lockstep`` runs stepped together (:func:`_groups`), and are
    stored as they finish. The progress bar counts runs done of the grid
    and its ETA is the mean measured time of this session's runs (a
    lockstep run's share of its group) times the runs left, over the groups
    that run at once.
    """
    from tqdm.auto import tqdm

    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}: got {executor!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1: got {jobs!r}")
    if address is not None and executor != "ray":
        raise ValueError("address is the address of a Ray cluster: it needs executor='ray'")
    if isinstance(lockstep, bool) or not isinstance(lockstep, int) or lockstep < 1:
        raise ValueError(f"lockstep must be an int >= 1: got {lockstep!r}")
    store = None if store is None else (store if isinstance(store, ResultStore)
                                        else ResultStore(store))
    out = [None] * len(tasks)
    settings = [run_settings(config, t) for t in tasks]
    keys = [run_key(s) for s in settings]
    if store is not None:
        for i, key in enumerate(keys):
            record = store.get(key)
            if record is not None:
                out[i] = record["result"]
    todo = [i for i, r in enumerate(out) if r is None]
    skipped = len(tasks) - len(todo)

    bar = tqdm(total=len(tasks), initial=skipped, desc=desc, unit="run",
               disable=None if progress is None else not progress,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} runs "
                          "[{elapsed}{postfix}]")
    at_once = jobs if executor == "local" else (jobs if address is None and jobs > 1 else None)
    groups = _groups(len(todo), lockstep, at_once)
    size = len(groups[0]) if groups else 1  # runs per group
    seconds = []

    def done(j, result):
        i = todo[j]
        out[i] = result
        if store is not None:
            store.put(keys[i], settings[i], result)
        seconds.append(float(result["seconds"]))
        left = sum(r is None for r in out)
        if at_once is None:
            # runs at once on a cluster: as many as have finished per run time so far
            elapsed = time.perf_counter() - t0
            eta = elapsed / len(seconds) * left
        else:
            # the runs of a group share its time: groups run at once, not runs
            parallel = min(at_once, max(1, math.ceil(left / size)))
            eta = sum(seconds) / len(seconds) * left / parallel
        bar.set_postfix_str(f"ETA {_fmt_seconds(eta)} from {len(seconds)} measured run(s)",
                            refresh=False)
        bar.update()

    sub = [tasks[i] for i in todo]
    t0 = time.perf_counter()
    try:
        with _sigterm_interrupts():
            if not sub:
                pass
            elif executor == "ray":
                _ray(config, sub, groups, done, jobs, address)
            elif jobs <= 1:
                _serial(config, sub, groups, done)
            else:
                _processes(config, sub, groups, done, jobs)
    except KeyboardInterrupt:
        finished = sum(r is not None for r in out)
        # the groups in flight lose their unfinished runs: the executors start
        # groups in order, so those are the first unfinished ones (all of them
        # on a cluster of unknown size)
        open_groups = [g for g in groups if any(out[todo[j]] is None for j in g)]
        running = open_groups[: at_once or len(open_groups)]
        in_flight = sum(out[todo[j]] is None for g in running for j in g)
        raise GridInterrupted(finished if store is not None else 0, len(tasks),
                              in_flight, None if store is None else store.folder) from None
    finally:
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


def _default_store(output, store):
    if store is False:
        return None
    if store is not None and store is not True:
        return store
    return None if output is None else Path(output) / "store"


def grid_status(config, *, seeds=None, split="test", store=None):
    """How much of a grid is in a store, and what the rest will cost.

    Parameters
    ----------
    config : ExperimentConfig, dict, str or path-like
    seeds : sequence of int, optional
        The config's ``seeds`` by default.
    split : {"test", "val"}, default="test"
    store : str, path-like or ResultStore, optional
        The store; without one nothing is done.

    Returns
    -------
    status : dict
        ``total``, ``done`` and ``remaining`` runs, ``cpu_seconds_done``
        (the stored runs' measured CPU time), ``cpu_seconds_per_run`` (the
        mean of those runs, scaled to this grid's rounds; None when no run
        is stored) and ``cpu_seconds_remaining`` (the estimate, or None).
    """
    config = as_config(config)
    seeds = tuple(config.seeds if seeds is None else seeds)
    tasks = _grid(config, seeds, split)
    store = None if store is None else (store if isinstance(store, ResultStore)
                                        else ResultStore(store))
    cpu, done = [], 0
    for t in tasks:
        record = None if store is None else store.get(run_key(run_settings(config, t)))
        if record is not None:
            done += 1
            c = record["result"].get("cpu_seconds")
            if c is not None and math.isfinite(c):
                cpu.append(float(c))
    per_run = sum(cpu) / len(cpu) if cpu else None
    remaining = len(tasks) - done
    return {"total": len(tasks), "done": done, "remaining": remaining,
            "cpu_seconds_done": float(sum(cpu)), "cpu_seconds_per_run": per_run,
            "cpu_seconds_remaining": None if per_run is None else per_run * remaining}


def probe_cpu_seconds(config, *, rounds=10, split="test", samples=3):
    """CPU seconds one run of the grid takes, extrapolated from short runs.

    Runs ``samples`` tasks spread over the grid (its first, middle and last
    settings by default: rules and attacks differ a lot in cost) for
    ``rounds`` rounds (at most the config's) on one thread, after one
    warm-up run that keeps set-up costs out, and scales their mean per-round
    time to the config's rounds.
    """
    tasks = _grid(config, tuple(config.seeds[:1]), split)
    picks = sorted({round(i * (len(tasks) - 1) / max(1, samples - 1))
                    for i in range(max(1, samples))})
    short = config.replace(rounds=min(rounds, config.rounds),
                           eval_every=min(config.eval_every, rounds, config.rounds))
    with _one_cpu():
        _run_task(short, tasks[picks[0]])
        c0 = time.process_time()
        for i in picks:
            _run_task(short, tasks[i])
        per_round = (time.process_time() - c0) / short.rounds / len(picks)
    return per_round * config.rounds


def run_experiment(config, *, seeds=None, split="test", output=None, plots=True,
                   progress=None, jobs=1, store=None, executor="local", address=None,
                   lockstep=LOCKSTEP):
    """Run a rules x attacks x f x seeds grid, resuming from its result store.

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
        ``results.json`` and (with ``plots``) PNG figures into; the result
        store is its ``store`` folder unless ``store`` says otherwise.
    plots : bool, default=True
        Whether to draw figures into ``output``.
    progress : bool, optional
        Show a progress bar (runs done of the grid, with an ETA from the
        measured run times); by default only on a terminal.
    jobs : int, default=1
        Local processes to run on (``executor="local"``), or the CPUs of the
        private Ray started for ``executor="ray"``. Results do not depend on it.
    store : str, path-like, ResultStore or bool, optional
        Where finished runs are kept and read back from: ``output/store`` by
        default, False for no store. Stored runs are not run again.
    executor : {"local", "ray"}, default="local"
        ``"ray"`` runs every run as a Ray task of one CPU: on the Ray this
        process is connected to, on ``address``, or on a private Ray started
        on this machine (loopback only).
    address : str, optional
        Address of an existing Ray cluster (``"auto"``, ``"HOST:6379"`` or
        ``"ray://HOST:10001"``); only with ``executor="ray"``.
    lockstep : int, default=1
        Runs stepped together in one process or Ray task (consecutive runs
        of the grid: the seeds of a cell, then the next rule): their
        per-worker gradients are one call of the gradient engine each
        round, while momenta, attacks, aggregation, evaluation and the
        store stay per run (:func:`flagagg.sim._cluster.simulate_lockstep`).
        Results do not depend on it. Fewer runs per group when there are
        too few groups for ``jobs``. 1 (the default) runs every run alone:
        groups pay for small models (a 64-unit MLP: about 1.3 times less
        CPU with 3 runs a group) but not for the MNIST-1D CNN, whose
        larger arrays leave the caches (1.05 to 1.21 times more).

    Returns
    -------
    results : Results

    Raises
    ------
    GridInterrupted
        On SIGINT or SIGTERM; the finished runs are in the store.
    """
    config = as_config(config)
    seeds = tuple(config.seeds if seeds is None else seeds)
    t0 = time.perf_counter()
    tasks = _grid(config, seeds, split)
    store = _default_store(output, store)
    out = _run_tasks(config, tasks, progress=progress, jobs=jobs, store=store,
                     executor=executor, address=address, lockstep=lockstep)
    if store is not None:
        # the table and the plots are made from what the store holds
        st = store if isinstance(store, ResultStore) else ResultStore(store)
        out = [st.get(run_key(run_settings(config, t)))["result"] for t in tasks]
    rows = [_rows(config, t, r) for t, r in zip(tasks, out, strict=True)]
    results = Results(
        config=config,
        runs=[run for run, _ in rows],
        curves=[row for _, curve in rows for row in curve],
        split=split,
        seconds=time.perf_counter() - t0,
    )
    if output is not None:
        results.save(output, plots=plots)
    return results


def _print_interrupted(exc, command=None, file=sys.stderr):
    """Say where an interrupted grid's results are and how to resume it."""
    print(f"\nflagagg: {exc}", file=file)
    if command:
        print(f"flagagg: resume with: {command}", file=file)
