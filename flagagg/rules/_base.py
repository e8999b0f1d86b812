"""What every aggregation rule shares: input coercion, backend choice, results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._array import Stack, as_stack
from ..backends import Backend, select_backend

__all__ = [
    "GramRule",
    "Params",
    "Rule",
    "RuleResult",
    "check_f",
    "finite_gram",
    "finite_rows",
    "nonfinite_or_zero",
    "sq_distances",
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
    """

    def _coefficients(self, K: np.ndarray) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    def _gram_only(self) -> bool:
        """Whether :meth:`_coefficients` alone computes this rule (no other pass over the data)."""
        return True

    def _aggregate(self, stack: Stack, backend: Backend) -> RuleResult:
        K = stack.gram(backend)
        coef, extras = self._coefficients(K)
        out = stack.combine(backend, coef)
        return RuleResult(
            aggregate=out, rule=self.name, backend=backend.name, coefficients=coef, **extras
        )


def nonfinite_or_zero(K: np.ndarray) -> tuple[np.ndarray, tuple[tuple[int, str], ...]]:
    """Inputs that cannot be normalised, read off the Gram diagonal.

    A row holding NaN or Inf (or so large that its squared norm overflows)
    has a non-finite ``K_ii``; a zero row has ``K_ii == 0``.

    Returns
    -------
    keep : ndarray of bool, shape (p,)
    excluded : tuple of (int, str)
    """
    finite, nonfinite = finite_rows(K)
    zero = finite & (np.diag(K) == 0)
    excluded = sorted(nonfinite + tuple((int(i), "zero norm") for i in np.flatnonzero(zero)))
    return finite & ~zero, tuple(excluded)


def finite_rows(K: np.ndarray) -> tuple[np.ndarray, tuple[tuple[int, str], ...]]:
    """Inputs with finite values, read off the Gram diagonal (zero rows are kept).

    Returns
    -------
    finite : ndarray of bool, shape (p,)
    excluded : tuple of (int, str)
        The other inputs, with the reason.
    """
    finite = np.isfinite(np.diag(K))
    return finite, tuple((int(i), NONFINITE) for i in np.flatnonzero(~finite))


def sq_distances(K: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """Squared distances ``||g_i - g_j||^2 = K_ii + K_jj - 2 K_ij`` from the Gram matrix.

    Round-off can make the expression slightly negative; it is clipped at
    0. Pairs involving a non-finite input are ``+inf`` (such an input is
    farther from everything than any finite one) and the diagonal is 0.
    """
    d = np.diag(K)
    with np.errstate(invalid="ignore", over="ignore"):
        D2 = np.maximum(d[:, None] + d[None, :] - 2.0 * K, 0.0)
    D2[~finite, :] = np.inf
    D2[:, ~finite] = np.inf
    np.fill_diagonal(D2, 0.0)
    return D2


def finite_gram(K: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """``K`` with the rows and columns of non-finite inputs set to 0.

    Products with coefficient vectors that are zero on those inputs then
    stay finite (``0 * nan`` would not).
    """
    return np.where(finite[:, None] & finite[None, :], K, 0.0)
