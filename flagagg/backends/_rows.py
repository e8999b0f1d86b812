"""Leaves given as ``p`` separate rows: the address tables of the per-row kernels.

A pytree input reaches the backends as a list of leaves, each the ``p``
workers' flattened rows. The compiled per-row kernels read those rows in
place through a table of their addresses, every leaf of one dtype in one
call. This module builds the tables (it imports no compiled library, so
the torch backend can use it without numba).
"""

from __future__ import annotations

import numpy as np

__all__ = ["RowTable", "row_tables", "scatter"]


class RowTable:
    """Leaves of one dtype, as an address table for the per-row kernels.

    Parameters
    ----------
    index : list of int
        Positions of these leaves in the caller's list of leaves.
    ptrs : ndarray of shape (L, p), int64
        ``ptrs[l, i]``: address of worker ``i``'s row of leaf ``l``.
    offsets : ndarray of shape (L + 1,), int64
        Leaf ``l`` spans ``offsets[l]:offsets[l+1]`` of the virtual row.
    dtype : numpy dtype
        float32 or float64.
    keep : list
        The row objects, referenced so that the addresses stay valid.
    """

    def __init__(self, index, ptrs, offsets, dtype, keep):
        self.index = index
        self.ptrs = ptrs
        self.offsets = offsets
        self.dtype = np.dtype(dtype)
        self.keep = keep
        self.like = np.empty(0, dtype=self.dtype)

    @property
    def n(self) -> int:
        """Total columns of the table's leaves."""
        return int(self.offsets[-1])

    def split(self, flat):
        """Per-leaf views ``flat[offsets[l]:offsets[l+1]]`` of a flat result."""
        o = self.offsets.tolist()
        return [flat[a:b] for a, b in zip(o[:-1], o[1:], strict=True)]


def row_tables(leaves, eligible, address, kernel_dtype):
    """Group the leaves the per-row kernels can read into one :class:`RowTable` per dtype.

    Parameters
    ----------
    leaves : list of list of 1-D arrays
        Each leaf as its ``p`` rows (non-empty, one dtype per leaf).
    eligible : callable
        ``eligible(row) -> bool``: contiguous, aligned, on the host.
    address : callable
        ``address(row) -> int``: the row's data address.
    kernel_dtype : callable
        ``kernel_dtype(row) -> numpy dtype or None`` (None: not float32/float64).

    Returns
    -------
    tables : list of RowTable
    rest : list of int
        Positions of the leaves left for the generic path.
    """
    cache = getattr(leaves, "cache", None)
    key = (eligible, address, kernel_dtype)
    if cache is not None and key in cache:
        return cache[key]
    groups: dict = {}
    rest = []
    for j, rows in enumerate(leaves):
        dt = kernel_dtype(rows[0])
        if dt is None or not all(eligible(r) for r in rows):
            rest.append(j)
            continue
        groups.setdefault(dt, []).append(j)
    tables = []
    for dt, index in groups.items():
        ptrs = np.array([[address(r) for r in leaves[j]] for j in index], dtype=np.int64)
        sizes = np.array([int(leaves[j][0].shape[0]) for j in index], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        tables.append(RowTable(index, ptrs, offsets, dt, [leaves[j] for j in index]))
    if cache is not None:
        # Kept with the leaves (a Stack's RowLeaves): the Gram and the
        # combination passes of one aggregation share the tables.
        cache[key] = (tables, rest)
    return tables, rest


def scatter(n_leaves, tables, flat_results, rest, rest_results):
    """Per-leaf results in the leaves' order, from the tables' flat results and the rest's."""
    outs = [None] * n_leaves
    for table, flat in zip(tables, flat_results, strict=True):
        for j, part in zip(table.index, table.split(flat), strict=True):
            outs[j] = part
    for j, part in zip(rest, rest_results, strict=True):
        outs[j] = part
    return outs
