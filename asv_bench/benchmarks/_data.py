"""Data builders and the paired-ratio timer, shared by the asv suite and ``make bench``.

Nothing here imports flagagg: the asv suite runs these against old commits
too, whose API may differ.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# The rule names the suite benchmarks. A fixed list, not flagagg.available_rules():
# asv discovers the parameters once and runs them on every commit by index, so
# the list must not change with the commit being measured.
RULES = ["bulyan", "centered_clipping", "flag", "geometric_median", "krum", "mda", "meamed",
         "mean", "median", "multi_krum", "phocas", "trimmed_mean",
         "cge", "medoid", "monna", "caf", "smea"]  # the peers' rules (issue 24), r1


def make_stack(p: int, n: int, f: int = 3, dtype: str = "float32", seed: int = 0) -> np.ndarray:
    """A ``(p, n)`` stack: ``p - f`` honest rows around a common direction, ``f`` reversed ones.

    Generated in float32 a row at a time, so no float64 copy of the whole
    stack is made.

    Parameters
    ----------
    p, n : int
        Inputs and coordinates.
    f : int, default=3
        Faulty rows (the last ``f``), the honest ones scaled by -10.
    dtype : str, default="float32"
        Dtype of the result.
    seed : int, default=0
        Seed of :func:`numpy.random.default_rng`.

    Returns
    -------
    G : ndarray of shape (p, n)
    """
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(n, dtype=np.float32)
    G = np.empty((p, n), dtype=np.float32)
    for i in range(p):
        G[i] = base + np.float32(0.5) * rng.standard_normal(n, dtype=np.float32)
    for i in range(max(0, p - f), p):
        G[i] *= np.float32(-10.0)
    return G.astype(dtype, copy=False)


def resnet18_shapes(num_classes: int = 10, width: int = 64) -> list[tuple[int, ...]]:
    """Parameter shapes of a ResNet-18 (He et al. 2016), in ``named_parameters()`` order.

    62 tensors, 11,181,642 parameters for 10 classes at the standard width
    64 (torchvision's layout: conv1, bn1, four stages of two basic blocks,
    a 1x1 downsampling conv in the first block of stages 2-4, fc). A
    smaller ``width`` keeps the structure for quick runs.
    """
    shapes: list[tuple[int, ...]] = [(width, 3, 7, 7), (width,), (width,)]
    cin = width
    for stage in range(4):
        w = width << stage
        for block in range(2):
            first = cin if block == 0 else w
            shapes += [(w, first, 3, 3), (w,), (w,), (w, w, 3, 3), (w,), (w,)]
            if block == 0 and stage > 0:
                shapes += [(w, cin, 1, 1), (w,), (w,)]
        cin = w
    return shapes + [(num_classes, cin), (num_classes,)]


def per_layer(G: np.ndarray, shapes: list[tuple[int, ...]]) -> list[list[np.ndarray]]:
    """The rows of ``G`` as per-worker lists of per-layer arrays (each its own allocation)."""
    sizes = [math.prod(s) for s in shapes]
    if sum(sizes) != G.shape[1]:
        raise ValueError(f"the shapes hold {sum(sizes)} values, G has {G.shape[1]} columns")
    offsets = np.cumsum([0] + sizes)
    return [[np.array(g[a:b]).reshape(s) for a, b, s in zip(offsets[:-1], offsets[1:], shapes,
                                                             strict=True)] for g in G]


def seconds(fn: Callable[[], object]) -> float:
    """Seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass(frozen=True)
class Ratio:
    """Median timings of a baseline and a candidate, and the median per-pair ratio."""

    base_s: float
    cand_s: float
    ratio: float  # candidate time / baseline time


def paired_ratio(base: Callable[[], object], cand: Callable[[], object], repeats: int) -> Ratio:
    """Time ``cand`` against ``base`` in interleaved pairs.

    Parameters
    ----------
    base, cand : callable
        Called without arguments; each is called once first to warm up (JIT
        compilation, caches, page faults of first use).
    repeats : int
        Number of timed pairs. The order within a pair alternates, so a
        change of machine load hits both sides alike.

    Returns
    -------
    ratio : Ratio
        Median times and the median of ``time(cand) / time(base)`` over pairs.
    """
    base()
    cand()
    gc.collect()
    tb, tc, ratios = [], [], []
    for k in range(max(1, repeats)):
        if k % 2:
            c = seconds(cand)
            b = seconds(base)
        else:
            b = seconds(base)
            c = seconds(cand)
        tb.append(b)
        tc.append(c)
        ratios.append(c / b)
    return Ratio(statistics.median(tb), statistics.median(tc), statistics.median(ratios))
