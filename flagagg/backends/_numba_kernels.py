"""Numba kernels: the only module that imports numba.

Each kernel splits the columns into a number of segments that depends only on
the problem size, computes one partial per segment in a ``prange`` loop and
reduces the partials serially in segment order, so results do not depend on
the number of threads. ``fastmath`` allows reassociation and FMA contraction
(for vectorisation) but not ``nnan``/``ninf``: the NaN/Inf policy needs
non-finite values to propagate honestly.

Inputs arrive as a flat read-only view ``X`` of a row-major ``(p, m)``
matrix with row stride ``ld``, so a column slice of a larger array is read
in place. Inner loops run over a slice of one row (a unit-stride, provably
non-negative index) so that LLVM vectorises them; float32 values are
widened to float64 in registers, never through a buffer.

Gram: a chunk of columns that fits L2 is swept by register tiles of 4 x 4
(16 accumulators) or 5 x 5 row pairs (25; fewer FMAs when 5 divides p,
e.g. p = 15), one zmm accumulator per pair, so the kernel runs at the FMA
throughput of the core. Combine: four rows at a time into an L1-resident
float64 accumulator, i.e. at memory speed.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange, types
from numba.extending import intrinsic

from ._threads import size_pool

# Before the first kernel below is compiled or loaded from the cache (which may
# start numba's threads): a pool no larger than the process's thread budget.
size_pool()

# No "nnan"/"ninf": excluded rows are detected from non-finite Gram entries.
_FASTMATH = {"contract", "reassoc", "nsz", "arcp"}


def _jit(signatures):
    return numba.njit(signatures, parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)


_RO32 = types.Array(types.float32, 1, "C", readonly=True)
_RO64 = types.Array(types.float64, 1, "C", readonly=True)


def _helper(func):
    # Inner functions of the kernels: compiled (and cached) with the caller's
    # argument types, same fastmath flags, inlined by LLVM.
    return numba.njit(fastmath=_FASTMATH, cache=True, nogil=True)(func)


# Granularity, in columns, of the segment bounds chosen by the callers.
SEGMENT = 2048


@_helper
def _piece(X, i, ld, c0, w):
    """Columns ``c0:c0+w`` of row ``i`` of the row-major matrix ``X`` with row stride ``ld``.

    Slicing first gives the inner loops a non-negative index, which keeps
    LLVM from emitting wrap-around checks (and gathers instead of loads).
    """
    start = i * ld + c0
    return X[start:start + w]


@_helper
def _row(X, i, p, ld, c0, w):
    """:func:`_piece` of row ``min(i, p - 1)``.

    Clamping rows past the end to the last one makes every tile a full
    tile; the products of those copies are computed and dropped.
    """
    return _piece(X, min(i, p - 1), ld, c0, w)


@_helper
def _diag_tile(x0, x1, x2, x3, w):
    """Lower triangle of the 4 x 4 Gram of four row pieces, as a row-major 16-tuple."""
    d00 = d10 = d11 = d20 = d21 = d22 = d30 = d31 = d32 = d33 = 0.0
    for c in range(w):
        # float32 -> float64 on the fly: products of float32 values are exact in float64.
        a0 = np.float64(x0[c])
        a1 = np.float64(x1[c])
        a2 = np.float64(x2[c])
        a3 = np.float64(x3[c])
        d00 += a0 * a0
        d10 += a1 * a0
        d11 += a1 * a1
        d20 += a2 * a0
        d21 += a2 * a1
        d22 += a2 * a2
        d30 += a3 * a0
        d31 += a3 * a1
        d32 += a3 * a2
        d33 += a3 * a3
    return (d00, 0.0, 0.0, 0.0, d10, d11, 0.0, 0.0, d20, d21, d22, 0.0, d30, d31, d32, d33)


@_helper
def _off_tile(x0, x1, x2, x3, y0, y1, y2, y3, w):
    """The 4 x 4 block ``x y^T`` of four row pieces against four others, row-major."""
    # 16 accumulators + 8 converted rows fit the 32 zmm registers of AVX-512;
    # LLVM vectorises the column loop, one accumulator vector per pair.
    t00 = t01 = t02 = t03 = t10 = t11 = t12 = t13 = 0.0
    t20 = t21 = t22 = t23 = t30 = t31 = t32 = t33 = 0.0
    for c in range(w):
        a0 = np.float64(x0[c])
        a1 = np.float64(x1[c])
        a2 = np.float64(x2[c])
        a3 = np.float64(x3[c])
        b0 = np.float64(y0[c])
        b1 = np.float64(y1[c])
        b2 = np.float64(y2[c])
        b3 = np.float64(y3[c])
        t00 += a0 * b0
        t01 += a0 * b1
        t02 += a0 * b2
        t03 += a0 * b3
        t10 += a1 * b0
        t11 += a1 * b1
        t12 += a1 * b2
        t13 += a1 * b3
        t20 += a2 * b0
        t21 += a2 * b1
        t22 += a2 * b2
        t23 += a2 * b3
        t30 += a3 * b0
        t31 += a3 * b1
        t32 += a3 * b2
        t33 += a3 * b3
    return (t00, t01, t02, t03, t10, t11, t12, t13, t20, t21, t22, t23, t30, t31, t32, t33)


@_helper
def _diag_tile5(x0, x1, x2, x3, x4, w):
    """Lower triangle of the 5 x 5 Gram of five row pieces, as a row-major 25-tuple."""
    d00 = d10 = d11 = d20 = d21 = d22 = d30 = d31 = d32 = d33 = 0.0
    d40 = d41 = d42 = d43 = d44 = 0.0
    for c in range(w):
        a0 = np.float64(x0[c])
        a1 = np.float64(x1[c])
        a2 = np.float64(x2[c])
        a3 = np.float64(x3[c])
        a4 = np.float64(x4[c])
        d00 += a0 * a0
        d10 += a1 * a0
        d11 += a1 * a1
        d20 += a2 * a0
        d21 += a2 * a1
        d22 += a2 * a2
        d30 += a3 * a0
        d31 += a3 * a1
        d32 += a3 * a2
        d33 += a3 * a3
        d40 += a4 * a0
        d41 += a4 * a1
        d42 += a4 * a2
        d43 += a4 * a3
        d44 += a4 * a4
    z = 0.0
    return (d00, z, z, z, z, d10, d11, z, z, z, d20, d21, d22, z, z,
            d30, d31, d32, d33, z, d40, d41, d42, d43, d44)


@_helper
def _off_tile5(x0, x1, x2, x3, x4, y0, y1, y2, y3, y4, w):
    """The 5 x 5 block ``x y^T`` of five row pieces against five others, row-major."""
    # 25 accumulators: LLVM keeps all but a couple in zmm registers; the
    # block needs no more FMAs than the triangle has pairs when 5 divides p.
    t00 = t01 = t02 = t03 = t04 = t10 = t11 = t12 = t13 = t14 = 0.0
    t20 = t21 = t22 = t23 = t24 = t30 = t31 = t32 = t33 = t34 = 0.0
    t40 = t41 = t42 = t43 = t44 = 0.0
    for c in range(w):
        a0 = np.float64(x0[c])
        a1 = np.float64(x1[c])
        a2 = np.float64(x2[c])
        a3 = np.float64(x3[c])
        a4 = np.float64(x4[c])
        b0 = np.float64(y0[c])
        b1 = np.float64(y1[c])
        b2 = np.float64(y2[c])
        b3 = np.float64(y3[c])
        b4 = np.float64(y4[c])
        t00 += a0 * b0
        t01 += a0 * b1
        t02 += a0 * b2
        t03 += a0 * b3
        t04 += a0 * b4
        t10 += a1 * b0
        t11 += a1 * b1
        t12 += a1 * b2
        t13 += a1 * b3
        t14 += a1 * b4
        t20 += a2 * b0
        t21 += a2 * b1
        t22 += a2 * b2
        t23 += a2 * b3
        t24 += a2 * b4
        t30 += a3 * b0
        t31 += a3 * b1
        t32 += a3 * b2
        t33 += a3 * b3
        t34 += a3 * b4
        t40 += a4 * b0
        t41 += a4 * b1
        t42 += a4 * b2
        t43 += a4 * b3
        t44 += a4 * b4
    return (t00, t01, t02, t03, t04, t10, t11, t12, t13, t14, t20, t21, t22, t23, t24,
            t30, t31, t32, t33, t34, t40, t41, t42, t43, t44)


@_helper
def _add_tile(acc, t, i0, j0, p, diag, size):
    """Add a ``size x size`` tile at ``acc[i0, j0]``, dropping clamped rows (and the upper part)."""
    for a in range(min(size, p - i0)):
        for b in range(a + 1 if diag else size):
            acc[i0 + a, j0 + b] += t[size * a + b]


@_helper
def _sweep4(acc, X, p, ld, c0, w, i0):
    """Rows ``i0:i0+4`` against rows ``0:i0+4`` of one chunk, in 4 x 4 tiles."""
    x0 = _row(X, i0, p, ld, c0, w)
    x1 = _row(X, i0 + 1, p, ld, c0, w)
    x2 = _row(X, i0 + 2, p, ld, c0, w)
    x3 = _row(X, i0 + 3, p, ld, c0, w)
    _add_tile(acc, _diag_tile(x0, x1, x2, x3, w), i0, i0, p, True, 4)
    for j0 in range(0, i0, 4):
        y0 = _row(X, j0, p, ld, c0, w)
        y1 = _row(X, j0 + 1, p, ld, c0, w)
        y2 = _row(X, j0 + 2, p, ld, c0, w)
        y3 = _row(X, j0 + 3, p, ld, c0, w)
        _add_tile(acc, _off_tile(x0, x1, x2, x3, y0, y1, y2, y3, w), i0, j0, p, False, 4)


@_helper
def _sweep5(acc, X, p, ld, c0, w, i0):
    """Rows ``i0:i0+5`` against rows ``0:i0+5`` of one chunk, in 5 x 5 tiles."""
    x0 = _row(X, i0, p, ld, c0, w)
    x1 = _row(X, i0 + 1, p, ld, c0, w)
    x2 = _row(X, i0 + 2, p, ld, c0, w)
    x3 = _row(X, i0 + 3, p, ld, c0, w)
    x4 = _row(X, i0 + 4, p, ld, c0, w)
    _add_tile(acc, _diag_tile5(x0, x1, x2, x3, x4, w), i0, i0, p, True, 5)
    for j0 in range(0, i0, 5):
        y0 = _row(X, j0, p, ld, c0, w)
        y1 = _row(X, j0 + 1, p, ld, c0, w)
        y2 = _row(X, j0 + 2, p, ld, c0, w)
        y3 = _row(X, j0 + 3, p, ld, c0, w)
        y4 = _row(X, j0 + 4, p, ld, c0, w)
        t = _off_tile5(x0, x1, x2, x3, x4, y0, y1, y2, y3, y4, w)
        _add_tile(acc, t, i0, j0, p, False, 5)


def tile_size(p: int) -> int:
    """Tile size, 4 or 5, that needs the fewest FMAs per column for ``p`` rows (ties: 4)."""
    def fmas(t: int) -> int:
        n = -(-p // t)
        return n * t * (t + 1) // 2 + n * (n - 1) // 2 * t * t

    return 5 if fmas(5) < fmas(4) else 4


@_jit([types.void(x, types.int64, types.int64, types.int64[::1], types.int64, types.int64,
                  types.float64[:, :, ::1]) for x in (_RO32, _RO64)])
def _gram_partials(X, p, ld, bounds, width, tile, partials):
    """Add the lower triangle of each segment's float64 Gram matrix to ``partials[s]``.

    ``X`` holds a ``(p, m)`` matrix row-major with row stride ``ld``
    (flattened); segment ``s`` is columns ``bounds[s]:bounds[s+1]``. Each
    segment is swept ``width`` columns at a time (a chunk that stays in
    cache while every ``tile x tile`` block of row pairs passes over it);
    ``tile`` is 4 or 5 (see :func:`tile_size`).
    """
    n_tiles = (p + tile - 1) // tile
    for s in prange(bounds.size - 1):
        acc = partials[s]
        for c0 in range(bounds[s], bounds[s + 1], width):
            w = min(width, bounds[s + 1] - c0)
            for ti in range(n_tiles):
                if tile == 5:
                    _sweep5(acc, X, p, ld, c0, w, 5 * ti)
                else:
                    _sweep4(acc, X, p, ld, c0, w, 4 * ti)


@_helper
def _axpy4(acc, a0, a1, a2, a3, x0, x1, x2, x3, w):
    """``acc += a0 x0 + a1 x1 + a2 x2 + a3 x3`` in float64 (one pass over ``acc`` per 4 rows)."""
    for c in range(w):
        acc[c] += (a0 * np.float64(x0[c]) + a1 * np.float64(x1[c])) + (
            a2 * np.float64(x2[c]) + a3 * np.float64(x3[c]))


@_helper
def _axpy1(acc, a0, x0, w):
    """``acc += a0 x0`` in float64."""
    for c in range(w):
        acc[c] += a0 * np.float64(x0[c])


@_jit([types.void(x, types.int64, types.int64[::1], types.float64[::1], types.int64[::1],
                  types.int64, out[::1])
       for x, out in ((_RO32, types.float32), (_RO64, types.float64))])
def _combine(X, ld, rows, coef, bounds, width, out):
    """``out[c] = sum_k coef[k] X[rows[k], c]``, summed in float64 in the order of ``rows``.

    ``X`` is the flattened row-major matrix with row stride ``ld``; only
    rows listed in ``rows`` are read. Every column is summed independently,
    so the result does not depend on the segments ``bounds`` or on threads.
    """
    nr = rows.size
    for s in prange(bounds.size - 1):
        # One L1-sized float64 accumulator per segment, reused chunk after chunk.
        acc = np.empty(width, dtype=np.float64)
        for c0 in range(bounds[s], bounds[s + 1], width):
            w = min(width, bounds[s + 1] - c0)
            acc[:w] = 0.0
            k = 0
            while k + 4 <= nr:
                _axpy4(acc, coef[k], coef[k + 1], coef[k + 2], coef[k + 3],
                       _piece(X, rows[k], ld, c0, w), _piece(X, rows[k + 1], ld, c0, w),
                       _piece(X, rows[k + 2], ld, c0, w), _piece(X, rows[k + 3], ld, c0, w), w)
                k += 4
            while k < nr:
                _axpy1(acc, coef[k], _piece(X, rows[k], ld, c0, w), w)
                k += 1
            o = out[c0:c0 + w]
            for c in range(w):
                o[c] = acc[c]


# ---------------------------------------------------------------------------
# Coordinate order statistics (median, trimmed mean, MeaMed, Phocas, Bulyan).

_OS_RO32 = types.Array(types.float32, 1, "C", readonly=True)
_OS_RO64 = types.Array(types.float64, 1, "C", readonly=True)


@_helper
def _stat_of_sorted_block(buf, w, net_i, net_j, mode, trim, k, block, res):
    """Sort the first ``w`` columns of ``buf`` by the network; write their statistic to ``res``.

    The body of the coordinate kernels once a block is in ``buf``; see
    :func:`_coordinate_stat`.
    """
    q = buf.shape[0]
    for e in range(net_i.size):
        lo = buf[net_i[e]]
        hi = buf[net_j[e]]
        for c in range(w):
            a = lo[c]
            z = hi[c]
            lo[c] = min(a, z)
            hi[c] = max(a, z)
    cen = np.zeros(block)
    if mode == 0:
        # Odd q reads the middle twice: one code path for both parities.
        mid0 = buf[(q - 1) // 2]
        mid1 = buf[q // 2]
        for c in range(w):
            cen[c] = 0.5 * (np.float64(mid0[c]) + np.float64(mid1[c]))
    else:
        for u in range(trim, q - trim):
            row = buf[u]
            for c in range(w):
                cen[c] += row[c]
        for c in range(w):
            cen[c] /= q - 2 * trim
    if k == 0:
        for c in range(w):
            res[c] = cen[c]
        return
    # Window start: how many left ends lose to the value k places right.
    s = np.zeros(block, dtype=np.int64)
    for u in range(q - k):
        left = buf[u]
        right = buf[u + k]
        for c in range(w):
            s[c] += 1 if np.float64(right[c]) - cen[c] < cen[c] - np.float64(left[c]) else 0
    acc = np.zeros(block)
    for u in range(q):
        row = buf[u]
        if q - k <= u < k:
            # Inside every possible window (s <= q - k, s + k >= k).
            for c in range(w):
                acc[c] += row[c]
        else:
            for c in range(w):
                # A select, not a product with a mask: values outside may be +inf.
                acc[c] += np.float64(row[c]) if s[c] <= u and u < s[c] + k else 0.0
    for c in range(w):
        res[c] = acc[c] / k


@_jit([types.void(X, types.int64, types.int64[::1], types.int64[::1], types.int64[::1],
                  types.int64, types.int64, types.int64, types.int64, out)
       for X, out in ((_OS_RO32, types.float32[::1]), (_OS_RO64, types.float64[::1]))])
def _coordinate_stat(X, ld, rows, net_i, net_j, mode, trim, k, block, out):
    """Per column, a robust statistic of the values of ``rows`` (see ``_order_stats``).

    ``X`` is row-major with row stride ``ld`` (flattened). Each block of
    ``block`` columns of the selected rows is copied into an L1-sized buffer
    (NaN becomes +inf there) and sorted by the comparators ``net_i[e] <
    net_j[e]``, every comparator a min/max over the whole row of the buffer
    so that it vectorises across columns. ``mode`` 0 centers on the median,
    1 on the mean of positions ``trim .. q-trim-1``; ``k > 0`` then averages
    the ``k`` values closest to the center. Centers and sums are float64.
    Columns are independent, so the result does not depend on the threads.
    """
    q = rows.size
    m = out.size
    for b in prange((m + block - 1) // block):
        c0 = b * block
        w = min(block, m - c0)
        buf = np.empty((q, block), dtype=out.dtype)
        for r in range(q):
            start = rows[r] * ld + c0
            src = X[start:start + w]
            dst = buf[r]
            for c in range(w):
                v = src[c]
                dst[c] = v if v == v else np.float32(np.inf)  # exact in float64 too
        _stat_of_sorted_block(buf, w, net_i, net_j, mode, trim, k, block, out[c0:c0 + w])


# ---------------------------------------------------------------------------
# Per-row kernels: a pytree of L leaves, each given as p separate 1-D arrays
# (one per worker), read in place through a table of their addresses. The
# columns of all leaves are laid end to end in one virtual row of length n
# (leaf l spans ``offsets[l]:offsets[l+1]``); segments of that virtual row
# make the partials, so small leaves cost no kernel call of their own and
# no stacked copy of any leaf is made.


@intrinsic
def _pointer(typingctx, address, like):
    """The int64 ``address`` as a pointer to ``like``'s dtype (for :func:`numba.carray`)."""
    sig = types.CPointer(like.dtype)(types.int64, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@_helper
def _leaf_piece(ptrs, like, leaf, i, m, c0, w):
    """Columns ``c0:c0+w`` of worker ``i``'s row of that leaf (length ``m``)."""
    return numba.carray(_pointer(ptrs[leaf, i], like), m)[c0:c0 + w]


@_helper
def _sweep4_rows(acc, ptrs, like, leaf, p, m, c0, w, i0):
    """:func:`_sweep4` on the rows of one leaf."""
    x0 = _leaf_piece(ptrs, like, leaf, min(i0, p - 1), m, c0, w)
    x1 = _leaf_piece(ptrs, like, leaf, min(i0 + 1, p - 1), m, c0, w)
    x2 = _leaf_piece(ptrs, like, leaf, min(i0 + 2, p - 1), m, c0, w)
    x3 = _leaf_piece(ptrs, like, leaf, min(i0 + 3, p - 1), m, c0, w)
    _add_tile(acc, _diag_tile(x0, x1, x2, x3, w), i0, i0, p, True, 4)
    for j0 in range(0, i0, 4):
        y0 = _leaf_piece(ptrs, like, leaf, j0, m, c0, w)
        y1 = _leaf_piece(ptrs, like, leaf, j0 + 1, m, c0, w)
        y2 = _leaf_piece(ptrs, like, leaf, j0 + 2, m, c0, w)
        y3 = _leaf_piece(ptrs, like, leaf, j0 + 3, m, c0, w)
        _add_tile(acc, _off_tile(x0, x1, x2, x3, y0, y1, y2, y3, w), i0, j0, p, False, 4)


@_helper
def _sweep5_rows(acc, ptrs, like, leaf, p, m, c0, w, i0):
    """:func:`_sweep5` on the rows of one leaf."""
    x0 = _leaf_piece(ptrs, like, leaf, min(i0, p - 1), m, c0, w)
    x1 = _leaf_piece(ptrs, like, leaf, min(i0 + 1, p - 1), m, c0, w)
    x2 = _leaf_piece(ptrs, like, leaf, min(i0 + 2, p - 1), m, c0, w)
    x3 = _leaf_piece(ptrs, like, leaf, min(i0 + 3, p - 1), m, c0, w)
    x4 = _leaf_piece(ptrs, like, leaf, min(i0 + 4, p - 1), m, c0, w)
    _add_tile(acc, _diag_tile5(x0, x1, x2, x3, x4, w), i0, i0, p, True, 5)
    for j0 in range(0, i0, 5):
        y0 = _leaf_piece(ptrs, like, leaf, j0, m, c0, w)
        y1 = _leaf_piece(ptrs, like, leaf, j0 + 1, m, c0, w)
        y2 = _leaf_piece(ptrs, like, leaf, j0 + 2, m, c0, w)
        y3 = _leaf_piece(ptrs, like, leaf, j0 + 3, m, c0, w)
        y4 = _leaf_piece(ptrs, like, leaf, j0 + 4, m, c0, w)
        t = _off_tile5(x0, x1, x2, x3, x4, y0, y1, y2, y3, y4, w)
        _add_tile(acc, t, i0, j0, p, False, 5)


@_helper
def _segment_pieces(offsets, lo, hi, width):
    """The pieces of the virtual row ``lo:hi`` over the leaves, in order.

    Row ``t`` is ``(leaf, m, c0, w)``: columns ``c0:c0+w`` (``w <= width``)
    of leaf ``leaf``, whose rows have length ``m``; ``offsets[leaf]`` is
    where that leaf starts in the virtual row (``offsets[-1]`` its end). The
    one walk over the leaves of the kernels on address tables.
    """
    n_leaves = offsets.size - 1
    first = np.searchsorted(offsets, lo, side="right") - 1
    n = 0
    stop = first
    while stop < n_leaves and offsets[stop] < hi:
        a = max(lo, offsets[stop]) - offsets[stop]
        b = min(hi, offsets[stop + 1]) - offsets[stop]
        n += (b - a + width - 1) // width
        stop += 1
    pieces = np.empty((n, 4), dtype=np.int64)
    t = 0
    for leaf in range(first, stop):
        m = offsets[leaf + 1] - offsets[leaf]
        a = max(lo, offsets[leaf]) - offsets[leaf]
        b = min(hi, offsets[leaf + 1]) - offsets[leaf]
        for c0 in range(a, b, width):
            pieces[t, 0] = leaf
            pieces[t, 1] = m
            pieces[t, 2] = c0
            pieces[t, 3] = min(width, b - c0)
            t += 1
    return pieces


_LIKE32 = types.float32[::1]
_LIKE64 = types.float64[::1]
_PTRS = types.int64[:, ::1]


@_jit([types.void(_PTRS, like, types.int64[::1], types.int64[::1], types.int64, types.int64,
                  types.float64[:, :, ::1]) for like in (_LIKE32, _LIKE64)])
def _gram_partials_rows(ptrs, like, offsets, bounds, width, tile, partials):
    """:func:`_gram_partials` on the leaves of an address table.

    ``ptrs[leaf, i]`` is the address of worker ``i``'s row of leaf ``leaf`` (dtype
    of ``like``, contiguous, length ``offsets[leaf+1] - offsets[leaf] > 0``);
    ``bounds`` are segments of the virtual row ``0:offsets[-1]``.
    """
    p = ptrs.shape[1]
    n_tiles = (p + tile - 1) // tile
    for s in prange(bounds.size - 1):
        acc = partials[s]
        pieces = _segment_pieces(offsets, bounds[s], bounds[s + 1], width)
        for t in range(pieces.shape[0]):
            leaf, m, c0, w = pieces[t, 0], pieces[t, 1], pieces[t, 2], pieces[t, 3]
            for ti in range(n_tiles):
                if tile == 5:
                    _sweep5_rows(acc, ptrs, like, leaf, p, m, c0, w, 5 * ti)
                else:
                    _sweep4_rows(acc, ptrs, like, leaf, p, m, c0, w, 4 * ti)


@_jit([types.void(_PTRS, like, types.int64[::1], types.int64[::1], types.float64[::1],
                  types.int64[::1], types.int64, out[::1])
       for like, out in ((_LIKE32, types.float32), (_LIKE64, types.float64))])
def _combine_rows(ptrs, like, offsets, rows, coef, bounds, width, out):
    """:func:`_combine` on the leaves of an address table, into the flat ``out`` (length n).

    Leaf ``leaf`` of the result is ``out[offsets[leaf]:offsets[leaf+1]]``; only the
    workers listed in ``rows`` are read, summed in float64 in that order.
    """
    nr = rows.size
    for s in prange(bounds.size - 1):
        acc = np.empty(width, dtype=np.float64)
        pieces = _segment_pieces(offsets, bounds[s], bounds[s + 1], width)
        for t in range(pieces.shape[0]):
            leaf, m, c0, w = pieces[t, 0], pieces[t, 1], pieces[t, 2], pieces[t, 3]
            acc[:w] = 0.0
            k = 0
            while k + 4 <= nr:
                _axpy4(acc, coef[k], coef[k + 1], coef[k + 2], coef[k + 3],
                       _leaf_piece(ptrs, like, leaf, rows[k], m, c0, w),
                       _leaf_piece(ptrs, like, leaf, rows[k + 1], m, c0, w),
                       _leaf_piece(ptrs, like, leaf, rows[k + 2], m, c0, w),
                       _leaf_piece(ptrs, like, leaf, rows[k + 3], m, c0, w), w)
                k += 4
            while k < nr:
                _axpy1(acc, coef[k], _leaf_piece(ptrs, like, leaf, rows[k], m, c0, w), w)
                k += 1
            start = offsets[leaf] + c0
            o = out[start:start + w]
            for c in range(w):
                o[c] = acc[c]


@_jit([types.void(_PTRS, like, types.int64[::1], types.int64[:, ::1], types.int64[::1],
                  types.int64[::1], types.int64[::1], types.int64, types.int64, types.int64,
                  types.int64, out[::1])
       for like, out in ((_LIKE32, types.float32), (_LIKE64, types.float64))])
def _coordinate_stat_rows(ptrs, like, offsets, items, rows, net_i, net_j, mode, trim, k, block,
                          out):
    """:func:`_coordinate_stat` on the leaves of an address table, into the flat ``out``.

    ``items[b] = (leaf, c0)``: block ``b`` is columns ``c0:c0+block`` of leaf
    ``leaf`` (cut at the leaf's end), so no block straddles two leaves.
    """
    q = rows.size
    for b in prange(items.shape[0]):
        leaf = items[b, 0]
        c0 = items[b, 1]
        m = offsets[leaf + 1] - offsets[leaf]
        w = min(block, m - c0)
        buf = np.empty((q, block), dtype=out.dtype)
        for r in range(q):
            src = _leaf_piece(ptrs, like, leaf, rows[r], m, c0, w)
            dst = buf[r]
            for c in range(w):
                v = src[c]
                dst[c] = v if v == v else np.float32(np.inf)
        start = offsets[leaf] + c0
        _stat_of_sorted_block(buf, w, net_i, net_j, mode, trim, k, block, out[start:start + w])


@numba.njit(cache=True, nogil=True)
def address(x):
    """Data address of a NumPy array (jitted: ~10x cheaper than ``__array_interface__``)."""
    return x.ctypes.data
