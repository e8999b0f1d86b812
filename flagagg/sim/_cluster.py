"""The simulated cluster: p workers, f of them faulty, one parameter server.

Every round each worker draws a minibatch from its own shard and computes a
gradient at the current parameters; faulty workers then apply their attack;
the server aggregates the p rows with a flagagg rule and takes one SGD step
with momentum and weight decay (``torch.optim.SGD``'s update, the paper's
optimiser). All randomness comes from NumPy generators spawned from the run's
seed, so a seed fixes a run bit for bit, and runs that differ only in the rule
or the attack see the same shards, initial model and minibatches (paired
comparisons). The faulty workers' own gradients are computed only where
their attack reads them (:attr:`flagagg.attacks.Attack.reads_own`): an
attack such as A Little Is Enough replaces them with rows made from the
honest ones, so a round computes p - f gradients, with the same results.
"""

from __future__ import annotations

import functools
import numbers
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .._validation import check_int
from ..attacks import Attack, get_attack
from ..training._data import Dataset, load_dataset
from ..training._replica import Replica, _accuracy, sgd_step
from ..training._root import RootGradient, needs_reference
from ..training._step import aggregate_step, build_rule, rule_for_attack

__all__ = ["TrainResult", "build_rule", "simulate", "simulate_lockstep"]


@dataclass(frozen=True, eq=False)
class TrainResult:
    """Outcome of one simulated training run.

    Attributes
    ----------
    rounds : tuple of int
        Rounds at which the model was evaluated (0 is the initial model).
    accuracy : tuple of float
        Accuracy on the evaluation split at those rounds.
    final_accuracy : float
        Accuracy after the last round.
    diverged : bool
        Whether the parameters became non-finite; the run then stops and
        counts as accuracy 0 from that round on.
    diverged_round : int or None
        The round whose step made the parameters non-finite.
    seconds : float
        Wall-clock time of the run.
    parameters : ndarray of float32, shape (n,)
        Final flat model parameters.
    faulty : tuple of int
        Indices of the faulty workers.
    """

    rounds: tuple
    accuracy: tuple
    final_accuracy: float
    diverged: bool
    diverged_round: int | None
    seconds: float
    parameters: np.ndarray
    faulty: tuple


@contextmanager
def cpu_threads(count):
    """PyTorch and the BLAS under NumPy on ``count`` threads, as long as the block runs.

    Small models and (p, n) rows of a few thousand columns: one thread per
    run is fastest and keeps runs repeatable, and a grid promises one CPU
    per run. The BLAS matters too: OpenBLAS spreads even a (15, 15) x
    (15, n) product (NNM's mixed inputs before a coordinate-wise rule) over
    every core, and on a busy machine waiting for those threads cost 15 ms
    of CPU a round, 1.5 times the whole round without them. The results
    agree to float32 rounding, not always bit for bit: OpenBLAS 0.3.31 also
    splits such a product's sums over its threads. One thread is also what
    makes a run repeat bit for bit on any machine.
    """
    from threadpoolctl import threadpool_limits

    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        with threadpool_limits(limits=count, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(saved)


def _on_threads(fn):
    """``fn``'s ``threads`` argument (default 1) applied around the call (:func:`cpu_threads`)."""

    @functools.wraps(fn)
    def call(*args, threads=1, **kwargs):
        if threads is None:
            return fn(*args, **kwargs)
        check_int("threads", threads, owner=fn.__name__, low=1)
        with cpu_threads(threads):
            return fn(*args, **kwargs)

    return call


@_on_threads
def simulate(dataset, rule="mean", *, f=0, attack="none", rule_params=None, attack_params=None,
             workers=15, model="logreg", model_params=None, partition_method="iid", alpha=0.5,
             rounds=150, batch_size=32, lr=0.1, momentum=0.9, weight_decay=5e-4,
             worker_momentum=0.0, seed=0,
             eval_every=10, evaluate_on="test", array="numpy", backend="numpy",
             progress=False, root_size=100, threads=1):
    """Train a model on a simulated cluster with faulty workers.

    Parameters
    ----------
    dataset : Dataset or str
        Data, or a dataset name for :func:`load_dataset` with its defaults.
    rule : str or callable, default="mean"
        Aggregation rule name (see :func:`flagagg.available_rules`) or a
        callable ``(p, n) array -> (n,) array``.
    f : int, default=0
        Number of faulty workers.
    attack : str or flagagg.attacks.Attack, default="none"
        What the faulty workers do (see :func:`flagagg.attacks.available_attacks`).
    rule_params, attack_params : dict, optional
        Parameters of the rule and the attack.
    workers : int, default=15
        Number of workers p.
    model : {"logreg", "mlp", "cnn"}, default="logreg"
        Model trained.
    model_params : dict, optional
        Passed to :func:`make_model` (``hidden``, ``channels``).
    partition_method : {"iid", "dirichlet", "extreme"}, default="iid"
        How the training data are split over workers.
    alpha : float, default=0.5
        Dirichlet concentration for ``partition_method="dirichlet"``.
    rounds : int, default=150
        Number of server steps.
    batch_size : int, default=32
        Minibatch size of every worker, drawn with replacement from its shard.
    lr, momentum, weight_decay : float
        Server SGD: ``buf = momentum * buf + (g + weight_decay * w)``,
        ``w -= lr * buf``.
    worker_momentum : float, default=0.0
        Local momentum beta of the workers: each sends
        ``m = beta * m + (1 - beta) * g`` rather than its gradient ``g``
        (Karimireddy, He and Jaggi, ICML 2021; ByzFL's benchmark trains honest
        clients with beta = 0.9). Omniscient attacks see the honest workers'
        momenta. 0 (the default) sends gradients.
    seed : int, default=0
        Fixes shards, faulty workers, initial model, minibatches and attack.
    eval_every : int, default=10
        Evaluate every this many rounds (and after the last).
    evaluate_on : {"test", "val"}, default="test"
        Split the accuracy is measured on; tuning uses ``"val"``.
    array : {"numpy", "torch"}, default="numpy"
        Library of the (p, n) float32 gradient array handed to the rule.
    backend : str or None, default="numpy"
        flagagg backend the rule runs on (see :func:`flagagg.backend`); None
        leaves the choice to flagagg. The simulated models are small, where
        plain NumPy has the least overhead per call.
    progress : bool, default=False
        Show a progress bar over rounds.
    root_size : int, default=100
        For rules that need the server's reference gradient (``"fltrust"``):
        examples in the server's clean root dataset, drawn from the training
        split by a random stream of its own (the workers' shards, minibatches
        and attacks are those of the same run without it); each round the
        server takes one minibatch gradient (``batch_size``) on it at the
        current parameters. Unused by every other rule.
    threads : int or None, default=1
        PyTorch's intra-op threads and the BLAS threads under NumPy while the
        run trains (both restored after). The simulated models and the
        ``(p, n)`` stacks are small, where one thread is fastest: a 1-D CNN
        run on MNIST-1D took 4 to 13 times the CPU time with PyTorch's
        default two threads on a busy 2-core machine, for the same
        results. It is also what :func:`run_experiment` runs every run with.
        None leaves both as they are.

    Returns
    -------
    result : TrainResult
    """
    t0 = time.perf_counter()
    dataset = _as_dataset(dataset)
    run = _setup_run(dataset, rule=rule, f=f, attack=attack, rule_params=rule_params,
                     attack_params=attack_params, workers=workers, model=model,
                     model_params=model_params, partition_method=partition_method, alpha=alpha,
                     rounds=rounds, batch_size=batch_size, worker_momentum=worker_momentum,
                     seed=seed, eval_every=eval_every, evaluate_on=evaluate_on, array=array,
                     backend=backend, root_size=root_size)
    replica, curve = run.replica, run.curve
    steps = range(1, rounds + 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="rounds", leave=False)
    flat, diverged_round = _train(replica, run.aggregate, run.attack, steps, curve,
                                  root=run.root, batch_size=batch_size, array=array,
                                  backend=backend, lr=lr, momentum=momentum,
                                  weight_decay=weight_decay)
    return _result(curve, flat, diverged_round, replica, time.perf_counter() - t0)


class _Run:
    """One run's pieces: its replica, rule, attack, server reference and curve."""

    def __init__(self, replica, aggregate, attack, root, curve):
        self.replica, self.aggregate, self.attack = replica, aggregate, attack
        self.root, self.curve = root, curve


def _setup_run(dataset, *, rule, f, attack, rule_params, attack_params, workers, model,
               model_params, partition_method, alpha, rounds, batch_size, worker_momentum, seed,
               eval_every, evaluate_on, array, backend, root_size):
    """Check a run's arguments and build its :class:`_Run` (one at a time or in lockstep)."""
    _check_run(f=f, workers=workers, evaluate_on=evaluate_on, array=array, backend=backend)
    attack = _as_attack(attack, attack_params)
    aggregate = build_rule(rule, f, rule_params)

    # shards, faulty workers, initial model and random streams, built the same
    # way by the distributed trainer's processes (flagagg.distributed)
    replica = Replica(dataset, workers=workers, f=f, seed=seed, model=model,
                      model_params=model_params, partition_method=partition_method, alpha=alpha,
                      worker_momentum=worker_momentum)
    # FLTrust: the server's own gradient on its root dataset, every round
    root = (RootGradient(replica, size=root_size, batch_size=batch_size, seed=seed)
            if needs_reference(aggregate) else None)
    if attack.defence_aware and root is not None:
        raise ValueError(f"attack {attack.name!r} calls the rule without the server's reference "
                         f"gradient, which {rule!r} needs every round: pick another attack")
    if attack.defence_aware:
        # defence-aware attacks call the rule under test, as the server runs it
        attack = attack.with_rule(rule_for_attack(aggregate, array, backend))
    schedule = _Schedule(rounds, eval_every)
    evaluate = _evaluator(replica, dataset, evaluate_on)
    return _Run(replica, aggregate, attack, root, _Curve(schedule, evaluate))


def _result(curve, flat, diverged_round, replica, seconds):
    if diverged_round is not None:
        curve.diverged(diverged_round)
    return TrainResult(
        rounds=tuple(curve.rounds),
        accuracy=tuple(curve.accuracy),
        final_accuracy=curve.accuracy[-1],
        diverged=diverged_round is not None,
        diverged_round=diverged_round,
        seconds=seconds,
        parameters=flat.numpy().copy(),
        faulty=tuple(int(i) for i in replica.faulty),
    )


# the arguments of simulate() that may differ between the runs of a lockstep group
LOCKSTEP_PER_RUN = ("rule", "f", "attack", "rule_params", "attack_params", "lr", "seed",
                    "evaluate_on")


@_on_threads
def simulate_lockstep(dataset, runs, *, workers=15, model="logreg", model_params=None,
                      partition_method="iid", alpha=0.5, rounds=150, batch_size=32,
                      momentum=0.9, weight_decay=5e-4, worker_momentum=0.0, eval_every=10,
                      array="numpy", backend="numpy", root_size=100, on_done=None,
                      threads=1):
    """Several :func:`simulate` runs on one data set and model, stepped in lockstep.

    The runs share the data, the cluster (workers, shards method, batch
    size), the model and the number of rounds; each has its own rule,
    attack, f, seed, learning rate and split (``runs``). Every round, the
    per-worker gradients of all the runs still going are computed in one
    call of the gradient engine (:class:`~flagagg.training._grads.GradientEngine`,
    a leading run axis; models it does not handle are computed run by run),
    and everything else stays per run: momenta, attacks, the server's
    reference gradient, aggregation, the optimiser step, divergence and
    evaluation. Each run's result is what :func:`simulate` with the same
    arguments returns, bit for bit (the engine computes every run's rows
    with the same operations in the same order, with or without other runs
    beside them; tests compare), except ``seconds``.

    Parameters
    ----------
    dataset : Dataset or str
    runs : sequence of dict
        Each run's arguments of :func:`simulate` among ``rule``, ``f``,
        ``attack``, ``rule_params``, ``attack_params``, ``lr``, ``seed`` and
        ``evaluate_on`` (the others are :func:`simulate`'s defaults).
    workers, model, model_params, partition_method, alpha, rounds, batch_size, momentum, \
weight_decay, worker_momentum, eval_every, array, backend, root_size, threads
        As in :func:`simulate`, common to all runs.
    on_done : callable, optional
        ``on_done(i, result, cpu_seconds)`` as run ``i`` finishes (a run that
        diverges finishes early), e.g. to store it at once.

    Returns
    -------
    results : list of TrainResult
        In the order of ``runs``. ``seconds`` is the run's share of the
        group's wall time: its own work, plus the shared gradient calls
        divided among the runs they served.
    """
    t_start, c_start = time.perf_counter(), time.process_time()
    dataset = _as_dataset(dataset)
    runs = list(runs)
    if not runs:
        raise ValueError("simulate_lockstep needs at least one run")
    defaults = {"rule": "mean", "f": 0, "attack": "none", "rule_params": None,
                "attack_params": None, "lr": 0.1, "seed": 0, "evaluate_on": "test"}
    specs = []
    for i, spec in enumerate(runs):
        if not isinstance(spec, dict):
            raise TypeError(f"runs[{i}] must be a dict of simulate() arguments: got "
                            f"{type(spec).__name__}")
        unknown = sorted(set(spec) - set(LOCKSTEP_PER_RUN))
        if unknown:
            raise TypeError(f"runs[{i}] has arguments a lockstep run cannot set per run: "
                            f"{', '.join(unknown)} (allowed: {', '.join(LOCKSTEP_PER_RUN)})")
        specs.append({**defaults, **spec})
    common = dict(workers=workers, model=model, model_params=model_params,
                  partition_method=partition_method, alpha=alpha, rounds=rounds,
                  batch_size=batch_size, worker_momentum=worker_momentum,
                  eval_every=eval_every, array=array, backend=backend, root_size=root_size)
    states = [_setup_run(dataset, **common, **{k: v for k, v in sp.items() if k != "lr"})
              for sp in specs]
    R = len(states)
    # the time of the set-up and of every shared call is divided among the runs
    # it served; a run's own work is its own. Only wall time is taken per round
    # (perf_counter is cheap; the process's CPU clock is a system call that can
    # cost more than a small run's round): a run's CPU time is the group's so
    # far, in proportion to its share of the wall time
    wall = [(time.perf_counter() - t_start) / R] * R
    flats, bufs = [None] * R, [None] * R
    out = [None] * R
    everyone = list(range(workers))
    engine = states[0].replica._engine

    def finish(i, diverged_round):
        st = states[i]
        out[i] = _result(st.curve, flats[i], diverged_round, st.replica, wall[i])
        if on_done is not None:
            elapsed = time.perf_counter() - t_start
            share = wall[i] / elapsed if elapsed > 0 else 1.0 / R
            on_done(i, out[i], (time.process_time() - c_start) * share)

    for i, st in enumerate(states):
        w0 = time.perf_counter()
        flats[i] = st.replica.initial_parameters()
        st.curve.start(flats[i])
        wall[i] += time.perf_counter() - w0
    active = list(range(R))
    for t in range(1, rounds + 1):
        w0 = time.perf_counter()
        plans = [states[i].replica.round_inputs(states[i].replica.draw_batches(batch_size),
                                                states[i].attack, everyone, skip_unread=True)
                 for i in active]
        # one engine call needs the same number of workers in every run (runs
        # whose attacks skip the faulty workers' gradients and runs that do not
        # are computed apart: every run's rows are the same either way)
        if engine.supported and len({tuple(pl.xb.shape) for pl in plans}) == 1:
            G = engine(torch.stack([flats[i] for i in active]),
                       torch.stack([pl.xb for pl in plans]),
                       torch.stack([pl.yb for pl in plans])).unbind(0)
        else:
            G = [states[i].replica._per_worker(flats[i], pl.xb, pl.yb, states[i].replica.shapes)
                 for i, pl in zip(active, plans, strict=True)]
        dw = (time.perf_counter() - w0) / len(active)
        still = []
        for i, pl, Gi in zip(active, plans, G, strict=True):
            w0 = time.perf_counter()
            st, sp = states[i], specs[i]
            rows = st.replica.round_rows(Gi, pl, st.attack)
            rule_t = (st.aggregate if st.root is None
                      else st.root.bind(st.aggregate, flats[i], array))
            g = _aggregate_or_diverge(rule_t, rows, array=array, backend=backend)
            diverged = g is None
            if not diverged:
                flats[i], bufs[i] = sgd_step(flats[i], bufs[i], g, lr=sp["lr"],
                                             momentum=momentum, weight_decay=weight_decay)
                diverged = not bool(torch.isfinite(flats[i]).all())
            if not diverged:
                st.curve.after(t, flats[i])
            wall[i] += dw + time.perf_counter() - w0
            if diverged:
                finish(i, t)
            else:
                still.append(i)
        active = still
        if not active:
            break
    for i in active:
        finish(i, None)
    return out


def _as_dataset(dataset):
    """A :class:`Dataset`, loading a named one with its defaults."""
    if isinstance(dataset, str):
        dataset = load_dataset(dataset)
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a Dataset or a dataset name: got {type(dataset)}")
    return dataset


def _check_run(*, f, workers, evaluate_on, array, backend):
    """The checks of :func:`simulate`'s arguments that no other piece makes."""
    check_int("workers", workers, owner="simulate", low=1)
    if not isinstance(f, numbers.Integral) or isinstance(f, bool):
        return  # the rule's own declaration says what f must be (build_rule, next)
    if not 0 <= f < workers:
        raise ValueError(f"need 0 <= f < workers: got f={f}, workers={workers}")
    if evaluate_on not in ("test", "val"):
        raise ValueError(f"evaluate_on must be 'test' or 'val': got {evaluate_on!r}")
    if array not in ("numpy", "torch"):
        raise ValueError(f"array must be 'numpy' or 'torch': got {array!r}")
    if backend is not None and array == "numpy" and backend == "torch":
        raise ValueError("backend 'torch' needs array='torch'")
    if backend is not None and array == "torch" and backend in ("numpy", "numba"):
        raise ValueError(
            f"backend {backend!r} takes NumPy arrays; with array='torch' use backend='torch' "
            "or None"
        )


def _as_attack(attack, attack_params):
    """An :class:`~flagagg.attacks.Attack` from a name and its parameters, or as given."""
    if not isinstance(attack, Attack):
        return get_attack(attack, **(attack_params or {}))
    if attack_params:
        raise TypeError("attack_params are only accepted with an attack name")
    return attack


@dataclass(frozen=True)
class _Schedule:
    """Which rounds are evaluated: every ``eval_every``-th and the last."""

    rounds: int
    eval_every: int

    def evaluated(self, t):
        return t % self.eval_every == 0 or t == self.rounds


def _evaluator(replica, dataset, split):
    """``evaluate(flat)``: the accuracy on ``split``, its tensors made once."""
    X, y = (torch.from_numpy(a) for a in dataset.split(split))
    net, shapes = replica.net, replica.shapes

    def evaluate(flat):
        return _accuracy(net, flat, shapes, X, y)

    return evaluate


class _Curve:
    """The accuracy curve: the initial model, then the scheduled rounds."""

    def __init__(self, schedule, evaluate):
        self.schedule, self.evaluate = schedule, evaluate
        self.rounds, self.accuracy = [], []

    def start(self, flat):
        self.rounds.append(0)
        self.accuracy.append(self.evaluate(flat))

    def after(self, t, flat):
        if self.schedule.evaluated(t):
            self.rounds.append(t)
            self.accuracy.append(self.evaluate(flat))

    def diverged(self, t):
        """From round ``t`` on: a model with non-finite parameters predicts nothing."""
        for r in range(t, self.schedule.rounds + 1):
            if self.schedule.evaluated(r):
                self.rounds.append(r)
                self.accuracy.append(0.0)


def _train(replica, aggregate, attack, steps, curve, *, root, batch_size, array, backend, lr,
           momentum, weight_decay):
    """The rounds: return the final parameters and the round that diverged (or None).

    ``root`` (a :class:`RootGradient` or None) gives the rule the server's
    reference gradient of the round.
    """
    flat = replica.initial_parameters()
    buf = None
    everyone = list(range(replica.workers))
    curve.start(flat)
    for t in steps:
        # minibatches with replacement from each worker's own shard, attacks applied
        # the faulty workers' own gradients only where the attack reads them
        # (Replica.round_inputs: the same rows, f of p gradients fewer)
        G = replica.gradients(flat, replica.draw_batches(batch_size), attack, everyone,
                              skip_unread=True)
        rule_t = aggregate if root is None else root.bind(aggregate, flat, array)
        g = _aggregate_or_diverge(rule_t, G, array=array, backend=backend)
        if g is None:
            return flat, t
        flat, buf = sgd_step(flat, buf, g, lr=lr, momentum=momentum, weight_decay=weight_decay)
        if not bool(torch.isfinite(flat).all()):
            return flat, t
        curve.after(t, flat)
    return flat, None


def _aggregate_or_diverge(aggregate, G, *, array, backend):
    """The round's aggregate; None when every row overflowed (the run has diverged).

    A rule that fails on finite rows raises: that is a bug to see, not a run
    to score.
    """
    step = aggregate_step(aggregate, G, array=array, backend=backend)
    if step.gradient is not None:
        return step.gradient
    if isinstance(step.error, ValueError) and not bool(torch.isfinite(G).all(dim=1).any()):
        # every gradient overflowed (a model already blowing up): the rules
        # refuse to aggregate nothing, and the run has diverged
        return None
    raise step.error or ValueError(step.problem)
