"""Adaptive robust clipping (ARC), a pre-aggregation step."""

from __future__ import annotations

import numpy as np

from .._gram import Gram
from ._contract import F_REQUIRED, Contract, Reference
from ._pre import PreAggregator

__all__ = ["ARC", "arc_clipped", "arc_scales"]


def arc_clipped(p: int, f: int) -> int:
    """How many inputs ARC clips: ``k = floor(2 f (p - f) / p)`` (exact integer arithmetic)."""
    return (2 * f * (p - f)) // p


def arc_scales(norms: np.ndarray, usable: np.ndarray, f: int) -> tuple[np.ndarray, float]:
    """Per-input factors ``min(1, C / ||g_i||)`` and the threshold ``C``.

    ``C`` is the ``(k + 1)``-th largest norm, ``k`` from :func:`arc_clipped`;
    unusable inputs (NaN or Inf) count as ``+inf`` (they are among the
    largest) and keep the factor 1 (the step marks them non-finite).
    """
    p = norms.size
    key = np.where(usable, norms, np.inf)
    C = float(np.sort(key)[p - 1 - arc_clipped(p, f)])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale = np.where(usable & (key > C), C / key, 1.0)
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
    norm ``C``, the others are unchanged. The threshold adapts to each call,
    so there is nothing to tune. The norms are the Gram diagonal and the
    step is a diagonal mixing matrix: a Gram rule after it still reads the
    inputs twice, and the norms are exact at any magnitude. It scales by
    norms, so it does not commute with translations (no shifted Gram).

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [300.0, 400.0]])
    >>> flagagg.aggregate(G, rule="mean", f=1, pre=["arc"], backend="numpy")
    array([1.75, 2.5 ])
    """

    name = "arc"
    contract = Contract(
        params={"f": F_REQUIRED},
        nan_policy="an input holding NaN or Inf ranks among the largest and stays as it is, "
        "non-finite, for the rule after the step",
        cost="O(p log p) on the Gram matrix (no pass over the data)",
        reference=Reference(("Allouah", "Guerraoui", "Gupta", "Jellouli", "Rizk", "Stephan"),
                            "The vital role of gradient clipping in Byzantine-resilient "
                            "distributed learning", "arXiv:2405.14432", 2024),
    )

    def __init__(self, f: int) -> None:
        self._store(f=f)

    def mixing(self, K: Gram) -> tuple[np.ndarray, dict]:
        """Diagonal: ``min(1, C / ||g_i||)``; 1 for non-finite inputs."""
        p = K.p
        scale, C = arc_scales(K.inputs.row_norms(), K.usable, self.f)
        return np.diag(scale), {"threshold": C, "clipped": arc_clipped(p, self.f)}

