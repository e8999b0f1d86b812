"""Covariance-bound agnostic filter (CAF): down-weight along the top covariance direction."""

from __future__ import annotations

import numpy as np

from .._gram import Gram
from ._base import Rule
from ._contract import F_REQUIRED, Contract, Reference, Solution

__all__ = ["CAF", "caf_weights", "centered_top_eig"]


def centered_top_eig(U: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    """Top eigenvalue of the weighted covariance, and the inputs' squared projections on it.

    For inputs of Gram ``U`` and weights ``w`` summing to 1, the covariance
    ``Sigma = sum_i w_i d_i d_i^T`` (``d_i = y_i - sum_j w_j y_j``) has the
    nonzero eigenvalues of ``S Kc S`` (``Kc`` the centred Gram, ``S =
    diag(sqrt(w))``); with its top eigenpair ``(lam, u)`` the unit top
    eigenvector of ``Sigma`` is ``v = sum_i sqrt(w_i) u_i d_i / sqrt(lam)``,
    so ``d_i . v = (Kc S u)_i / sqrt(lam)``. All ``q x q`` work.

    Returns
    -------
    lam : float
        In the units of ``U`` (0 when the weighted inputs coincide).
    tau : ndarray of shape (q,)
        ``(d_i . v)^2`` (zeros when ``lam`` is 0).
    """
    Uw = U @ w
    Kc = U - Uw[:, None] - Uw[None, :] + float(w @ Uw)
    Kc = (Kc + Kc.T) / 2
    s = np.sqrt(w)
    vals, vecs = np.linalg.eigh(s[:, None] * Kc * s[None, :])
    lam = float(vals[-1])
    if not lam > 0:
        return 0.0, np.zeros(w.size)
    # (Kc S u) / sqrt(lam) before squaring: Kc may be near 2^800, its square is not.
    proj = Kc @ (s * vecs[:, -1]) / np.sqrt(lam)
    return lam, proj * proj


def caf_weights(K: Gram, f: int) -> tuple[np.ndarray, float, int]:
    """Run the filter; return the weights of the mean kept, its log2 eigenvalue, iterations.

    Each iteration works on the inputs of positive weight, in units of their
    largest scale, so one input at 1e300 is down-weighted exactly as the
    definition says (the others' squared projections relative to its are
    kept) and the next iteration, without it, is at the others' scale.
    """
    p = K.p
    c = K.usable.astype(np.float64)
    best_w, best_log, it = None, np.inf, 0
    while True:
        it += 1
        A = np.flatnonzero(c > 0)
        E = int(K.exponents[A].max())
        U = K.unit(E)[np.ix_(A, A)]
        w = c[A] / c[A].sum()
        lam, tau = centered_top_eig(U, w)
        # Eigenvalues of different iterations are compared in one unit: log2.
        log_lam = float(np.log2(lam)) + 2 * E if lam > 0 else -np.inf
        if best_w is None or log_lam < best_log:
            best_w, best_log = np.zeros(p), log_lam
            best_w[A] = w
        tmax = float(tau.max())
        if not tmax > 0:
            break  # the weighted inputs coincide: nothing to filter
        c[A] = c[A] * (1.0 - tau / tmax)
        # The input of largest projection has weight 0 now: at most p iterations.
        c[A[np.argmax(tau)]] = 0.0
        if c.sum() <= p - 2 * f:
            break
    return best_w, best_log, it


class CAF(Rule):
    """Covariance-bound agnostic filter: the weighted mean of least top covariance eigenvalue.

    Parameters
    ----------
    f : int
        Byzantine inputs tolerated; needs ``p >= 2f + 1``.

    Notes
    -----
    Allouah, Guerraoui and Stephan, "Towards trustworthy federated learning
    with untrusted participants", ICML 2025. Weights ``c_i = 1``; while
    ``sum c > p - 2f`` (and at least once): the weighted mean ``mu``, the
    top eigenpair ``(lam, v)`` of the weighted covariance ``sum c_i (g_i -
    mu)(g_i - mu)^T / sum c``, ``tau_i = ((g_i - mu) . v)^2`` and ``c_i <-
    c_i (1 - tau_i / max tau)`` (the maximum over inputs of positive
    weight). The output is the ``mu`` of the smallest ``lam`` met (the first
    on ties). No bound on the honest inputs' covariance is needed.

    Gram space: the covariance's eigenpair comes from the ``p x p``
    centred Gram (see :func:`centered_top_eig`), exactly, where ByzFL's
    ``CAF`` takes one power-method step from a random vector (byzpy three).
    ``max tau`` is over the inputs of positive weight, so each iteration
    zeroes one; ByzFL and byzpy take it over all inputs, those at weight 0
    included, which keeps the largest ``tau`` on an input already removed
    and can make their loop run for thousands of iterations. At most ``p``
    iterations (each zeroes a weight) of ``O(p^3)``: ``O(p^4)`` after one
    Gram pass, then one combination pass.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [40.0, -30.0]])
    >>> res = flagagg.aggregate(G, rule="caf", f=1, backend="numpy", return_result=True)
    >>> res.aggregate.round(3), res.coefficients.round(3)
    (array([0.503, 0.498]), array([0.25 , 0.252, 0.248, 0.25 , 0.   ]))
    """

    name = "caf"
    contract = Contract(
        params={"f": F_REQUIRED},
        nan_policy="an input holding NaN or Inf starts with weight 0 (result.excluded)",
        cost="one pass for the Gram matrix (O(p² n)), at most p filter iterations of O(p³) "
        "(a p x p eigenproblem each), one combination pass",
        reference=Reference(("Allouah", "Guerraoui", "Stephan"),
                            "Towards trustworthy federated learning with untrusted "
                            "participants", "ICML", 2025),
        space="gram",
        translation_invariant=True,
    )

    def __init__(self, f: int) -> None:
        self._store(f=f)

    def _solve_gram(self, K: Gram) -> Solution:
        self.usable(K)
        w, log_lam, it = caf_weights(K, self.f)
        with np.errstate(over="ignore"):
            lam = float(np.exp2(log_lam))
        return Solution(coefficients=w, excluded=K.excluded, n_iter=it,
                        details={"eigenvalue": lam})
