"""Medoid: the input minimising the sum of its distances to the others."""

from __future__ import annotations

import numpy as np

from ._base import GramRule, check_f, distances, finite_rows, nothing_left, row_norms, validate_f

__all__ = ["Medoid", "medoid_index", "top_exponent"]


def top_exponent(K: np.ndarray, finite: np.ndarray) -> int:
    """``E`` with every finite input below ``2^E`` in norm (0 when none is, or it overflows).

    In units of ``2^E`` no distance between finite inputs exceeds 2, so sums
    of ``p`` of them cannot overflow; small ones lose only what float64 loses
    when it adds them to the large ones.
    """
    n = row_norms(K)[finite]
    top = float(n.max()) if n.size else 0.0
    return int(np.frexp(top)[1]) if np.isfinite(top) and top > 0 else 0


def medoid_index(K: np.ndarray, finite: np.ndarray) -> tuple[int, np.ndarray]:
    """The finite input of least total distance to the other finite inputs.

    Returns the index (the lowest on ties) and every input's total distance
    in units of ``2^E`` (:func:`top_exponent`; ``+inf`` for non-finite inputs).
    """
    E = top_exponent(K, finite)
    D = distances(K, finite, E)
    sums = np.where(finite[None, :], D, 0.0).sum(axis=1)
    sums = np.where(finite, sums, np.inf)
    return int(np.argmin(sums)), sums


class Medoid(GramRule):
    """Medoid: the input whose summed distance to the other inputs is smallest.

    Parameters
    ----------
    f : int, optional
        Not used to compute the medoid; when given, ``p >= 2f + 1`` is
        checked (the medoid's breakdown point is 1/2) and passed on to
        pre-aggregation steps.

    Notes
    -----
    The medoid of a set, a robust location estimator studied for
    Byzantine-robust aggregation by El Mhamdi, Guerraoui and Rouault
    ("Fast and robust distributed learning in high dimension", SRDS 2020)
    and shipped by the ``krum`` package. Returns ``g_m`` with
    ``m = argmin_i sum_j ||g_i - g_j||`` (distances, not squared: a far
    input adds its distance, not its square); the lowest index on ties.
    Distances come from the Gram matrix: one Gram pass, ``p x p`` work, one
    combination pass reading one row.

    NaN policy: inputs holding NaN or Inf are never chosen and left out of
    the others' sums (``result.excluded``); all of them non-finite is a
    ValueError.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[0.0], [1.0], [3.0], [100.0]])
    >>> flagagg.aggregate(G, rule="medoid", backend="numpy")
    array([1.])
    """

    name = "medoid"
    p_bound = (2, 1)
    translation_invariant = True

    def __init__(self, f: int | None = None) -> None:
        self.f = validate_f(self.name, f, required=False)

    def _coefficients(self, K: np.ndarray) -> tuple[np.ndarray, dict]:
        p = K.shape[0]
        if self.f is not None:
            check_f(self.name, self.f, p, 2 * self.f + 1, "p >= 2f + 1")
        finite, excluded = finite_rows(K)
        if not finite.any():
            raise nothing_left(self.name, p, excluded)
        m, sums = medoid_index(K, finite)
        coef = np.zeros(p)
        coef[m] = 1.0
        return coef, {"selected": (m,), "scores": sums, "excluded": excluded}
