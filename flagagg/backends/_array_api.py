"""Generic backend: the kernels written once against the array API.

It runs on any array-API namespace (NumPy, PyTorch, CuPy, array-api-strict)
and is the reference the specialised backends are tested against. Float64
accumulation of a lower-precision input goes a cache-sized chunk of columns
at a time, so no float64 copy of the whole input is ever made.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace, device

from .._array import chunk_columns, dtype_name, to_numpy
from ._base import compute_dtype_name

Array = Any


def _dtype(xp: Any, name: str) -> Any:
    return getattr(xp, name)


class ArrayAPIBackend:
    """Kernels in plain array-API calls; accepts arrays of any namespace."""

    name = "array_api"

    def accepts(self, x: Array) -> bool:
        """Accept every array-API array."""
        return True

    def gram(self, X: Array) -> np.ndarray:
        """Float64 ``X @ X.T``, accumulated chunk by chunk for lower precisions."""
        xp = array_namespace(X)
        if X.dtype == xp.float64:
            return np.array(to_numpy(X @ X.T), dtype=np.float64)
        p, m = X.shape
        K = xp.zeros((p, p), dtype=xp.float64, device=device(X))
        step = chunk_columns(p)
        for start in range(0, m, step):
            B = xp.astype(X[:, start : min(start + step, m)], xp.float64)
            K = K + B @ B.T
        return np.array(to_numpy(K), dtype=np.float64)

    def combine(self, coef: np.ndarray, X: Array) -> Array:
        """``coef @ X`` in the compute dtype, skipping rows whose coefficient is zero."""
        xp = array_namespace(X)
        dev = device(X)
        ct_name = compute_dtype_name(dtype_name(xp, X.dtype))
        ct = _dtype(xp, ct_name)
        p, m = X.shape
        nonzero = np.flatnonzero(coef)
        if nonzero.size == p and X.dtype == ct:
            return xp.asarray(coef.astype(ct_name), device=dev) @ X
        out = xp.zeros((m,), dtype=ct, device=dev)
        if nonzero.size == 0:
            return out
        idx = xp.asarray(nonzero.astype(np.int64), device=dev)
        c = xp.asarray(coef[nonzero].astype(ct_name), device=dev)
        step = chunk_columns(p)
        for start in range(0, m, step):
            stop = min(start + step, m)
            block = xp.take(X[:, start:stop], idx, axis=0)
            out[start:stop] = c @ xp.astype(block, ct)
        return out


BACKEND = ArrayAPIBackend()
