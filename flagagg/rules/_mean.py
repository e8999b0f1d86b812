"""The plain mean, the non-robust baseline."""

from __future__ import annotations

import numpy as np

from .._array import Stack
from ..backends import Backend
from ._base import (
    AggregationResult,
    Rule,
    all_finite,
    finite_rows,
    nothing_left,
    validate_f,
)
from ._result import deferred_diagnostics


class Mean(Rule):
    """Arithmetic mean of the inputs, ``(1/p) sum_i g_i``.

    Parameters
    ----------
    f : int, optional
        Not used by the mean (it tolerates no Byzantine input); accepted so
        that every rule takes ``f``, and passed by :func:`flagagg.get_rule`
        to pre-aggregation steps (``get_rule("mean", f=2, pre=["nnm"])``).

    Notes
    -----
    One pass over the data. NaN policy: inputs holding NaN or Inf are
    excluded and reported (``result.excluded``), and the others averaged;
    finding them costs a Gram pass, taken only when the plain mean is not
    finite. Huge finite inputs are averaged like any other: the mean is the
    baseline that shows what robust rules protect against.
    """

    name = "mean"

    def __init__(self, f: int | None = None) -> None:
        self.f = validate_f(self.name, f, required=False)

    def _aggregate(self, stack: Stack, backend: Backend) -> AggregationResult:
        p = stack.p
        coef = np.full(p, 1.0 / p)
        out = stack.combine(backend, coef)
        if all_finite(stack, out):
            return AggregationResult(aggregate=out, rule=self.name, backend=backend.name,
                                     coefficients=coef)
        K = stack.gram(backend)
        keep, excluded = finite_rows(K)
        if not excluded:
            # Finite inputs whose mean overflows: nothing to exclude, say so.
            return AggregationResult(aggregate=out, rule=self.name, backend=backend.name,
                                     coefficients=coef, **deferred_diagnostics(K, coef, ()))
        if not keep.any():
            raise nothing_left(self.name, p, excluded)
        coef = keep / keep.sum()
        out = stack.combine(backend, coef)
        return AggregationResult(aggregate=out, rule=self.name, backend=backend.name,
                                 coefficients=coef, excluded=excluded,
                                 **deferred_diagnostics(K, coef, excluded))
