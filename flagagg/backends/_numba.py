"""Numba backend: parallel CPU kernels for NumPy arrays.

Importing this module imports numba and loads (or compiles, once, into the
on-disk cache) the kernels of :mod:`flagagg.backends._numba_kernels`.
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import _numba_kernels as nk
from ._array_api import symmetric, transformed_chunk
from ._numba_kernels import SEGMENT
from ._numpy import NumpyBackend
from ._order_stats import check_args, network, stat_block
from ._rows import RowTable, row_tables, scatter
from ._threads import thread_cap

# From this many rows on, the Gram goes to float64 BLAS (syrk) on converted
# column chunks: the p^2/2 products per column outweigh the conversion, and
# BLAS's cache blocking beats the register tiles (measured 1.5x at p = 256,
# 2.8x at p = 1024 against dgemm on a float64 copy before this switch).
BLAS_MIN_ROWS = 96
# Bytes of one float64 chunk for the BLAS path and the shifted/scaled Gram.
_BLAS_CHUNK_BYTES = 1 << 23
# Upper bound on the segments (and partial Gram matrices): enough to balance
# any thread count, few enough that reducing them is negligible.
_MAX_SEGMENTS = 64
_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Bytes of one Gram chunk (p rows x width columns): it stays in L2 while the
# register tiles of row pairs sweep over it.
_GRAM_CHUNK_BYTES = 1 << 19
# Columns of the float64 accumulator of the combine kernel (16 KiB, in L1).
_COMBINE_WIDTH = 2048
# Columns converted at a time for inputs the kernels cannot read in place.
_CONVERT_BYTES = 1 << 22
# Below this much work (about 2 ms on one core) the kernels run on the
# calling thread only. Waking the pool costs ~10 us on an idle machine, but on
# a busy one every parallel region waits for a worker that the OS has
# descheduled: a whole time slice, measured at 10-16 ms on the 2-core
# development box for a 1.4 ms Gram. Gram: products p(p+1)/2 * m; combine:
# elements read.
_PARALLEL_MIN_PRODUCTS = 1 << 25
_PARALLEL_MIN_ELEMENTS = 1 << 23


@contextlib.contextmanager
def _threads(parallel: bool):
    """Run the enclosed kernels on numba's threads (at most the process's cap), or on one."""
    previous = numba.get_num_threads()
    n = 1
    if parallel:
        cap = thread_cap()
        n = previous if cap is None else max(1, min(previous, cap))
        if n == previous:
            yield
            return
    numba.set_num_threads(n)  # thread-local: other callers keep their setting
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def _row_major(X: np.ndarray) -> tuple[np.ndarray, int] | None:
    """``X`` as a flat read-only view with row stride ``ld``, or None.

    Views with contiguous rows (a column slice of a larger array, say) are
    read in place; other strides, unaligned data and dtypes other than
    float32/float64 return None and go through converted chunks.
    """
    if X.dtype not in _KERNEL_DTYPES or not X.flags.aligned:
        return None
    p, m = X.shape
    size = X.itemsize
    if m > 1 and X.strides[1] != size:
        return None
    ld = m if p == 1 else X.strides[0] // size
    if p > 1 and (X.strides[0] % size or ld < m):
        return None
    if X.flags.c_contiguous:
        return X.reshape(-1), ld  # as_strided costs microseconds, this does not
    flat = as_strided(X, shape=((p - 1) * ld + m,), strides=(size,), writeable=False)
    return flat, ld


def _converted_chunks(X: np.ndarray, rows: np.ndarray | None = None):
    """Yield ``(start, stop, chunk)``: C-contiguous float32/float64 copies of column chunks.

    Only ``rows`` (all rows by default) are copied. Half precision becomes
    float32, float64 stays float64.
    """
    dtype = np.float64 if X.dtype == np.float64 else np.float32
    n_rows = max(X.shape[0] if rows is None else rows.size, 1)
    step = max(SEGMENT, _CONVERT_BYTES // (8 * n_rows) // SEGMENT * SEGMENT)
    for start in range(0, X.shape[1], step):
        stop = min(start + step, X.shape[1])
        part = X[:, start:stop] if rows is None else X[rows, start:stop]
        yield start, stop, np.ascontiguousarray(part, dtype=dtype)


def _segment_bounds(m: int) -> np.ndarray:
    """Column bounds of the kernels' segments.

    They depend on ``m`` only, so the float64 sums (and the result) do not
    depend on how many threads run.
    """
    n_seg = max(1, min(_MAX_SEGMENTS, -(-m // SEGMENT)))
    per = -(-m // n_seg)
    per = -(-per // SEGMENT) * SEGMENT
    return np.minimum(np.arange(n_seg + 1, dtype=np.int64) * per, m)


def _gram_width(p: int, itemsize: int) -> int:
    """Columns per Gram chunk: ``p`` rows of it fill about ``_GRAM_CHUNK_BYTES``."""
    return int(min(16384, max(256, _GRAM_CHUNK_BYTES // (p * itemsize) // 64 * 64)))


def _gram_flat(flat: np.ndarray, p: int, ld: int, m: int) -> np.ndarray:
    """Lower triangle of the float64 Gram matrix of a flat row-major block."""
    bounds = _segment_bounds(m)
    partials = np.zeros((bounds.size - 1, p, p))
    nk._gram_partials(flat, p, ld, bounds, _gram_width(p, flat.itemsize), nk.tile_size(p),
                      partials)
    return partials.sum(axis=0)  # in segment order: deterministic


def _mirror(K: np.ndarray) -> np.ndarray:
    """The symmetric matrix whose lower triangle is that of ``K`` (np.tril is slow for tiny K)."""
    S = K + K.T
    np.fill_diagonal(S, np.diagonal(K))
    return S


def _gram_blocked(X: np.ndarray, ref: int | None, scale: np.ndarray | None,
                  blas: bool) -> np.ndarray:
    """Float64 Gram of float64 column chunks of ``X`` (shifted and scaled when asked).

    Each chunk is one ``p x w`` float64 block of about ``_BLAS_CHUNK_BYTES``
    (the only extra memory, one buffer reused for every chunk); its Gram goes
    to BLAS ``syrk`` (``blas``, accumulated in place into the lower triangle)
    or to the tiled kernel. Chunks are summed in column order: deterministic.
    """
    p, m = X.shape
    s = None if scale is None else np.asarray(scale, dtype=np.float64).reshape(p, 1)
    if blas and ref is None and s is None and X.dtype == np.float64:
        return symmetric(X @ X.T)  # numpy hands A @ A.T to syrk
    step = _blocked_width(p)
    plain = ref is None and s is None
    buf = np.empty(p * min(step, m)) if plain else None
    K = np.zeros((p, p))
    # NumPy's own BLAS, not SciPy's dsyrk: SciPy ships another OpenBLAS, whose
    # threads keep spinning after each call and starve NumPy's (measured: a
    # 256 x 256 eigh after a SciPy dsyrk took 80 ms instead of 8, and SciPy's
    # dsyrk after NumPy's matmul ran 1.3x slower). The p x p product of each
    # chunk goes into one reused temporary.
    prod = np.empty((p, p)) if blas else None
    with _threads(p * (p + 1) // 2 * m >= _PARALLEL_MIN_PRODUCTS):
        for start in range(0, m, step):
            part = X[:, start:min(start + step, m)]
            if plain:
                # Converted into the one buffer: no fresh pages (and their
                # zeroing by the OS) per chunk.
                B = buf[: part.size].reshape(part.shape)
                np.copyto(B, part)
            else:
                B = np.ascontiguousarray(transformed_chunk(np, part, ref, s))
            if blas:
                np.matmul(B, B.T, out=prod)  # NumPy hands A @ A.T to syrk
                K += prod
            else:
                K += _mirror(_gram_flat(B.reshape(-1), p, B.shape[1], B.shape[1]))
    return symmetric(K)


def _blocked_width(p: int) -> int:
    """Columns per float64 chunk of the blocked Gram: about ``_BLAS_CHUNK_BYTES``, >= 4096.

    Each chunk's ``p x p`` product is added to the sum: ``p^2`` reads and
    writes against syrk's ``p^2 w / 2`` multiply-adds, a share that only
    ``w`` sets. At 4096 columns it is a few percent (measured at p = 1024:
    1.02x a single syrk, 1.13x at 2048 columns) for ``p * 32 KiB`` of buffer
    (32 MiB at p = 1024, the size of ``K`` itself at p = 4096).
    """
    return max(4096, _BLAS_CHUNK_BYTES // (8 * p) // 256 * 256)


class NumbaBackend(NumpyBackend):
    """Numba-parallel Gram and combine kernels on NumPy arrays."""

    name = "numba"

    def gram(self, X: np.ndarray, ref: int | None = None,
             scale: np.ndarray | None = None) -> np.ndarray:
        """Float64 ``X @ X.T`` (shifted by row ``ref``, scaled by ``scale`` when given).

        The kernel is chosen by shape: the register-tiled kernel while the
        pass over the data dominates (few rows), float64 BLAS ``syrk`` on
        converted column chunks from :data:`BLAS_MIN_ROWS` rows on, where the
        ``p^2`` products dominate and BLAS's cache blocking wins.
        """
        p, m = X.shape
        if p == 0 or m == 0:
            return np.zeros((p, p))
        if ref is not None or scale is not None or p >= BLAS_MIN_ROWS:
            return _gram_blocked(X, ref, scale, blas=p >= BLAS_MIN_ROWS)
        view = _row_major(X)
        with _threads(p * (p + 1) // 2 * m >= _PARALLEL_MIN_PRODUCTS):
            if view is not None:
                K = _gram_flat(view[0], p, view[1], m)
            else:
                K = np.zeros((p, p))
                for _, _, B in _converted_chunks(X):
                    K += _gram_flat(B.reshape(-1), p, B.shape[1], B.shape[1])
        return _mirror(K)

    def combine(self, coef: np.ndarray, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``sum_i coef[i] X[i]`` over the non-zero coefficients, float64 accumulation.

        ``out``, when given, receives the result (a contiguous vector of the
        result's dtype that does not overlap ``X``; the DDP hook writes
        straight into a gradient bucket) and is returned.
        """
        p, m = X.shape
        rows = np.flatnonzero(coef).astype(np.int64)
        dtype = np.float64 if X.dtype == np.float64 else np.float32
        if out is None:
            out = np.empty(m, dtype=dtype)
        elif out.shape != (m,) or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError(f"combine: out must be a contiguous ({m},) {np.dtype(dtype)} "
                             f"vector, got {out.shape} {out.dtype}")
        if rows.size == 0 or m == 0:
            out[:] = 0
            return out
        c = np.ascontiguousarray(coef[rows], dtype=np.float64)
        view = _row_major(X)
        with _threads(rows.size * m >= _PARALLEL_MIN_ELEMENTS):
            if view is not None:
                nk._combine(view[0], view[1], rows, c, _segment_bounds(m), _COMBINE_WIDTH, out)
                return out
            local = np.arange(rows.size, dtype=np.int64)
            for start, stop, B in _converted_chunks(X, rows):
                nk._combine(B.reshape(-1), B.shape[1], local, c, _segment_bounds(stop - start),
                            _COMBINE_WIDTH, out[start:stop])
        return out

    def coordinate_stat(self, X: np.ndarray, rows: np.ndarray, center: str, trim: int,
                        k: int) -> np.ndarray:
        """Per-column order statistic of ``X[rows]``: sorting networks over L1 blocks."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        q = rows.size
        check_args(q, center, trim, k)
        m = X.shape[1]
        out = np.empty(m, dtype=np.float64 if X.dtype == np.float64 else np.float32)
        if m == 0:
            return out
        net_i, net_j = network(q, center, trim, k)
        mode = 0 if center == "median" else 1
        block = stat_block(q, out.itemsize)
        view = _row_major(X)
        # +inf - inf is NaN by design; only the kernels run as Python would warn.
        with np.errstate(invalid="ignore"):
            if view is not None:
                nk._coordinate_stat(view[0], view[1], rows, net_i, net_j, mode, trim, k, block,
                                    out)
                return out
            local = np.arange(q, dtype=np.int64)
            for start, stop, B in _converted_chunks(X, rows):
                nk._coordinate_stat(B.reshape(-1), stop - start, local, net_i, net_j, mode, trim,
                                    k, block, out[start:stop])
        return out

    # Leaves given as p separate rows: the per-row kernels read the rows in
    # place (every float32/float64 leaf of one dtype in one call); others
    # go through the generic chunked path.

    def gram_rows(self, leaves: list) -> np.ndarray:
        """Float64 Gram matrix summed over leaves given as rows, read in place."""
        tables, rest = _split_rows(leaves)
        K = sum((gram_table(t) for t in tables), np.zeros((len(leaves[0]),) * 2))
        if rest:
            K = K + super().gram_rows([leaves[j] for j in rest])
        return K

    def combine_rows(self, coef: np.ndarray, leaves: list) -> list:
        """Per-leaf ``sum_i coef[i] g_i`` (views of one flat result per dtype)."""
        tables, rest = _split_rows(leaves)
        flats = [combine_table(coef, t) for t in tables]
        others = super().combine_rows(coef, [leaves[j] for j in rest]) if rest else []
        return scatter(len(leaves), tables, flats, rest, others)

    def coordinate_stat_rows(self, leaves: list, rows: np.ndarray, center: str, trim: int,
                             k: int) -> list:
        """Per-leaf coordinate statistic of leaves given as rows, read in place."""
        tables, rest = _split_rows(leaves)
        flats = [coordinate_stat_table(t, rows, center, trim, k) for t in tables]
        others = (super().coordinate_stat_rows([leaves[j] for j in rest], rows, center, trim, k)
                  if rest else [])
        return scatter(len(leaves), tables, flats, rest, others)


BACKEND = NumbaBackend()


# ---------------------------------------------------------------------------
# Leaves given as p separate rows (a pytree per worker): the per-row kernels
# read every row in place through a table of addresses, all leaves of one
# dtype in one kernel call.


def gram_table(table: RowTable) -> np.ndarray:
    """Float64 Gram matrix of a table's rows, summed over its leaves (symmetric)."""
    p = table.ptrs.shape[1]
    bounds = _segment_bounds(table.n)
    partials = np.zeros((bounds.size - 1, p, p))
    with _threads(p * (p + 1) // 2 * table.n >= _PARALLEL_MIN_PRODUCTS):
        nk._gram_partials_rows(table.ptrs, table.like, table.offsets, bounds,
                               _gram_width(p, table.dtype.itemsize), nk.tile_size(p), partials)
    K = partials.sum(axis=0)  # in segment order: deterministic
    S = K + K.T
    np.fill_diagonal(S, np.diagonal(K))
    return S


def combine_table(coef: np.ndarray, table: RowTable) -> np.ndarray:
    """``sum_i coef[i] g_i`` over a table's leaves, as one flat array in the table's dtype."""
    rows = np.flatnonzero(coef).astype(np.int64)
    out = np.empty(table.n, dtype=table.dtype)
    if rows.size == 0:
        out[:] = 0
        return out
    c = np.ascontiguousarray(coef[rows], dtype=np.float64)
    with _threads(rows.size * table.n >= _PARALLEL_MIN_ELEMENTS):
        nk._combine_rows(table.ptrs, table.like, table.offsets, rows, c,
                         _segment_bounds(table.n), _COMBINE_WIDTH, out)
    return out


def coordinate_stat_table(table: RowTable, rows: np.ndarray, center: str, trim: int,
                          k: int) -> np.ndarray:
    """The per-column statistic of ``rows`` over a table's leaves, as one flat array."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    q = rows.size
    check_args(q, center, trim, k)
    net_i, net_j = network(q, center, trim, k)
    block = stat_block(q, table.dtype.itemsize)
    sizes = np.diff(table.offsets)
    per_leaf = -(-sizes // block)
    leaf_of = np.repeat(np.arange(sizes.size, dtype=np.int64), per_leaf)
    first = np.repeat(np.cumsum(per_leaf) - per_leaf, per_leaf)
    c0 = (np.arange(leaf_of.size, dtype=np.int64) - first) * block
    items = np.ascontiguousarray(np.stack([leaf_of, c0], axis=1), dtype=np.int64)
    out = np.empty(table.n, dtype=table.dtype)
    with np.errstate(invalid="ignore"):
        nk._coordinate_stat_rows(table.ptrs, table.like, table.offsets, items, rows, net_i, net_j,
                                 0 if center == "median" else 1, trim, k, block, out)
    return out


def _numpy_row_ok(row: np.ndarray) -> bool:
    return row.ndim == 1 and row.flags.c_contiguous and row.flags.aligned


_numpy_address = nk.address


def _numpy_kernel_dtype(row: np.ndarray):
    return row.dtype if row.dtype in _KERNEL_DTYPES else None


def _split_rows(leaves):
    return row_tables(leaves, _numpy_row_ok, _numpy_address, _numpy_kernel_dtype)
