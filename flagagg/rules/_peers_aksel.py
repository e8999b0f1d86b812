"""Aksel (Boussetta et al., OPODIS 2020), as the krum package defines it.

The mean of the ``p - f`` inputs closest to the coordinate-wise median.
"""

from __future__ import annotations

import numpy as np

from .._array import Stack
from .._gram import unshifted
from ..backends import Backend
from ._base import (
    AggregationResult,
    Rule,
    append_input,
    distance_exponent,
    distances,
    finite_rows,
    nothing_left,
    unit_gram,
    validate_f,
)
from ._coordinate import check_finite_output, coordinate_aggregate
from ._result import deferred_diagnostics

__all__ = ["Aksel"]


class Aksel(Rule):
    """Aksel: the mean of the ``p - f`` inputs closest to the coordinate-wise median.

    Parameters
    ----------
    f : int
        Byzantine inputs tolerated; needs ``p >= 2f + 1``.

    Notes
    -----
    Boussetta, El Mhamdi, Guerraoui, Maurer and Rouault, "AKSEL: Fast
    Byzantine SGD", OPODIS 2020, in the form of the ``krum`` package
    (LPD-EPFL, version 0.9): the pivot ``m`` is the coordinate-wise median
    of the ``p`` inputs (the mean of the two middle values at even ``p``),
    and the output is the mean of the ``p - f`` inputs of smallest
    ``||g_i - m||`` (the lower index first on equal distances). (The
    original Garfield code also had a ``"mid"`` mode averaging
    ``(p + 1) // 2`` inputs; the krum package keeps ``p - f``.)

    Cost: three passes over the data: the median (per coordinate, an order
    statistic of ``p`` values), the Gram matrix of the inputs and the
    median (distances, exact under large common offsets: the Gram is that
    of the inputs shifted by a central one), and the combination.

    NaN policy: the median counts NaN as ``+inf`` per coordinate (as the
    ``median`` rule; a coordinate where half the inputs or more are
    non-finite is a ValueError); inputs holding NaN or Inf are never kept
    and are listed in ``result.excluded``; with more than ``f`` of them,
    every finite input is averaged.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [50.0, -9.0], [1.5, 1.0]])
    >>> res = flagagg.aggregate(G, rule="aksel", f=1, backend="numpy", return_result=True)
    >>> res.aggregate, res.selected
    (array([1.125, 1.   ]), (0, 1, 2, 4))
    """

    name = "aksel"
    p_bound = (2, 1)

    def __init__(self, f: int) -> None:
        self.f = validate_f(self.name, f)

    def _aggregate(self, stack: Stack, backend: Backend) -> AggregationResult:
        p = stack.p
        self.check_workers(p)
        median = coordinate_aggregate(stack, backend, np.arange(p), "median", 0, 0)
        check_finite_output(self.name, stack, median, self.f)
        aug = append_input(stack, median, self.name)
        # Distances to the median only: the Gram may be shifted by a central input.
        KA = aug.gram(backend, shift=True)
        finite_all, nonfinite = finite_rows(KA)
        finite = finite_all[:p]
        excluded = tuple((i, why) for i, why in nonfinite if i < p)
        if not finite.any():
            raise nothing_left(self.name, p, excluded)
        # Distances in units of 2^E, formed at each pair's own scale: exact order at any
        # magnitude (a row at 1e300 is far, not +inf or NaN).
        d = distances(KA, finite_all, distance_exponent(KA))[:p, p]
        idx = np.flatnonzero(finite)
        kept = np.sort(idx[np.lexsort((idx, d[idx]))][: p - self.f])
        coef = np.zeros(p)
        coef[kept] = 1.0 / kept.size
        K = unshifted(KA)
        Ku = np.asarray(unit_gram(K, distance_exponent(K)))[:p, :p]
        scores = np.where(finite, d, np.inf)
        return AggregationResult(
            aggregate=stack.combine(backend, coef), rule=self.name, backend=backend.name,
            coefficients=coef, selected=tuple(int(i) for i in kept), excluded=excluded,
            scores=scores, **deferred_diagnostics(Ku, coef, excluded))
