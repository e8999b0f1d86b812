"""Adaptive robust clipping (ARC), a pre-aggregation step."""

from __future__ import annotations

import numpy as np

from ._base import check_f, finite_rows, row_norms, validate_f
from ._pre import PreAggregator

__all__ = ["ARC", "arc_clipped", "arc_scales"]


def arc_clipped(p: int, f: int) -> int:
    """How many inputs ARC clips: ``k = floor(2 f (p - f) / p)`` (exact integer arithmetic)."""
    return (2 * f * (p - f)) // p


def arc_scales(norms: np.ndarray, finite: np.ndarray, f: int) -> tuple[np.ndarray, float]:
    """Per-input factors ``min(1, C / ||g_i||)`` and the threshold ``C``.

    ``C`` is the ``(k + 1)``-th largest norm, ``k`` from :func:`arc_clipped`;
    inputs holding NaN or Inf count as ``+inf`` (they are among the largest)
    and keep the factor 1 (the step marks them non-finite).
    """
    p = norms.size
    key = np.where(finite, norms, np.inf)
    C = float(np.sort(key)[p - 1 - arc_clipped(p, f)])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale = np.where(finite & (key > C), C / key, 1.0)
    return scale, C


class ARC(PreAggregator):
    """Adaptive robust clipping: clip every input to the ``(k+1)``-th largest norm.

    Parameters
    ----------
    f : int
        Byzantine inputs tolerated; needs ``p >= 2f + 1``.

    Notes
    -----
    Allouah, Guerraoui, Gupta, Jellouli, Rizk and Stephan, "The vital role
    of gradient clipping in Byzantine-resilient distributed learning",
    arXiv:2405.14432, 2024. With ``k = floor(2 f (p - f) / p)`` (at most
    ``p / 2``) and ``C`` the ``(k + 1)``-th largest input norm, every input
    becomes ``min(1, C / ||g_i||) g_i``: the ``k`` largest are clipped to
    norm ``C``, the others unchanged. The threshold adapts to each call, so
    no tuning is needed. The norms are the Gram diagonal and the step is a
    diagonal mixing matrix: a Gram rule after it still reads the inputs
    twice, and the norms are exact at any magnitude. It scales by norms, so
    it does not commute with translations (no shifted Gram).

    NaN policy: an input holding NaN or Inf ranks as the largest and stays
    non-finite, for the rule after the step to handle.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [300.0, 400.0]])
    >>> flagagg.aggregate(G, rule="mean", f=1, pre=["arc"], backend="numpy")
    array([1.75, 2.5 ])
    """

    name = "arc"
    p_bound = (2, 1)

    def __init__(self, f: int) -> None:
        self.f = validate_f(self.name, f)

    def mixing(self, K: np.ndarray) -> tuple[np.ndarray, dict]:
        """Diagonal: ``min(1, C / ||g_i||)``; 1 for non-finite inputs."""
        p = K.shape[0]
        check_f(self.name, self.f, p, 2 * self.f + 1, "p >= 2f + 1")
        finite, _ = finite_rows(K)
        scale, C = arc_scales(row_norms(K), finite, self.f)
        return np.diag(scale), {"threshold": C, "clipped": arc_clipped(p, self.f)}
