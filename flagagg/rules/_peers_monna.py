"""MoNNA: the mean of the ``p - f`` nearest neighbours of a trusted (or central) input."""

from __future__ import annotations

import numpy as np

from .._gram import Gram
from .._validation import Int
from ._base import Rule
from ._contract import F_REQUIRED, Contract, Reference, Solution
from ._peers_medoid import medoid_index

__all__ = ["MoNNA", "distance_order"]


def distance_order(K: Gram, c: int) -> np.ndarray:
    """The inputs by distance to input ``c``: ``c`` first, ties to the lower index, unusable last.

    Exact at any magnitude, in ``O(p)``: each distance ``||g_j - g_c||`` is
    formed at the scale ``2^top`` of the larger of the two inputs (``K``'s
    scaled form) and compared by its binary exponent, then its mantissa, as
    :meth:`~flagagg._gram.Gram.distance_ranks` does for all pairs at once.
    """
    e, S = K.exponents, K.scaled
    p = K.p
    lowest, highest = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    with np.errstate(under="ignore", over="ignore", invalid="ignore"):
        top = np.maximum(e, e[c])
        a = np.ldexp(1.0, e - top)  # g_j's scale relative to the pair's, <= 1
        b = np.ldexp(1.0, e[c] - top)  # g_c's
        t = np.maximum(a * a * np.diag(S) + b * b * S[c, c] - 2.0 * a * b * S[:, c], 0.0)
        m, ex = np.frexp(np.sqrt(t))
    ex = np.where(m == 0, lowest + 1, ex + top)  # distance 0 before every positive one
    ex = np.where(K.usable, ex, highest)
    m = np.where(K.usable, m, 0.0)
    ex[c], m[c] = lowest, 0.0  # the pivot is its own nearest input
    return np.lexsort((np.arange(p), m, ex))


class MoNNA(Rule):
    """MoNNA: the mean of the ``p - f`` inputs nearest to a pivot input.

    Parameters
    ----------
    f : int
        Byzantine inputs tolerated; needs ``p >= 2f + 1``.
    pivot : int or None, default=None
        Index of the input the neighbourhood is built around. In the paper
        it is the aggregating node's own, hence trusted, vector: pass its
        index (e.g. a server's own gradient stacked with the workers').
        None, when no input is trusted: the medoid of the inputs
        (:class:`~flagagg.rules._peers_medoid.Medoid`), which ``f < p / 2``
        faulty inputs cannot move outside the honest inputs' spread.

    Notes
    -----
    Farhadkhani, Guerraoui, Gupta, Hoang, Pinot and Stephan, "Robust
    collaborative learning with linear gradient overhead", ICML 2023. The
    output is ``(1 / (p - f)) sum_{j in N} g_j`` over the ``p - f`` inputs
    ``N`` closest to the pivot, the pivot included; ties go to the lower
    index. Distances come from the Gram matrix, ordered exactly at any
    magnitude: one Gram pass, ``p x p`` work, one combination pass.

    ByzFL's ``MoNNA`` takes ``idx=0`` by default, i.e. it trusts worker 0
    whatever it sends; here that is ``pivot=0``, and the default (no trusted
    input) is the medoid, so a faulty worker 0 cannot choose the
    neighbourhood. A pivot holding NaN or Inf is a ValueError.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[0.0], [1.0], [2.0], [3.0], [50.0]])
    >>> flagagg.aggregate(G, rule="monna", f=2, backend="numpy")
    array([2.])
    >>> flagagg.aggregate(G, rule="monna", f=2, pivot=0, backend="numpy")
    array([1.])
    """

    name = "monna"
    contract = Contract(
        params={"f": F_REQUIRED, "pivot": Int(low=0, none=True)},
        nan_policy="inputs holding NaN or Inf are nobody's neighbour (result.excluded); with "
        "fewer than p - f finite inputs all of them are averaged",
        cost="one pass for the Gram matrix (O(p² n)), O(p log p) to order the distances to "
        "the pivot (O(p²) for the medoid as pivot), one combination pass",
        reference=Reference(("Farhadkhani", "Guerraoui", "Gupta", "Hoang", "Pinot", "Stephan"),
                            "Robust collaborative learning with linear gradient overhead",
                            "ICML", 2023),
        space="gram",
        translation_invariant=True,
    )

    def __init__(self, f: int, pivot: int | None = None) -> None:
        self._store(f=f, pivot=pivot)

    def _solve_gram(self, K: Gram) -> Solution:
        p, f = K.p, self.f
        if self.pivot is not None and self.pivot >= p:
            raise ValueError(f"need pivot < p for {self.name}: got pivot={self.pivot}, p={p}")
        idx = self.usable(K)
        if self.pivot is None:
            c, _ = medoid_index(K)
        else:
            c = self.pivot
            if not K.usable[c]:
                raise ValueError(
                    f"{self.name}: the pivot, input {c}, holds NaN or Inf; a trusted pivot "
                    "must be finite (pivot=None takes the medoid)"
                )
        k = min(p - f, idx.size)
        kept = np.sort(distance_order(K, c)[:k])
        coef = np.zeros(p)
        coef[kept] = 1.0 / k
        return Solution(coefficients=coef, selected=tuple(int(i) for i in kept),
                        excluded=K.excluded, details={"pivot": c, "neighbours": k})
