"""Comparative gradient elimination (CGE): drop the ``f`` largest inputs, average the rest."""

from __future__ import annotations

import numpy as np

from ._base import GramRule, check_f, finite_rows, nothing_left, row_norms, validate_f

__all__ = ["CGE", "cge_kept"]


def cge_kept(norms: np.ndarray, finite: np.ndarray, f: int) -> np.ndarray:
    """Indices (ascending) of the ``p - f`` inputs of smallest norm.

    Parameters
    ----------
    norms : ndarray of shape (p,)
        The inputs' norms (anything for non-finite inputs).
    finite : ndarray of bool, shape (p,)
        Whether each input holds only finite values; the others rank as
        ``+inf``, so they are dropped first.
    f : int
        Inputs dropped.

    Returns
    -------
    kept : ndarray of int
        Ties in norm keep the lower index (a stable sort).
    """
    key = np.where(finite, norms, np.inf)
    order = np.argsort(key, kind="stable")
    return np.sort(order[: norms.size - f])


class CGE(GramRule):
    """Comparative gradient elimination: the mean of the ``p - f`` inputs of smallest norm.

    Parameters
    ----------
    f : int
        Byzantine inputs tolerated; needs ``p >= 2f + 1``.

    Notes
    -----
    Gupta, Liu and Vaidya, "Byzantine fault-tolerant distributed machine
    learning with norm-based comparative gradient elimination", DSN
    Workshops 2021. The inputs are sorted by norm, the ``f`` largest dropped
    and the others averaged (the paper sums them; the mean is the same
    direction, on the scale of one input, as every other rule here). Ties in
    norm keep the lower index. The norms are the Gram diagonal, so the rule
    costs one Gram pass and one combination pass, and is exact for inputs of
    any magnitude. It compares norms, not distances: it is not translation
    invariant, and its guarantee assumes honest inputs of comparable norm.

    NaN policy: an input holding NaN or Inf has norm ``+inf``, so it is
    among the ``f`` dropped; more than ``f`` such inputs is a ValueError.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [30.0, 40.0]])
    >>> flagagg.aggregate(G, rule="cge", f=1, backend="numpy")
    array([0., 1.])
    """

    name = "cge"
    p_bound = (2, 1)

    def __init__(self, f: int) -> None:
        self.f = validate_f(self.name, f)

    def _coefficients(self, K: np.ndarray) -> tuple[np.ndarray, dict]:
        p, f = K.shape[0], self.f
        check_f(self.name, f, p, 2 * f + 1, "p >= 2f + 1")
        finite, excluded = finite_rows(K)
        if not finite.any():
            raise nothing_left(self.name, p, excluded)
        if len(excluded) > f:
            raise ValueError(
                f"{self.name}: more than f={f} inputs hold NaN or Inf ({len(excluded)} of "
                f"p={p}); the p - f inputs of smallest norm would include one"
            )
        norms = row_norms(K)
        kept = cge_kept(norms, finite, f)
        coef = np.zeros(p)
        coef[kept] = 1.0 / kept.size
        return coef, {"selected": tuple(int(i) for i in kept), "scores": norms,
                      "excluded": excluded}
