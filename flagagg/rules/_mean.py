"""The plain mean, the non-robust baseline."""

from __future__ import annotations

import numpy as np

from .._array import Stack
from ..backends import Backend
from ._base import Rule, RuleResult


class Mean(Rule):
    """Arithmetic mean of the inputs, ``(1/p) sum_i g_i``.

    One pass over the data. NaN policy: none; a non-finite input makes the
    output non-finite, as :func:`numpy.mean` would (it is the baseline that
    shows what robust rules protect against).
    """

    name = "mean"

    def _aggregate(self, stack: Stack, backend: Backend) -> RuleResult:
        coef = np.full(stack.p, 1.0 / stack.p)
        out = stack.combine(backend, coef)
        return RuleResult(aggregate=out, rule=self.name, backend=backend.name, coefficients=coef)
