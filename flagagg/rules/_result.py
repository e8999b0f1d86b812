"""One result type for every rule: the aggregate and who it listened to.

Per-worker diagnostics (``influence``, ``cosine``, ``verdict``) come from
the Gram matrix of the inputs and the output, so a linear rule gets them
from the ``p x p`` algebra it already did (``<g_i, out> = (K c)_i``), with
no extra pass over the data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._gram import unshifted

__all__ = ["AggregationResult", "RuleResult", "deferred_diagnostics", "suspects_of",
           "with_diagnostics", "worker_diagnostics"]

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


def _fmt(value: float, sign: str, width: int, decimals: int) -> str:
    """``value`` in fixed notation when it reads well there, else scientific, in ``width``."""
    a = abs(value)
    if np.isfinite(value) and a != 0 and not (1e-3 <= a < 10 ** (width - decimals - 3)):
        return f"{value:>{sign}{width}.{max(decimals - 2, 1)}e}"
    return f"{value:>{sign}{width}.{decimals}f}"


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
    # (K, coef, excluded, late) of a linear rule whose per-input diagnostics are not
    # computed yet: they cost more than the rule itself at small sizes, so they
    # are formed only when a result is handed out (see with_diagnostics).
    _deferred: tuple | None = field(default=None, repr=False, compare=False)

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

    def _columns(self) -> list[tuple[str, str, np.ndarray | None]]:
        """Extra per-input columns of a subclass: (title, format, values)."""
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
        cols = [("influence", "{:>+10.4f}", self.influence), ("cosine", "{:>+7.3f}", self.cosine),
                ("coef c_i", "{:>+11.3e}", self.coefficients), *self._columns()]
        cols = [c for c in cols if c[2] is not None]
        head = f"  {'input':>5}  " + "  ".join(
            f"{t:>{len(fmt.format(0.0))}}" for t, fmt, _ in cols) + "  verdict"
        lines.append(head)

        def cell(fmt: str, value: float) -> str:
            # Fixed-point columns switch to scientific notation for huge or tiny
            # values (an influence of 1e29 must not print 30 digits).
            m = re.fullmatch(r"\{:>(\+?)(\d+)\.(\d+)f\}", fmt)
            if m:
                return _fmt(value, m[1], int(m[2]), int(m[3]))
            return fmt.format(value)

        for i in range(p):
            cells = "  ".join(cell(fmt, float(v[i])) for _, fmt, v in cols)
            mark = " <<" if i in sus else ""
            lines.append(f"  {i:>5}  {cells}  {self.verdict[i]}{mark}")
        return "\n".join(lines)


RuleResult = AggregationResult  # the earlier name, kept for code that imports it


def worker_diagnostics(
    inner: np.ndarray, sq_norms: np.ndarray, out_sq: float, coefficients: np.ndarray | None,
    excluded: tuple[tuple[int, str], ...], K: np.ndarray | None = None,
) -> dict:
    """``influence``, ``cosine`` and ``verdict`` from inner products with the output.

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
        The inputs' Gram matrix (same units as ``inner``): with it, "pulls
        against" also needs a negative inner product with the mean of the
        finite inputs that are not outsized (see :func:`_against_consensus`).

    Returns
    -------
    fields : dict
        Keyword arguments of :class:`AggregationResult`.
    """
    p = inner.shape[0]
    reasons = dict(excluded)
    notex = np.ones(p, dtype=bool)
    notex[list(reasons)] = False
    ok = np.isfinite(inner) & np.isfinite(sq_norms) & notex
    inner = np.where(ok, inner, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cos = np.where(ok & (sq_norms > 0), inner / np.sqrt(sq_norms * out_sq), np.nan)
        norms = np.sqrt(np.where(notex & ~np.isnan(sq_norms), sq_norms, np.nan))
    finite_norms = norms[np.isfinite(norms)]
    median = float(np.median(finite_norms)) if finite_norms.size else np.nan
    # A norm that overflows (inf) is outsized whatever the median.
    with np.errstate(invalid="ignore"):
        outsized = notex & ((norms == np.inf) | (norms > OUTSIZED_RATIO * median))
    if not np.isfinite(out_sq) or out_sq <= 0:
        influence = None
        cos = np.full(p, np.nan)
    elif coefficients is not None:
        # |c_i|: a rule that flips an input (c_i < 0) still takes what the input
        # points at against the output; the sign stays the cosine's.
        influence = np.where(ok, np.abs(coefficients) * inner, 0.0) / out_sq
    else:
        influence = inner / (max(int(ok.sum()), 1) * out_sq)
    against = np.isfinite(cos) & (cos < AGAINST_COS)
    if K is not None:
        against &= _against_consensus(K, ok & ~outsized)
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


def deferred_diagnostics(K: np.ndarray, coef: np.ndarray,
                         excluded: tuple[tuple[int, str], ...], late: Any = None) -> dict:
    """Keyword arguments of :class:`AggregationResult` that defer :func:`gram_diagnostics`.

    The rule's hot path keeps a reference to the ``p x p`` Gram and the
    coefficients; :func:`with_diagnostics` forms the columns when a caller
    asks for the result. ``late``, if given, is a function returning more
    fields of the result, formed at the same time (a rule's own costly
    diagnostics, such as the Flag Aggregator's final eigenvalues); a rule's
    ``_coefficients`` hands it over as ``extras["_late"]``.
    """
    return {"_deferred": (K, coef, excluded, late)}


def with_diagnostics(result: AggregationResult) -> AggregationResult:
    """``result`` with its deferred per-input diagnostics formed (itself if none are pending)."""
    if result._deferred is None:
        return result
    from dataclasses import replace

    K, coef, excluded, late = result._deferred
    fields = gram_diagnostics(K, coef, excluded)
    if late is not None:
        fields.update(late())
    return replace(result, _deferred=None, **fields)


def gram_diagnostics(K: np.ndarray, coef: np.ndarray,
                     excluded: tuple[tuple[int, str], ...]) -> dict:
    """:func:`worker_diagnostics` of a linear rule, from the Gram matrix alone (no data pass).

    Inner products with the inputs need the Gram of the inputs themselves,
    so a shifted Gram (exact distances) hands over its first, unshifted pass.
    """
    inner, sq_norms, out_sq, K = gram_stats(K, coef)
    return worker_diagnostics(inner, sq_norms, out_sq, coef, excluded, K)


def gram_stats(K: np.ndarray, coef: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """``<g_i, out>``, ``||g_i||^2``, ``||out||^2`` and the plain Gram, for ``out = sum c_i g_i``.

    Arguments of :func:`worker_diagnostics` (the DDP hook calls it on a Gram
    matrix summed across ranks).
    """
    K = np.asarray(unshifted(K), dtype=np.float64)
    finite = np.isfinite(np.diag(K))
    Kf = np.where(finite[:, None] & finite[None, :], K, 0.0)
    inner = Kf @ coef
    inner[~finite] = np.nan
    out_sq = float(coef @ Kf @ coef)
    return inner, np.diag(K), out_sq, K
