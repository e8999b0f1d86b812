"""The geometric median, by smoothed Weiszfeld iterations in the Gram space."""

from __future__ import annotations

import numpy as np

from .._gram import Gram
from .._validation import Int, Real
from ._base import Rule, unit_distances
from ._contract import F_OPTIONAL, Contract, Reference, Solution

__all__ = ["GeometricMedian", "medoid", "weiszfeld_gram", "weiszfeld_unit"]


def medoid(D: np.ndarray) -> int:
    """The point of smallest sum of distances to the others (the first of a tie).

    Parameters
    ----------
    D : ndarray of shape (q, q)
        Distances (not squared), ``+inf`` where one overflows.

    Notes
    -----
    The sums are taken in units of the largest finite distance, so they
    cannot overflow; a distance that did overflow counts as twice that (it
    is larger than every finite one, and the same for every honest point).
    """
    sums = D.sum(axis=1)
    if np.isfinite(sums).all():  # the usual case: no distance, and no sum, overflowed
        return int(np.argmin(sums))
    fin = np.isfinite(D)
    top = float(D[fin].max()) if fin.any() else 0.0
    if top == 0.0:
        return 0
    return int(np.argmin(np.where(fin, D / top, 2.0).sum(axis=1)))


def weiszfeld_unit(s: np.ndarray, U: np.ndarray, *, max_iter: int, tol: float, eps: float):
    """Smoothed Weiszfeld on points ``s_i u_i`` given by their lengths and unit Gram.

    The points are ``y_i = s_i u_i`` (relative to a start point, the origin,
    which is one of them), with ``U_ij = u_i . u_j`` and every length in one
    unit (the honest scale): then nothing overflows however far a point is
    (``s_i`` may be ``+inf``: a point that far pulls with its direction
    alone, as the limit says), and a step is measured in that unit.

    Parameters
    ----------
    s : ndarray of shape (q,)
        Lengths ``||y_i||``, ``>= 0`` (0 for the origin), possibly ``+inf``.
    U : ndarray of shape (q, q)
        ``u_i . u_j``; rows of zero-length points are ignored.
    max_iter, tol, eps
        As in :class:`GeometricMedian`, ``tol`` and ``eps`` in the unit of ``s``.

    Returns
    -------
    b : ndarray of shape (q,)
        The median is ``sum_i b_i u_i`` (in the unit of ``s``).
    history : ndarray of shape (n_iter,)
        Smoothed objective after each iteration (``+inf`` if a length is).
    converged : bool
        Whether the pulls balanced to ``tol``: the gradient of the smoothed
        objective (a sum of ``q`` pulls of length at most 1) was at most
        ``tol q`` long, i.e. the step at most ``tol`` long with the unit as
        curvature radius.
    """
    q = s.size
    far = np.isinf(s)
    sf = np.where(far, 0.0, s)
    b = np.zeros(q)  # the start: the origin

    def dist(b: np.ndarray, Ub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = unit_distances(s, U, b, Ub)
        # s_i / d_i, the pull of point i in the step; 1 in the limit of an infinitely far one.
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(far, 1.0, sf / np.maximum(d, eps))
        return d, ratio

    def objective(d: np.ndarray) -> float:
        # Huber-like smoothing of ||z - y_i||: quadratic below eps, so the
        # Weiszfeld step with weights 1 / max(eps, d_i) never increases it.
        dm = np.minimum(d, eps)
        return float(np.where(d >= eps, d, dm * dm / (2 * eps) + eps / 2).sum())

    Ub = np.zeros(q)
    d, ratio = dist(b, Ub)
    # The first step from the start (a point that coincides with y_i for s_i = 0)
    # leaves those points out: with them at weight 1 / eps it would be eps long, and
    # smoothed Weiszfeld would creep away from a data point one eps at a time.
    w = np.where(far | (s == 0), 0.0, 1.0 / np.maximum(d, eps))
    if w.sum() > 0:
        b = ratio / w.sum()
        Ub = U @ b
        d, ratio = dist(b, Ub)
    history = [objective(d)]
    converged = False
    for _ in range(max_iter - 1):
        # z <- sum_i w_i y_i / sum_i w_i, w_i = 1 / max(eps, d_i); w_i y_i = ratio_i u_i.
        w = np.where(far, 0.0, 1.0 / np.maximum(d, eps))
        W = w.sum()
        b_new = ratio / W
        Ub_new = U @ b_new
        step = b_new - b
        # The step is minus the gradient over W, and each point pulls with at most 1:
        # stop when the pulls balance to tol (the gradient is at most tol q), i.e. when
        # the step, with the honest scale (1) as curvature radius, is at most tol long.
        # (A step alone can be short without the gradient being so, at a data point.)
        # ||step||^2 from the products at hand, confirmed exactly before stopping.
        # (Divided by W, not multiplied: W is up to q / eps.)
        if np.sqrt(max(float(step @ (Ub_new - Ub)), 0.0)) <= tol * q / W:
            converged = bool(np.sqrt(max(float(step @ (U @ step)), 0.0)) <= tol * q / W)
        b, Ub = b_new, Ub_new
        d, ratio = dist(b, Ub)
        history.append(objective(d))
        if converged:
            break
    return b, np.asarray(history), converged


def weiszfeld_gram(K: Gram, idx: np.ndarray, *, max_iter: int, tol: float, eps: float):
    """Smoothed Weiszfeld on the inputs ``idx`` of the Gram matrix ``K``, from their medoid.

    Parameters
    ----------
    K : Gram
        Gram matrix of the inputs (shifted or not).
    idx : ndarray of int, shape (q,)
        The finite inputs, ``q >= 1``.
    max_iter : int
    tol : float
        Stop when a step is at most ``tol`` times the honest scale (the
        upper median of the inputs' distances to the medoid).
    eps : float
        Smoothing, in the units of the inputs.

    Returns
    -------
    coef : ndarray of shape (q,)
        Weights (summing to 1) of the median as a combination of the inputs ``idx``.
    history : ndarray of shape (n_iter,)
        Smoothed objective after each iteration, in the units of the inputs.
    converged : bool
    """
    idx = np.asarray(idx)
    q = idx.size
    # The start: the medoid, which a minority of far inputs cannot move far (unlike
    # the mean, which one input at 1e30 moves by 1e30 / p). Distances in units of
    # 2^E (E = 0 unless the inputs are huge or tiny) only to compare them.
    D = K.distances(K.distance_exponent())
    r = medoid(D if q == K.p else D[np.ix_(idx, idx)])
    # Lengths ||g_i - g_r|| = 2^t_i n_i and the unit Gram of the g_i - g_r.
    n, t, U = K.relative_unit(idx, r)
    coef = np.zeros(q)
    coef[r] = 1.0
    pos = n > 0
    # The honest scale: the upper median of the lengths, ordered by exponent then
    # mantissa (no overflow). If it is 0, at least half the inputs coincide with g_r,
    # which is then a geometric median exactly (the others' unit pulls cannot outweigh it).
    mant, ex = np.frexp(n)
    k = int(np.lexsort((mant, np.where(pos, ex + t, np.iinfo(np.int64).min)))[q // 2])
    if not pos[k]:
        return coef, np.zeros(0), True
    with np.errstate(over="ignore", under="ignore"):
        s = np.ldexp(n / n[k], t - t[k])  # lengths in units of sigma = 2^t_k n_k
        eps_u = float(np.ldexp(eps / n[k], -int(t[k])))
    # eps below the smallest normal number in the unit: as good as 0 but keeps 1/eps finite.
    eps_u = min(max(eps_u, np.finfo(np.float64).tiny), np.finfo(np.float64).max)
    b, history, converged = weiszfeld_unit(s, U, max_iter=max_iter, tol=tol, eps=eps_u)
    # sum_i b_i u_i = sum_i (b_i / s_i) (g_i - g_r): coefficients summing to 1. (A point
    # beyond float64 in the unit keeps its pull in the iterations, not in the output.)
    with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
        c = np.where(pos & np.isfinite(s), b / s, 0.0)
    coef += c
    coef[r] -= c.sum()
    with np.errstate(over="ignore"):
        history = np.ldexp(history * n[k], int(t[k]))
    return coef, history, converged


class GeometricMedian(Rule):
    """Geometric median ``argmin_z sum_i ||z - g_i||``, by smoothed Weiszfeld iterations.

    Parameters
    ----------
    max_iter : int, default=100
        Most Weiszfeld iterations.
    tol : float, default=1e-6
        Stop when a step is at most ``tol`` times the honest scale (the
        upper median of the inputs' distances to the medoid): a step of
        Weiszfeld is the objective's gradient over the sum of the weights,
        so this bounds the gradient relative to the honest inputs, whatever
        the outliers do to the objective.
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
    the medoid (the input of smallest sum of distances to the others), and
    work with the lengths and directions of ``g_i - medoid`` in units of the
    honest scale: no squared distance is formed, so an input at ``1e300``
    neither overflows nor moves the median by more than its unit pull.
    ``result.objective_history`` holds the smoothed objective
    (``||z - g_i||``, or ``d^2 / (2 eps) + eps / 2`` below ``eps``) after
    each iteration; it never increases. ``result.converged`` says whether
    the last step was within ``tol``.

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
    contract = Contract(
        params={"max_iter": Int(low=1), "tol": Real(low=0.0), "eps": Real(low=0.0, strict=True),
                "f": F_OPTIONAL},
        nan_policy="inputs holding NaN or Inf are excluded (coefficient 0, listed in "
        "result.excluded); the median of the others is returned",
        cost="one pass for the Gram matrix (O(p² n)), O(p²) per Weiszfeld iteration, one "
        "combination pass",
        reference=Reference(("Pillutla", "Kakade", "Harchaoui"),
                            "Robust aggregation for federated learning",
                            "IEEE TSP", 2022),
        space="gram",
        translation_invariant=True,
    )

    def __init__(self, max_iter: int = 100, tol: float = 1e-6, eps: float = 1e-6,
                 f: int | None = None) -> None:
        self._store(max_iter=max_iter, tol=tol, eps=eps, f=f)

    def _solve_gram(self, K: Gram) -> Solution:
        idx = self.usable(K)
        c, history, converged = weiszfeld_gram(K, idx, max_iter=self.max_iter, tol=self.tol,
                                               eps=self.eps)
        coef = np.zeros(K.p)
        coef[idx] = c
        return Solution(coefficients=coef, excluded=K.excluded, n_iter=int(history.size),
                        converged=converged, objective_history=history)
