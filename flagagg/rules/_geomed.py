"""The geometric median, by smoothed Weiszfeld iterations in the Gram space."""

from __future__ import annotations

import numpy as np

from .._validation import check_int, check_real
from ._base import (
    GramRule,
    check_f,
    distance_exponent,
    finite_rows,
    nothing_left,
    sq_distances,
    validate_f,
)

__all__ = ["GeometricMedian", "weiszfeld_gram"]


def weiszfeld_gram(D2: np.ndarray, *, max_iter: int, tol: float, eps: float):
    """Smoothed Weiszfeld on ``q`` points given by their squared distances.

    Parameters
    ----------
    D2 : ndarray of shape (q, q)
        Finite squared distances between the points.
    max_iter, tol, eps
        As in :class:`GeometricMedian`.

    Returns
    -------
    coef : ndarray of shape (q,)
        Weights (summing to 1) of the median as a combination of the points.
    history : ndarray of shape (n_iter,)
        Smoothed objective after each iteration.
    converged : bool
    """
    q = D2.shape[0]
    # Quadratic forms are taken relative to the medoid: z - g_i is the same
    # vector for any origin, and a central origin keeps the terms small
    # (no cancellation between large norms).
    r = int(np.argmin(np.sqrt(D2).sum(axis=1)))
    Kc = 0.5 * (D2[:, [r]] + D2[[r], :] - D2)  # (g_i - g_r) . (g_j - g_r)
    dKc = np.diag(Kc).copy()

    def distances(c: np.ndarray) -> np.ndarray:
        Kcc = Kc @ c
        return np.sqrt(np.maximum(c @ Kcc - 2.0 * Kcc + dKc, 0.0))

    def objective(d: np.ndarray) -> float:
        # Huber-like smoothing of ||z - g_i||: quadratic below eps, so the
        # Weiszfeld step with weights 1 / max(eps, d_i) never increases it.
        return float(np.where(d >= eps, d, d * d / (2 * eps) + eps / 2).sum())

    c = np.full(q, 1.0 / q)
    d = distances(c)
    prev = objective(d)
    history = []
    converged = False
    for _ in range(max_iter):
        w = 1.0 / np.maximum(d, eps)
        c = w / w.sum()
        d = distances(c)
        cur = objective(d)
        history.append(cur)
        if prev - cur <= tol * prev:
            converged = True
            break
        prev = cur
    return c, np.asarray(history), converged


class GeometricMedian(GramRule):
    """Geometric median ``argmin_z sum_i ||z - g_i||``, by smoothed Weiszfeld iterations.

    Parameters
    ----------
    max_iter : int, default=100
        Most Weiszfeld iterations.
    tol : float, default=1e-6
        Stop when the relative decrease of the objective falls below this.
    eps : float, default=1e-6
        Smoothing: distances below ``eps`` count as ``eps`` in the weights
        (Pillutla, Kakade and Harchaoui, "Robust aggregation for federated
        learning", 2022), which keeps a step well defined at an input.
    f : int, optional
        Byzantine inputs tolerated. The rule needs no bound (its breakdown
        point is 1/2); when given, ``p >= 2f + 1`` is checked.

    Notes
    -----
    Every iterate is ``z = sum_i c_i g_i`` with ``c_i`` proportional to
    ``1 / max(eps, ||z_prev - g_i||)``; the distances are quadratic forms in
    the Gram matrix, so each iteration costs ``O(p^2)`` and the data are
    read twice in all (Gram, then the combination). The iterations start at
    the mean. ``result.objective_history`` holds the smoothed objective
    (``||z - g_i||``, or ``d^2 / (2 eps) + eps / 2`` below ``eps``) after
    each iteration; it never increases. ``result.converged`` says whether
    ``tol`` was met within ``max_iter``.

    NaN policy: inputs holding NaN or Inf are excluded (coefficient 0,
    listed in ``result.excluded``); the median of the others is returned.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [500.0, 500.0]])
    >>> res = flagagg.aggregate(G, rule="geometric_median", tol=1e-12, max_iter=500,
    ...                         backend="numpy", return_result=True)
    >>> np.round(res.aggregate, 3), res.converged
    (array([1.577, 1.577]), True)
    """

    name = "geometric_median"
    p_bound = (2, 1)
    translation_invariant = True

    def __init__(self, max_iter: int = 100, tol: float = 1e-6, eps: float = 1e-6,
                 f: int | None = None) -> None:
        self.max_iter = check_int("max_iter", max_iter, owner=self.name, low=1)
        self.tol = check_real("tol", tol, owner=self.name, low=0.0)
        self.eps = check_real("eps", eps, owner=self.name, low=0.0, strict=True)
        self.f = validate_f(self.name, f, required=False)

    def _coefficients(self, K: np.ndarray) -> tuple[np.ndarray, dict]:
        p = K.shape[0]
        if self.f is not None:
            check_f(self.name, self.f, p, 2 * self.f + 1, "p >= 2f + 1")
        finite, excluded = finite_rows(K)
        idx = np.flatnonzero(finite)
        if idx.size == 0:
            raise nothing_left(self.name, p, excluded)
        # Distances in units of 2^E (E = 0 unless the inputs are huge or tiny),
        # eps with them: the same iterations, exactly.
        E = distance_exponent(K)
        D2 = sq_distances(K, finite, E)[np.ix_(idx, idx)]
        c, history, converged = weiszfeld_gram(D2, max_iter=self.max_iter, tol=self.tol,
                                               eps=float(np.ldexp(self.eps, -E)))
        history = np.ldexp(history, E)
        coef = np.zeros(p)
        coef[idx] = c
        return coef, {"excluded": excluded, "n_iter": int(history.size), "converged": converged,
                      "objective_history": history}
