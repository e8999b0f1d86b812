"""What every aggregation rule shares: the declared contract, validation, results.

A rule class declares its :class:`~flagagg.rules._contract.Contract` once and
implements one solver hook:

* ``_solve_gram(K) -> Solution`` for a rule of ``space="gram"``: its
  coefficients from the ``p x p`` :class:`~flagagg._gram.Gram` alone;
* ``_solve_stack(stack, backend) -> Outcome`` for the others (and for a Gram
  rule that reads the data once more).

:class:`Rule` validates the parameters and ``p`` from the contract, runs the
hook, forms the aggregate and builds the result from the typed solution.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .._array import Leaf, Stack, _is_array, as_stack
from .._backend_choice import select_backend
from .._gram import Gram, as_gram
from .._validation import check_params
from ..backends import Backend
from ._contract import Contract, Outcome, Solution, Space, result_fields
from ._result import (
    AggregationResult,
    Pending,
    diagnose,
    output_stats,
    with_diagnostics,
)

__all__ = [
    "AggregationResult",
    "NothingLeftError",
    "Params",
    "Rule",
    "all_finite",
    "append_input",
    "in_unit",
    "unit_distances",
]


# The per-call inputs (``contract.call_inputs``) of the call in progress: set by
# Rule.__call__ around the solve, read by the rule's solver with ``call_input``. A
# context variable, so concurrent calls of one rule object from several threads each
# see their own, and a ComposedRule's inner rule sees the inputs of the outer call.
_CALL_INPUTS: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "flagagg_call_inputs", default=None)


class NothingLeftError(ValueError):
    """Every input was excluded: nothing is left to aggregate (the one such error of every rule)."""

    def __init__(self, rule: str, p: int, excluded: tuple[tuple[int, str], ...]) -> None:
        super().__init__(
            f"{rule}: all {p} inputs were excluded, nothing is left to aggregate: "
            + "; ".join(f"input {i}: {why}" for i, why in excluded[:5])
            + ("; ..." if len(excluded) > 5 else "")
        )


class Params:
    """``get_params``, ``repr`` and parameter validation from the class's declared contract.

    Attributes starting with ``_`` (private) or ending with ``_`` (results of
    the last call, scikit-learn style) are not parameters.
    """

    name: ClassVar[str] = "rule"
    contract: ClassVar[Contract] = Contract(params={})

    def _store(self, **values: Any) -> None:
        """Check ``values`` against ``contract.params`` and set them as attributes.

        Raises
        ------
        TypeError
            A value of the wrong type.
        ValueError
            A value out of range.
        """
        for key, value in check_params(self.name, self.contract.params, values).items():
            setattr(self, key, value)

    def get_params(self) -> dict[str, Any]:
        """Return the parameters as a dict (scikit-learn style)."""
        return {k: v for k, v in vars(self).items()
                if not (k.startswith("_") or k.endswith("_"))}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    def check_workers(self, p: int) -> int:
        """Raise the declared bound's ValueError if ``p`` inputs are too few for ``f``.

        Returns
        -------
        p : int
            The number of inputs the rule itself sees.
        """
        f = getattr(self, "f", None)
        bound = self.contract.bound
        if bound is not None and f is not None:
            bound.check(self.name, f, p)
        return p


class Rule(Params):
    """Base class of aggregation rules: callable on the inputs.

    Subclasses set ``name`` and ``contract`` and implement ``_solve_gram``
    (``contract.space == "gram"``) or ``_solve_stack``; see the module
    docstring. A rule object holds its parameters; each call returns its
    own result (``return_result=True``), so one rule object can serve
    concurrent callers. The one exception is state a rule needs by
    definition from one call to the next (centered clipping from the
    previous output), which that rule keeps explicitly and documents.

    ``result_`` holds the diagnostics of the last call (its ``aggregate``
    left out, so no gradient-sized array stays alive), for interactive use,
    scikit-learn style; with several threads sharing a rule, use
    ``return_result=True``. The per-input diagnostics (influence, cosine,
    verdict) cost more than a small aggregation itself, so they are formed
    only when a result is asked for: with ``return_result=True`` or on
    reading ``result_``.
    """

    result_type: ClassVar[type[AggregationResult]] = AggregationResult
    # The backend of every call without its own backend= (None: the context's).
    backend: str | None = None

    @property
    def space(self) -> Space:
        """Where this rule object computes (``contract.space`` unless its parameters narrow it)."""
        return self.contract.space

    @property
    def call_inputs(self) -> Mapping[str, str]:
        """The inputs it needs on every call besides the gradients (``contract.call_inputs``)."""
        return self.contract.call_inputs

    def missing_inputs(self) -> tuple[str, ...]:
        """The per-call inputs a call must give: those not set once on the constructor."""
        return tuple(k for k in self.call_inputs if getattr(self, k, None) is None)

    def call_input(self, name: str) -> Any:
        """The per-call input ``name`` of the call in progress (the constructor's if none)."""
        value = (_CALL_INPUTS.get() or {}).get(name)
        return getattr(self, name, None) if value is None else value

    def _check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """``inputs`` without the Nones, checked against ``call_inputs``."""
        declared = self.call_inputs
        unknown = sorted(set(inputs) - set(declared))
        if unknown:
            raise TypeError(
                f"{self.name} takes no per-call input {', '.join(map(repr, unknown))}; "
                + (f"its per-call inputs: {', '.join(declared)}" if declared else
                   "it aggregates the gradients alone")
            )
        given = {k: v for k, v in inputs.items() if v is not None}
        for k in self.missing_inputs():
            if k not in given:
                raise TypeError(
                    f"{self.name} needs {declared[k]} on every call: call "
                    f"rule(gradients, {k}=...), or build the rule with "
                    f"get_rule({self.name!r}, {k}=...)"
                )
        return given

    def solve_gram(self, K: Any) -> Solution:
        """The rule's solution from the Gram matrix of its inputs alone.

        Parameters
        ----------
        K : Gram or array of shape (p, p)
            A :class:`~flagagg._gram.Gram`, or a plain float64 matrix (one
            summed across ranks, say), read off its diagonal.

        Returns
        -------
        solution : Solution
            ``solution.coefficients`` give the aggregate ``sum_i c_i g_i``.

        Raises
        ------
        TypeError
            If the rule does not compute in the Gram space (``space != "gram"``).
        ValueError
            If ``p`` is below the rule's bound, or nothing is left to aggregate.
        """
        if self.space != "gram":
            raise TypeError(f"{self.name} does not compute from the Gram matrix alone "
                            f"(space={self.space!r})")
        K = as_gram(K)
        self.check_workers(K.p)
        return self._solve_gram(K)

    def _solve_gram(self, K: Gram) -> Solution:
        raise NotImplementedError(f"{type(self).__name__} implements no Gram-space solver")

    def _solve_stack(self, stack: Stack, backend: Backend) -> Outcome:
        """Default: the Gram of the inputs, the Gram-space solver, one combination pass."""
        K = stack.gram(backend, shift=self.contract.translation_invariant)
        sol = self._solve_gram(K)
        return Outcome(stack.combine(backend, sol.coefficients), sol, gram=K)

    def usable(self, K: Gram, need: int = 1) -> np.ndarray:
        """Indices of the inputs ``K`` says are usable; raise if fewer than ``need``.

        Raises
        ------
        NothingLeftError
            If no input is usable.
        ValueError
            If fewer than ``need`` are.
        """
        idx = np.flatnonzero(K.usable)
        if idx.size == 0:
            raise NothingLeftError(self.name, K.p, K.excluded)
        if idx.size < need:
            raise ValueError(
                f"{self.name} needs at least {need} inputs with finite values: got {idx.size} "
                f"of p={K.p} (the others hold NaN or Inf)"
            )
        return idx

    def __call__(
        self, gradients: Any, *, return_result: bool = False, backend: str | None = None,
        **inputs: Any,
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
        **inputs
            The inputs the rule declares in ``contract.call_inputs`` (FLTrust's
            ``reference``; no other rule takes any).

        Returns
        -------
        aggregate or result
            The aggregate in the input's structure, library, device and
            dtype, or the result object when ``return_result`` is true.

        Raises
        ------
        TypeError
            A per-call input the rule does not declare, or one it needs and
            got neither here nor from its constructor.
        """
        stack = as_stack(gradients)
        self.check_workers(stack.p)
        impl = select_backend(self.backend if backend is None else backend, stack.sample,
                              stack.library)
        given = self._check_inputs(inputs)
        token = _CALL_INPUTS.set(given)
        try:
            outcome = self._solve_stack(stack, impl)
        finally:
            _CALL_INPUTS.reset(token)
        self._remember(outcome.aggregate)
        if not return_result:
            # result_ is formed when it is read (a training loop that never reads
            # it pays nothing), from the solution: never the gradient-sized aggregate
            self._last_result = _Unread(Outcome(None, outcome.solution, outcome.gram,
                                                outcome.stats), impl.name)
            return outcome.aggregate
        result = with_diagnostics(self._result(outcome, impl.name, aggregate=outcome.aggregate))
        if not result.verdict:
            result = _with_data_diagnostics(result, stack, impl)
        self._last_result = dataclasses.replace(result, aggregate=None)
        return result

    def _result(self, outcome: Outcome, backend: str, *, aggregate: Any) -> AggregationResult:
        """The result of one call, built from the solver's typed solution."""
        sol = outcome.solution
        fields = result_fields(sol)
        pending = None
        if outcome.stats is not None:
            fields.update(diagnose(outcome.stats, sol.coefficients, sol.excluded))
        elif outcome.gram is not None and sol.coefficients is not None:
            pending = Pending(outcome.gram, sol.coefficients, sol.excluded, sol.late)
        if sol.late is not None and pending is None:
            fields.update(result_fields(sol.late(), leave=()))
        return self.result_type(aggregate=aggregate, rule=self.name, backend=backend,
                                _deferred=pending, **fields)

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
        if isinstance(last, _Unread):
            last = self._last_result = self._result(last.outcome, last.backend, aggregate=None)
        if last._deferred is not None:
            last = with_diagnostics(last)
            self._last_result = last
        return last

    def _remember(self, out: Any) -> None:
        """Keep what the next call needs (nothing, for a stateless rule)."""


class _Unread(NamedTuple):
    """The last call's outcome (without its aggregate), until ``result_`` is read."""

    outcome: Outcome
    backend: str


def all_finite(stack: Stack, out: Any) -> bool:
    """Whether every value of ``out`` (an array or pytree shaped like one input) is finite."""
    xp = stack.xp
    if _is_array(out):
        # one array (the common case): no pytree to take apart
        return bool(xp.all(xp.isfinite(out)))
    for leaf in as_stack([out]).leaves:
        x = leaf.block if leaf.block is not None else leaf.rows[0]
        if not bool(xp.all(xp.isfinite(x))):
            return False
    return True


NONFINITE_COORD = "non-finite values (NaN or Inf), counted as +inf per coordinate"


def _with_data_diagnostics(result: AggregationResult, stack: Stack,
                           backend: Backend) -> AggregationResult:
    """Add the per-input diagnostics with one more pass: the Gram of ``[g_1..g_p, out]``.

    Only rules without a Gram of their inputs (coordinate-wise rules) need
    this, and only when a result is asked for: the aggregate-only path stays
    one pass.
    """
    p = stack.p
    KA = append_input(stack, result.aggregate, result.rule).gram(backend)
    excluded = result.excluded
    if not excluded:
        # Coordinate rules count NaN as +inf per coordinate; say which inputs had some
        # (read from the data: a finite row whose squared norm overflows is finite).
        excluded = tuple((int(i), NONFINITE_COORD) for i in np.flatnonzero(~KA.usable[:p]))
    diag = diagnose(output_stats(KA), result.coefficients, excluded)
    return dataclasses.replace(result, excluded=excluded, **diag)


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
