"""The aggregation step every trainer takes: the round's rows in, one gradient (or why not) out.

The simulator (:func:`flagagg.sim.simulate`) and the parameter server
(:mod:`flagagg.distributed`) both build their rule with :func:`build_rule`
and aggregate a round with :func:`aggregate_step`, under the same backend,
array library and floating-point policy, so that a distributed run steps
exactly as the simulated one does. A defence-aware attack calls the rule
through :func:`rule_for_attack`, the same way.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["Aggregated", "aggregate_step", "backend_scope", "build_rule", "rule_columns",
           "rule_for_attack"]


def build_rule(rule, f, params=None):
    """Make an aggregation callable from a rule name, or pass a callable through.

    Parameters
    ----------
    rule : str or callable
        A name from :func:`flagagg.available_rules`, or a callable taking a
        (p, n) array and returning an (n,) array.
    f : int
        Number of faulty workers; every rule takes ``f`` (and hands it to
        its pre-aggregation steps, e.g. ``params={"pre": ["nnm"]}``) unless
        ``params`` sets it.
    params : dict, optional
        Further parameters of the rule.

    Returns
    -------
    rule : callable
    """
    params = dict(params or {})
    if callable(rule):
        if params:
            raise TypeError("rule parameters are only accepted with a rule name")
        return rule
    import flagagg

    known = tuple(flagagg.available_rules())
    if rule not in known:
        raise ValueError(
            f"rule {rule!r} is not available in this flagagg: available rules are "
            f"{', '.join(known)}"
        )
    params.setdefault("f", f)  # checked by the rule: 1.5 is a TypeError, not 1
    return flagagg.get_rule(rule, **params)


def backend_scope(backend):
    """A context in which flagagg runs on ``backend`` (None: flagagg's own choice)."""
    if backend is None:
        return contextlib.nullcontext()
    import flagagg

    return flagagg.backend(backend)


def rule_for_attack(aggregate, array="numpy", backend=None):
    """The rule as a defence-aware attack calls it: torch rows in, a torch row out.

    Parameters
    ----------
    aggregate : callable
        The rule, from :func:`build_rule`.
    array : {"numpy", "torch"}, default="numpy"
        Library of the rows the rule is handed, as in :func:`aggregate_step`.
    backend : str or None, default=None
        flagagg backend, as in :func:`aggregate_step`.

    Returns
    -------
    rule : callable
        ``rule(rows)`` for a (k, n) tensor, returning an (n,) tensor of the
        rows' dtype on their device.
    """
    def rule(rows):
        with backend_scope(backend), np.errstate(all="ignore"):
            if array == "numpy":
                out = np.asarray(aggregate(rows.detach().cpu().numpy()))
                return torch.as_tensor(out, dtype=rows.dtype, device=rows.device)
            return aggregate(rows).to(rows.dtype)

    return rule


@dataclass(frozen=True, eq=False)
class Aggregated:
    """What one aggregation step gave.

    Attributes
    ----------
    gradient : torch.Tensor or None
        The aggregate, float32 of shape (n,) on the rows' device; None when
        there is no step to take (see ``problem``).
    result : flagagg.AggregationResult or None
        The rule's result, with its per-worker diagnostics, when they were
        asked for and the rule returned.
    problem : str
        Why there is no gradient; ``""`` when there is one.
    error : Exception or None
        What the rule raised, if it raised.
    seconds : float
        Time the rule took.
    """

    gradient: Any
    result: Any
    problem: str
    error: BaseException | None
    seconds: float


def aggregate_step(rule, G, *, array="numpy", backend=None, diagnostics=False):
    """Aggregate one round's rows into the gradient the optimiser steps with.

    Parameters
    ----------
    rule : callable
        The rule, from :func:`build_rule`.
    G : torch.Tensor of shape (p, n)
        The rows that take part in the round.
    array : {"numpy", "torch"}, default="numpy"
        Library of the (p, n) array handed to the rule: a float32 NumPy copy
        on the CPU, or ``G`` itself.
    backend : str or None, default=None
        flagagg backend the rule runs on (see :func:`flagagg.backend`);
        None leaves the choice to flagagg.
    diagnostics : bool, default=False
        Ask the rule for its result object (``return_result=True``), whose
        per-worker columns the parameter server records. The aggregate is
        the same either way.

    Returns
    -------
    step : Aggregated
        A rule that raises, or returns a gradient of the wrong shape, gives
        no gradient and says why; the caller decides whether that ends the
        run (the simulator) or skips the round (the parameter server).
    """
    n = int(G.shape[1])
    result = None
    t0 = time.perf_counter()
    try:
        # diverging non-robust rules overflow; that is reported as divergence
        # by the trainer, not as floating-point warnings from inside the rule
        with backend_scope(backend), np.errstate(all="ignore"):
            rows = G.detach().cpu().numpy() if array == "numpy" else G
            if diagnostics:
                result = rule(rows, return_result=True)
                out = result.aggregate
            else:
                out = rule(rows)
            if array == "numpy":
                g = torch.as_tensor(np.asarray(out), dtype=torch.float32)
            else:
                g = out.to(torch.float32)
    except Exception as exc:  # noqa: BLE001 - the trainer decides what a failing rule means
        return Aggregated(None, None, f"the rule cannot aggregate these {G.shape[0]} "
                          f"gradients: {type(exc).__name__}: {exc}", exc,
                          time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    if tuple(g.shape) != (n,):
        return Aggregated(None, result, f"the rule returned shape {tuple(g.shape)}; expected "
                          f"({n},)", None, seconds)
    return Aggregated(g.to(G.device), result, "", None, seconds)


def rule_columns(result, rows, workers):
    """The rule's per-worker diagnostics of one round, keyed by worker.

    Parameters
    ----------
    result : flagagg.AggregationResult or None
        The round's result (:attr:`Aggregated.result`).
    rows : sequence of int
        The worker of each row the rule was handed, in row order.
    workers : iterable of int
        Every worker of the run.

    Returns
    -------
    columns : dict
        Worker -> ``reconstruction_ratio`` (the Flag Aggregator's, else
        None), ``coefficient`` (the row's weight in a linear rule's output,
        else None) and ``rule_excluded`` (why the rule left the row out, or
        ``""``); None, None and ``""`` for a worker without a row.
    """
    import flagagg

    ratios = coefs = None
    excluded = {}
    if result is not None:
        if isinstance(result, flagagg.FlagResult):
            ratios = np.asarray(result.reconstruction_ratios)
        if result.coefficients is not None:
            coefs = np.asarray(result.coefficients)
        for i, why in result.excluded:
            if 0 <= int(i) < len(rows):
                excluded[rows[int(i)]] = str(why)
    position = {w: i for i, w in enumerate(rows)}
    columns = {}
    for w in workers:
        i = position.get(w)
        columns[w] = {
            "reconstruction_ratio": None if ratios is None or i is None else float(ratios[i]),
            "coefficient": None if coefs is None or i is None else float(coefs[i]),
            "rule_excluded": excluded.get(w, ""),
        }
    return columns
