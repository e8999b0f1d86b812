"""The Krum family: Krum, Multi-Krum and Bulyan.

All three score inputs by squared distances read off the Gram matrix, so the
selection costs ``p x p`` work after one pass over the data. Krum and
Multi-Krum then take one combination pass (only the selected rows are
read); Bulyan finishes with a coordinate-wise pass over its selected rows.

NaN policy, shared by these rules: an input whose Gram diagonal is not
finite (a NaN or Inf anywhere in it) is at distance ``+inf`` from every
other input and is never selected; it is reported in ``result.excluded``.
With at most ``f`` such inputs the scores of the others stay finite.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .._array import Stack
from .._gram import Gram
from .._validation import Int
from ..backends import Backend
from ._base import Rule
from ._contract import F_REQUIRED, Bound, Contract, Outcome, Reference, Solution

__all__ = ["Bulyan", "Krum", "MultiKrum", "krum_distances", "krum_scores"]


def krum_scores(D2: np.ndarray, n_neighbours: int) -> np.ndarray:
    """Krum scores: per input, the sum of its ``n_neighbours`` smallest squared distances to others.

    Parameters
    ----------
    D2 : ndarray of shape (q, q)
        Squared distances (``+inf`` for excluded inputs), zero diagonal.
    n_neighbours : int
        Neighbours summed; 0 gives zero scores.

    Returns
    -------
    scores : ndarray of shape (q,)
    """
    q = D2.shape[0]
    if n_neighbours <= 0:
        return np.zeros(q)
    M = D2.copy()
    np.fill_diagonal(M, np.inf)  # an input is not its own neighbour
    # A score that overflows is +inf: such an input is farther from its neighbours
    # than any input with a finite score, and is never picked before one.
    with np.errstate(over="ignore"):
        return np.sort(M, axis=1)[:, :n_neighbours].sum(axis=1)


def _lowest(scores: np.ndarray, candidates: np.ndarray) -> int:
    """Index (into ``scores``) of the lowest score among ``candidates``; lowest index on ties."""
    idx = np.flatnonzero(candidates)
    return int(idx[np.argmin(scores[idx])])


KRUM = Reference(("Blanchard", "El Mhamdi", "Guerraoui", "Stainer"),
                 "Machine learning with adversaries: Byzantine tolerant gradient descent",
                 "NeurIPS", 2017)
NAN_POLICY = ("an input holding NaN or Inf is at distance +inf from every other input and is "
              "never selected; it is reported in result.excluded. With at most f such inputs "
              "the scores of the others stay finite")


def krum_distances(K: Gram) -> np.ndarray:
    """Squared distances for Krum scores, in units of ``2^K.distance_exponent()``."""
    return K.sq_distances(K.distance_exponent())


def _absolute(scores: np.ndarray, K: Gram) -> np.ndarray:
    """Scores in the inputs' own units (from those of :func:`krum_distances`)."""
    with np.errstate(over="ignore"):
        return np.ldexp(scores, 2 * K.distance_exponent())


class Krum(Rule):
    """Krum: the input closest to its ``p - f - 2`` nearest neighbours.

    Parameters
    ----------
    f : int
        Byzantine inputs tolerated; needs ``p >= 2f + 3``.

    Notes
    -----
    Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine learning with
    adversaries: Byzantine tolerant gradient descent", NeurIPS 2017. The
    score of input ``i`` is ``sum_{j in N_i} ||g_i - g_j||^2`` over the
    ``p - f - 2`` inputs ``j != i`` closest to it; Krum returns the input of
    lowest score (the lowest index on ties). Squared distances come from the
    Gram matrix, ``K_ii + K_jj - 2 K_ij``, accumulated in float64.

    Some published code counts ``p - f - 1`` neighbours or sums un-squared
    distances; this follows the paper.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1],
    ...               [0.05, 0.05], [9.0, 9.0]])
    >>> res = flagagg.aggregate(G, rule="krum", f=1, backend="numpy", return_result=True)
    >>> res.aggregate, res.selected
    (array([0.05, 0.05]), (4,))
    """

    name = "krum"
    contract = Contract(
        params={"f": F_REQUIRED},
        bound=Bound(2, 3),
        nan_policy=NAN_POLICY,
        cost="one pass for the Gram matrix (O(p² n)), O(p² log p) scoring, one combination "
        "pass reading the selected row",
        reference=KRUM,
        space="gram",
        translation_invariant=True,
    )

    def __init__(self, f: int) -> None:
        self._store(f=f)

    def _solve_gram(self, K: Gram) -> Solution:
        p = K.p
        self.usable(K)
        scores = krum_scores(krum_distances(K), p - self.f - 2)
        i = _lowest(scores, K.usable)
        coef = np.zeros(p)
        coef[i] = 1.0
        return Solution(coefficients=coef, selected=(i,), scores=_absolute(scores, K),
                        excluded=K.excluded)


class MultiKrum(Rule):
    """Multi-Krum: the mean of the ``m`` inputs of lowest Krum score.

    Parameters
    ----------
    f : int
        Byzantine inputs tolerated; needs ``p >= 2f + 3``.
    m : int, optional
        Inputs averaged, ``1 <= m <= p``; ``p - f`` by default. ``m = 1``
        is Krum.

    Notes
    -----
    Blanchard et al. 2017 (see :class:`Krum`): the scores are computed once,
    and the ``m`` lowest (lowest index first on ties) are averaged. Inputs
    holding NaN or Inf are never selected; when fewer than ``m`` finite
    inputs remain, all of them are averaged (``result.details["m"]`` says
    how many).

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [100.0]])
    >>> flagagg.aggregate(G, rule="multi_krum", f=1, backend="numpy")
    array([2.])
    """

    name = "multi_krum"
    # Krum's contract, with m and the cost of averaging m rows.
    contract = replace(Krum.contract, params={"f": F_REQUIRED, "m": Int(low=1, none=True)},
                       cost="one pass for the Gram matrix (O(p² n)), O(p² log p) scoring, one "
                       "combination pass reading the m selected rows")

    def __init__(self, f: int, m: int | None = None) -> None:
        self._store(f=f, m=m)

    def _solve_gram(self, K: Gram) -> Solution:
        p = K.p
        m = p - self.f if self.m is None else self.m
        if m > p:
            raise ValueError(f"need m <= p for {self.name}: got m={m}, p={p}")
        idx = self.usable(K)
        scores = krum_scores(krum_distances(K), p - self.f - 2)
        chosen = idx[np.argsort(scores[idx], kind="stable")][:m]
        coef = np.zeros(p)
        coef[chosen] = 1.0 / chosen.size
        return Solution(coefficients=coef, selected=tuple(int(i) for i in chosen),
                        scores=_absolute(scores, K), excluded=K.excluded,
                        details={"m": int(chosen.size)})


# From this many inputs on, Bulyan's selection tracks the neighbours incrementally
# instead of rescoring every round: below it the round-by-round loop's few
# numpy calls per round are cheaper (measured crossover ~150-250 inputs).
BULYAN_INCREMENTAL_MIN = 192


def bulyan_select(D2: np.ndarray, finite: np.ndarray, f: int,
                  theta: int) -> tuple[list[int], np.ndarray]:
    """Recursive Krum: pick ``theta`` inputs one at a time, each Krum's choice among those left.

    Returns the picks in order and the Krum scores of the first round.
    Round by round for few inputs; from :data:`BULYAN_INCREMENTAL_MIN` on,
    :func:`_bulyan_select_incremental` (the same picks in ``O(p^2 log p)``).
    """
    if D2.shape[0] >= BULYAN_INCREMENTAL_MIN:
        return _bulyan_select_incremental(D2, finite, f, theta)
    p = D2.shape[0]
    left = np.ones(p, dtype=bool)
    picks: list[int] = []
    first_scores = None
    for _ in range(theta):
        R = np.flatnonzero(left)
        # Late rounds have fewer than 2f + 3 inputs left; the neighbour
        # count p_R - f - 2 shrinks with them (to 0 at worst: all scores 0).
        scores = krum_scores(D2[np.ix_(R, R)], R.size - f - 2)
        if first_scores is None:
            first_scores = scores
        i = int(R[_lowest(scores, finite[R])])
        picks.append(i)
        left[i] = False
    return picks, first_scores


def _bulyan_select_incremental(D2: np.ndarray, finite: np.ndarray, f: int,
                               theta: int) -> tuple[list[int], np.ndarray]:
    """:func:`bulyan_select` without rescoring every round.

    Round ``t`` scores every input left by its ``p_R - f - 2`` smallest
    distances to the others left. Recomputing them each round costs
    ``O(p^2 log p)`` per round, ``O(p^3 log p)`` in all; instead each row is
    sorted once and the included neighbours tracked as inputs leave (one
    boundary per row, moving only backwards), which makes the selection
    ``O(p^2 log p)`` in all with ``O(p^2)`` memory. Those running sums only
    shortlist: the inputs within their round-off of the lowest are rescored
    exactly as :func:`krum_scores` does, so the picks (ties to the lowest
    index) are exactly those of the round-by-round definition.
    """
    p = D2.shape[0]
    M = np.array(D2, dtype=np.float64)
    np.fill_diagonal(M, np.inf)  # an input is not its own neighbour
    first_scores = krum_scores(D2, p - f - 2)
    order = np.argsort(M, axis=1, kind="stable")
    vals = np.take_along_axis(M, order, axis=1)
    rows = np.arange(p)
    pos = np.empty_like(order)
    pos[rows[:, None], order] = rows[None, :]  # pos[i, j]: where j sits in row i's order
    alive = np.ones((p, p), dtype=bool)  # alive[i, k]: input order[i, k] is still left
    c = p - f - 2
    # Row i's c smallest are positions 0..b[i]; their finite sum and how many are inf.
    b = np.full(p, c - 1 if c > 0 else -1)
    lead = vals[:, :max(c, 0)]
    ninf = np.isinf(lead).sum(axis=1)
    S = np.where(np.isinf(lead), 0.0, lead).sum(axis=1)
    drift = 4.0 * p * np.finfo(float).eps * (float(S.max()) if p else 0.0)
    left = np.ones(p, dtype=bool)
    picks: list[int] = []
    for _ in range(theta):
        R = np.flatnonzero(left)
        c = R.size - f - 2
        approx = np.where(ninf[R] > 0, np.inf, S[R]) if c > 0 else np.zeros(R.size)
        ok = finite[R]
        low = approx[ok].min()
        near = R[ok & (approx <= low + drift)]
        sub = M[np.ix_(near, R)]
        exact = (np.sort(sub, axis=1)[:, :c].sum(axis=1) if c > 0 else np.zeros(near.size))
        i = int(near[np.argmin(exact)])  # near is ascending: lowest index on ties
        picks.append(i)
        left[i] = False
        # Input i leaves every row's order; each row's count drops by one.
        rest = np.flatnonzero(left)
        P = pos[rest, i]
        alive[rest, P] = False
        have = b[rest] >= 0
        inside = have & (P <= b[rest])
        out_at = np.where(inside, P, b[rest])  # the included entry that goes
        v = vals[rest, np.maximum(out_at, 0)]
        inf_gone = have & np.isinf(v)
        ninf[rest[inf_gone]] -= 1
        fin_gone = have & ~np.isinf(v)
        S[rest[fin_gone]] -= v[fin_gone]
        move = rest[have & (P >= b[rest])]
        # The boundary moves back to the previous input still left.
        b[move] -= 1
        while move.size:
            stuck = (b[move] >= 0) & ~alive[move, np.maximum(b[move], 0)]
            move = move[stuck]
            b[move] -= 1
    return picks, first_scores


class Bulyan(Rule):
    """Bulyan: recursive Krum selection, then a coordinate-wise trimmed average.

    Parameters
    ----------
    f : int
        Byzantine inputs tolerated; needs ``p >= 4f + 3``.

    Notes
    -----
    El Mhamdi, Guerraoui and Rouault, "The hidden vulnerability of
    distributed learning in Byzantium", ICML 2018. With ``theta = p - 2f``
    and ``beta = theta - 2f``:

    1. select ``theta`` inputs by applying Krum recursively: each round
       adds Krum's choice among the inputs not yet selected (with that
       round's count ``p_R - f - 2`` of neighbours) and removes it;
    2. per coordinate, average the ``beta`` selected values closest to
       their median (ties to the smaller value).

    Some published code selects the ``theta`` lowest scores of a single
    Krum round instead; this follows the paper. Inputs holding NaN or Inf
    are never selected (``result.excluded``); Bulyan needs ``theta`` finite
    inputs.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [-50.0]])
    >>> res = flagagg.aggregate(G, rule="bulyan", f=1, backend="numpy", return_result=True)
    >>> res.aggregate, res.details["theta"], res.details["beta"]
    (array([2.5]), 6, 4)
    """

    name = "bulyan"
    contract = Contract(
        params={"f": F_REQUIRED},
        bound=Bound(4, 3),
        nan_policy=NAN_POLICY + "; Bulyan needs p - 2f finite inputs",
        cost="one pass for the Gram matrix (O(p² n)), recursive Krum selection (O(p³ log p), "
        "O(p² log p) from 192 inputs), one coordinate-wise pass over the selected rows",
        reference=Reference(("El Mhamdi", "Guerraoui", "Rouault"),
                            "The hidden vulnerability of distributed learning in Byzantium",
                            "ICML", 2018),
        space="vector",
    )

    def __init__(self, f: int) -> None:
        self._store(f=f)

    def _solve_stack(self, stack: Stack, backend: Backend) -> Outcome:
        p, f = stack.p, self.f
        K = stack.gram(backend, shift=True)
        theta = p - 2 * f
        beta = theta - 2 * f
        self.usable(K, need=theta)
        picks, scores = bulyan_select(krum_distances(K), K.usable, f, theta)
        out = stack.coordinate_stat(backend, np.sort(picks), "median", 0, beta)
        return Outcome(out, Solution(selected=tuple(picks), excluded=K.excluded,
                                     scores=_absolute(scores, K),
                                     details={"theta": theta, "beta": beta}))
