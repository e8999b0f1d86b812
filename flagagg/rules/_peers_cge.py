"""Comparative gradient elimination (CGE): drop the ``f`` largest inputs, average the rest."""

from __future__ import annotations

import numpy as np

from .._gram import Gram
from ._base import Rule
from ._contract import F_REQUIRED, Contract, Reference, Solution

__all__ = ["CGE", "cge_kept"]


def cge_kept(norms: np.ndarray, usable: np.ndarray, f: int) -> np.ndarray:
    """Indices (ascending) of the ``p - f`` inputs of smallest norm.

    Parameters
    ----------
    norms : ndarray of shape (p,)
        The inputs' norms (anything for unusable inputs).
    usable : ndarray of bool, shape (p,)
        Whether each input holds only finite values; the others rank as
        ``+inf``, so they are dropped first.
    f : int
        Inputs dropped.

    Returns
    -------
    kept : ndarray of int
        Ties in norm keep the lower index (a stable sort).
    """
    key = np.where(usable, norms, np.inf)
    order = np.argsort(key, kind="stable")
    return np.sort(order[: norms.size - f])


class CGE(Rule):
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
    and the others averaged (the paper sums them; the mean has the same
    direction, on the scale of one input like every other rule here). Ties
    in norm keep the lower index. The norms are the Gram diagonal, so the
    rule costs one Gram pass and one combination pass, and is exact for
    inputs of any magnitude. It compares norms, not distances: it is not
    translation invariant, and its guarantee assumes honest inputs of
    comparable norm (a faulty input of small norm is kept).

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [30.0, 40.0]])
    >>> flagagg.aggregate(G, rule="cge", f=1, backend="numpy")
    array([0., 1.])
    """

    name = "cge"
    contract = Contract(
        params={"f": F_REQUIRED},
        nan_policy="an input holding NaN or Inf has norm +inf, so it is among the f dropped "
        "(result.excluded); more than f such inputs is a ValueError",
        cost="one pass for the Gram matrix (O(p² n)), an O(p log p) sort of the norms, one "
        "combination pass",
        reference=Reference(("Gupta", "Liu", "Vaidya"),
                            "Byzantine fault-tolerant distributed machine learning with "
                            "norm-based comparative gradient elimination", "DSN Workshops", 2021),
        space="gram",
        translation_invariant=False,
    )

    def __init__(self, f: int) -> None:
        self._store(f=f)

    def _solve_gram(self, K: Gram) -> Solution:
        p, f = K.p, self.f
        self.usable(K)
        if len(K.excluded) > f:
            raise ValueError(
                f"{self.name}: more than f={f} inputs hold NaN or Inf ({len(K.excluded)} of "
                f"p={p}); the p - f inputs of smallest norm would include one"
            )
        norms = K.inputs.row_norms()
        kept = cge_kept(norms, K.usable, f)
        coef = np.zeros(p)
        coef[kept] = 1.0 / kept.size
        return Solution(coefficients=coef, selected=tuple(int(i) for i in kept), scores=norms,
                        excluded=K.excluded)
