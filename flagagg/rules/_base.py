"""What every aggregation rule shares: input coercion, backend choice, results."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._array import Leaf, Stack, as_stack
from .._validation import check_int
from ..backends import Backend, select_backend
from ._result import AggregationResult, RuleResult, gram_diagnostics, worker_diagnostics

__all__ = [
    "AggregationResult",
    "GramRule",
    "Params",
    "Rule",
    "RuleResult",
    "all_finite",
    "append_input",
    "check_f",
    "finite_gram",
    "finite_rows",
    "nothing_left",
    "nonfinite_or_zero",
    "sq_distances",
    "validate_f",
]

NONFINITE = "non-finite values (NaN or Inf) or an overflowing norm"


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
    with several threads sharing a rule, use ``return_result=True``.
    """

    name = "rule"
    # p >= a f + b, declared once: read by the rule's own checks, by
    # check_workers (configs, the CLI) and by the docs. None: no bound.
    p_bound: tuple[int, int] | None = None

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
        impl = select_backend(backend, stack.sample, stack.library)
        result = self._aggregate(stack, impl)
        if return_result and not result.verdict:
            result = _with_data_diagnostics(result, stack, impl)
        self._remember(result.aggregate)
        self.result_ = _light(result)
        return result if return_result else result.aggregate

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
        # Coordinate rules count NaN as +inf per coordinate; say which inputs had some.
        bad = np.flatnonzero(~np.isfinite(np.diag(KA)[:p]))
        excluded = tuple((int(i), NONFINITE_COORD) for i in bad)
    diag = worker_diagnostics(KA[:p, p], np.diag(KA)[:p], float(KA[p, p]),
                              result.coefficients, excluded)
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
    """

    result_type = AggregationResult

    def _coefficients(self, K: np.ndarray) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    def _gram_only(self) -> bool:
        """Whether :meth:`_coefficients` alone computes this rule (no other pass over the data)."""
        return True

    def _aggregate(self, stack: Stack, backend: Backend) -> AggregationResult:
        K = stack.gram(backend)
        coef, extras = self._coefficients(K)
        out = stack.combine(backend, coef)
        diag = gram_diagnostics(K, coef, extras.get("excluded", ()))
        return self.result_type(
            aggregate=out, rule=self.name, backend=backend.name, coefficients=coef,
            **extras, **diag,
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
