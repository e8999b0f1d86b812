"""Smallest maximum eigenvalue averaging (SMEA): an exhaustive search over subsets."""

from __future__ import annotations

import numpy as np

from .._gram import Gram
from .._validation import Int
from ._base import Rule
from ._contract import F_REQUIRED, Contract, Reference, Solution
from ._subsets import check_subset_budget, combination_batches, mean_of_kept, refuse_no_subset

__all__ = ["SMEA", "SMEA_MAX_SUBSETS", "smallest_max_eigenvalue_subset"]

# Subsets searched exactly: C(p, f) of them, each an eigenvalue problem of
# size p - f (about 3 s per 100,000 at p = 25, one loaded core). Beyond this the
# rule is refused rather than approximated.
SMEA_MAX_SUBSETS = 200_000
# Subsets per vectorised batch.
_BATCH = 2048


def smallest_max_eigenvalue_subset(U: np.ndarray, ok: np.ndarray,
                                   f: int) -> tuple[np.ndarray, float, int]:
    """The ``p - f`` inputs whose covariance has the smallest top eigenvalue.

    Parameters
    ----------
    U : ndarray of shape (p, p)
        Gram matrix of the inputs (any unit; translation does not matter).
    ok : ndarray of bool, shape (p,)
        Inputs that may be kept; a subset with another one is never chosen.
    f : int
        Inputs left out.

    Returns
    -------
    kept : ndarray of int
        Ascending; the lexicographically first subset on ties.
    lam : float
        Top eigenvalue of the kept inputs' covariance (normalised by
        ``p - f``), in the units of ``U``; ``inf`` when no subset qualifies.
    n_subsets : int
        ``C(p, f)``.

    Notes
    -----
    The covariance of a subset ``S`` of ``m`` inputs has the nonzero
    eigenvalues of its centred Gram ``H U_SS H / m`` (``H = I - 11^T / m``),
    an ``m x m`` matrix: no pass over the data per subset.
    """
    p = U.shape[0]
    m = p - f
    best, best_lam = None, np.inf
    n_subsets = 0
    with np.errstate(invalid="ignore", over="ignore"):
        for S in combination_batches(p, m, _BATCH):
            n_subsets += S.shape[0]
            Ks = U[S[:, :, None], S[:, None, :]]
            r = Ks.mean(axis=2, keepdims=True)
            Kc = Ks - r - np.swapaxes(r, 1, 2) + r.mean(axis=1, keepdims=True)
            good = ok[S].all(axis=1) & np.isfinite(Kc).all(axis=(1, 2))
            lam = np.full(S.shape[0], np.inf)
            if good.any():
                lam[good] = np.linalg.eigvalsh(Kc[good])[:, -1] / m
            j = int(np.argmin(lam))
            if lam[j] < best_lam:
                best, best_lam = S[j], float(lam[j])
    return (np.arange(m) if best is None else best), best_lam, n_subsets


class SMEA(Rule):
    """Smallest maximum eigenvalue averaging: the ``p - f`` inputs of tightest covariance.

    Parameters
    ----------
    f : int
        Byzantine inputs tolerated; needs ``p >= 2f + 1``.
    max_subsets : int, default=SMEA_MAX_SUBSETS (200_000)
        Largest ``C(p, f)`` searched. The search is exact and exhaustive,
        ``C(p, f)`` eigenvalue problems of size ``p - f``; beyond this limit
        the rule raises a ValueError instead of approximating.

    Notes
    -----
    Allouah, Guerraoui, Gupta, Pinot and Stephan, "On the
    privacy-robustness-utility trilemma in distributed learning", ICML 2023.
    Of all subsets ``S`` of ``p - f`` inputs, the one whose empirical
    covariance ``(1/|S|) sum_{i in S} (g_i - mu_S)(g_i - mu_S)^T`` has the
    smallest largest eigenvalue is averaged; the lexicographically first
    subset on ties.

    Cost: one Gram pass, then ``C(p, f)`` symmetric eigenvalue problems of
    size ``p - f`` on ``p x p`` data (the covariance's eigenvalues are those
    of the subset's centred Gram; ``C(20, 4) = 4845`` subsets take well under
    a second), then one combination pass. Exact eigenvalues: ByzFL's ``SMEA``
    estimates each one by a single power-method step from a random vector.

    An input so far from the others that its Gram entries overflow float64
    in their unit (the median input's scale) is in no chosen subset either,
    like one holding NaN or Inf.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[0.0], [1.0], [2.0], [3.0], [40.0]])
    >>> flagagg.aggregate(G, rule="smea", f=1, backend="numpy")
    array([1.5])
    """

    name = "smea"
    contract = Contract(
        params={"f": F_REQUIRED, "max_subsets": Int(low=1)},
        nan_policy="an input holding NaN or Inf is in no chosen subset (result.excluded); "
        "more than f such inputs is a ValueError",
        cost="one pass for the Gram matrix (O(p² n)), C(p, f) eigenvalue problems of size "
        "p - f (O(C(p, f) (p - f)³), refused beyond max_subsets), one combination pass",
        reference=Reference(("Allouah", "Guerraoui", "Gupta", "Pinot", "Stephan"),
                            "On the privacy-robustness-utility trilemma in distributed "
                            "learning", "ICML", 2023),
        space="gram",
        translation_invariant=True,
    )

    def __init__(self, f: int, max_subsets: int = SMEA_MAX_SUBSETS) -> None:
        self._store(f=f, max_subsets=max_subsets)

    def _solve_gram(self, K: Gram) -> Solution:
        p, f = K.p, self.f
        check_subset_budget(self.name, p, f, self.max_subsets,
                            f"each subset is an eigenvalue problem of size p - f = {p - f}")
        self.usable(K)
        # In the unit of the median input: honest distances in range; an input whose
        # entries overflow in that unit is beyond any honest subset's covariance.
        E = K.distance_exponent()
        U = K.unit(E)
        ok = K.usable & np.isfinite(np.diag(U))
        kept, lam, n_subsets = smallest_max_eigenvalue_subset(U, ok, f)
        if not np.isfinite(lam):
            refuse_no_subset(self.name, f, p, int((~ok).sum()),
                             "hold NaN or Inf or are beyond float64")
        with np.errstate(over="ignore"):
            lam_out = float(np.ldexp(lam, 2 * E))
        return Solution(coefficients=mean_of_kept(kept, p), selected=tuple(int(i) for i in kept),
                        excluded=K.excluded,
                        details={"eigenvalue": lam_out, "n_subsets": n_subsets})
