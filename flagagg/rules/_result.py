"""One result type for every rule: the aggregate and who it listened to.

Per-worker diagnostics (``influence``, ``cosine``, ``verdict``) come from
the Gram matrix of the inputs and the output, so a linear rule gets them
from the ``p x p`` algebra it already did (``<g_i, out> = (K c)_i``), with
no extra pass over the data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .._gram import Gram
from ._contract import WorkerStats, result_fields

__all__ = ["AggregationResult", "Pending", "diagnose", "linear_stats",
           "output_stats", "suspects_of", "with_diagnostics", "worker_diagnostics"]

# An input whose cosine with the output is below this pulls the other way.
AGAINST_COS = 0.0
# An input counted with less than this fraction of an equal share is down-weighted.
DOWN_SHARE = 0.5
# An input whose norm is more than this many times the median norm of the finite
# inputs is "outsized": honest gradients of one model on batches of one size differ
# in norm by far less (their norms concentrate), and the median is set by the honest
# majority whatever the f < p/2 faulty inputs send.
OUTSIZED_RATIO = 3.0


def suspects_of(verdict: tuple[str, ...]) -> tuple[int, ...]:
    """Indices whose verdict makes them suspect: excluded, outsized or pulling against."""
    return tuple(i for i, v in enumerate(verdict)
                 if v.startswith("excluded") or "outsized" in v or "pulls against" in v)


@dataclass(frozen=True)
class Column:
    """How a per-input column of :meth:`AggregationResult.summary` prints its numbers.

    ``style="f"``: fixed notation with ``decimals``, switching to scientific
    notation for huge or tiny values (an influence of 1e29 must not print 30
    digits); ``"e"``: scientific; ``"g"``: general.
    """

    width: int
    decimals: int
    sign: bool = False
    style: str = "f"

    def cell(self, value: float) -> str:
        """``value`` formatted in ``width`` characters."""
        sign = "+" if self.sign else ""
        a = abs(value)
        if self.style == "f" and not (np.isfinite(value) and a != 0
                                      and not 1e-3 <= a < 10 ** (self.width - self.decimals - 3)):
            return f"{value:>{sign}{self.width}.{self.decimals}f}"
        style = "e" if self.style == "f" else self.style
        decimals = max(self.decimals - 2, 1) if self.style == "f" else self.decimals
        return f"{value:>{sign}{self.width}.{decimals}{style}}"


@dataclass(frozen=True, kw_only=True)
class AggregationResult:
    """The outcome of one aggregation, by any rule.

    Attributes
    ----------
    aggregate : array or pytree
        The aggregate, in the input's structure, library, device and dtype.
    rule : str
        Name of the rule (``"nnm+krum"`` after pre-aggregation).
    backend : str
        Backend that computed it.
    coefficients : ndarray of shape (p,) or None
        For rules whose output is a linear combination ``out = sum_i c_i g_i``
        of the inputs; ``None`` for coordinate-wise rules.
    selected : tuple of int
        Inputs the rule selected (Krum family, MDA), else empty.
    excluded : tuple of (int, str)
        Inputs left out before aggregating, with the reason.
    scores : ndarray or None
        Per-input scores (Krum scores), where the rule has them.
    n_iter : int
        Iterations of iterative rules, else 0.
    converged : bool or None
        Whether an iterative rule met its tolerance; ``None`` when the rule
        is not iterative or ran a fixed number of steps by design.
    objective_history : ndarray
        Objective per iteration of iterative rules, else empty.
    details : dict
        Rule-specific extras.
    influence : ndarray of shape (p,) or None
        Signed share of each input in the aggregate's squared norm. For a
        linear rule ``|c_i| <g_i, out> / ||out||^2`` (the shares sum to 1
        when no coefficient is negative); for a coordinate-wise rule, which
        counts every kept input alike before sorting, ``<g_i, out> / (q
        ||out||^2)`` over the ``q`` inputs it kept (equal to the linear share
        when the rule is the mean). Its sign is always the sign of
        ``cosine``: negative means the input points against the aggregate.
        0 for excluded inputs. ``None`` when the output is zero.
    cosine : ndarray of shape (p,) or None
        ``cos(g_i, out)``; NaN for excluded inputs and zero inputs. A
        negative cosine means the input pulls against the aggregate.
    verdict : tuple of str
        One short phrase per input, the first that applies:
        ``"excluded: <reason>"``; ``"outsized"`` (norm more than
        ``OUTSIZED_RATIO = 3`` times the median norm of the finite inputs,
        or a norm that overflows: a share no honest input could have;
        ``"not selected, outsized"`` when the rule gave it no weight);
        ``"not selected"`` (coefficient 0); ``"pulls against"`` (negative
        cosine with the aggregate and, where the rule has the inputs' Gram
        matrix, with the mean of the finite inputs that are not outsized;
        also appended to ``"not selected"``);
        ``"down-weighted"`` (less than half an equal share); ``"trusted"``.
        An outsized input is never ``"trusted"``.
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
    influence: np.ndarray | None = None
    cosine: np.ndarray | None = None
    verdict: tuple[str, ...] = ()
    # The per-input diagnostics of a linear rule, not formed yet: they cost more than
    # the rule itself at small sizes, so they are formed only when a result is handed
    # out (see with_diagnostics).
    _deferred: Pending | None = field(default=None, repr=False, compare=False)

    @property
    def excluded_indices(self) -> tuple[int, ...]:
        """Indices of the excluded inputs."""
        return tuple(i for i, _ in self.excluded)

    @property
    def suspects(self) -> tuple[int, ...]:
        """Inputs that were excluded, are outsized or pull against the aggregate, ascending."""
        return suspects_of(self.verdict)

    def _header(self) -> list[str]:
        return [f"{self.rule} (backend={self.backend})"]

    def _columns(self) -> list[tuple[str, Column, np.ndarray | None]]:
        """Extra per-input columns of a subclass: (title, column format, values)."""
        return []

    def summary(self) -> str:
        """A plain-text table, one row per input, suspects marked ``<<`` and listed first.

        Returns
        -------
        text : str
        """
        p = len(self.verdict)
        lines = self._header()
        sus = self.suspects
        lines.append("  suspects (excluded, outsized or pulling the other way): "
                     + (", ".join(str(i) for i in sus) if sus else "none"))
        lines.append("")
        cols = [("influence", Column(10, 4, sign=True), self.influence),
                ("cosine", Column(7, 3, sign=True), self.cosine),
                ("coef c_i", Column(11, 3, sign=True, style="e"), self.coefficients),
                *self._columns()]
        cols = [c for c in cols if c[2] is not None]
        head = f"  {'input':>5}  " + "  ".join(
            f"{t:>{col.width}}" for t, col, _ in cols) + "  verdict"
        lines.append(head)
        for i in range(p):
            cells = "  ".join(col.cell(float(v[i])) for _, col, v in cols)
            mark = " <<" if i in sus else ""
            lines.append(f"  {i:>5}  {cells}  {self.verdict[i]}{mark}")
        return "\n".join(lines)
@dataclass(frozen=True)
class Pending:
    """The per-input diagnostics of a linear rule, to be formed from its Gram when asked for.

    ``late``: the rule's own costly diagnostics (see
    :attr:`flagagg.rules._contract.Solution.late`), formed at the same time.
    """

    gram: Gram
    coefficients: np.ndarray
    excluded: tuple[tuple[int, str], ...]
    late: Callable[[], Any] | None = None


def with_diagnostics(result: AggregationResult) -> AggregationResult:
    """``result`` with its deferred per-input diagnostics formed (itself if none are pending)."""
    pending = result._deferred
    if pending is None:
        return result
    coef = pending.coefficients
    p, extra = coef.size, pending.gram.p - coef.size
    if extra:
        # The Gram of the inputs followed by vectors of the rule's own (FLTrust's
        # reference, Aksel's median) that take no part in the output.
        st = linear_stats(pending.gram.inputs, np.append(coef, np.zeros(extra)))
        st = WorkerStats(st.cosine[:p], st.share[:p], st.norms[:p], st.out_ok)
    else:
        st = linear_stats(pending.gram.inputs, coef)
    fields = diagnose(st, coef, pending.excluded)
    if pending.late is not None:
        fields.update(result_fields(pending.late(), leave=()))
    return replace(result, _deferred=None, **fields)


def linear_stats(K: Gram, coef: np.ndarray) -> WorkerStats:
    """:class:`WorkerStats` of ``out = sum_i c_i g_i`` from the inputs' Gram, at any magnitude.

    Everything is formed from the scaled form: with ``x_i = 2^-e_i g_i`` and
    ``out = 2^top sum_j c'_j x_j`` (``c'_j = c_j 2^(e_j - top)``, ``top`` the
    largest scale), cosines and shares are ratios of representable numbers,
    so a finite input of 1e200 gets a finite cosine.
    """
    u = K.usable
    e = K.exponents
    nz = (coef != 0) & u
    S = K.masked()
    if nz.any():
        top = int((e + np.frexp(coef)[1])[nz].max())
        c = np.where(nz, np.ldexp(coef, e - top), 0.0)
    else:
        top, c = 0, np.zeros_like(coef)
    v = S @ c  # <x_i, out / 2^top>
    out_sq = float(c @ v)
    E = K.distance_exponent()
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        d = np.diag(S)
        cosine = np.where(u & (d > 0), v / np.sqrt(d * out_sq), np.nan)
        share = np.where(u, np.ldexp(v / out_sq, e - top), np.nan)
        norms = np.where(u, np.ldexp(np.sqrt(np.maximum(d, 0.0)), e - E), np.nan)
    return WorkerStats(cosine, share, norms, bool(out_sq > 0 and np.isfinite(out_sq)),
                       K.unit(E))


def output_stats(KA: Gram) -> WorkerStats:
    """:class:`WorkerStats` of the inputs against the output, from the Gram of ``[g, out]``."""
    p = KA.p - 1
    S, e, u = KA.scaled, KA.exponents, KA.usable
    E = KA.distance_exponent()
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        d = np.diag(S)[:p]
        s_o = float(S[p, p])
        ok = u[:p]
        cosine = np.where(ok & (d > 0), S[:p, p] / np.sqrt(d * s_o), np.nan)
        share = np.where(ok, np.ldexp(S[:p, p] / s_o, e[:p] - e[p]), np.nan)
        norms = np.where(ok, np.ldexp(np.sqrt(np.maximum(d, 0.0)), e[:p] - E), np.nan)
    out_ok = bool(u[p] and s_o > 0)
    return WorkerStats(cosine, share, norms, out_ok, KA.unit(E)[:p, :p])


def worker_diagnostics(
    inner: np.ndarray, sq_norms: np.ndarray, out_sq: float, coefficients: np.ndarray | None,
    excluded: tuple[tuple[int, str], ...], K: np.ndarray | None = None,
) -> dict:
    """``influence``, ``cosine`` and ``verdict`` from plain inner products with the output.

    For callers that hold plain numbers (the DDP hook, from a Gram summed
    across ranks); the rules use :func:`diagnose` on :class:`WorkerStats`
    formed from the scaled Gram.

    Parameters
    ----------
    inner : ndarray of shape (p,)
        ``<g_i, out>`` (non-finite for inputs holding NaN or Inf).
    sq_norms : ndarray of shape (p,)
        ``||g_i||^2`` (``+inf`` for a finite input whose squared norm overflows).
    out_sq : float
        ``||out||^2``.
    coefficients : ndarray of shape (p,) or None
        The linear rule's ``c_i``; ``None`` for a coordinate-wise rule.
    excluded : tuple of (int, str)
    K : ndarray of shape (p, p), optional
        The inputs' Gram matrix (same units as ``inner``).

    Returns
    -------
    fields : dict
        Keyword arguments of :class:`AggregationResult`.
    """
    ok = np.isfinite(inner) & np.isfinite(sq_norms)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cosine = np.where(ok & (sq_norms > 0), inner / np.sqrt(sq_norms * out_sq), np.nan)
        share = np.where(ok, inner / out_sq, np.nan)
        norms = np.sqrt(np.where(np.isnan(sq_norms), np.nan, sq_norms))
    stats = WorkerStats(cosine, share, norms, bool(np.isfinite(out_sq) and out_sq > 0), K)
    return diagnose(stats, coefficients, excluded)


def diagnose(stats: WorkerStats, coefficients: np.ndarray | None,
             excluded: tuple[tuple[int, str], ...]) -> dict:
    """``influence``, ``cosine`` and ``verdict`` (keyword arguments of the result) from ``stats``.

    With ``stats.K``, "pulls against" also needs a negative inner product
    with the mean of the finite inputs that are not outsized (see
    :func:`_against_consensus`).
    """
    p = stats.cosine.shape[0]
    reasons = dict(excluded)
    notex = np.ones(p, dtype=bool)
    notex[list(reasons)] = False
    ok = np.isfinite(stats.share) & notex
    share_ok = np.where(ok, stats.share, 0.0)
    cos = np.where(ok, stats.cosine, np.nan)
    norms = np.where(notex, stats.norms, np.nan)
    finite_norms = norms[np.isfinite(norms)]
    median = float(np.median(finite_norms)) if finite_norms.size else np.nan
    # A norm that overflows (inf) is outsized whatever the median.
    with np.errstate(invalid="ignore"):
        outsized = notex & ((norms == np.inf) | (norms > OUTSIZED_RATIO * median))
    if not stats.out_ok:
        influence = None
        cos = np.full(p, np.nan)
    elif coefficients is not None:
        # |c_i|: a rule that flips an input (c_i < 0) still takes what the input
        # points at against the output; the sign stays the cosine's.
        with np.errstate(invalid="ignore", over="ignore"):
            influence = np.where(ok, np.abs(coefficients) * share_ok, 0.0)
    else:
        influence = share_ok / max(int(ok.sum()), 1)
    against = np.isfinite(cos) & (cos < AGAINST_COS)
    if stats.K is not None:
        against &= _against_consensus(stats.K, ok & ~outsized)
    share = 1.0 / max(int(ok.sum()), 1)
    verdict = []
    for i in range(p):
        unselected = coefficients is not None and coefficients[i] == 0
        if i in reasons:
            verdict.append(f"excluded: {reasons[i]}")
        elif outsized[i]:
            verdict.append("not selected, outsized" if unselected else "outsized")
        elif unselected:
            verdict.append("not selected, pulls against" if against[i] else "not selected")
        elif against[i]:
            verdict.append("pulls against")
        elif influence is not None and influence[i] < DOWN_SHARE * share:
            verdict.append("down-weighted")
        else:
            verdict.append("trusted")
    return {"influence": influence, "cosine": np.clip(cos, -1.0, 1.0), "verdict": tuple(verdict)}


def _against_consensus(K: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Inputs that point against the mean of the ``normal`` inputs (sign of ``K w``).

    "Pulls against" needs both: a negative cosine with the aggregate and
    with this consensus. The aggregate alone misleads twice: a rule that
    selects one input (Krum) makes its honest peers' cosines as noisy as
    one gradient, and one huge input makes a mean point its way, so that
    every honest input would seem to pull against it. The mean of the
    inputs that are finite and not outsized is held by the honest majority.
    Inputs that are not ``normal`` keep the aggregate's verdict (True here).
    """
    out = np.ones(normal.shape[0], dtype=bool)
    if not normal.any():
        return out
    w = normal / normal.sum()
    Kn = np.where(normal[:, None] & normal[None, :], np.asarray(K, dtype=np.float64), 0.0)
    out[normal] = (Kn @ w)[normal] < 0
    return out
