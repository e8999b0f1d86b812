"""Numba kernels: the only module that imports numba.

Each kernel splits the columns into a number of segments that depends only on
the problem size, computes one partial per segment in a ``prange`` loop and
reduces the partials serially in segment order, so results do not depend on
the number of threads. ``fastmath`` allows reassociation and FMA contraction
(for vectorisation) but not ``nnan``/``ninf``: the NaN/Inf policy needs
non-finite values to propagate honestly.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

# No "nnan"/"ninf": excluded rows are detected from non-finite Gram entries.
_FASTMATH = {"contract", "reassoc", "nsz", "arcp"}


def _jit(signatures):
    return numba.njit(signatures, parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)


# Columns per segment: the p rows of a segment stay in L2 while all pairs are formed.
SEGMENT = 2048


@_jit(["void(float32[:, ::1], int64[::1], float64[:, :, ::1])",
       "void(float64[:, ::1], int64[::1], float64[:, :, ::1])"])
def _gram_partials(X, bounds, partials):
    """partials[s] += lower triangle of X[:, b_s:b_s+1] X[:, b_s:b_s+1]^T, in float64."""
    p = X.shape[0]
    for s in prange(bounds.size - 1):
        buf = np.empty((p, SEGMENT), dtype=np.float64)
        acc = partials[s]
        for c0 in range(bounds[s], bounds[s + 1], SEGMENT):
            w = min(SEGMENT, bounds[s + 1] - c0)
            for i in range(p):
                for c in range(w):
                    buf[i, c] = X[i, c0 + c]
            # 4 x 4 register tiles over pairs of rows (i >= j).
            for i0 in range(0, p, 4):
                for j0 in range(0, i0 + 1, 4):
                    if i0 + 4 <= p and j0 + 4 <= p:
                        a00 = a01 = a02 = a03 = 0.0
                        a10 = a11 = a12 = a13 = 0.0
                        a20 = a21 = a22 = a23 = 0.0
                        a30 = a31 = a32 = a33 = 0.0
                        for c in range(w):
                            x0 = buf[i0, c]
                            x1 = buf[i0 + 1, c]
                            x2 = buf[i0 + 2, c]
                            x3 = buf[i0 + 3, c]
                            y0 = buf[j0, c]
                            y1 = buf[j0 + 1, c]
                            y2 = buf[j0 + 2, c]
                            y3 = buf[j0 + 3, c]
                            a00 += x0 * y0
                            a01 += x0 * y1
                            a02 += x0 * y2
                            a03 += x0 * y3
                            a10 += x1 * y0
                            a11 += x1 * y1
                            a12 += x1 * y2
                            a13 += x1 * y3
                            a20 += x2 * y0
                            a21 += x2 * y1
                            a22 += x2 * y2
                            a23 += x2 * y3
                            a30 += x3 * y0
                            a31 += x3 * y1
                            a32 += x3 * y2
                            a33 += x3 * y3
                        acc[i0, j0] += a00
                        acc[i0, j0 + 1] += a01
                        acc[i0, j0 + 2] += a02
                        acc[i0, j0 + 3] += a03
                        acc[i0 + 1, j0] += a10
                        acc[i0 + 1, j0 + 1] += a11
                        acc[i0 + 1, j0 + 2] += a12
                        acc[i0 + 1, j0 + 3] += a13
                        acc[i0 + 2, j0] += a20
                        acc[i0 + 2, j0 + 1] += a21
                        acc[i0 + 2, j0 + 2] += a22
                        acc[i0 + 2, j0 + 3] += a23
                        acc[i0 + 3, j0] += a30
                        acc[i0 + 3, j0 + 1] += a31
                        acc[i0 + 3, j0 + 2] += a32
                        acc[i0 + 3, j0 + 3] += a33
                    else:
                        for i in range(i0, min(i0 + 4, p)):
                            for j in range(j0, min(j0 + 4, i + 1)):
                                t = 0.0
                                for c in range(w):
                                    t += buf[i, c] * buf[j, c]
                                acc[i, j] += t


@_jit(["void(float32[:, ::1], float64[::1], int64[::1], float32[::1], int64)",
       "void(float64[:, ::1], float64[::1], int64[::1], float64[::1], int64)"])
def _combine(X, coef, rows, out, seg):
    """Out = sum_{i in rows} coef[i] X[i], accumulated in float64 per column."""
    m = X.shape[1]
    n_seg = (m + seg - 1) // seg
    for s in prange(n_seg):
        c0 = s * seg
        c1 = min(c0 + seg, m)
        acc = np.zeros(c1 - c0, dtype=np.float64)
        for i in rows:
            a = coef[i]
            for c in range(c1 - c0):
                acc[c] += a * X[i, c0 + c]
        for c in range(c1 - c0):
            out[c0 + c] = acc[c]
