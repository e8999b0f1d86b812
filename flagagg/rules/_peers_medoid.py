"""Medoid: the input minimising the sum of its distances to the others."""

from __future__ import annotations

import numpy as np

from .._gram import Gram
from ._base import Rule
from ._contract import F_OPTIONAL, Contract, Reference, Solution

__all__ = ["Medoid", "medoid_index", "top_exponent"]


def top_exponent(K: Gram) -> int:
    """The largest scale exponent of the usable inputs (0 when there is none).

    In units of ``2^E`` every usable input's scaled form is at most its own
    size, so no distance between them, nor a sum of ``p`` of them, overflows;
    small distances lose only what float64 loses adding them to large ones.
    """
    u = K.usable
    return int(K.exponents[u].max()) if u.any() else 0


def medoid_index(K: Gram) -> tuple[int, np.ndarray]:
    """The usable input of least total distance to the other usable inputs.

    Returns the index (the lowest on ties) and every input's total distance
    (``+inf`` for unusable inputs, and where the total is beyond float64).
    """
    u = K.usable
    E = top_exponent(K)
    D = K.distances(E)
    sums = np.where(u, np.where(u[None, :], D, 0.0).sum(axis=1), np.inf)
    with np.errstate(over="ignore"):
        return int(np.argmin(sums)), np.ldexp(sums, E)


class Medoid(Rule):
    """Medoid: the input whose summed distance to the other inputs is smallest.

    Parameters
    ----------
    f : int, optional
        Not used to find the medoid; when given, ``p >= 2f + 1`` is checked
        (the medoid's breakdown point is 1/2) and ``f`` goes on to
        pre-aggregation steps.

    Notes
    -----
    Xie, Koyejo and Gupta, "Generalized Byzantine-tolerant SGD",
    arXiv:1802.10116, 2018 (also in the ``krum`` package). The medoid is the
    input of least total distance to the others, a location estimator with
    breakdown point 1/2: ``g_m`` with ``m = argmin_i sum_j ||g_i - g_j||``
    (distances, not squared: a far input adds its distance, not its
    square); the lowest index on ties. Distances come from the Gram matrix:
    one Gram pass, ``p x p`` work, one combination pass reading one row.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[0.0], [1.0], [3.0], [100.0]])
    >>> flagagg.aggregate(G, rule="medoid", backend="numpy")
    array([1.])
    """

    name = "medoid"
    contract = Contract(
        params={"f": F_OPTIONAL},
        nan_policy="inputs holding NaN or Inf are never chosen and left out of the others' "
        "sums (result.excluded)",
        cost="one pass for the Gram matrix (O(p² n)), O(p²) sums of distances, one "
        "combination pass reading the chosen row",
        reference=Reference(("Xie", "Koyejo", "Gupta"), "Generalized Byzantine-tolerant SGD",
                            "arXiv", 2018),
        space="gram",
        translation_invariant=True,
    )

    def __init__(self, f: int | None = None) -> None:
        self._store(f=f)

    def _solve_gram(self, K: Gram) -> Solution:
        self.usable(K)
        m, sums = medoid_index(K)
        coef = np.zeros(K.p)
        coef[m] = 1.0
        return Solution(coefficients=coef, selected=(m,), scores=sums, excluded=K.excluded)
