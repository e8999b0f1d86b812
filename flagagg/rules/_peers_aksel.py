"""Aksel (Boussetta et al., OPODIS 2020), as the krum package defines it.

The mean of the ``p - f`` inputs closest to the coordinate-wise median.
"""

from __future__ import annotations

import numpy as np

from .._array import Stack
from ..backends import Backend
from ._base import NothingLeftError, Rule, append_input
from ._contract import F_REQUIRED, Bound, Contract, Outcome, Reference, Solution
from ._coordinate import check_finite_output

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
    contract = Contract(
        params={"f": F_REQUIRED},
        bound=Bound(2, 1),
        nan_policy="the median counts NaN as +inf per coordinate (a coordinate where half the "
        "inputs or more are non-finite is a ValueError); inputs holding NaN or Inf are never "
        "kept (result.excluded)",
        cost="three passes: the coordinate-wise median (O(p n log p)), the Gram matrix of the "
        "inputs and the median (O(p² n)), one combination pass",
        reference=Reference(("Boussetta", "El Mhamdi", "Guerraoui", "Maurer", "Rouault"),
                            "AKSEL: Fast Byzantine SGD", "OPODIS", 2020),
        # The median pivot needs every input's coordinates, the distances the whole
        # vectors: not the inputs' Gram alone.
        space="vector",
    )

    def __init__(self, f: int) -> None:
        self._store(f=f)

    def _solve_stack(self, stack: Stack, backend: Backend) -> Outcome:
        p = stack.p
        median = stack.coordinate_stat(backend, np.arange(p), "median", 0, 0)
        check_finite_output(self.name, stack, median, self.f)
        aug = append_input(stack, median, self.name)
        # Distances to the median only: the Gram may be shifted by a central input.
        KA = aug.gram(backend, shift=True)
        excluded = tuple((i, why) for i, why in KA.excluded if i < p)
        finite = KA.usable[:p]
        if not finite.any():
            raise NothingLeftError(self.name, p, excluded)
        # Distances in units of 2^E, formed at each pair's own scale: exact order at any
        # magnitude (a row at 1e300 is far, not +inf or NaN).
        d = KA.distances(KA.distance_exponent())[:p, p]
        idx = np.flatnonzero(finite)
        kept = np.sort(idx[np.lexsort((idx, d[idx]))][: p - self.f])
        coef = np.zeros(p)
        coef[kept] = 1.0 / kept.size
        out = stack.combine(backend, coef)
        sol = Solution(coefficients=coef, excluded=excluded,
                       selected=tuple(int(i) for i in kept), scores=np.where(finite, d, np.inf))
        # Each input against the output from the augmented Gram, when a result is asked
        # for: no further pass.
        return Outcome(out, sol, gram=KA)
