"""Pre-aggregation: nearest-neighbour mixing, bucketing and static clipping, composed with any rule.

A pre-aggregation step maps the ``p`` inputs to ``p'`` new ones that are
linear combinations of them, ``Y = M G`` with a ``p' x p`` matrix ``M``
chosen from the Gram matrix. The Gram matrix of ``Y`` is ``M K M^T``, so
after one pass over the data the steps and a Gram rule after them run on
``p x p`` matrices, and the final coefficients ``M^T c`` give the output in
one combination pass: ``get_rule("krum", f=3, pre=["nnm"])`` reads the
inputs twice, like Krum. A rule that needs the data itself (coordinate-wise
rules, Bulyan, centered clipping from an array center) runs on the
materialised ``Y`` instead (one ``p' x n`` array, in the compute dtype).

NaN policy: an input holding NaN or Inf (non-finite Gram diagonal) takes
no part in any mixing: it is not anyone's neighbour, and the mixed input it
maps to (itself for NNM and clipping, its bucket for bucketing) is marked
non-finite, so the rule after the step applies its own NaN policy to it.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from .._array import Leaf, Stack, dtype_name
from .._gram import Gram
from .._validation import Anything, Int, Real
from ..backends import Backend, compute_dtype_name
from ._base import Params, Rule
from ._contract import F_REQUIRED, Contract, Outcome, Reference
from ._result import AggregationResult

__all__ = ["NNM", "Bucketing", "Clipping", "ComposedRule", "PreAggregator", "make_pre"]


class PreAggregator(Params):
    """Base class of pre-aggregation steps.

    Subclasses set ``name`` and ``contract`` (as a rule does: parameters,
    bound, NaN policy, cost, reference) and implement ``mixing(K) -> (M,
    info)``: the ``p' x p`` matrix of the new inputs as combinations of the
    current ones, given their :class:`~flagagg._gram.Gram` ``K``, and a dict
    of the step's diagnostics (``result.details["pre"]``).
    """

    name = "pre"
    contract = Contract(params={}, bound=None)

    def outputs(self, p: int) -> int:
        """Number of mixed inputs the step makes from ``p``."""
        return p
    # Whether M maps a common translation of the inputs to the same
    # translation of the outputs (rows of M sum to 1, M chosen from
    # distances only): then a shifted Gram may be used.
    translation_equivariant = False

    def mixing(self, K: Gram) -> tuple[np.ndarray, dict]:
        """Return the mixing matrix for inputs of Gram matrix ``K``."""
        raise NotImplementedError


class NNM(PreAggregator):
    """Nearest-neighbour mixing: each input becomes the mean of its ``p - f`` nearest inputs.

    Parameters
    ----------
    f : int
        Byzantine inputs tolerated; needs ``p >= 2f + 1``.

    Notes
    -----
    Allouah et al., "Fixing by mixing: a recipe for optimal Byzantine ML
    under heterogeneity", AISTATS 2023. The neighbourhood of ``g_i`` is the
    ``p - f`` inputs closest to it, itself included (ties to the lowest
    index). Inputs holding NaN or Inf are nobody's neighbour; when fewer
    than ``p - f`` finite inputs are left, all of them are used.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [1e6]])
    >>> flagagg.aggregate(G, rule="krum", f=1, pre=["nnm"], backend="numpy")
    array([3.])
    """

    name = "nnm"
    contract = Contract(
        params={"f": F_REQUIRED},
        nan_policy="inputs holding NaN or Inf are nobody's neighbour; each maps to itself, "
        "non-finite, for the rule after the step",
        cost="O(p² log p) on the Gram matrix (no pass over the data)",
        reference=Reference(("Allouah", "Farhadkhani", "Guerraoui", "Gupta", "Pinot",
                             "Stephan"), "Fixing by mixing: a recipe for optimal Byzantine ML "
                            "under heterogeneity", "AISTATS", 2023),
    )
    translation_equivariant = True

    def __init__(self, f: int) -> None:
        self._store(f=f)

    def mixing(self, K: Gram) -> tuple[np.ndarray, dict]:
        """Row ``i``: weight ``1 / (p - f)`` on each of the ``p - f`` neighbours of input ``i``."""
        p = K.p
        finite = K.usable
        D2 = K.sq_distances(K.distance_exponent())
        np.fill_diagonal(D2, -1.0)  # an input is its own first neighbour
        k = min(p - self.f, int(finite.sum()))
        A = nearest_mask(D2, k) * (1.0 / k)
        bad = np.flatnonzero(~finite)
        A[bad] = 0.0
        A[bad, bad] = 1.0
        return A, {"neighbours": k}


def nearest_mask(D2: np.ndarray, k: int) -> np.ndarray:
    """``mask[i, j]``: whether ``j`` is among the ``k`` smallest of row ``i`` of ``D2``.

    Ties go to the lowest index, so each row holds exactly the first ``k``
    of a stable argsort. One partition and a few whole-matrix operations
    (``O(p^2)``), not ``p`` sorts.
    """
    kth = np.partition(D2, k - 1, axis=1)[:, k - 1 : k]
    below = D2 < kth
    tied = D2 == kth
    room = k - np.count_nonzero(below, axis=1, keepdims=True)
    return below | (tied & (np.cumsum(tied, axis=1) <= room))


class Bucketing(PreAggregator):
    """Bucketing: average the inputs in random buckets of ``s``.

    Parameters
    ----------
    s : int, default=2
        Bucket size; the rule after it sees ``ceil(p / s)`` bucket means
        (the last bucket may be smaller).
    random_state : int, numpy.random.Generator or None, default=None
        Seed of the permutations. The generator is made once, when the step
        is built: successive calls draw new buckets, reproducibly. Draws
        are serialised by a lock, so threads sharing the step never share a
        draw (their order, hence which call gets which buckets, is theirs).

    Notes
    -----
    Karimireddy, He and Jaggi, "Byzantine-robust learning on heterogeneous
    datasets via bucketing", ICLR 2022. Each Byzantine input spoils at most
    one bucket, so ``f`` stays the bound for the rule that follows, on
    ``ceil(p / s)`` inputs. A bucket holding a non-finite input is
    non-finite.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.arange(12.0).reshape(12, 1)
    >>> rule = flagagg.get_rule("median", pre=[("bucketing", {"s": 3, "random_state": 0})])
    >>> rule(G, backend="numpy").shape
    (1,)
    """

    name = "bucketing"
    contract = Contract(
        params={"s": Int(low=1),
                "random_state": Anything("an int seed, a numpy.random.Generator or None")},
        bound=None,
        nan_policy="a bucket holding a non-finite input is non-finite",
        cost="O(p²) on the Gram matrix (no pass over the data)",
        reference=Reference(("Karimireddy", "He", "Jaggi"), "Byzantine-robust learning on "
                            "heterogeneous datasets via bucketing", "ICLR", 2022),
    )
    translation_equivariant = True

    def __init__(self, s: int = 2, random_state: Any = None) -> None:
        self._store(s=s, random_state=random_state)
        self._rng = np.random.default_rng(random_state)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # a lock cannot be pickled or copied; each copy gets its own
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def outputs(self, p: int) -> int:
        """``ceil(p / s)`` bucket means."""
        return -(-p // self.s)

    def mixing(self, K: Gram) -> tuple[np.ndarray, dict]:
        """Row ``b``: weight ``1 / |B_b|`` on the members of bucket ``b`` of a permutation."""
        p = K.shape[0]  # all it reads: a Gram or any p x p matrix
        with self._lock:
            perm = self._rng.permutation(p)
        buckets = [perm[j:j + self.s] for j in range(0, p, self.s)]
        B = np.zeros((len(buckets), p))
        for b, members in enumerate(buckets):
            B[b, members] = 1.0 / members.size
        return B, {"buckets": [tuple(int(i) for i in m) for m in buckets]}


class Clipping(PreAggregator):
    """Static norm clipping: ``g_i <- g_i min(1, tau / ||g_i||)``.

    Parameters
    ----------
    tau : float, optional
        Largest norm kept (``> 0``). By default the median norm of the
        finite inputs of each call, a threshold that a minority of huge
        inputs cannot move.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[3.0, 4.0], [0.3, 0.4], [30.0, 40.0]])
    >>> flagagg.aggregate(G, rule="mean", pre=[("clipping", {"tau": 1.0})], backend="numpy")
    array([0.5       , 0.66666667])
    """

    name = "clipping"
    contract = Contract(
        params={"tau": Real(low=0.0, strict=True, none=True)},
        bound=None,
        nan_policy="non-finite inputs are left as they are, for the rule after the step",
        cost="O(p) on the Gram matrix (no pass over the data)",
    )

    def __init__(self, tau: float | None = None) -> None:
        self._store(tau=tau)

    def mixing(self, K: Gram) -> tuple[np.ndarray, dict]:
        """Diagonal: ``min(1, tau / ||g_i||)``; 1 for zero and non-finite inputs."""
        finite = K.usable
        norms = np.where(finite, K.row_norms(), 0.0)
        tau = self.tau if self.tau is not None else (
            float(np.median(norms[finite])) if finite.any() else 1.0)
        with np.errstate(divide="ignore"):
            scale = np.where(norms > tau, tau / norms, 1.0)
        return np.diag(scale), {"tau": tau}


_PRE: dict[str, type[PreAggregator]] = {"nnm": NNM, "bucketing": Bucketing, "clipping": Clipping}
# Steps defined in modules of their own, as "module:Class", imported when first asked for
# (as the rules registry does): they subclass PreAggregator, so importing them here would
# make the two modules import each other.
_PRE_ELSEWHERE: dict[str, str] = {"arc": "flagagg.rules._peers_arc:ARC"}


def available_pre() -> list[str]:
    """Names of the pre-aggregation steps accepted by ``pre=``."""
    return sorted({*_PRE, *_PRE_ELSEWHERE})


def pre_class(name: str) -> type[PreAggregator]:
    """The class of the pre-aggregation step ``name`` (a name from :func:`available_pre`)."""
    if name not in _PRE:
        if name not in _PRE_ELSEWHERE:
            raise ValueError(
                f"unknown pre-aggregation {name!r}; available: {', '.join(available_pre())}"
            )
        module, cls = _PRE_ELSEWHERE[name].split(":")
        _PRE[name] = getattr(importlib.import_module(module), cls)
    return _PRE[name]


def _accepts(cls: Any, name: str) -> bool:
    return name in cls.contract.params


def _is_pair(spec: Any) -> bool:
    # a list too: TOML configs have arrays, not tuples
    return (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str)
            and isinstance(spec[1], Mapping))


def make_pre(spec: Any, f: int | None) -> PreAggregator:
    """Build one pre-aggregation step from a name, a ``(name, params)`` pair or an instance.

    ``f`` is passed to steps that take it unless ``params`` sets it.
    """
    if isinstance(spec, PreAggregator):
        return spec
    if isinstance(spec, str):
        name, params = spec, {}
    elif _is_pair(spec):
        name, params = spec[0], dict(spec[1])
    else:
        raise TypeError(
            "each pre-aggregation step must be a name, a (name, params) pair or a "
            f"PreAggregator; got {spec!r}"
        )
    key = name.strip().lower()
    cls = pre_class(key)
    if _accepts(cls, "f") and "f" not in params:
        if f is None:
            raise TypeError(f"pre-aggregation {key!r} needs f: pass f=... to get_rule")
        params["f"] = f
    try:
        return cls(**params)
    except TypeError as exc:
        raise TypeError(f"invalid parameters for pre-aggregation {key!r}: {exc}") from None


class ComposedRule(Rule):
    """Pre-aggregation steps followed by a rule; usually built by ``get_rule(..., pre=[...])``.

    Parameters
    ----------
    rule : Rule
        The aggregation rule applied last.
    pre : list of PreAggregator
        Steps applied in order.

    Notes
    -----
    ``result.coefficients`` are on the original inputs (``M^T c``) when the
    rule returns coefficients; ``result.selected`` and the rule's own
    diagnostics refer to the mixed inputs. ``result.excluded`` lists the
    original inputs holding NaN or Inf; ``result.details["pre"]`` has each
    step's diagnostics and ``details["mixing"]`` the overall matrix ``M``.
    A Gram rule after the steps (the Flag Aggregator included) runs in the
    Gram space and returns its own result type (a :class:`~flagagg.FlagResult`
    for ``"flag"``), whose per-input extras (reconstruction ratios, weights,
    scores) refer to the mixed inputs. ``influence``, ``cosine`` and
    ``verdict`` always refer to the original inputs.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> rule = flagagg.get_rule("krum", f=1, pre=["nnm"])
    >>> rule
    ComposedRule(rule=Krum(f=1), pre=[NNM(f=1)])
    >>> G = np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [9.0]])
    >>> rule(G, backend="numpy", return_result=True).rule
    'nnm+krum'
    """

    contract = Contract(
        params={"rule": Anything("a Rule"), "pre": Anything("a list of PreAggregator steps")},
        bound=None,  # each step and the rule check their own (see check_workers)
        space="vector",
    )

    def __init__(self, rule: Rule, pre: list[PreAggregator]) -> None:
        self.rule = rule
        self.pre = list(pre)

    @property
    def name(self) -> str:  # type: ignore[override]
        """``"step+...+rule"``, e.g. ``"nnm+krum"``."""
        return "+".join([s.name for s in self.pre] + [self.rule.name])

    @property
    def call_inputs(self) -> Mapping[str, str]:  # type: ignore[override]
        """The rule's own per-call inputs (FLTrust's reference): the steps take none."""
        return self.rule.call_inputs

    def missing_inputs(self) -> tuple[str, ...]:
        """The rule's per-call inputs not set on its constructor."""
        return self.rule.missing_inputs()

    @property
    def result_type(self) -> type[AggregationResult]:  # type: ignore[override]
        """The rule's own result type (a FlagResult after ``"flag"``)."""
        return self.rule.result_type

    @property
    def backend(self) -> str | None:  # type: ignore[override]
        """The rule's own default backend, if it has one."""
        return self.rule.backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self.rule.backend = value

    def check_workers(self, p: int) -> int:
        """Check every step on the inputs it sees, then the rule on the steps' outputs."""
        p0 = p
        for step in self.pre:
            p = step.outputs(step.check_workers(p))
        try:
            return self.rule.check_workers(p)
        except ValueError as exc:
            if p == p0:
                raise
            raise ValueError(
                f"{exc} ({self.rule.name} sees the {p} outputs of "
                f"{'+'.join(s.name for s in self.pre)} on p={p0} inputs)"
            ) from None

    def _remember(self, out: Any) -> None:
        # Stateful rules (centered clipping from the previous output) see the
        # composed output as theirs.
        self.rule._remember(out)

    def _shift(self) -> bool:
        """Whether the steps and the rule after them allow a shifted Gram."""
        if not all(step.translation_equivariant for step in self.pre):
            return False
        # A rule run on the materialised mixed inputs reads the data itself;
        # a Gram-only rule needs to be translation invariant.
        if self.rule.space == "gram":
            return self.rule.contract.translation_invariant
        return True

    def _solve_stack(self, stack: Stack, backend: Backend) -> Outcome:
        K = stack.gram(backend, shift=self._shift())
        M = None
        Kmix = K
        infos = []
        for step in self.pre:
            Mi, info = step.mixing(Kmix)
            Kmix = Kmix.transform(Mi)
            # The first step's matrix is the product so far: no p^3 product with I.
            M = Mi if M is None else Mi @ M
            infos.append({"step": step.name, **info})
        if M is None:
            M = np.eye(stack.p)
        try:
            if self.rule.space == "gram":
                sol = self.rule._solve_gram(Kmix)
                out = None
            else:
                inner = self.rule._solve_stack(_materialise(stack, M, K.usable), backend)
                sol, out = inner.solution, inner.aggregate
        except ValueError as exc:
            if M.shape[0] != stack.p:
                raise ValueError(
                    f"{exc} ({self.rule.name} sees the {M.shape[0]} outputs of "
                    f"{'+'.join(s.name for s in self.pre)} on p={stack.p} inputs)"
                ) from None
            raise
        # Coefficients, exclusions and diagnostics on the original inputs; the rule's
        # own selection and exclusions refer to the mixed ones.
        coef = None if sol.coefficients is None else M.T @ sol.coefficients
        if out is None:
            out = stack.combine(backend, coef)
        sol = replace(sol, coefficients=coef, excluded=K.excluded,
                      details={**sol.details, "pre": infos, "mixing": M,
                               "rule_excluded": sol.excluded})
        return Outcome(out, sol, gram=K if coef is not None else None)


def _materialise(stack: Stack, M: np.ndarray, finite: np.ndarray) -> Stack:
    """The mixed inputs ``M G`` as a new stack of ``(p', m)`` blocks in the compute dtype.

    Non-finite inputs are not read (``0 * nan`` would spread NaN); a mixed
    input that includes one is set to NaN, so the rule sees it as
    non-finite.
    """
    xp, dev = stack.xp, stack.device
    keep = np.flatnonzero(finite)
    bad = (M[:, ~finite] != 0).any(axis=1)
    leaves = []
    for leaf in stack.leaves:
        ct_name = compute_dtype_name(leaf.dtype_name)
        ct = getattr(xp, ct_name)
        Mk = xp.asarray(np.ascontiguousarray(M[:, keep]).astype(ct_name), device=dev)
        nan_col = xp.asarray(np.where(bad, np.nan, 0.0).astype(ct_name).reshape(-1, 1),
                             device=dev)
        idx = xp.asarray(keep.astype(np.int64), device=dev)
        Y = xp.empty((M.shape[0], leaf.size), dtype=ct, device=dev)
        for start, stop, block in stack.blocks(leaf):
            X = xp.take(block, idx, axis=0) if keep.size < stack.p else block
            if dtype_name(xp, X.dtype) != ct_name:
                X = xp.astype(X, ct)
            Y[:, start:stop] = Mk @ X + nan_col
        leaves.append(Leaf(leaf.shape, leaf.dtype_name, block=Y))
    return Stack(M.shape[0], leaves, xp, stack.library, dev, leaves[0].block, stack.unflatten)


def compose(cls: type[Rule], pre: Any, params: dict[str, Any]) -> ComposedRule:
    """Build ``cls(**params)`` behind the pre-aggregation steps ``pre``.

    ``f`` goes to the steps that take it, and to the rule when it takes it.
    """
    if isinstance(pre, (str, PreAggregator)) or _is_pair(pre):
        pre = [pre]
    f = params.get("f")
    steps = [make_pre(spec, f) for spec in pre]
    if "f" in params and not _accepts(cls, "f"):
        params = {k: v for k, v in params.items() if k != "f"}
    return ComposedRule(cls(**params), steps)
