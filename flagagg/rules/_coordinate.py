"""Coordinate-wise rules: median, trimmed mean, MeaMed and Phocas.

Each coordinate is aggregated on its own from the ``p`` values the inputs
give it, by the backend's order-statistics kernel
(:meth:`flagagg.backends.Backend.coordinate_stat`): one pass over the data,
sorting networks over cache-sized blocks of columns on numba.

NaN policy, shared by these rules: per coordinate, NaN counts as ``+inf``,
an outlier larger than every number. With at most ``f`` non-finite values
in a coordinate (and ``p >= 2f + 1``) they are trimmed or left out like any
other extreme value, so the output stays finite. No input is dropped as a
whole (a row with a NaN in one coordinate still counts in the others), but
every input holding NaN or Inf is reported in ``result.excluded``. When too
many do and some output coordinate is not finite, the rule raises a
ValueError instead of returning it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._array import Stack
from ..backends import Backend
from ._base import Rule, all_finite
from ._contract import F_OPTIONAL, F_REQUIRED, Contract, Outcome, Reference, Solution

__all__ = ["MeaMed", "Median", "Phocas", "TrimmedMean"]

NAN_POLICY = ("per coordinate, NaN counts as +inf, an outlier larger than every number: with "
              "at most f non-finite values in a coordinate (and p >= 2f + 1) the output stays "
              "finite. No input is dropped as a whole, but every input holding NaN or Inf is "
              "reported in result.excluded; a non-finite output coordinate is a ValueError")
COST = ("one O(p n) pass: the backend's order-statistics kernel per coordinate (sorting "
        "networks over cache-sized blocks of columns on numba)")
XIE = ("Xie", "Koyejo", "Gupta")


class _CoordinateRule(Rule):
    """A rule given by ``(center, trim, k)`` of the order-statistics kernel."""

    def _stat(self, p: int) -> tuple[str, int, int]:
        raise NotImplementedError

    def _solve_stack(self, stack: Stack, backend: Backend) -> Outcome:
        p = stack.p
        center, trim, k = self._stat(p)
        out = stack.coordinate_stat(backend, np.arange(p), center, trim, k)
        check_finite_output(self.name, stack, out, self.f)
        return Outcome(out, Solution(details={"center": center, "trim": trim, "k": k}))


def check_finite_output(rule: str, stack: Stack, out: Any, f: int | None) -> None:
    """Raise instead of returning a non-finite coordinate-wise aggregate."""
    if not all_finite(stack, out):
        tol = f"f={f}" if f is not None else "fewer than half"
        raise ValueError(
            f"{rule}: some coordinates of the aggregate are not finite: more inputs hold NaN "
            f"or Inf there than the rule tolerates ({tol}); drop those inputs or raise f"
        )


class Median(_CoordinateRule):
    """Coordinate-wise median.

    Parameters
    ----------
    f : int, optional
        Byzantine inputs to tolerate. The median needs no bound; when given,
        ``p >= 2f + 1`` is checked.

    Notes
    -----
    Per coordinate, the middle value of the sorted ``p`` values; for even
    ``p`` the mean of the two middle ones (as :func:`numpy.median`).
    Breakdown point 1/2. NaN counts as ``+inf``: fewer than ``p/2``
    non-finite values per coordinate leave the output finite.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [1e9, np.nan]])
    >>> flagagg.aggregate(G, rule="median", backend="numpy")
    array([ 2.5, 25. ])
    """

    name = "median"
    contract = Contract(params={"f": F_OPTIONAL}, nan_policy=NAN_POLICY, cost=COST,
                        space="coordinate")

    def __init__(self, f: int | None = None) -> None:
        self._store(f=f)

    def _stat(self, p: int) -> tuple[str, int, int]:
        return "median", 0, 0


class TrimmedMean(_CoordinateRule):
    """Coordinate-wise trimmed mean: drop the ``f`` largest and ``f`` smallest values.

    Parameters
    ----------
    f : int
        Values dropped at each end of every coordinate; needs ``p >= 2f + 1``.

    Notes
    -----
    Per coordinate, the mean of ``x_(f), ..., x_(p-f-1)`` (sorted values),
    as in Yin et al., "Byzantine-robust distributed learning: towards optimal
    statistical rates", ICML 2018. NaN counts as ``+inf``: up to ``f``
    non-finite values per coordinate are trimmed away.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[1.0], [2.0], [3.0], [4.0], [-1e9]])
    >>> flagagg.aggregate(G, rule="trimmed_mean", f=1, backend="numpy")
    array([2.])
    """

    name = "trimmed_mean"
    contract = Contract(
        params={"f": F_REQUIRED}, nan_policy=NAN_POLICY, cost=COST, space="coordinate",
        reference=Reference(("Yin", "Chen", "Ramchandran", "Bartlett"),
                            "Byzantine-robust distributed learning: towards optimal "
                            "statistical rates", "ICML", 2018),
    )

    def __init__(self, f: int) -> None:
        self._store(f=f)

    def _stat(self, p: int) -> tuple[str, int, int]:
        return "trimmed", self.f, 0


class MeaMed(_CoordinateRule):
    """MeaMed: per coordinate, the mean of the ``p - f`` values closest to the median.

    Parameters
    ----------
    f : int
        Byzantine inputs tolerated; needs ``p >= 2f + 1``.

    Notes
    -----
    Xie, Koyejo and Gupta, "Generalized Byzantine-tolerant SGD", 2018. The
    ``p - f`` values closest to the median form a window of the sorted
    values; of two values at the same distance on either side the smaller
    is kept, so ties are deterministic. NaN counts as ``+inf``, farther from
    the median than any number.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[1.0], [2.0], [3.0], [7.0], [1e9]])
    >>> flagagg.aggregate(G, rule="meamed", f=2, backend="numpy")
    array([2.])
    """

    name = "meamed"
    contract = Contract(
        params={"f": F_REQUIRED}, nan_policy=NAN_POLICY, cost=COST, space="coordinate",
        reference=Reference(XIE, "Generalized Byzantine-tolerant SGD", "arXiv", 2018),
    )

    def __init__(self, f: int) -> None:
        self._store(f=f)

    def _stat(self, p: int) -> tuple[str, int, int]:
        return "median", 0, p - self.f


class Phocas(_CoordinateRule):
    """Mean around the trimmed mean: the ``p - f`` values closest to the ``f``-trimmed mean.

    Parameters
    ----------
    f : int
        Byzantine inputs tolerated (and values trimmed at each end for the
        center); needs ``p >= 2f + 1``.

    Notes
    -----
    Xie, Koyejo and Gupta, "Phocas: dimensional Byzantine-resilient
    stochastic gradient descent", 2018. Per coordinate, the center is the
    trimmed mean of :class:`TrimmedMean`, and the output the mean of the
    ``p - f`` values closest to it (ties to the smaller value). NaN counts
    as ``+inf``.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[1.0], [2.0], [3.0], [7.0], [1e9]])
    >>> flagagg.aggregate(G, rule="phocas", f=1, backend="numpy")
    array([3.25])
    """

    name = "phocas"
    contract = Contract(
        params={"f": F_REQUIRED}, nan_policy=NAN_POLICY, cost=COST, space="coordinate",
        reference=Reference(XIE, "Phocas: dimensional Byzantine-resilient stochastic gradient "
                            "descent", "arXiv", 2018),
    )

    def __init__(self, f: int) -> None:
        self._store(f=f)

    def _stat(self, p: int) -> tuple[str, int, int]:
        return "trimmed", self.f, p - self.f
