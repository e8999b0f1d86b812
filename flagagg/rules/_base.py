"""What every aggregation rule shares: input coercion, backend choice, results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._array import Stack, as_stack
from .._gram import Gram
from ..backends import Backend, select_backend

__all__ = [
    "GramRule",
    "Params",
    "Rule",
    "RuleResult",
    "check_f",
    "combination_norm",
    "distance_exponent",
    "finite_gram",
    "finite_rows",
    "nonfinite_or_zero",
    "normalized_gram",
    "row_norms",
    "sq_distances",
    "transform_gram",
    "unit_gram",
    "validate_f",
]

NONFINITE = "non-finite values (NaN or Inf) or an overflowing norm"


@dataclass(frozen=True)
class RuleResult:
    """The outcome of one aggregation by a baseline rule.

    Attributes
    ----------
    aggregate : array or pytree
        The aggregate, in the input's structure, library, device and dtype.
    rule : str
        Name of the rule.
    backend : str
        Backend that computed it.
    coefficients : ndarray of shape (p,) or None
        For rules that return a linear combination ``sum_i c_i g_i`` of the
        inputs; ``None`` for coordinate-wise rules.
    selected : tuple of int
        Inputs the rule selected (Krum family), else empty.
    excluded : tuple of (int, str)
        Inputs left out before aggregating, with the reason.
    scores : ndarray or None
        Per-input scores (Krum scores, distances), where the rule has them.
    n_iter : int
        Iterations of iterative rules, else 0.
    converged : bool or None
        Whether an iterative rule met its tolerance; ``None`` otherwise.
    objective_history : ndarray
        Objective per iteration of iterative rules, else empty.
    details : dict
        Rule-specific extras.
    """

    aggregate: Any
    rule: str
    backend: str
    coefficients: np.ndarray | None = None
    selected: tuple[int, ...] = ()
    excluded: tuple[tuple[int, str], ...] = ()
    scores: np.ndarray | None = None
    n_iter: int = 0
    converged: bool | None = None
    objective_history: np.ndarray = field(default_factory=lambda: np.zeros(0))
    details: dict = field(default_factory=dict)


def validate_f(rule: str, f: Any, *, required: bool = True) -> int | None:
    """Check the parameter ``f`` of ``rule``: an integer ``>= 0`` (or None when optional).

    Raises
    ------
    TypeError
        If ``f`` is not an integer.
    ValueError
        If ``f < 0``.
    """
    if f is None and not required:
        return None
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)):
        raise TypeError(f"f must be an integer number of Byzantine inputs for {rule}: got {f!r}")
    if f < 0:
        raise ValueError(f"need f >= 0 for {rule}: got f={f}")
    return int(f)


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
    ``name``. Calling the rule keeps the result of the last call in
    ``result_``.
    """

    name = "rule"

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
        stack = as_stack(gradients)
        impl = select_backend(backend, stack.sample, stack.library)
        result = self._aggregate(stack, impl)
        self.result_ = result
        return result if return_result else result.aggregate

    def _aggregate(self, stack: Stack, backend: Backend) -> Any:
        raise NotImplementedError



class GramRule(Rule):
    """A rule that needs only the Gram matrix and returns a linear combination.

    Subclasses implement ``_coefficients(K) -> (coef, extras)`` on the
    float64 ``p x p`` Gram matrix; ``extras`` are keyword arguments of
    :class:`RuleResult`. The inputs are read twice: once for the Gram matrix,
    once for the combination.

    A subclass whose coefficients sum to 1 and do not change when every
    input is translated by one vector sets ``translation_invariant = True``:
    it is then given the Gram of the inputs shifted by a central input when
    they share a large common part (see :mod:`flagagg._gram`), which keeps
    its distances exact.
    """

    translation_invariant = False

    def _coefficients(self, K: np.ndarray) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    def _gram_only(self) -> bool:
        """Whether :meth:`_coefficients` alone computes this rule (no other pass over the data)."""
        return True

    def _aggregate(self, stack: Stack, backend: Backend) -> RuleResult:
        K = stack.gram(backend, shift=self.translation_invariant)
        coef, extras = self._coefficients(K)
        out = stack.combine(backend, coef)
        return RuleResult(
            aggregate=out, rule=self.name, backend=backend.name, coefficients=coef, **extras
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
    """Inputs with finite values (zero rows are kept).

    Read from the data for a :class:`~flagagg._gram.Gram`, off the diagonal
    of a plain matrix (where an overflowing norm counts as non-finite).

    Returns
    -------
    finite : ndarray of bool, shape (p,)
    excluded : tuple of (int, str)
        The other inputs, with the reason.
    """
    G = _exact(K)
    finite = G.finite.copy() if G is not None else np.isfinite(np.diag(K))
    why = NONFINITE if G is None else "non-finite values (NaN or Inf)"
    return finite, tuple((int(i), why) for i in np.flatnonzero(~finite))


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
            D2 = np.ldexp(np.maximum(t, 0.0), 2 * (top - exponent))
        else:
            d = np.diag(np.asarray(K))
            D2 = np.maximum(d[:, None] + d[None, :] - 2.0 * np.asarray(K), 0.0)
            if exponent:
                D2 = np.ldexp(D2, -2 * exponent)
    D2[~finite, :] = np.inf
    D2[:, ~finite] = np.inf
    np.fill_diagonal(D2, 0.0)
    return D2


def combination_norm(K: np.ndarray, coef: np.ndarray) -> float:
    """``||sum_i c_i y_i||`` without overflow (0 for an empty combination)."""
    G = _exact(K)
    if G is None or G.scaled is None:
        return float(np.sqrt(max(float(coef @ np.asarray(K) @ coef), 0.0)))
    nz = coef != 0
    if not nz.any():
        return 0.0
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
    Mf = np.where(finite[None, :], M, 0.0)
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
    stay finite (``0 * nan`` would not).
    """
    return np.where(finite[:, None] & finite[None, :], np.asarray(K), 0.0)
