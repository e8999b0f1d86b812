"""Clipped clustering (Li, Xu, Mao and Liu, 2023).

Every input is clipped to the median norm of this round's inputs, the inputs
are split in two by agglomerative clustering with average linkage on the
cosine distance ``1 - cos(g_i, g_j)``, and the clipped inputs of the larger
cluster are averaged. Norms and cosines come from the ``p x p`` Gram matrix,
so the rule is a Gram rule: one pass for the Gram, ``O(p^3)`` clustering, one
combination pass.
"""

from __future__ import annotations

import numpy as np

from .._gram import Gram
from ._base import Rule, in_unit
from ._contract import F_OPTIONAL, Bound, Contract, Reference, Solution

__all__ = ["ClippedClustering", "average_linkage_two", "larger_cluster"]


def average_linkage_two(D: np.ndarray) -> np.ndarray:
    """Agglomerative clustering of ``q`` points with average linkage, down to two clusters.

    Parameters
    ----------
    D : ndarray of shape (q, q)
        Symmetric distances, ``q >= 2``.

    Returns
    -------
    labels : ndarray of int, shape (q,)
        The smallest member of each point's cluster (two distinct values).

    Notes
    -----
    At each step the two clusters of smallest mean pairwise distance merge
    (Lance-Williams update of the cluster distances, ``O(q^2)`` per merge);
    on equal distances the pair whose smallest members ``(a, b)``, ``a < b``,
    are lexicographically first merges, so the result is deterministic.
    """
    q = D.shape[0]
    # Symmetric, so a cluster's distances are one contiguous row; dead clusters are
    # masked with `alive` where read instead of overwritten.
    W = np.array(D, dtype=np.float64, copy=True)
    np.fill_diagonal(W, np.inf)
    size = np.ones(q)
    alive = np.ones(q, dtype=bool)
    label = np.arange(q)
    pos = np.arange(q)
    # Each row's smallest entry right of the diagonal and its column (the first on
    # ties): the closest pair (a, b), a < b, is the row of smallest minimum (the first
    # on ties), so a merge costs O(q) plus the rows whose minimum it removed, instead
    # of a search of all q^2 pairs.
    U = np.where(pos[None, :] > pos[:, None], W, np.inf)
    rmin = U.min(axis=1)
    rarg = U.argmin(axis=1)
    del U
    for _ in range(q - 2):
        a = int(np.argmin(rmin))
        b = int(rarg[a])
        # d(a u b, c) = (|a| d(a, c) + |b| d(b, c)) / (|a| + |b|), for every live c.
        new = (size[a] * W[a] + size[b] * W[b]) / (size[a] + size[b])
        size[a] += size[b]
        alive[b] = False
        label[label == b] = a
        rmin[b] = np.inf
        new[a] = np.inf
        W[a] = new
        W[:, a] = new
        # Rows whose minimum sat in column a or b: recompute. Other live rows before a
        # gain the new column a: it becomes their minimum if smaller (or equal and
        # further left).
        stale = alive & ((rarg == a) | (rarg == b))
        stale[a] = True
        gain = alive & (pos < a) & ~stale & ((new < rmin) | ((new == rmin) & (a < rarg)))
        rmin[gain] = new[gain]
        rarg[gain] = a
        rows = np.flatnonzero(stale)
        R = np.where(alive[None, :] & (pos[None, :] > rows[:, None]), W[rows], np.inf)
        rmin[rows] = R.min(axis=1)
        rarg[rows] = R.argmin(axis=1)
    return label


def larger_cluster(labels: np.ndarray) -> np.ndarray:
    """Positions of the larger of the (at most two) clusters; on a tie, the one with position 0.

    ``labels`` are the clusters' smallest members, as :func:`average_linkage_two` gives them.
    """
    values, counts = np.unique(labels, return_counts=True)
    # np.unique sorts the labels: the first maximum is the cluster of the smallest member.
    return np.flatnonzero(labels == values[int(np.argmax(counts))])


class ClippedClustering(Rule):
    """Clipped clustering: clip to the median norm, keep the larger of two cosine clusters.

    Parameters
    ----------
    f : int, optional
        Byzantine inputs tolerated; the rule itself does not use it, but
        refuses ``p < 2f + 1`` when given (the honest inputs must be the
        larger cluster).

    Notes
    -----
    Li, Xu, Mao and Liu, "An Experimental Study of Byzantine-Robust
    Aggregation Schemes in Federated Learning", IEEE Transactions on Big
    Data 2023. With ``tau`` the median norm of the inputs (the mean of the
    two middle norms at even ``p``), every input becomes
    ``g_i min(1, tau / ||g_i||)``; the inputs are clustered in two by
    agglomerative clustering with average linkage on the cosine distance
    ``1 - cos(g_i, g_j)`` (a zero input has cosine 0 with every other); the
    output is the mean of the clipped inputs of the larger cluster (on a tie,
    the cluster holding the lowest index).

    The paper clips to the median of the norms of every round so far; this
    rule is stateless and uses the current round's median (a rule object can
    then serve any number of runs; Blades keeps the history). Cost: one pass
    for the Gram matrix, ``O(p^3)`` for the clustering, one combination pass.

    Inputs holding NaN or Inf are left out (``result.excluded``) and do not
    count in the median. Bound: ``p >= 2f + 1`` (the honest inputs must be
    the larger cluster).

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[1.0, 0.1], [1.1, 0.0], [0.9, -0.1], [-50.0, 0.0], [1.0, 0.0]])
    >>> res = flagagg.aggregate(G, rule="clipped_clustering", backend="numpy",
    ...                         return_result=True)
    >>> res.selected
    (0, 1, 2, 4)
    """

    name = "clipped_clustering"
    contract = Contract(
        params={"f": F_OPTIONAL},
        bound=Bound(2, 1),
        nan_policy="inputs holding NaN or Inf are left out (result.excluded) and do not count "
        "in the median norm",
        cost="one pass for the Gram matrix (O(p² n)), O(p³) average-linkage clustering, one "
        "combination pass",
        reference=Reference(("Li", "Xu", "Mao", "Liu"), "An Experimental Study of "
                            "Byzantine-Robust Aggregation Schemes in Federated Learning",
                            "IEEE Trans. Big Data", 2023),
        space="gram",
        # Clipping and cosines are about the origin: the Gram must not be shifted.
        translation_invariant=False,
    )

    def __init__(self, f: int | None = None) -> None:
        self._store(f=f)

    def _solve_gram(self, K: Gram) -> Solution:
        p = K.p
        idx = self.usable(K)
        # Lengths 2^t n and unit Gram U, formed at each input's own scale: exact for
        # inputs of any magnitude (no squared norm is formed).
        n, t, U = K.relative_unit(idx, None)
        tau = _median_length(n, t)
        if tau == 0.0:
            ratio = np.where(n == 0, 0.0, np.inf)
            scale = np.zeros(idx.size)  # clipped to norm 0: every input becomes 0
        else:
            ratio = in_unit(n, t, tau)  # ||g_i|| / tau
            with np.errstate(divide="ignore"):
                scale = np.where(ratio > 1.0, 1.0 / ratio, 1.0)
        if idx.size == 1:
            chosen = np.zeros(1, dtype=np.int64)
        else:
            D = np.clip(1.0 - U, 0.0, 2.0)
            np.fill_diagonal(D, 0.0)
            chosen = larger_cluster(average_linkage_two(D))
        coef = np.zeros(p)
        coef[idx[chosen]] = scale[chosen] / chosen.size
        scores = np.full(p, np.nan)
        scores[idx] = ratio
        return Solution(coefficients=coef, excluded=K.excluded,
                        selected=tuple(int(i) for i in idx[chosen]), scores=scores,
                        details={"tau": tau})


def _median_length(n: np.ndarray, t: np.ndarray) -> float:
    """The median of the lengths ``2^t_i n_i`` (mean of the two middle ones at even count).

    Sorted by binary exponent then mantissa, so lengths beyond float64 (a
    minority of huge inputs) still sort above the others; the median itself
    is finite whenever the middle lengths are.
    """
    m, e = np.frexp(n)
    e = np.where(m == 0, np.iinfo(np.int64).min, e + t)
    order = np.lexsort((m, e))
    with np.errstate(over="ignore"):
        vals = np.ldexp(n[order], t[order])
    q = vals.size
    if q % 2:
        return float(vals[q // 2])
    return float(vals[q // 2 - 1] / 2 + vals[q // 2] / 2)
