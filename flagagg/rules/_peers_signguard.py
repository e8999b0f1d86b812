"""SignGuard (Xu, Huang, Lai and Li, ICDCS 2022): norm filtering and sign-statistics clustering.

An input is kept when its norm is within ``[lower, upper]`` times the median
norm and its sign statistics (fractions of positive, zero and negative
coordinates) fall in the larger of two clusters; the kept inputs, clipped to
the median norm, are averaged.
"""

from __future__ import annotations

import numpy as np

from .._array import Stack, chunk_columns, to_numpy
from .._validation import Real
from ..backends import Backend
from ._base import Rule, in_unit
from ._contract import F_OPTIONAL, Bound, Contract, Outcome, Reference, Solution
from ._peers_clippedclustering import _median_length, larger_cluster

__all__ = ["SignGuard", "two_means"]


def two_means(F: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    """Lloyd's 2-means on the rows of ``F``, started from the two rows farthest apart.

    Deterministic: the start is the pair ``(i, j)``, ``i < j``, of largest
    distance (the lexicographically first on ties); a point joins the
    nearer centre (centre 0 on a tie); a centre is the mean of its points
    (kept when it has none); stops when no point changes cluster.

    Returns
    -------
    labels : ndarray of int, shape (q,)
        The smallest member of each point's cluster.
    """
    q = F.shape[0]
    D = ((F[:, None, :] - F[None, :, :]) ** 2).sum(axis=-1)
    D[np.tril_indices(q)] = -1.0
    i, j = divmod(int(np.argmax(D)), q)
    centres = np.stack([F[i], F[j]])
    labels = None
    for _ in range(max_iter):
        d = ((F[:, None, :] - centres[None, :, :]) ** 2).sum(axis=-1)
        new = (d[:, 0] > d[:, 1]).astype(np.int64)
        if labels is not None and (new == labels).all():
            break
        labels = new
        for k in (0, 1):
            if (labels == k).any():
                centres[k] = F[labels == k].mean(axis=0)
    first = np.array([np.flatnonzero(labels == k)[0] if (labels == k).any() else -1
                      for k in (0, 1)])
    return first[labels]


class SignGuard(Rule):
    """SignGuard: norm filter and sign-statistics clustering, then the clipped mean.

    Parameters
    ----------
    f : int, optional
        Byzantine inputs tolerated; not used by the rule, but ``p >= 2f + 1``
        is checked when given (the honest inputs must be the larger cluster).
    lower, upper : float, default=0.1, 3.0
        The norm filter: inputs with ``lower <= ||g_i|| / M <= upper`` pass,
        ``M`` the median norm (the paper's ``L`` and ``R``).

    Notes
    -----
    Xu, Huang, Lai and Li, "SignGuard: Byzantine-robust Federated Learning
    through Collaborative Malicious Gradient Filtering", ICDCS 2022. This is
    the plain SignGuard (no similarity features) with two choices stated:

    * the sign statistics (fractions of positive, zero and negative
      coordinates) are taken over **every** coordinate (the paper samples a
      random subset; all of them is the limit and needs no randomness);
    * they are split by a deterministic 2-means (:func:`two_means`; the paper
      uses mean-shift, Blades uses k-means with two clusters), and the larger
      cluster is kept (on a tie, the one holding the lowest index).

    The kept inputs are those in both the norm filter and the larger sign
    cluster; the output is their mean after clipping each to norm ``M``.
    The norm filter is applied to the inputs as given (the Blades code
    clips first, which makes its upper bound void).

    Cost: one pass for the Gram matrix (norms, exact at any magnitude), one
    pass counting signs, one combination pass. Not a Gram rule: the sign
    statistics need the coordinates (they are sums over coordinates, so a
    sharded input only needs its shards' counts added).

    NaN policy: inputs holding NaN or Inf are left out (``result.excluded``)
    and do not count in the median norm. When no input passes both
    filters, a ValueError.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> rng = np.random.default_rng(0)
    >>> H = 1.0 + rng.normal(size=(6, 40))
    >>> G = np.vstack([H, -H[:2]])  # sign flipped: the sign statistics move
    >>> res = flagagg.aggregate(G, rule="signguard", f=2, backend="numpy",
    ...                         return_result=True)
    >>> res.selected
    (0, 1, 2, 3, 4, 5)
    """

    name = "signguard"
    contract = Contract(
        params={"f": F_OPTIONAL, "lower": Real(low=0.0), "upper": Real(low=0.0)},
        bound=Bound(2, 1),
        nan_policy="inputs holding NaN or Inf are left out (result.excluded) and do not count "
        "in the median norm",
        cost="one pass for the Gram matrix (O(p² n)), one pass counting signs (O(p n)), "
        "2-means on p points, one combination pass",
        reference=Reference(("Xu", "Huang", "Lai", "Li"), "SignGuard: Byzantine-robust "
                            "Federated Learning through Collaborative Malicious Gradient "
                            "Filtering", "ICDCS", 2022),
        # Sign statistics need the coordinates (sums over them: shardable, but not
        # from the Gram).
        space="vector",
    )

    def __init__(self, f: int | None = None, lower: float = 0.1, upper: float = 3.0) -> None:
        self._store(f=f, lower=lower, upper=upper)
        if self.upper < self.lower:
            raise ValueError(f"need upper >= lower for {self.name}: got lower={self.lower:g}, "
                             f"upper={self.upper:g}")

    def _solve_stack(self, stack: Stack, backend: Backend) -> Outcome:
        p = stack.p
        K = stack.gram(backend)
        idx = self.usable(K)
        n, t, _ = K.relative_unit(idx, None)
        M = _median_length(n, t)
        if M > 0:
            ratio = in_unit(n, t, M)  # ||g_i|| / M
            s1 = (ratio >= self.lower) & (ratio <= self.upper)
        else:
            ratio = np.where(n == 0, 0.0, np.inf)
            s1 = ratio == 0
        features = _sign_features(stack)[idx]
        if idx.size == 1:
            s2 = np.ones(1, dtype=bool)
        else:
            s2 = np.zeros(idx.size, dtype=bool)
            s2[larger_cluster(two_means(features))] = True
        kept = s1 & s2
        if not kept.any():
            raise ValueError(
                f"{self.name}: no input passes both the norm filter ({self.lower:g} <= "
                f"||g|| / median <= {self.upper:g}: {int(s1.sum())} pass) and the sign "
                f"clustering ({int(s2.sum())} in the larger cluster)")
        with np.errstate(divide="ignore"):
            clip = np.where(ratio > 1.0, 1.0 / ratio, 1.0)
        coef = np.zeros(p)
        coef[idx[kept]] = clip[kept] / int(kept.sum())
        scores = np.full(p, np.nan)
        scores[idx] = ratio
        details = {"median_norm": M, "norm_pass": tuple(int(i) for i in idx[s1]),
                   "sign_cluster": tuple(int(i) for i in idx[s2]),
                   "sign_features": features}
        sol = Solution(coefficients=coef, excluded=K.excluded,
                       selected=tuple(int(i) for i in idx[kept]), scores=scores,
                       details=details)
        return Outcome(stack.combine(backend, coef), sol, gram=K)


def _sign_features(stack: Stack) -> np.ndarray:
    """Fractions of positive, zero and negative coordinates of every input, shape (p, 3).

    Counted a cache-sized chunk of columns at a time: the comparison's
    temporaries stay small whatever the inputs' length.
    """
    xp = stack.xp
    pos = np.zeros(stack.p)
    neg = np.zeros(stack.p)
    step = chunk_columns(stack.p)
    for leaf in stack.leaves:
        for _, _, block in stack.blocks(leaf):
            width = block.shape[1]
            for start in range(0, width, step):
                part = block[:, start:min(start + step, width)]
                if stack.library == "numpy":
                    pos += np.count_nonzero(part > 0, axis=1)
                    neg += np.count_nonzero(part < 0, axis=1)
                else:
                    pos += np.asarray(to_numpy(xp.sum(xp.astype(part > 0, xp.int32), axis=1)),
                                      dtype=np.float64)
                    neg += np.asarray(to_numpy(xp.sum(xp.astype(part < 0, xp.int32), axis=1)),
                                      dtype=np.float64)
    n = stack.n
    return np.stack([pos / n, (n - pos - neg) / n, neg / n], axis=1)
