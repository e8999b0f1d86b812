"""Generic backend: the kernels written once against the array API.

It runs on any array-API namespace (NumPy, PyTorch, CuPy, array-api-strict)
and is the reference the specialised backends are tested against. Float64
accumulation of a lower-precision input goes a cache-sized chunk of columns
at a time, so no float64 copy of the whole input is ever made.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import device

from .._array import chunk_columns, dtype_name, to_numpy
from .._namespace import array_namespace
from ._base import compute_dtype_name
from ._order_stats import coordinate_stat_network

Array = Any


def _dtype(xp: Any, name: str) -> Any:
    return getattr(xp, name)


def symmetric(K: Any) -> np.ndarray:
    """A float64 NumPy copy of ``K``, made exactly symmetric.

    Library matrix products need not return ``X @ X.T`` bit-symmetric.
    """
    K = np.array(K, dtype=np.float64)
    return (K + K.T) / 2


def transformed_chunk(xp: Any, X: Array, ref: int | None, s: Array | None) -> Array:
    """Float64 ``s * X - s * X[ref]`` of a column chunk (each part optional).

    Scaling comes first: with ``s`` the powers of two that bring each row
    near unit size, neither product nor difference can overflow.
    """
    B = X if X.dtype == xp.float64 else xp.astype(X, xp.float64)
    if s is not None:
        if ref is not None:
            return B * s - s * B[ref : ref + 1, :]
        return B * s
    if ref is not None:
        return B - B[ref : ref + 1, :]
    return B


def _nonzero_runs(coef: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of consecutive non-zero coefficients."""
    nz = np.concatenate([[False], np.asarray(coef) != 0, [False]])
    edges = np.flatnonzero(nz[1:] != nz[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _combine_runs(c: Array, X: Array, runs: list[tuple[int, int]], xp: Any = None,
                  dtype: Any = None) -> Array:
    """``sum over runs of c[a:b] @ X[a:b]``: rows outside the runs are never read.

    With ``dtype``, each run is first converted with ``xp.astype``.
    """
    out = None
    for a, b in runs:
        rows = X[a:b, :] if dtype is None else xp.astype(X[a:b, :], dtype)
        part = c[a:b] @ rows
        out = part if out is None else out + part
    return out


class ArrayAPIBackend:
    """Kernels in plain array-API calls; accepts arrays of any namespace."""

    name = "array_api"

    def accepts(self, x: Array) -> bool:
        """Accept every array-API array."""
        return True

    # Bytes of one float64 chunk of columns: cache-sized on a CPU; the GPU
    # backends raise it so that kernel launches do not dominate.
    chunk_bytes = 1 << 22

    def _step(self, rows: int) -> int:
        return chunk_columns(rows, self.chunk_bytes)

    def gram(self, X: Array, ref: int | None = None,
             scale: np.ndarray | None = None) -> np.ndarray:
        """Float64 ``Y @ Y.T``, accumulated chunk by chunk for lower precisions.

        ``Y`` is ``X``, shifted by row ``ref`` and scaled by ``scale`` when
        given (see :meth:`flagagg.backends.Backend.gram`). Only the ``p x p``
        result leaves the device.
        """
        xp = array_namespace(X)
        if ref is None and scale is None and X.dtype == xp.float64:
            return symmetric(to_numpy(X @ X.T))
        p, m = X.shape
        dev = device(X)
        K = xp.zeros((p, p), dtype=xp.float64, device=dev)
        s = None if scale is None else xp.asarray(
            np.asarray(scale, dtype=np.float64).reshape(p, 1), device=dev)
        step = self._step(p)
        for start in range(0, m, step):
            B = transformed_chunk(xp, X[:, start : min(start + step, m)], ref, s)
            K = K + B @ B.T
        return symmetric(to_numpy(K))

    def combine(self, coef: np.ndarray, X: Array) -> Array:
        """``coef @ X`` in the compute dtype, skipping rows whose coefficient is zero.

        The rows with non-zero coefficients are taken as runs of consecutive
        rows, each a view of ``X``, so nothing is gathered or copied (inputs
        in half precision are converted a chunk of columns at a time).
        """
        xp = array_namespace(X)
        dev = device(X)
        ct_name = compute_dtype_name(dtype_name(xp, X.dtype))
        ct = _dtype(xp, ct_name)
        p, m = X.shape
        runs = _nonzero_runs(coef)
        if not runs:
            return xp.zeros((m,), dtype=ct, device=dev)
        # The only host -> device traffic: the p coefficients.
        c = xp.asarray(np.asarray(coef, dtype=ct_name), device=dev)
        if X.dtype == ct:
            return _combine_runs(c, X, runs)
        out = xp.empty((m,), dtype=ct, device=dev)
        step = self._step(p)
        for start in range(0, m, step):
            stop = min(start + step, m)
            out[start:stop] = _combine_runs(c, X[:, start:stop], runs, xp, ct)
        return out

    def coordinate_stat(self, X: Array, rows: np.ndarray, center: str, trim: int,
                        k: int) -> Array:
        """Per-column order statistic of ``X[rows]``: a sorting network of elementwise min/max."""
        return coordinate_stat_network(X, rows, center, trim, k, chunk_bytes=self.chunk_bytes)


    # Leaves given as p separate 1-D rows (pytrees): the generic path gathers
    # a chunk of columns of the rows it needs at a time, never a whole leaf.

    def _row_chunks(self, rows: list) -> Any:
        """Yield ``(start, stop, block)``: column chunks of ``rows`` stacked into ``(q, w)``."""
        xp = array_namespace(rows[0])
        m = int(rows[0].shape[0])
        step = self._step(len(rows))
        for start in range(0, m, step):
            stop = min(start + step, m)
            yield start, stop, xp.stack([r[start:stop] for r in rows], axis=0)

    def gram_rows(self, leaves: list) -> np.ndarray:
        """Float64 Gram matrix summed over leaves, each given as its ``p`` rows."""
        p = len(leaves[0])
        K = np.zeros((p, p))
        for rows in leaves:
            for _, _, block in self._row_chunks(rows):
                K += self.gram(block)
        return K

    def _map_row_chunks(self, leaves: list, fn: Any) -> list:
        outs = []
        for rows in leaves:
            out = None
            for start, stop, block in self._row_chunks(rows):
                part = fn(block)
                if start == 0 and stop == rows[0].shape[0]:
                    out = part
                    break
                if out is None:
                    xp = array_namespace(part)
                    out = xp.empty((rows[0].shape[0],), dtype=part.dtype, device=device(part))
                out[start:stop] = part
            outs.append(out)
        return outs

    def combine_rows(self, coef: np.ndarray, leaves: list) -> list:
        """Per-leaf ``sum_i coef[i] g_i`` of leaves given as rows; zero-weight rows are not read."""
        nz = np.flatnonzero(coef)
        if nz.size == 0:
            # Zeros in the compute dtype, as combine() returns them.
            return [self.combine(np.zeros(1), array_namespace(rows[0]).reshape(rows[0], (1, -1)))
                    for rows in leaves]
        c = np.ascontiguousarray(coef[nz], dtype=np.float64)
        return self._map_row_chunks([[rows[i] for i in nz.tolist()] for rows in leaves],
                                    lambda block: self.combine(c, block))

    def coordinate_stat_rows(self, leaves: list, rows: np.ndarray, center: str, trim: int,
                             k: int) -> list:
        """Per-leaf coordinate statistic of the rows ``rows`` of leaves given as rows."""
        sel = np.asarray(rows, dtype=np.int64)
        local = np.arange(sel.size, dtype=np.int64)
        return self._map_row_chunks(
            [[leaf[i] for i in sel.tolist()] for leaf in leaves],
            lambda block: self.coordinate_stat(block, local, center, trim, k))


BACKEND = ArrayAPIBackend()
