"""What a rule declares about itself, once, and the typed value its solver returns.

Every rule class sets ``contract = Contract(...)``: its parameters with their
constraints, its bound on the number of inputs ``p`` for a given ``f``, its
NaN/Inf policy, its cost, its reference and where it computes (the ``p x p``
Gram space, coordinate by coordinate, or on the whole vectors). The base class
validates parameters and ``p`` from it; the error messages, ``flagagg
experiment --check``, the DDP hook's mode choice and the documentation tables
read the same object. Nothing about a rule is recovered from its docstring or
by trying inputs.

A rule's solver returns a :class:`Solution` (or a subclass adding the rule's
own result fields); :class:`flagagg.rules.Rule` builds the result from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .._validation import Constraint, Int

__all__ = ["F_OPTIONAL", "F_REQUIRED", "Bound", "Contract", "Outcome", "Reference", "Solution",
           "Space", "WorkerStats", "result_fields"]

# Where a rule computes:
# "gram":       its coefficients come from the p x p Gram matrix alone (any Gram: one
#               built from the data, or summed across ranks), then one combination;
# "coordinate": each coordinate from the p values the inputs give it (shard by shard);
# "vector":     it needs the whole input vectors on one machine.
Space = Literal["gram", "coordinate", "vector"]

# ``f``, the number of Byzantine inputs tolerated, as most rules declare it.
F_REQUIRED = Int(low=0)
F_OPTIONAL = Int(low=0, none=True)


@dataclass(frozen=True)
class Bound:
    """The smallest number of inputs a rule accepts: ``p >= a f + b``."""

    a: int
    b: int

    def need(self, f: int) -> int:
        """Smallest admissible ``p`` for ``f``."""
        return self.a * f + self.b

    def __str__(self) -> str:
        term = "f" if self.a == 1 else f"{self.a}f"
        return f"p >= {term} + {self.b}" if self.b else f"p >= {term}"

    def check(self, owner: str, f: int, p: int) -> None:
        """Raise ``ValueError("need p >= 2f + 3 for krum: got p=4, f=1")`` if ``p`` is too small."""
        if p < self.need(f):
            raise ValueError(f"need {self} for {owner}: got p={p}, f={f}")


# Refuses an f no rule could tolerate (f faulty inputs of p a majority or a tie).
MAJORITY = Bound(2, 1)


@dataclass(frozen=True)
class Reference:
    """The publication that defines a rule."""

    authors: tuple[str, ...]
    title: str
    venue: str
    year: int

    def short(self) -> str:
        """``"Blanchard et al. (NeurIPS 2017)"``."""
        a = self.authors
        who = a[0] if len(a) == 1 else (f"{a[0]} and {a[1]}" if len(a) == 2 else f"{a[0]} et al.")
        return f"{who} ({self.venue} {self.year})".replace("( ", "(")

    def full(self) -> str:
        """``"Blanchard, El Mhamdi, ... , "Title", NeurIPS 2017"``."""
        who = ", ".join(self.authors[:-1]) + (" and " if len(self.authors) > 1 else "") + \
            self.authors[-1]
        return f'{who}, "{self.title}", {self.venue} {self.year}'.replace(",  ", ", ")


@dataclass(frozen=True)
class Contract:
    """The facts a rule states about itself; see the module docstring.

    Attributes
    ----------
    params : mapping of str to constraint
        Every constructor parameter (``backend`` aside) with its constraint
        from :mod:`flagagg._validation` (``Int``, ``Real``, ``Choice``,
        ``Anything``). ``f`` is declared like the others (:data:`F_REQUIRED`
        or :data:`F_OPTIONAL`).
    bound : Bound or None
        ``p >= a f + b``, checked whenever ``f`` is set; None: no bound.
    nan_policy : str
        What the rule does with inputs holding NaN or Inf, in one sentence.
    cost : str
        Its cost in passes over the data and ``p x p`` work.
    reference : Reference or None
        The publication that defines it.
    space : {"gram", "coordinate", "vector"}
        Where it computes (an instance may narrow it, see ``Rule.space``).
    translation_invariant : bool
        For a Gram rule: its coefficients sum to 1 and do not change when
        every input moves by one vector, so it may be given the Gram of the
        inputs shifted by a central one (exact distances under large offsets).
    call_inputs : mapping of str to str
        The inputs the rule needs on every call besides the gradients, each
        with what it is (FLTrust: ``{"reference": "the server's reference
        gradient g0 ..."}``). Each is given per call, ``rule(G, reference=g0)``,
        or once as the constructor parameter of the same name (declared in
        ``params``); a call with neither is a TypeError naming the input.
        Generic callers (the Flower strategy, the simulated cluster's root
        gradient, loops over every rule) read this to supply them. Empty for
        a rule that needs the gradients alone (every other rule).
    breakdown : str
        Empty for a rule whose guarantee holds against any ``f`` inputs
        within its bound; otherwise, in one sentence, the inputs against
        which it has none (DnC: Byzantine inputs of several magnitudes).
    """

    params: Mapping[str, Constraint]
    bound: Bound | None = MAJORITY
    nan_policy: str = ""
    cost: str = ""
    reference: Reference | None = None
    space: Space = "gram"
    translation_invariant: bool = False
    call_inputs: Mapping[str, str] = field(default_factory=dict)
    breakdown: str = ""

    def __post_init__(self) -> None:
        # A per-call input may also be given once to the constructor: it must be a
        # declared parameter (None: given per call), so that get_rule accepts it.
        missing = [k for k in self.call_inputs if k not in self.params]
        if missing:
            raise TypeError(f"a per-call input must also be a constructor parameter (None "
                            f"by default): {missing} not in params")


@dataclass(frozen=True, kw_only=True)
class Solution:
    """What a rule's solver found, before the aggregate is formed; the base class does the rest.

    Attributes
    ----------
    coefficients : ndarray of shape (p,) or None
        ``out = sum_i c_i g_i`` for a linear rule; None for the others.
    excluded : tuple of (int, str)
        Inputs left out, with the reason (usually ``K.excluded``).
    selected, scores, n_iter, converged, objective_history, details
        As the fields of :class:`flagagg.AggregationResult` of those names.
    late : callable or None
        Costly diagnostics of the rule's own, formed only when a result is
        handed out: returns a dataclass whose fields are more fields of the
        rule's ``result_type``.

    A rule whose result type adds fields (the Flag Aggregator's
    :class:`~flagagg.FlagResult`) returns a subclass of this class that
    declares them under the same names.
    """

    coefficients: np.ndarray | None = None
    excluded: tuple[tuple[int, str], ...] = ()
    selected: tuple[int, ...] = ()
    scores: np.ndarray | None = None
    n_iter: int = 0
    converged: bool | None = None
    objective_history: np.ndarray = field(default_factory=lambda: np.zeros(0))
    details: Mapping[str, Any] = field(default_factory=dict)
    late: Callable[[], Any] | None = field(default=None, repr=False, compare=False)


def result_fields(value: Any, *, leave: tuple[str, ...] = ("late",)) -> dict[str, Any]:
    """The fields of a dataclass instance as keyword arguments (shallow: no copies)."""
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)
            if f.name not in leave}


@dataclass(frozen=True)
class WorkerStats:
    """Each input against the output: what the per-input diagnostics are formed from.

    Attributes
    ----------
    cosine : ndarray of shape (p,)
        ``cos(g_i, out)``; NaN for unused and zero inputs.
    share : ndarray of shape (p,)
        ``<g_i, out> / ||out||^2``; NaN for unused inputs.
    norms : ndarray of shape (p,)
        ``||g_i||`` in one unit for all inputs (``inf`` where that overflows).
    out_ok : bool
        Whether ``||out||`` is finite and positive.
    K : ndarray of shape (p, p) or None
        The inputs' Gram in one unit, for the consensus of "pulls against".
    """

    cosine: np.ndarray
    share: np.ndarray
    norms: np.ndarray
    out_ok: bool
    K: np.ndarray | None = None


@dataclass(frozen=True)
class Outcome:
    """What a rule's data-space solver returns: the aggregate and its :class:`Solution`.

    Attributes
    ----------
    aggregate : array or pytree
        Shaped like one input.
    solution : Solution
    gram : Gram or None
        The inputs' Gram matrix, when the rule built one: a linear rule's
        per-input diagnostics then need no further pass over the data,
        formed only when a result is asked for. It may be the Gram of the
        ``p`` inputs followed by vectors of the rule's own with no part in
        the output (FLTrust's reference, Aksel's median).
    stats : WorkerStats or None
        Diagnostics' inputs the rule formed itself (centered clipping from its
        augmented Gram). Without ``gram`` or ``stats``, a result asked for
        costs one more pass (the Gram of the inputs and the output).
    """

    aggregate: Any
    solution: Solution
    gram: Any = None
    stats: WorkerStats | None = None
