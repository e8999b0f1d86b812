"""What every aggregation rule shares: input coercion, backend choice, results."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._array import Leaf, Stack, as_stack
from .._backend_choice import select_backend
from .._gram import Gram, usable_rows
from .._validation import check_int
from ..backends import Backend
from ._result import (
    AggregationResult,
    RuleResult,
    deferred_diagnostics,
    with_diagnostics,
    worker_diagnostics,
)

__all__ = [
    "AggregationResult",
    "GramRule",
    "Params",
    "Rule",
    "RuleResult",
    "all_finite",
    "append_input",
    "check_f",
    "combination_norm",
    "distance_exponent",
    "distance_ranks",
    "distances",
    "finite_gram",
    "finite_rows",
    "in_unit",
    "nothing_left",
    "nonfinite_or_zero",
    "normalized_gram",
    "relative_unit_gram",
    "row_norms",
    "sq_distances",
    "transform_gram",
    "unit_distances",
    "unit_gram",
    "validate_f",
]


def validate_f(rule: str, f: Any, *, required: bool = True) -> int | None:
    """Check the parameter ``f`` of ``rule``: an integer ``>= 0`` (or None when optional).

    Raises
    ------
    TypeError
        If ``f`` is not an integer (the number of Byzantine inputs tolerated).
    ValueError
        If ``f < 0``.
    """
    return check_int("f", f, owner=rule, low=0, none=not required)


def nothing_left(rule: str, p: int, excluded: tuple[tuple[int, str], ...]) -> ValueError:
    """The one error of every rule when no input is left to aggregate."""
    return ValueError(
        f"{rule}: all {p} inputs were excluded, nothing is left to aggregate: "
        + "; ".join(f"input {i}: {why}" for i, why in excluded[:5])
        + ("; ..." if len(excluded) > 5 else "")
    )


def check_f(rule: str, f: int, p: int, need: int, condition: str) -> None:
    """Raise a ValueError naming the rule when ``p < need``.

    Parameters
    ----------
    rule : str
        Rule name, for the message.
    f : int
        Byzantine inputs tolerated.
    p : int
        Number of inputs.
    need : int
        Smallest admissible ``p``.
    condition : str
        The condition in words, e.g. ``"p >= 2f + 3"``.
    """
    if p < need:
        raise ValueError(f"need {condition} for {rule}: got p={p}, f={f}")


class Params:
    """``get_params`` and ``repr`` from the instance's public attributes.

    Attributes starting with ``_`` (private) or ending with ``_`` (results of
    the last call, scikit-learn style) are not parameters.
    """

    def get_params(self) -> dict[str, Any]:
        """Return the parameters as a dict (scikit-learn style)."""
        return {k: v for k, v in vars(self).items()
                if not (k.startswith("_") or k.endswith("_"))}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


class Rule(Params):
    """Base class of aggregation rules: callable on the inputs.

    Subclasses implement ``_aggregate(stack, backend) -> result`` and set
    ``name``. A rule object holds its parameters only: each call returns
    its own result (``return_result=True``), so one rule object can serve
    concurrent callers. The one exception is state a rule needs by
    definition from one call to the next (centered clipping from the
    previous output), which that rule keeps explicitly and documents.

    ``result_`` holds the diagnostics of the last call (its ``aggregate``
    dropped, so no gradient-sized array stays alive), for interactive use;
    with several threads sharing a rule, use ``return_result=True``. The
    per-input diagnostics (influence, cosine, verdict) cost more than a small
    aggregation itself, so they are formed only when a result is asked for:
    with ``return_result=True`` or on reading ``result_``.
    """

    name = "rule"
    # p >= a f + b, declared once: read by the rule's own checks, by
    # check_workers (configs, the CLI) and by the docs. A rule that does not
    # use f (the mean, the Flag Aggregator) keeps this default: it still
    # refuses an f no rule could tolerate, f faulty inputs of p being a
    # majority or a tie when 2f >= p. None: no bound.
    p_bound: tuple[int, int] | None = (2, 1)

    def check_workers(self, p: int) -> int:
        """Raise the rule's own ValueError if ``p`` inputs are too few for its ``f``.

        Returns
        -------
        p : int
            The number of inputs the rule itself sees.
        """
        f = getattr(self, "f", None)
        if self.p_bound is not None and f is not None:
            a, b = self.p_bound
            check_f(self.name, f, p, a * f + b, f"p >= {a}f + {b}")
        return p

    def __call__(
        self, gradients: Any, *, return_result: bool = False, backend: str | None = None
    ) -> Any:
        """Aggregate ``gradients``.

        Parameters
        ----------
        gradients : array of shape (p, n), or sequence of p arrays or pytrees
            The inputs, one per worker.
        return_result : bool, default=False
            Return the full result object instead of the aggregate alone.
        backend : str, optional
            Backend for this call; see :func:`flagagg.backend`.

        Returns
        -------
        aggregate or result
            The aggregate in the input's structure, library, device and
            dtype, or the result object when ``return_result`` is true.
        """
        if backend is None:
            backend = getattr(self, "backend", None)
        stack = as_stack(gradients)
        self.check_workers(stack.p)
        impl = select_backend(backend, stack.sample, stack.library)
        result = self._aggregate(stack, impl)
        out = result.aggregate
        self._remember(out)
        if not return_result:
            # The result goes nowhere but result_: drop the gradient-sized
            # aggregate in place (no copy) and leave the diagnostics deferred.
            object.__setattr__(result, "aggregate", None)
            self._last_result = result
            return out
        result = with_diagnostics(result)
        if not result.verdict:
            result = _with_data_diagnostics(result, stack, impl)
        self._last_result = _light(result)
        return result

    @property
    def result_(self) -> AggregationResult:
        """The result of the last call, without its aggregate (for interactive use).

        Per-input diagnostics of a linear rule are formed on first access
        (from the ``p x p`` Gram, no pass over the data); a coordinate-wise
        rule has them only after a call with ``return_result=True``.
        """
        last = self.__dict__.get("_last_result")
        if last is None:
            raise AttributeError(f"{type(self).__name__} has no result_ before its first call")
        if last._deferred is not None:
            last = with_diagnostics(last)
            self._last_result = last
        return last

    def _remember(self, out: Any) -> None:
        """Keep what the next call needs (nothing, for a stateless rule)."""

    def _aggregate(self, stack: Stack, backend: Backend) -> Any:
        raise NotImplementedError


def all_finite(stack: Stack, out: Any) -> bool:
    """Whether every value of ``out`` (an array or pytree shaped like one input) is finite."""
    xp = stack.xp
    for leaf in as_stack([out]).leaves:
        x = leaf.block if leaf.block is not None else leaf.rows[0]
        if not bool(xp.all(xp.isfinite(x))):
            return False
    return True


def _light(result: AggregationResult) -> AggregationResult:
    import dataclasses

    return dataclasses.replace(result, aggregate=None)


def _with_data_diagnostics(result: AggregationResult, stack: Stack,
                           backend: Backend) -> AggregationResult:
    """Add the per-input diagnostics with one more pass: the Gram of ``[g_1..g_p, out]``.

    Only coordinate-wise rules (no coefficients, no Gram) need this, and only
    when a result is asked for: the aggregate-only path stays one pass.
    """
    import dataclasses

    p = stack.p
    KA = append_input(stack, result.aggregate, result.rule).gram(backend)
    excluded = result.excluded
    if not excluded:
        # Coordinate rules count NaN as +inf per coordinate; say which inputs had some
        # (read from the data: a finite row whose squared norm overflows is finite).
        bad = np.flatnonzero(~finite_rows(KA)[0][:p])
        excluded = tuple((int(i), NONFINITE_COORD) for i in bad)
    # Influence and cosine do not change with scale: in units of 2^E nothing overflows.
    KA = unit_gram(KA, distance_exponent(KA))
    diag = worker_diagnostics(KA[:p, p], np.diag(KA)[:p], float(KA[p, p]),
                              result.coefficients, excluded, KA[:p, :p])
    return dataclasses.replace(result, excluded=excluded, **diag)


NONFINITE_COORD = "non-finite values (NaN or Inf), counted as +inf per coordinate"


class GramRule(Rule):
    """A rule that needs only the Gram matrix and returns a linear combination.

    Subclasses implement ``_coefficients(K) -> (coef, extras)`` on the
    float64 ``p x p`` Gram matrix; ``extras`` are keyword arguments of
    :attr:`result_type`. The inputs are read twice: once for the Gram
    matrix, once for the combination. ``_coefficients`` needs nothing but
    ``K``, so it can run on a Gram matrix built elsewhere (e.g. all-reduced
    across ranks).

    A subclass whose coefficients sum to 1 and do not change when every
    input is translated by one vector sets ``translation_invariant = True``:
    it is then given the Gram of the inputs shifted by a central input when
    they share a large common part (see :mod:`flagagg._gram`), which keeps
    its distances exact.
    """

    result_type = AggregationResult
    translation_invariant = False

    def _coefficients(self, K: np.ndarray) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    def _gram_only(self) -> bool:
        """Whether :meth:`_coefficients` alone computes this rule (no other pass over the data)."""
        return True

    def _aggregate(self, stack: Stack, backend: Backend) -> AggregationResult:
        K = stack.gram(backend, shift=self.translation_invariant)
        coef, extras = self._coefficients(K)
        out = stack.combine(backend, coef)
        late = extras.pop("_late", None)
        return self.result_type(
            aggregate=out, rule=self.name, backend=backend.name, coefficients=coef,
            **extras, **deferred_diagnostics(K, coef, extras.get("excluded", ()), late),
        )


def _exact(K: np.ndarray) -> Gram | None:
    """``K`` when it is a :class:`~flagagg._gram.Gram` carrying its finite rows, else None."""
    return K if isinstance(K, Gram) and K.finite is not None else None


def nonfinite_or_zero(K: np.ndarray) -> tuple[np.ndarray, tuple[tuple[int, str], ...]]:
    """Inputs that cannot be normalised.

    A row holding NaN or Inf is non-finite; a zero row has norm 0. For a
    :class:`~flagagg._gram.Gram` both are read from the data (a finite row
    whose squared norm overflows or underflows is kept); for a plain matrix,
    off the diagonal (non-finite or zero ``K_ii``).

    Returns
    -------
    keep : ndarray of bool, shape (p,)
    excluded : tuple of (int, str)
    """
    finite, nonfinite = finite_rows(K)
    zero = finite & (row_norms(K) == 0)
    excluded = sorted(nonfinite + tuple((int(i), "zero norm") for i in np.flatnonzero(zero)))
    return finite & ~zero, tuple(excluded)


def finite_rows(K: np.ndarray) -> tuple[np.ndarray, tuple[tuple[int, str], ...]]:
    """Inputs the rules use: finite values, represented in ``K`` (zero rows are kept).

    The decision is :func:`flagagg._gram.usable_rows`, the same for every
    rule and every kind of Gram matrix.

    Returns
    -------
    finite : ndarray of bool, shape (p,)
    excluded : tuple of (int, str)
        The other inputs, with the reason.
    """
    return usable_rows(K)


def row_norms(K: np.ndarray) -> np.ndarray:
    """Norms ``||y_i||`` of the rows ``K`` is the Gram of, without overflow or underflow.

    NaN for non-finite inputs. (For a shifted Gram these are the norms of
    the shifted rows: callers that need the inputs' norms use an unshifted
    Gram.)
    """
    G = _exact(K)
    if G is not None and G.scaled is not None:
        with np.errstate(invalid="ignore", over="ignore"):
            n = np.ldexp(np.sqrt(np.maximum(np.diag(G.scaled), 0.0)), G.exponents)
    else:
        with np.errstate(invalid="ignore"):
            n = np.sqrt(np.maximum(np.diag(np.asarray(K)), 0.0))
    finite, _ = finite_rows(K)
    return np.where(finite, n, np.nan)


def normalized_gram(K: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``K_ij / (||y_i|| ||y_j||)`` for the inputs ``idx`` (finite, non-zero), symmetric.

    Computed from the scaled form when ``K`` has one, so inputs of any
    magnitude have exact cosines.
    """
    G = _exact(K)
    S = np.asarray(G.scaled if G is not None and G.scaled is not None else K)[np.ix_(idx, idx)]
    n = np.sqrt(np.diag(S))
    Kn = S / np.outer(n, n)
    return (Kn + Kn.T) / 2


def distance_exponent(K: np.ndarray) -> int:
    """A power of two ``E`` that puts the inputs' distances in range: ``D2 / 4^E``.

    0 unless ``K`` carries a scaled form; then the median exponent of the
    finite inputs (a minority of huge or tiny inputs cannot move it).
    """
    G = _exact(K)
    if G is None or G.scaled is None or not G.finite.any():
        return 0
    return int(np.median(G.exponents[G.finite]))


def unit_gram(K: np.ndarray, E: int) -> np.ndarray:
    """The Gram in units of ``2^E``: ``K / 4^E``, from the scaled form when there is one."""
    G = _exact(K)
    if G is None or G.scaled is None:
        return np.ldexp(np.asarray(K), -2 * E) if E else np.asarray(K)
    e = G.exponents - E
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        return np.ldexp(G.scaled, e[:, None] + e[None, :])


def _pair_terms(K: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(t, top)``: ``||y_i - y_j||^2 = 4^top t_ij`` (``top`` None: ``t`` is the plain value).

    With a scaled :class:`~flagagg._gram.Gram` each pair is formed at the scale
    ``2^top`` of its larger input, so ``t`` is representable whatever the inputs'
    magnitudes; otherwise ``t = K_ii + K_jj - 2 K_ij``.
    """
    G = _exact(K)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        if G is not None and G.scaled is not None:
            e = G.exponents
            S = G.scaled
            top = np.maximum(e[:, None], e[None, :])  # pair scale 2^top
            # Each row's scale relative to the pair's, <= 1.
            si = np.ldexp(1.0, e[:, None] - top)
            sj = np.ldexp(1.0, e[None, :] - top)
            ds = np.diag(S)
            t = si * si * ds[:, None] + sj * sj * ds[None, :] - 2.0 * si * sj * S
            return np.maximum(t, 0.0), top
        d = np.diag(np.asarray(K))
        return np.maximum(d[:, None] + d[None, :] - 2.0 * np.asarray(K), 0.0), None


def _mark_nonfinite(D: np.ndarray, finite: np.ndarray) -> np.ndarray:
    D[~finite, :] = np.inf
    D[:, ~finite] = np.inf
    np.fill_diagonal(D, 0.0)
    return D


def sq_distances(K: np.ndarray, finite: np.ndarray, exponent: int = 0) -> np.ndarray:
    """Squared distances ``||g_i - g_j||^2 = K_ii + K_jj - 2 K_ij``, in units of ``2^exponent``.

    Round-off can make the expression slightly negative; it is clipped at
    0. Pairs involving a non-finite input are ``+inf`` (such an input is
    farther from everything than any finite one) and the diagonal is 0.
    With a scaled :class:`~flagagg._gram.Gram` each pair is formed at the
    scale of its larger input and saturates to ``+inf`` only when the
    distance itself overflows (in units of ``2^exponent``; see
    :func:`distance_exponent` for callers that only compare distances).
    Distances are exact for a shifted Gram: the shift cancels.
    """
    t, top = _pair_terms(K)
    with np.errstate(over="ignore", under="ignore"):
        if top is not None:
            D2 = np.ldexp(t, 2 * (top - exponent))
        else:
            D2 = np.ldexp(t, -2 * exponent) if exponent else t
    return _mark_nonfinite(D2, finite)


def distances(K: np.ndarray, finite: np.ndarray, exponent: int = 0) -> np.ndarray:
    """Distances ``||g_i - g_j||`` in units of ``2^exponent``, as :func:`sq_distances`.

    The square root is taken at the pair's own scale, so a distance saturates
    to ``+inf`` only when it is itself beyond float64 (in the units), not when
    its square is: 1e300 apart is 1e300.
    """
    t, top = _pair_terms(K)
    with np.errstate(over="ignore", under="ignore"):
        if top is not None:
            D = np.ldexp(np.sqrt(t), top - exponent)
        else:
            D = np.sqrt(t)
            if exponent:
                D = np.ldexp(D, -exponent)
    return _mark_nonfinite(D, finite)


def distance_ranks(K: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """The order of the distances ``||g_i - g_j||``, as dense ranks (equal distances, equal ranks).

    For rules that only compare distances (minimum-diameter subsets): each
    distance is ordered by its binary exponent, then its mantissa, at the
    pair's own scale, so no comparison is lost to overflow or underflow
    whatever the inputs' magnitudes. Pairs with a non-finite input are
    ``+inf``; the diagonal has the lowest rank (distance 0).
    """
    t, top = _pair_terms(K)
    m, ex = np.frexp(np.sqrt(t))
    if top is not None:
        ex = ex + top
    ex = np.where(m == 0, np.iinfo(np.int64).min, ex)  # 0 below every positive distance
    order = np.lexsort((m.ravel(), ex.ravel()))
    km, ke = m.ravel()[order], ex.ravel()[order]
    new = np.ones(order.size, dtype=np.int64)
    new[1:] = (km[1:] != km[:-1]) | (ke[1:] != ke[:-1])
    new[0] = 0
    R = np.empty(order.size)
    R[order] = np.cumsum(new)
    return _mark_nonfinite(R.reshape(t.shape), finite)


def relative_unit_gram(K: np.ndarray, idx: np.ndarray,
                       r: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lengths and unit Gram of the inputs ``idx`` relative to one of them, without overflow.

    For ``y_i = g_i - g_r`` (``i`` in ``idx``, ``r`` a position in ``idx``;
    ``y_i = g_i`` for ``r=None``, which needs an unshifted ``K``):
    ``||y_i|| = 2^t_i n_i`` and ``U_ij = y_i . y_j / (||y_i|| ||y_j||)``.
    Each ``y_i`` is formed at the scale ``2^t_i`` of the larger of ``g_i`` and
    ``g_r`` (from the scaled form when ``K`` has one), so inputs of any
    magnitude give exact directions and lengths; rows and columns of
    zero-length ``y_i`` are 0 in ``U`` (with 1 on the diagonal).

    Returns
    -------
    n : ndarray of shape (q,)
    t : ndarray of int, shape (q,)
    U : ndarray of shape (q, q)
    """
    G = _exact(K)
    idx = np.asarray(idx)
    whole = idx.size == K.shape[0]  # idx is every input (the usual case): no copy of K
    if G is not None and G.scaled is not None:
        S = G.scaled if whole else G.scaled[np.ix_(idx, idx)]
        e = G.exponents[idx]
        if r is None:
            t, V = e, S
        else:
            t = np.maximum(e, e[r])
            with np.errstate(under="ignore"):
                a = np.ldexp(1.0, e - t)  # g_i's scale relative to y_i's, <= 1
                b = np.ldexp(1.0, e[r] - t)  # g_r's
            aSr = a * S[:, r]
            # (a_i x_i - b_i x_r) . (a_j x_j - b_j x_r), x the scaled rows.
            V = np.outer(a, a) * S - np.outer(aSr, b) - np.outer(b, aSr) + S[r, r] * np.outer(b, b)
    else:
        # Every input of ordinary magnitude: the same formula with a = b = 1, in place.
        S = np.asarray(K) if whole else np.asarray(K)[np.ix_(idx, idx)]
        t = np.zeros(idx.size, dtype=np.int64)
        if r is None:
            V = S
        else:
            Sr = S[:, r].copy()
            V = S - Sr[:, None]
            V -= Sr[None, :]
            V += Sr[r]
    n = np.sqrt(np.maximum(np.diag(V), 0.0))
    with np.errstate(divide="ignore"):
        inv = np.where(n > 0, 1.0 / n, 0.0)
    # Round-off may put an entry a little outside [-1, 1]; the distances formed from
    # U clip at 0, so that is harmless. Rows of zero length are 0, with 1 on the diagonal.
    U = V * inv[:, None]
    U *= inv[None, :]
    np.fill_diagonal(U, 1.0)
    return n, t, U


def unit_distances(s: np.ndarray, U: np.ndarray, b: np.ndarray,
                   Ub: np.ndarray | None = None) -> np.ndarray:
    """``||z - s_i u_i||`` for ``z = sum_j b_j u_j``, from lengths ``s`` and ``U_ij = u_i . u_j``.

    Each distance is formed relative to ``max(s_i, ||z||)``: no squared length
    is ever formed, so a point at ``1e300`` (in the unit of ``s``) is exact and
    one at ``+inf`` (beyond float64 in that unit) is at ``+inf``. ``Ub``:
    ``U @ b`` when the caller has it.
    """
    far = np.isinf(s)
    sf = np.where(far, 0.0, s)
    if Ub is None:
        Ub = U @ b
    nz = np.sqrt(max(float(b @ Ub), 0.0))
    m = np.maximum(sf, nz)
    with np.errstate(invalid="ignore", divide="ignore", under="ignore"):
        inv = np.where(m > 0, 1.0 / m, 0.0)
        a = sf * inv
        t = a * a - 2.0 * a * (Ub * inv) + (nz * inv) ** 2
    d = m * np.sqrt(np.maximum(t, 0.0))
    return np.where(far, np.inf, d)


def in_unit(n: np.ndarray, t: np.ndarray, unit: float) -> np.ndarray:
    """``2^t n / unit`` without overflow or underflow on the way (``+inf`` if it overflows)."""
    m, e = np.frexp(unit)
    with np.errstate(over="ignore", under="ignore"):
        return np.ldexp(n / m, t - e)


def combination_norm(K: np.ndarray, coef: np.ndarray) -> float:
    """``||sum_i c_i y_i||`` without overflow (0 for an empty combination)."""
    G = _exact(K)
    nz = coef != 0
    if not nz.any():
        return 0.0
    if G is None or G.scaled is None:
        # Inputs with a zero coefficient may be non-finite: 0 * nan must not count.
        Kz = np.where(nz[:, None] & nz[None, :], np.asarray(K), 0.0)
        return float(np.sqrt(max(float(coef @ Kz @ coef), 0.0)))
    e = G.exponents + np.frexp(coef)[1]
    top = int(e[nz].max())
    c = np.where(nz, np.ldexp(coef, G.exponents - top), 0.0)
    return float(np.ldexp(np.sqrt(max(float(c @ np.where(nz[:, None] & nz[None, :], G.scaled,
                                                          0.0) @ c), 0.0)), top))


def transform_gram(K: np.ndarray, M: np.ndarray) -> Gram:
    """The Gram of the mixed inputs ``M G``: ``M K M^T``, exact for inputs of any magnitude.

    A mixed input that includes a non-finite input (``M_ji != 0``) is
    non-finite (NaN on its diagonal). The shift of ``K``, if any, carries
    over when the rows of ``M`` sum to 1.
    """
    finite, _ = finite_rows(K)
    bad = (M[:, ~finite] != 0).any(axis=1)
    # All finite (the usual case): no masked copies of two p x p matrices.
    Mf = M if finite.all() else np.where(finite[None, :], M, 0.0)
    G = _exact(K)
    ref = G.ref if G is not None else None
    if G is None or G.scaled is None:
        K2 = Mf @ finite_gram(np.asarray(K), finite) @ Mf.T
        K2[bad, bad] = np.nan
        return Gram(K2, finite=~bad, ref=ref)
    # Mixed row j at its own scale 2^f_j: A_ji = M_ji 2^(e_i - f_j), |A| <= 1.
    with np.errstate(divide="ignore"):
        e_ji = np.where(Mf != 0, np.frexp(Mf)[1] + G.exponents[None, :], np.iinfo(np.int64).min)
    f = np.where((Mf != 0).any(axis=1), e_ji.max(axis=1), 0)
    A = np.ldexp(Mf, G.exponents[None, :] - f[:, None])
    S2 = A @ finite_gram(G.scaled, finite) @ A.T
    S2[bad, bad] = np.nan
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        values = np.ldexp(S2, f[:, None] + f[None, :])
    return Gram(values, finite=~bad, ref=ref, exponents=f, scaled=S2)


def finite_gram(K: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """``K`` with the rows and columns of non-finite inputs set to 0.

    Products with coefficient vectors that are zero on those inputs then
    stay finite (``0 * nan`` would not). When every input is finite this is
    ``K`` itself, not a copy: read it, do not write to it.
    """
    if finite.all():
        return np.asarray(K)
    return np.where(finite[:, None] & finite[None, :], np.asarray(K), 0.0)


def append_input(stack: Stack, extra: Any, rule: str) -> Stack:
    """``stack`` with one more input, ``extra``, shaped like one input (array or pytree).

    The leaves become lists of rows (views, no copy of the inputs); the
    kernels then read them a cache-sized chunk at a time.
    """
    try:
        one = as_stack([extra])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{rule}: the center must be shaped like one input: {exc}") from None
    if one.library != stack.library:
        raise TypeError(
            f"{rule}: the center is a {one.library} array but the inputs are {stack.library}; "
            "nothing is converted silently"
        )
    if [leaf.shape for leaf in one.leaves] != [leaf.shape for leaf in stack.leaves]:
        raise ValueError(
            f"{rule}: the center must be shaped like one input: got leaves of shapes "
            f"{[leaf.shape for leaf in one.leaves]}, inputs have "
            f"{[leaf.shape for leaf in stack.leaves]}"
        )
    xp = stack.xp
    leaves = []
    for leaf, cleaf in zip(stack.leaves, one.leaves, strict=True):
        rows = ([leaf.block[i, ...] for i in range(stack.p)] if leaf.block is not None
                else list(leaf.rows))
        extra_row = cleaf.block[0, ...] if cleaf.block is not None else cleaf.rows[0]
        if extra_row.dtype != rows[0].dtype:
            extra_row = xp.astype(extra_row, rows[0].dtype)
        leaves.append(Leaf(leaf.shape, leaf.dtype_name, rows=rows + [extra_row]))
    return Stack(stack.p + 1, leaves, xp, stack.library, stack.device, stack.sample,
                 stack.unflatten)
