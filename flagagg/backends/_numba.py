"""Numba backend: parallel CPU kernels for NumPy arrays.

Importing this module imports numba and loads (or compiles, once, into the
on-disk cache) the kernels of :mod:`flagagg.backends._numba_kernels`.
"""

from __future__ import annotations

import numpy as np

from . import _numba_kernels as nk
from ._numpy import NumpyBackend

# Upper bound on the partial Gram matrices: enough segments to balance any
# thread count, few enough that reducing them is negligible.
_MAX_SEGMENTS = 64
_KERNEL_DTYPES = (np.float32, np.float64)


def _kernel_blocks(X: np.ndarray):
    """Yield ``(start, stop, block)`` pieces of X that the kernels can take.

    C-contiguous float32/float64 blocks go whole; anything else (half
    precision, strided views) is converted a few MiB at a time.
    """
    if X.dtype in _KERNEL_DTYPES and X.flags.c_contiguous:
        yield 0, X.shape[1], X
        return
    dtype = np.float64 if X.dtype == np.float64 else np.float32
    step = max(nk.SEGMENT, (1 << 22) // (8 * max(X.shape[0], 1)) // nk.SEGMENT * nk.SEGMENT)
    for start in range(0, X.shape[1], step):
        stop = min(start + step, X.shape[1])
        yield start, stop, np.ascontiguousarray(X[:, start:stop], dtype=dtype)


def _segment_bounds(m: int) -> np.ndarray:
    # Depends on m only, so the float64 sums (and the result) do not depend
    # on how many threads run.
    n_seg = max(1, min(_MAX_SEGMENTS, -(-m // nk.SEGMENT)))
    per = -(-m // n_seg)
    per = -(-per // nk.SEGMENT) * nk.SEGMENT
    return np.minimum(np.arange(n_seg + 1, dtype=np.int64) * per, m)


class NumbaBackend(NumpyBackend):
    """Numba-parallel Gram and combine kernels on NumPy arrays."""

    name = "numba"

    def gram(self, X: np.ndarray) -> np.ndarray:
        """Float64 ``X @ X.T``: register-tiled, segment partials reduced in order."""
        p = X.shape[0]
        K = np.zeros((p, p))
        for _, _, B in _kernel_blocks(X):
            bounds = _segment_bounds(B.shape[1])
            partials = np.zeros((bounds.size - 1, p, p))
            nk._gram_partials(B, bounds, partials)
            K += partials.sum(axis=0)
        K = np.tril(K)
        return K + np.tril(K, -1).T

    def combine(self, coef: np.ndarray, X: np.ndarray) -> np.ndarray:
        """``sum_i coef[i] X[i]`` over non-zero coefficients, float64 accumulation."""
        rows = np.flatnonzero(coef).astype(np.int64)
        out_dtype = np.float64 if X.dtype == np.float64 else np.float32
        out = np.empty(X.shape[1], dtype=out_dtype)
        coef = np.ascontiguousarray(coef, dtype=np.float64)
        for start, stop, B in _kernel_blocks(X):
            nk._combine(B, coef, rows, out[start:stop], nk.SEGMENT)
        return out


BACKEND = NumbaBackend()
