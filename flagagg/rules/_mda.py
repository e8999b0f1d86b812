"""Minimum-diameter averaging: the mean of the ``p - f`` inputs of smallest diameter."""

from __future__ import annotations

import numpy as np

from .._gram import Gram
from .._validation import Int
from ._base import Rule
from ._contract import F_REQUIRED, Contract, Reference, Solution
from ._subsets import check_subset_budget, combination_batches, mean_of_kept, refuse_no_subset

__all__ = ["MDA", "MDA_MAX_SUBSETS", "min_diameter_subset"]

# Subsets searched exactly: C(p, f) of them, about 2 s per million (p = 40,
# one core). Beyond this the exact rule is refused rather than approximated.
MDA_MAX_SUBSETS = 1_000_000
# Subsets examined per vectorised batch.
_BATCH = 8192


def min_diameter_subset(D2: np.ndarray, f: int) -> tuple[np.ndarray, float, int]:
    """The ``p - f`` inputs of smallest diameter, by exhaustive search over the removed sets.

    Parameters
    ----------
    D2 : ndarray of shape (p, p)
        Squared distances, or anything in the same order (distances, their
        ranks): the search only compares them. ``+inf`` for non-finite inputs.
    f : int
        Inputs removed.

    Returns
    -------
    kept : ndarray of int
        Indices kept, ascending.
    diameter2 : float
        Their diameter in the units of ``D2``.
    n_subsets : int
        Subsets examined, ``C(p, f)``.

    Notes
    -----
    The diameter of what is left after removing a set ``R`` is the largest
    distance of a pair that ``R`` does not touch. Removing ``f`` inputs
    touches at most ``f (p - 1)`` pairs, so walking the pairs from the
    largest down, the answer is among the first ``f (p - 1) + 1``: each
    subset costs a scan of that short list (vectorised over subsets).
    Among subsets of equal diameter the one keeping the lexicographically
    smallest indices wins (it removes the largest ones).
    """
    p = D2.shape[0]
    if f == 0:
        return np.arange(p), float(D2.max()) if p else 0.0, 1
    iu, ju = np.triu_indices(p, 1)
    d = D2[iu, ju]
    order = np.argsort(-d, kind="stable")[: f * (p - 1) + 1]
    a, b, dtop = iu[order], ju[order], d[order]
    best, best_d2 = None, np.inf
    n_subsets = 0
    for removed_sets in combination_batches(p, f, _BATCH):
        n_subsets += removed_sets.shape[0]
        removed = np.zeros((removed_sets.shape[0], p), dtype=bool)
        np.put_along_axis(removed, removed_sets, True, axis=1)
        alive = ~(removed[:, a] | removed[:, b])
        # Pairs with both ends kept; with p - f >= 2 at least one survives.
        first = np.argmax(alive, axis=1)
        diam = np.where(alive.any(axis=1), dtop[first], 0.0)
        # The last subset of minimal diameter: combinations come in
        # lexicographic order of the removed set, so the last removes the
        # largest indices and keeps the smallest.
        j = diam.size - 1 - int(np.argmin(diam[::-1]))
        if diam[j] <= best_d2:
            best, best_d2 = removed_sets[j], float(diam[j])
    keep = np.ones(p, dtype=bool)
    keep[best] = False
    return np.flatnonzero(keep), best_d2, n_subsets


class MDA(Rule):
    """Minimum-diameter averaging: the mean of the ``p - f`` inputs of smallest diameter.

    Parameters
    ----------
    f : int
        Byzantine inputs tolerated; needs ``p >= 2f + 1``.
    max_subsets : int, default=MDA_MAX_SUBSETS (1_000_000)
        Largest ``C(p, f)`` searched (``C(40, 5)`` is 658,008; a million
        subsets take about 2 s). The search is exact and exhaustive; beyond
        this limit the rule raises a ValueError instead of approximating.

    Notes
    -----
    El Mhamdi, Guerraoui and Rouault, "Distributed momentum for
    Byzantine-resilient stochastic gradient descent", ICLR 2021. Of all
    subsets of ``p - f`` inputs, the one whose largest pairwise distance is
    smallest is averaged. Distances come from the Gram matrix, so the search
    is ``p x p`` work after one pass over the data, then one combination
    pass. Ties go to the subset keeping the lowest indices.

    NaN policy: an input holding NaN or Inf is at distance ``+inf`` from the
    others, so no subset of finite diameter contains it; with at most ``f``
    such inputs the mean is finite. They are listed in ``result.excluded``.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[0.0], [1.0], [2.0], [3.0], [40.0]])
    >>> flagagg.aggregate(G, rule="mda", f=1, backend="numpy")
    array([1.5])
    """

    name = "mda"
    contract = Contract(
        params={"f": F_REQUIRED, "max_subsets": Int(low=1)},
        nan_policy="an input holding NaN or Inf is at distance +inf from the others, so no "
        "subset of finite diameter contains it; with at most f such inputs the mean is "
        "finite. They are listed in result.excluded",
        cost="one pass for the Gram matrix (O(p² n)), an exhaustive search over the C(p, f) "
        "subsets (O(C(p, f) f p)), one combination pass",
        reference=Reference(("El Mhamdi", "Guerraoui", "Rouault"),
                            "Distributed momentum for Byzantine-resilient stochastic gradient "
                            "descent", "ICLR", 2021),
        space="gram",
        translation_invariant=True,
    )

    def __init__(self, f: int, max_subsets: int = MDA_MAX_SUBSETS) -> None:
        self._store(f=f, max_subsets=max_subsets)

    def _solve_gram(self, K: Gram) -> Solution:
        p, f = K.p, self.f
        check_subset_budget(self.name, p, f, self.max_subsets, "about 2 s per million subsets")
        self.usable(K)
        # The search only compares distances: their ranks, which no magnitude can
        # overflow (a diameter of 1e300 is compared exactly with one of 1e-300).
        kept, rank, n_subsets = min_diameter_subset(K.distance_ranks(), f)
        if not np.isfinite(rank):
            refuse_no_subset(self.name, f, p, len(K.excluded), "hold NaN or Inf")
        return Solution(coefficients=mean_of_kept(kept, p), selected=tuple(int(i) for i in kept),
                        excluded=K.excluded,
                        details={"diameter": _diameter(K, kept), "n_subsets": n_subsets})


def _diameter(K: Gram, kept: np.ndarray) -> float:
    """Largest distance among the inputs ``kept`` (``inf`` only beyond float64)."""
    E = K.distance_exponent()
    D = K.distances(E)[np.ix_(kept, kept)]
    with np.errstate(over="ignore"):
        return float(np.ldexp(D.max(), E)) if kept.size else 0.0
