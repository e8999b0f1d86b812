"""Per-coordinate order statistics: the one kernel family of the coordinate-wise rules.

Every coordinate-wise rule (median, trimmed mean, MeaMed, Phocas, the last
stage of Bulyan) is, per column of a ``(p, m)`` block, computed from the
sorted values ``x_(0) <= ... <= x_(q-1)`` of ``q`` selected rows:

* a *center* ``c``: the median (``center="median"``) or the mean of
  ``x_(t) .. x_(q-t-1)`` (``center="trimmed"``, ``trim=t``);
* with ``k == 0`` the result is ``c``; otherwise the mean of the ``k``
  values closest to ``c``. Those form a window ``x_(s) .. x_(s+k-1)`` of the
  sorted values, with ``s`` the number of ``u < q - k`` such that
  ``x_(u+k) - c < c - x_(u)`` (the predicate is monotone in ``u``), so of
  two values at equal distance on either side the smaller is kept.

NaN counts as ``+inf``: a NaN is an outlier above every number, so at most
``f`` of them per column are trimmed or left out of the window like any
other extreme value instead of poisoning the result.

This module holds what the backends share: the argument checks, the sorting
networks, and two array-API implementations (a sorting network of
elementwise ops, and a plain sort as the reference).
"""

from __future__ import annotations

from functools import cache, lru_cache
from typing import Any

import numpy as np
from array_api_compat import device

from .._array import chunk_columns, dtype_name
from .._namespace import array_namespace
from ._base import compute_dtype_name

__all__ = [
    "CENTERS",
    "check_args",
    "coordinate_stat_network",
    "coordinate_stat_sorted",
    "network",
    "sorting_network",
    "stat_block",
]

Array = Any
CENTERS = ("median", "trimmed")


def check_args(q: int, center: str, trim: int, k: int) -> None:
    """Validate the arguments of a coordinate statistic over ``q`` rows.

    Raises
    ------
    ValueError
        Unknown center, no rows, ``trim`` or ``k`` out of range.
    """
    if center not in CENTERS:
        raise ValueError(f"center must be one of {CENTERS}, got {center!r}")
    if q < 1:
        raise ValueError("a coordinate statistic needs at least one row, got 0")
    if center == "trimmed" and not 0 <= 2 * trim < q:
        raise ValueError(f"trimming {trim} values at each end needs q > 2 * trim: got q={q}")
    if not 0 <= k <= q:
        raise ValueError(f"the window size k must be in [0, q]: got k={k}, q={q}")


@cache
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Comparators ``(i, j)``, ``i < j``, of Batcher's merge-exchange sort of ``n`` wires.

    Knuth, TAOCP vol. 3, 5.2.2, Algorithm M. Works for any ``n`` (not only
    powers of two) with ``O(n log^2 n)`` comparators. Applying
    ``x_i, x_j = min, max`` for each comparator in order sorts any input.
    """
    comps: list[tuple[int, int]] = []
    if n < 2:
        return ()
    t = (n - 1).bit_length()
    p = 1 << (t - 1)
    while p > 0:
        q, r, d = 1 << (t - 1), 0, p
        while True:
            comps.extend((i, i + d) for i in range(n - d) if i & p == r)
            if q == p:
                break
            d, q, r = q - p, q >> 1, p
        p >>= 1
    return tuple(comps)


def needed_wires(q: int, center: str, trim: int, k: int) -> frozenset[int]:
    """Sorted positions the statistic reads individually; the others only as a set.

    The median reads the middle one or two; trimming reads the ``trim``
    values at each end (the middle is summed, in any order); a window of
    ``k`` can start anywhere in ``[0, q - k]``, so positions outside
    ``[q - k, k)`` decide it, and those inside are always summed.
    """
    need = set()
    if center == "median":
        need |= {(q - 1) // 2, q // 2}
    else:
        need |= set(range(trim)) | set(range(q - trim, q))
    if k:
        need |= set(range(q - k)) | set(range(k, q))
    return frozenset(need)


@lru_cache(maxsize=256)
def network(q: int, center: str, trim: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The sorting network pruned to what the statistic needs, as two int64 arrays.

    A comparator is dropped when neither of its wires feeds a needed
    position later: comparators only swap values, so the dropped ones leave
    the needed wires exact and the other wires holding the remaining values
    in some order, which is all a sum over them needs.
    """
    need = set(needed_wires(q, center, trim, k))
    kept = []
    for i, j in reversed(sorting_network(q)):
        if i in need or j in need:
            kept.append((i, j))
            need.update((i, j))
    kept.reverse()
    arr = np.array(kept, dtype=np.int64).reshape(-1, 2)
    return np.ascontiguousarray(arr[:, 0]), np.ascontiguousarray(arr[:, 1])


def stat_block(q: int, itemsize: int) -> int:
    """Columns per block of the compiled kernels: ``q`` rows of it fill about 32 KiB (L1)."""
    return int(min(2048, max(64, (1 << 15) // (q * itemsize) // 64 * 64)))


def _expand0(xp: Any, x: Array) -> Array:
    return xp.reshape(x, (1, x.shape[0]))


def _statistic_sorted(xp: Any, S: Array, center: str, trim: int, k: int) -> Array:
    """The statistic of each column of ``S``, sorted along axis 0 (float64, no NaN)."""
    q = S.shape[0]
    if center == "median":
        c = S[(q - 1) // 2, :] if q % 2 else (S[q // 2 - 1, :] + S[q // 2, :]) / 2
    else:
        c = xp.sum(S[trim : q - trim, :], axis=0) / (q - 2 * trim)
    if k == 0:
        return c
    c2 = _expand0(xp, c)
    if k < q:
        closer_right = (S[k:, :] - c2) < (c2 - S[: q - k, :])
        s = xp.sum(xp.astype(closer_right, xp.int64), axis=0)
    else:
        s = xp.zeros(c.shape, dtype=xp.int64, device=device(S))
    u = xp.reshape(xp.arange(q, dtype=xp.int64, device=device(S)), (q, 1))
    s2 = _expand0(xp, s)
    inside = (u >= s2) & (u < s2 + k)
    # where(), not a product with the mask: values outside may be +inf.
    zero = xp.zeros((), dtype=S.dtype, device=device(S))
    return xp.sum(xp.where(inside, S, zero), axis=0) / k


def _prepare(X: Array, rows: np.ndarray, center: str, trim: int,
             k: int) -> tuple[Any, Any, np.ndarray, int, Any]:
    """What both array-API implementations start from: (xp, device, rows, m, compute dtype)."""
    xp = array_namespace(X)
    rows = np.asarray(rows, dtype=np.int64)
    check_args(int(rows.size), center, trim, k)
    ct = getattr(xp, compute_dtype_name(dtype_name(xp, X.dtype)))
    return xp, device(X), rows, X.shape[1], ct


def coordinate_stat_sorted(X: Array, rows: np.ndarray, center: str, trim: int, k: int) -> Array:
    """Reference array-API implementation, by ``sort``; see :meth:`Backend.coordinate_stat`.

    Sorts cache-sized column chunks of the selected rows in float64, so no
    full-size float64 copy is made. The simplest of the implementations,
    which the tests compare the others with (on NumPy the network is 4 to 8
    times faster).
    """
    xp, dev, rows, m, ct = _prepare(X, rows, center, trim, k)
    idx = None if np.array_equal(rows, np.arange(X.shape[0])) else xp.asarray(rows, device=dev)
    out = xp.empty((m,), dtype=ct, device=dev)
    inf = xp.asarray(float("inf"), dtype=xp.float64, device=dev)
    step = chunk_columns(int(rows.size))
    # +inf and -inf in one window give NaN, as documented; NumPy need not warn.
    with np.errstate(invalid="ignore"):
        for start in range(0, m, step):
            stop = min(start + step, m)
            B = X[:, start:stop]
            if idx is not None:
                B = xp.take(B, idx, axis=0)
            B = xp.astype(B, xp.float64)
            S = xp.sort(xp.where(xp.isnan(B), inf, B), axis=0)
            out[start:stop] = xp.astype(_statistic_sorted(xp, S, center, trim, k), ct)
    return out


def coordinate_stat_network(X: Array, rows: np.ndarray, center: str, trim: int, k: int,
                            chunk_bytes: int = 1 << 26) -> Array:
    """Array-API implementation by a sorting network of elementwise ``minimum``/``maximum``.

    What the generic and GPU backends run: each comparator is two
    elementwise ops over a chunk of ``chunk_bytes / (8 q)`` columns (cache
    sized on a CPU, large on a GPU so that kernel launches do not
    dominate), in the compute dtype; centers and sums are float64 as in the
    compiled kernels.
    """
    xp, dev, rows, m, ct = _prepare(X, rows, center, trim, k)
    q = int(rows.size)
    net = network(q, center, trim, k)
    out = xp.empty((m,), dtype=ct, device=dev)
    inf = xp.asarray(float("inf"), dtype=ct, device=dev)
    zero = xp.zeros((), dtype=xp.float64, device=dev)
    step = max(1024, chunk_bytes // (8 * q))
    for start in range(0, m, step):
        stop = min(start + step, m)
        with np.errstate(invalid="ignore"):  # +inf - inf is NaN, as documented
            out[start:stop] = _network_chunk(xp, X, rows, start, stop, ct, inf, zero, net,
                                             center, trim, k)
    return out


def _network_chunk(xp: Any, X: Array, rows: np.ndarray, start: int, stop: int, ct: Any,
                   inf: Array, zero: Array, net: tuple[np.ndarray, np.ndarray], center: str,
                   trim: int, k: int) -> Array:
    """The statistic of columns ``start:stop`` by the sorting network (see the caller)."""
    dev = device(X)
    q = rows.size
    v = []
    for r in rows.tolist():
        x = X[r, start:stop]
        x = x if x.dtype == ct else xp.astype(x, ct)
        v.append(xp.where(xp.isnan(x), inf, x))
    for i, j in zip(net[0].tolist(), net[1].tolist(), strict=True):
        v[i], v[j] = xp.minimum(v[i], v[j]), xp.maximum(v[i], v[j])
    w = [xp.astype(x, xp.float64) for x in v]
    if center == "median":
        c = (w[(q - 1) // 2] + w[q // 2]) / 2
    else:
        c = sum(w[trim + 1 : q - trim], start=w[trim]) / (q - 2 * trim)
    if k == 0:
        return xp.astype(c, ct)
    s = xp.zeros(c.shape, dtype=xp.int64, device=dev)
    for u in range(q - k):
        s = s + xp.astype((w[u + k] - c) < (c - w[u]), xp.int64)
    acc = xp.zeros(c.shape, dtype=xp.float64, device=dev)
    for u in range(q):
        if q - k <= u < k:  # inside every possible window
            acc = acc + w[u]
        else:
            # where(), not a product with the mask: values outside may be +inf.
            acc = acc + xp.where((s <= u) & (u < s + k), w[u], zero)
    return xp.astype(acc / k, ct)
