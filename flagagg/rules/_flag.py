"""The Flag Aggregator, solved in the ``p x p`` Gram space.

Notation follows the specification: ``g_i`` the inputs, ``h_i = g_i/||g_i||``,
``Y`` an ``n x r`` orthonormal basis, ``v_i = ||Y^T h_i||^2`` the
reconstruction ratios.

How the Gram formulation works. With ``Kn = D^-1 K D^-1 = V S V^T`` (the Gram
of the ``h_i``, truncated to its numerical rank ``k``), the columns of
``Q = H^T V S^{-1/2}`` are an orthonormal basis of the span of the inputs and
``h_i = Q t_i`` with ``T = V S^{1/2}`` (``q x k``). Every vector of the
objective (``h_i`` and the differences ``d_ij``) lies in that span, so the
subspace is ``Y = Q U`` for a ``k x r`` orthonormal ``U`` and the whole IRLS
runs on the ``k``-dimensional points ``t_i``: ``||Y^T h_i|| = ||U^T t_i||``.
The aggregate ``(1/r) Y Y^T sum_i h_i`` is ``Q z`` for a ``k``-vector ``z``,
that is ``sum_i c_i g_i`` with ``c = D^-1 V S^{-1/2} z``. The inputs are read
twice (Gram, then the combination), whatever ``max_iter`` and ``lam``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .._gram import Gram, as_gram
from .._linalg import top_eigh
from .._validation import Anything, Choice, Int, Real
from ._base import NothingLeftError, Rule
from ._contract import F_OPTIONAL, Contract, Reference, Solution, result_fields
from ._result import AggregationResult, Column

__all__ = ["FlagAggregator", "FlagResult", "FlagSolution", "flag_aggregate", "solve_gram"]

VARIANTS = ("paper", "reference")
# "auto": "median_norm" for variant "paper" (drop-in for a mean), None for
# "reference" (the published output, norm at most p / r).
# "none" is None spelled for TOML configs, which have no null.
RESCALE = ("auto", None, "none", "median_norm")
# Eigenvalues of Kn below this fraction of the largest are round-off: the
# Gram is accumulated in float64, so its entries carry errors of ~1e-13.
RANK_RTOL = 1e-10
# Pairs with ||h_i - h_j||^2 below this have no defined direction d_ij.
PAIR_ATOL = 1e-12
# Pairs with ||t_i - t_j||^2 below this fraction of ||t_i||^2 + ||t_j||^2
# have their difference formed explicitly: the Gram form would have lost
# more than 3 of its 16 digits on them.
CLOSE_PAIR = 1e-3
# Elements per chunk of explicit pair differences (8 MB of float64).
CHUNK_ELEMENTS = 2 ** 20


@dataclass(frozen=True, kw_only=True)
class FlagResult(AggregationResult):
    """Outcome and diagnostics of one Flag Aggregator solve.

    Everything of :class:`AggregationResult` (``coefficients``,
    ``influence``, ``cosine``, ``verdict``, ``summary()``), plus the
    solver's own diagnostics below. Every one is that of the "paper"
    objective at the returned subspace, also for variant "reference", so
    that the two can be compared.

    Attributes
    ----------
    rank : int
        Subspace rank used.
    r_requested : int
        Rank asked for (``ceil(p / 2)`` by default). ``rank`` is smaller when
        the inputs span fewer dimensions (see ``rank_clamped``).
    rank_clamped : bool
        Whether ``r_requested`` exceeded the numerical rank of the inputs.
    basis_coefficients : ndarray of shape (p, rank)
        The recovered subspace as combinations of the inputs: its orthonormal
        basis is ``Y = G^T basis_coefficients`` (zero rows for excluded
        inputs).
    reconstruction_ratios : ndarray of shape (p,)
        ``v_i = ||Y^T h_i||^2`` in [0, 1]: how much of input ``i``'s direction
        lies in the subspace (not its sign: a reversed input has ratio 1);
        0 for excluded inputs.
    weights : ndarray of shape (p,)
        IRLS weights ``(1 - v_i + eps)^(-1/2)`` at the returned subspace: how
        strongly input ``i`` would pull the next subspace, not its trust;
        0 for excluded inputs.
    stationarity : float
        Relative Riemannian gradient norm ``||(I - Y Y^T) B Y||_F / ||B Y||_F``
        with ``B`` built from the weights at ``Y``; 0 at a fixed point.
    eigengap : float
        ``lambda_r - lambda_{r+1}`` of that ``B`` (eigenvalues outside the
        span of the inputs are 0). A small gap means the subspace is poorly
        determined.
    eigenvalues : ndarray
        Eigenvalues of that ``B`` on the span of the inputs, descending.
    variant : str
        ``"paper"`` or ``"reference"``.
    lam : float
        Weight of the pairwise term.
    rescale : str or None
        Output rescaling applied (``"auto"`` resolved).
    max_iter : int
        Most IRLS steps allowed. ``converged`` is False when the default
        two steps stop before ``tol``; that is by design (see
        :func:`flag_aggregate`), not a failure.
    """

    rank: int = 0
    r_requested: int = 0
    rank_clamped: bool = False
    basis_coefficients: np.ndarray | None = None
    reconstruction_ratios: np.ndarray | None = None
    weights: np.ndarray | None = None
    stationarity: float = float("nan")
    eigengap: float = float("nan")
    eigenvalues: np.ndarray | None = None
    variant: str = "paper"
    lam: float = 0.0
    rescale: str | None = None
    max_iter: int = 0

    def _header(self) -> list[str]:
        clamp = f" (asked {self.r_requested}, clamped to the inputs' rank)" if (
            self.rank_clamped) else ""
        if self.converged:
            steps = f"converged to tol in {self.n_iter} steps"
        elif self.n_iter >= self.max_iter:
            steps = f"{self.n_iter} IRLS steps (max_iter, the default by design)"
        else:
            steps = f"{self.n_iter} steps"
        scale = "on the inputs' scale (median norm)" if self.rescale == "median_norm" else (
            "normalised (published output)")
        return [
            f"Flag Aggregator ({self.variant}, lam={self.lam:g}, backend={self.backend})",
            f"  rank r = {self.rank}{clamp}; {steps}; output {scale}",
            f"  objective {self.objective_history[0]:.6g} -> {self.objective_history[-1]:.6g}, "
            f"stationarity = {self.stationarity:.2e}, eigengap = {self.eigengap:.4g}",
            "  influence: signed share of ||out||^2; cosine: cos(g_i, out); ratio v_i: share of",
            "  h_i in the subspace (sign-blind); weight w_i: IRLS pull on the next subspace",
        ]

    def _columns(self) -> list[tuple[str, Column, np.ndarray | None]]:
        return [("ratio v_i", Column(9, 4), self.reconstruction_ratios),
                ("weight w_i", Column(10, 4, style="g"), self.weights)]


@dataclass(frozen=True)
class FlagDiagnostics:
    """The diagnostics of the returned subspace (see :class:`FlagResult`), formed on demand."""

    basis_coefficients: np.ndarray
    stationarity: float
    eigengap: float
    eigenvalues: np.ndarray


@dataclass(frozen=True, kw_only=True)
class FlagSolution(Solution):
    """What :func:`solve_gram` returns: a Solution with the Flag Aggregator's own fields.

    Those fields are the ones of :class:`FlagResult`, under the same names.
    """

    rank: int
    r_requested: int
    rank_clamped: bool
    reconstruction_ratios: np.ndarray
    weights: np.ndarray
    variant: str
    lam: float
    rescale: str | None
    max_iter: int
    basis_coefficients: np.ndarray | None = None
    stationarity: float = float("nan")
    eigengap: float = float("nan")
    eigenvalues: np.ndarray | None = None


class _Terms:
    """The vectors of the objective as points in the ``k``-dim span coordinates.

    The pair vectors are never formed: with ``C_ij = w_ij / ||t_i - t_j||^2``
    (symmetric, zero diagonal),
    ``sum_{i<j} w_ij d_ij d_ij^T = T^T (diag(C 1) - C) T``, and the pairs'
    projections ``||U^T (t_i - t_j)||^2`` come from the ``q x q`` Gram of
    ``T U``. That is ``O(q^2)`` memory and BLAS work. The Gram form loses
    digits for pairs whose difference is tiny against the points themselves
    (near-duplicate inputs); those few pairs get their differences formed
    explicitly, in bounded chunks. Pair weights are ``q x q`` symmetric
    matrices (or one scalar), read only at the pairs of the objective.
    """

    def __init__(self, T: np.ndarray, lam: float, variant: str) -> None:
        q, k = T.shape
        self.T = T
        self.q = q
        self.variant = variant
        n_pairs_total = q * (q - 1) // 2
        # lam / P with P = q(q-1)/2 counts every pair, defined direction or not.
        self.pair_scale = lam / n_pairs_total if n_pairs_total else 0.0
        self.has_pairs = lam > 0 and q > 1
        # Centring changes no difference t_i - t_j and keeps the Laplacian
        # products free of a common part the differences would cancel.
        self.Tc = T - T.mean(axis=0) if self.has_pairs else T
        if not self.has_pairs or variant == "reference":
            # The published code: every ordered pair, un-normalised, scaled by
            # lam / (q(q-1)); the weight carries the factor 2 of both orders.
            return
        sq = np.einsum("ij,ij->i", T, T)
        tt = sq[:, None] + sq[None, :]
        nd2 = np.maximum(tt - 2.0 * (T @ T.T), 0.0)
        close = np.triu(nd2 < CLOSE_PAIR * tt, 1)
        ci, cj = np.nonzero(close)
        nd2_close = np.concatenate([np.einsum("ij,ij->i", E, E)
                                    for E in self._differences(ci, cj)] or [np.zeros(0)])
        nd2[ci, cj] = nd2[cj, ci] = nd2_close
        ok = nd2 > PAIR_ATOL
        np.fill_diagonal(ok, False)
        self.has_pairs = bool(ok.any())
        self.ok = ok
        keep = ok[ci, cj]
        self.ci, self.cj = ci[keep], cj[keep]
        self.inv_close = 1.0 / nd2_close[keep]
        # 1 / ||t_i - t_j||^2 at the pairs of the Gram form (0 elsewhere).
        far = ok.copy()
        far[ci, cj] = far[cj, ci] = False
        self.inv_far = np.divide(1.0, nd2, out=np.zeros_like(nd2), where=far)

    def _differences(self, ci: np.ndarray, cj: np.ndarray):
        """The rows ``t_i - t_j`` for the pairs ``(ci, cj)``, in chunks of bounded size."""
        step = max(1, CHUNK_ELEMENTS // max(self.T.shape[1], 1))
        for a in range(0, ci.size, step):
            yield self.T[ci[a:a + step]] - self.T[cj[a:a + step]]

    def objective_parts(self, U: np.ndarray, eps: float,
                        P: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Slack ``1 - ||U^T u||^2 + eps`` of every node (``q``) and pair (``q x q``) vector.

        Pair slacks are 1 where there is no pair vector (the diagonal, pairs
        without a defined direction). ``P`` is ``T @ U`` when the caller has
        it for free (``U`` the first axes: a slice of ``T``).
        """
        if P is None:
            P = self.T @ U
        v = np.einsum("ij,ij->i", P, P)
        s_node = np.maximum(1.0 - v, 0.0) + eps
        if not self.has_pairs or self.variant == "reference":
            return s_node, np.ones((0, 0))
        Pc = self.Tc @ U
        vc = np.einsum("ij,ij->i", Pc, Pc)
        pe2 = np.maximum(vc[:, None] + vc[None, :] - 2.0 * (Pc @ Pc.T), 0.0)
        vp = pe2 * self.inv_far
        if self.ci.size:
            pe2_close = np.concatenate([np.einsum("ij,ij->i", EU, EU) for EU in (
                E @ U for E in self._differences(self.ci, self.cj))])
            vp[self.ci, self.cj] = vp[self.cj, self.ci] = pe2_close * self.inv_close
        s_pair = np.where(self.ok, np.maximum(1.0 - vp, 0.0) + eps, 1.0)
        return s_node, s_pair

    def objective(self, s_node: np.ndarray, s_pair: np.ndarray) -> float:
        pairs = 0.0
        if s_pair.size:
            # Both triangles hold every pair: half the masked sum.
            pairs = 0.5 * float(np.sqrt(s_pair, where=self.ok, out=np.zeros_like(s_pair)).sum())
        return float(np.sqrt(s_node).sum() + self.pair_scale * pairs)

    def matrix(self, w_node: np.ndarray, w_pair: np.ndarray | float) -> np.ndarray:
        """``B = sum_i w_i t_i t_i^T + sum_pairs w_ij d_ij d_ij^T`` (``k x k``)."""
        X = self.T * np.sqrt(w_node)[:, None]
        B = X.T @ X  # numpy hands X^T X to syrk: half the products of a GEMM
        if self.has_pairs and self.variant == "reference":
            # sum_{i<j} (t_i - t_j)(t_i - t_j)^T = q Tc^T Tc, one weight for all.
            B += (float(w_pair) * self.q) * (self.Tc.T @ self.Tc)
        elif self.has_pairs:
            C = w_pair * self.inv_far
            B += (self.Tc * C.sum(axis=1)[:, None]).T @ self.Tc - self.Tc.T @ (C @ self.Tc)
            if self.ci.size:
                c = np.broadcast_to(w_pair, (self.q, self.q))[self.ci, self.cj] * self.inv_close
                a = 0
                for E in self._differences(self.ci, self.cj):
                    B += (E * c[a:a + E.shape[0], None]).T @ E
                    a += E.shape[0]
        return (B + B.T) / 2


def solve_gram(
    K: Any,
    r: int | None = None,
    lam: float = 0.0,
    *,
    max_iter: int = 2,
    tol: float = 1e-6,
    eps: float = 1e-7,
    variant: str = "paper",
    rescale: str | None = "auto",
    defer: bool = False,
) -> FlagSolution:
    """Solve the Flag Aggregator given only the Gram matrix of the inputs.

    Parameters are those of :func:`flag_aggregate`; ``K`` is the ``p x p``
    Gram matrix ``G G^T`` (a :class:`~flagagg._gram.Gram`, or a plain float64
    matrix from anywhere, e.g. an all-reduce across ranks).

    Parameters
    ----------
    defer : bool, default=False
        Leave out the diagnostics of the returned subspace (``stationarity``,
        ``eigengap``, ``eigenvalues``: one more full eigendecomposition) and
        its ``basis_coefficients`` (a ``p x k x r`` product), and return a
        function that computes them as ``solution.late``. The aggregation's
        hot path uses it: they are formed only when a result is handed out.

    Returns
    -------
    solution : FlagSolution
        ``solution.coefficients`` give the aggregate on the inputs; its
        other fields are those of :class:`FlagResult`.
    """
    K = as_gram(K)
    p = K.p
    rescale = _resolve_rescale(rescale, variant)
    # Inputs that cannot be normalised: unused ones, and zero rows (norm 0).
    norms_all = K.row_norms()
    zero = K.usable & (norms_all == 0)
    keep = K.usable & ~zero
    excluded = tuple(sorted(K.excluded + tuple((int(i), "zero norm")
                                               for i in np.flatnonzero(zero))))
    if not keep.any():
        raise NothingLeftError("flag", p, excluded)
    idx = np.flatnonzero(keep)
    q = idx.size
    norms = norms_all[idx]
    Kn = np.clip(K.normalized(idx), -1.0, 1.0)
    np.fill_diagonal(Kn, 1.0)

    s, V = np.linalg.eigh(Kn)
    s, V = s[::-1], V[:, ::-1]
    k = int(np.count_nonzero(s > s[0] * RANK_RTOL))
    s, V = s[:k], V[:, :k]
    T = V * np.sqrt(s)  # rows: coordinates of h_i in an orthonormal basis of the span

    r_requested = math.ceil(p / 2) if r is None else r
    rank = min(r_requested, k)
    # The objective and every diagnostic are those of variant "paper", also
    # when the subspace comes from the published code's weighting.
    terms = _Terms(T, lam, "paper")

    if variant == "reference":
        # One step from uniform weights (the published code's random start
        # makes every weight (1 - O(r/n) + eps)^(-1/2), equal in the limit).
        ref = _Terms(T, lam, "reference")
        c = lam / (q * (q - 1)) if q > 1 else 0.0
        P = None
        if ref.has_pairs:
            _, U = top_eigh(ref.matrix(np.ones(q), 2.0 * c * c), rank)
        else:
            U = np.eye(k, rank)  # B = T^T T = S, as in the first "paper" step
            P = T[:, :rank]
        s_node, s_pair = terms.objective_parts(U, eps, P)
        history = [terms.objective(s_node, s_pair)]
        n_iter, converged = 1, False
    else:
        w_node = np.ones(q)
        w_pair = terms.pair_scale
        history = []
        converged = False
        n_iter = 0
        for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported
            P = None
            if n_iter == 1 and not terms.has_pairs:
                # Uniform weights, no pair vectors: B = T^T T = S is diagonal
                # (descending), its top-r eigenvectors the first r axes.
                U_new = np.eye(k, rank)
                P = T[:, :rank]
            else:
                _, U_new = top_eigh(terms.matrix(w_node, w_pair), rank)
            parts = terms.objective_parts(U_new, eps, P)
            value = terms.objective(*parts)
            if history and value > history[-1]:
                # The majorisation step cannot increase F in exact arithmetic: a
                # rise is round-off at the fixed point. Keep the previous subspace.
                n_iter -= 1
                converged = True
                break
            U, (s_node, s_pair) = U_new, parts
            history.append(value)
            w_node = s_node ** -0.5
            w_pair = terms.pair_scale * s_pair ** -0.5
            if n_iter > 1:
                prev, cur = history[-2], history[-1]
                if prev - cur <= tol * abs(prev):
                    converged = True
                    break

    weights_final = s_node ** -0.5
    w_pair_final = terms.pair_scale * s_pair ** -0.5

    def late() -> FlagDiagnostics:
        # B_final is the matrix the next step would use, from the weights at U.
        B_final = terms.matrix(weights_final, w_pair_final)
        eig_final = np.linalg.eigvalsh(B_final)[::-1]
        BU = B_final @ U
        resid = BU - U @ (U.T @ BU)
        nxt = eig_final[rank] if rank < k else 0.0
        basis = np.zeros((p, rank))
        basis[idx] = (V @ (U / np.sqrt(s)[:, None])) / norms[:, None]
        return FlagDiagnostics(
            basis_coefficients=basis,
            stationarity=float(np.linalg.norm(resid)
                               / max(np.linalg.norm(BU), np.finfo(float).tiny)),
            eigengap=float(eig_final[rank - 1] - nxt), eigenvalues=eig_final,
        )

    # Aggregate (1/r) Y Y^T sum_i h_i = Q z, and Q z = H^T (V S^-1/2 z).
    z = U @ (U.T @ T.sum(axis=0)) / rank
    coef_h = V @ (z / np.sqrt(s))
    coef = np.zeros(p)
    coef[idx] = coef_h / norms
    if rescale == "median_norm":
        out_norm = K.combination_norm(coef)
        if out_norm > 0:
            coef *= _median(norms) / out_norm

    ratios = np.zeros(p)
    ratios[idx] = np.clip(1.0 - (s_node - eps), 0.0, 1.0)
    weights = np.zeros(p)
    weights[idx] = weights_final
    solution = FlagSolution(
        coefficients=coef, excluded=excluded, n_iter=n_iter, converged=converged,
        objective_history=np.asarray(history), rank=rank, r_requested=r_requested,
        rank_clamped=rank < r_requested, reconstruction_ratios=ratios, weights=weights,
        variant=variant, lam=float(lam), rescale=rescale, max_iter=max_iter, late=late,
    )
    if defer:
        return solution
    return replace(solution, late=None, **result_fields(late(), leave=()))


def _median(x: np.ndarray) -> float:
    """``np.median`` of a short 1-d array, without np.median's generic (slow) machinery."""
    y = np.sort(x)
    m = y.size
    return float((y[(m - 1) // 2] + y[m // 2]) / 2)


def _resolve_rescale(rescale: str | None, variant: str) -> str | None:
    if rescale == "auto":
        return None if variant == "reference" else "median_norm"
    return None if rescale == "none" else rescale


FLAG_PARAMS = {
    "r": Int(low=1, none=True),
    "lam": Real(low=0.0),
    "f": F_OPTIONAL,
    "max_iter": Int(low=1),
    "tol": Real(low=0.0),
    "eps": Real(low=0.0, strict=True),
    "variant": Choice(VARIANTS),
    "rescale": Choice(RESCALE),
    "backend": Anything("a backend name, or None"),
}


class FlagAggregator(Rule):
    """Flag Aggregator: project normalised inputs onto their robust subspace.

    Parameters are those of :func:`flag_aggregate`. Calling the object
    aggregates; ``return_result=True`` returns the call's
    :class:`FlagResult`, and ``result_`` keeps the diagnostics of the last
    call (without the aggregate). A Gram rule: the coefficients come from
    the ``p x p`` Gram matrix alone.

    Examples
    --------
    >>> import numpy as np
    >>> from flagagg import FlagAggregator
    >>> agg = FlagAggregator(r=2, backend="numpy")
    >>> G = np.random.default_rng(0).normal(size=(5, 100))
    >>> agg(G).shape
    (100,)
    >>> agg.result_.rank
    2
    """

    name = "flag"
    result_type = FlagResult
    contract = Contract(
        params=FLAG_PARAMS,
        nan_policy="inputs holding NaN or Inf, and zero inputs, are excluded and reported, "
        "never propagated",
        cost="Gram matrix O(p² n); each IRLS step O(p k² + k³) with k ≤ p the rank of the "
        "inputs (O(p² k²) when lam > 0); one O(p n) combination. See :ref:`flag-cost`.",
        reference=Reference(("Almasi", "Mishra", "Vamanan", "Ravi"),
                            "Flag Aggregator: scalable distributed training under failures "
                            "and augmented losses using convex optimization", "ICLR", 2024),
        space="gram",
    )

    def __init__(
        self,
        r: int | None = None,
        lam: float = 0.0,
        *,
        f: int | None = None,
        max_iter: int = 2,
        tol: float = 1e-6,
        eps: float = 1e-7,
        variant: str = "paper",
        rescale: str | None = "auto",
        backend: str | None = None,
    ) -> None:
        self._store(r=r, lam=lam, f=f, max_iter=max_iter, tol=tol, eps=eps, variant=variant,
                    rescale=rescale, backend=backend)

    def _solve_gram(self, K: Gram) -> FlagSolution:
        return solve_gram(K, self.r, self.lam, max_iter=self.max_iter, tol=self.tol,
                          eps=self.eps, variant=self.variant, rescale=self.rescale, defer=True)


def flag_aggregate(
    gradients: Any,
    r: int | None = None,
    lam: float = 0.0,
    *,
    max_iter: int = 2,
    tol: float = 1e-6,
    eps: float = 1e-7,
    variant: str = "paper",
    rescale: str | None = "auto",
    f: int | None = None,
    return_result: bool = False,
    backend: str | None = None,
) -> Any:
    r"""Aggregate gradients with the Flag Aggregator.

    Finds the ``r``-dimensional subspace ``Y`` that best explains the
    normalised inputs ``h_i = g_i / ||g_i||`` in the robust (square-root)
    sense, and returns their projection onto it. Inputs far from the
    consensus subspace get small reconstruction ratios and little influence.

    Parameters
    ----------
    gradients : array of shape (p, n), or sequence of p arrays or pytrees
        One gradient per worker: a NumPy, PyTorch, CuPy or array-API array
        whose first axis indexes the workers, or ``p`` arrays of one shape,
        or ``p`` pytrees (lists, tuples, dicts of per-layer arrays).
    r : int, optional
        Subspace rank; ``ceil(p / 2)`` by default. Clamped to the numerical
        rank of the inputs (``result.rank_clamped`` says so).
    lam : float, default=0.0
        Weight of the pairwise regulariser (``>= 0``).
    max_iter : int, default=2
        Most eigen-solves (IRLS steps) for variant ``"paper"``; the first one
        uses uniform weights, so ``max_iter=1`` is PCA of the ``h_i`` and the
        default 2 applies the robust weights once. Iterating to ``tol``
        (e.g. ``max_iter=100``) minimises the objective but fits faulty
        workers that send identical vectors ever better; the robustness
        experiments behind this default are in the documentation
        ("How many steps?").
    tol : float, default=1e-6
        Stop when the relative decrease of the objective falls below this.
    eps : float, default=1e-7
        Smoothing of the square roots (``> 0``); bounds every weight by
        ``eps ** -0.5``.
    variant : {"paper", "reference"}, default="paper"
        ``"paper"``: the objective of the specification, by IRLS.
        ``"reference"``: what the published code computes (see Notes).
    rescale : {"auto", "median_norm", None, "none"}, default="auto"
        ``"median_norm"`` rescales the output to the median norm of the
        (non-excluded) inputs, so that the Flag Aggregator replaces a mean
        without retuning the learning rate; the median keeps a minority of
        huge inputs from setting the scale. ``None`` returns the published
        output, whose norm is at most ``p / r`` whatever the inputs' scale.
        ``"auto"`` is ``"median_norm"`` for variant ``"paper"`` and ``None``
        for variant ``"reference"``. ``"none"`` is ``None`` (TOML configs
        have no null).
    f : int, optional
        Not used by the Flag Aggregator (it needs no bound on the faulty
        inputs); accepted so that every rule takes ``f``, and passed by
        :func:`flagagg.get_rule` to pre-aggregation steps.
    return_result : bool, default=False
        Return a :class:`FlagResult` with the diagnostics instead of the
        aggregate alone.
    backend : str, optional
        Backend for this call (see :func:`flagagg.backend`).

    Returns
    -------
    aggregate : array or pytree, or FlagResult
        In the input's structure, library, device and float dtype.

    Raises
    ------
    ValueError
        No inputs, ragged inputs, every input excluded, ``r < 1``,
        ``lam < 0`` or another invalid parameter.
    TypeError
        Mixed array libraries, or a dtype that is not real floating point,
        integer or bool.

    Notes
    -----
    Variant ``"paper"`` minimises, over ``Y`` with ``Y^T Y = I_r``,

    .. math::

        F(Y) = \sum_i \sqrt{1 - \|Y^T h_i\|^2 + \epsilon}
             + \frac{\lambda}{P} \sum_{i<j} \sqrt{1 - \|Y^T d_{ij}\|^2 + \epsilon},

    with ``d_ij = (h_i - h_j) / ||h_i - h_j||`` and ``P = p(p-1)/2``, by
    iteratively reweighted least squares: each step takes the top-``r``
    eigenvectors of ``B = sum w_i h_i h_i^T + sum w_ij d_ij d_ij^T`` with
    weights ``(1 - ||Y^T u||^2 + eps)^(-1/2)`` (times ``lam / P`` for pairs).
    This majorises ``F``, so ``F`` never increases. The output is
    ``(1 / r) sum_i Y Y^T h_i``.

    Variant ``"reference"`` differs from ``"paper"`` exactly as the published
    code does: (1) one step from uniform weights (their random initial
    subspace makes all weights equal as ``n`` grows; here they are exactly
    equal, so the result is deterministic); (2) pairwise vectors are the
    un-normalised differences ``h_i - h_j`` over ordered pairs with column
    scale ``lam / (p(p-1))``, so ``lam`` enters squared; (3) the output
    formula is the same. Without the pairwise term, ``"reference"`` equals
    ``"paper"`` with ``max_iter=1``.

    Everything happens in ``p x p`` space: one pass over the inputs builds
    the float64 Gram matrix, the iterations cost ``O(p^3)`` each, and one
    pass forms ``sum_i c_i g_i``. Inputs with NaN/Inf or zero norm are
    excluded and reported, never propagated.

    Examples
    --------
    >>> import numpy as np
    >>> import flagagg
    >>> rng = np.random.default_rng(0)
    >>> honest = rng.normal(1.0, 0.1, size=(6, 1000))
    >>> G = np.vstack([honest, -10 * honest[:2]])   # two reversed workers
    >>> res = flagagg.flag_aggregate(G, r=2, return_result=True, backend="numpy")
    >>> res.aggregate.shape, res.aggregate.dtype
    ((1000,), dtype('float64'))
    >>> bool(np.all(np.diff(res.objective_history) <= 1e-9))
    True
    """
    return FlagAggregator(
        r, lam, f=f, max_iter=max_iter, tol=tol, eps=eps, variant=variant, rescale=rescale,
        backend=backend,
    )(gradients, return_result=return_result)
