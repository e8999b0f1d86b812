"""The plain mean, the non-robust baseline."""

from __future__ import annotations

import numpy as np

from .._array import Stack
from .._gram import Gram
from ..backends import Backend
from ._base import NothingLeftError, Rule, all_finite
from ._contract import F_OPTIONAL, Contract, Outcome, Solution


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
    contract = Contract(
        params={"f": F_OPTIONAL},
        nan_policy="inputs holding NaN or Inf are excluded and reported, the others averaged "
        "(a Gram pass, taken only when the plain mean is not finite)",
        cost="one O(p n) pass over the data",
        space="gram",
    )

    def __init__(self, f: int | None = None) -> None:
        self._store(f=f)

    def _solve_gram(self, K: Gram) -> Solution:
        if not K.usable.any():
            raise NothingLeftError(self.name, K.p, K.excluded)
        return Solution(coefficients=K.usable / K.usable.sum(), excluded=K.excluded)

    def _solve_stack(self, stack: Stack, backend: Backend) -> Outcome:
        coef = np.full(stack.p, 1.0 / stack.p)
        out = stack.combine(backend, coef)
        if all_finite(stack, out):
            return Outcome(out, Solution(coefficients=coef))
        K = stack.gram(backend)
        if not K.excluded:
            # Finite inputs whose mean overflows: nothing to exclude, say so.
            return Outcome(out, Solution(coefficients=coef), gram=K)
        sol = self._solve_gram(K)
        return Outcome(stack.combine(backend, sol.coefficients), sol, gram=K)
