"""MoNNA: the mean of the ``p - f`` nearest neighbours of a trusted (or central) input."""

from __future__ import annotations

import numpy as np

from .._validation import check_int
from ._base import GramRule, check_f, distance_ranks, finite_rows, nothing_left, validate_f
from ._peers_medoid import medoid_index

__all__ = ["MoNNA"]


class MoNNA(GramRule):
    """MoNNA: the mean of the ``p - f`` inputs nearest to a pivot input.

    Parameters
    ----------
    f : int
        Byzantine inputs tolerated; needs ``p >= 2f + 1``.
    pivot : int or None, default=None
        Index of the input the neighbourhood is built around. In the paper
        it is the aggregating node's own (hence trusted) vector: pass its
        index, e.g. the server's own gradient stacked with the workers'.
        None (no trusted input): the medoid of the inputs
        (:class:`~flagagg.rules._peers_medoid.Medoid`), which at most ``f <
        p / 2`` faulty inputs cannot move outside the honest inputs' spread.

    Notes
    -----
    Farhadkhani, Guerraoui, Gupta, Hoang, Pinot and Stephan, "Robust
    collaborative learning with linear gradient overhead", ICML 2023. The
    output is ``(1 / (p - f)) sum_{j in N} g_j`` over the ``p - f`` inputs
    ``N`` closest to the pivot, the pivot itself included; ties go to the
    lower index. Distances come from the Gram matrix, ordered exactly at
    any magnitude: one Gram pass, ``p x p`` work, one combination pass.

    ByzFL's ``MoNNA`` takes ``idx=0`` by default, i.e. it trusts worker 0
    whatever it sends; here that is ``pivot=0``, and the default (no
    trusted input) is the medoid, so a faulty worker 0 cannot choose the
    neighbourhood.

    NaN policy: inputs holding NaN or Inf are nobody's neighbour
    (``result.excluded``); with fewer than ``p - f`` finite inputs all of
    them are averaged. A pivot holding NaN or Inf is a ValueError.

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
    p_bound = (2, 1)
    translation_invariant = True

    def __init__(self, f: int, pivot: int | None = None) -> None:
        self.f = validate_f(self.name, f)
        self.pivot = check_int("pivot", pivot, owner=self.name, low=0, none=True)

    def _coefficients(self, K: np.ndarray) -> tuple[np.ndarray, dict]:
        p, f = K.shape[0], self.f
        check_f(self.name, f, p, 2 * f + 1, "p >= 2f + 1")
        if self.pivot is not None and self.pivot >= p:
            raise ValueError(f"need pivot < p for {self.name}: got pivot={self.pivot}, p={p}")
        finite, excluded = finite_rows(K)
        if not finite.any():
            raise nothing_left(self.name, p, excluded)
        if self.pivot is None:
            c, _ = medoid_index(K, finite)
        else:
            c = self.pivot
            if not finite[c]:
                raise ValueError(
                    f"{self.name}: the pivot, input {c}, holds NaN or Inf; a trusted pivot "
                    "must be finite (pivot=None takes the medoid)"
                )
        k = min(p - f, int(finite.sum()))
        # Exact order of the distances to the pivot at any magnitude; the pivot first.
        r = distance_ranks(K, finite)[c].copy()
        r[c] = -1.0
        kept = np.sort(np.argsort(r, kind="stable")[:k])
        coef = np.zeros(p)
        coef[kept] = 1.0 / k
        return coef, {"selected": tuple(int(i) for i in kept), "excluded": excluded,
                      "details": {"pivot": c, "neighbours": k}}
