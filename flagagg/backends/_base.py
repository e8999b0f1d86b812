"""The kernel protocol that every backend implements.

A backend supplies the few operations that touch all ``p x n`` numbers; the
rest of flagagg is ``p x p`` algebra written once. Kernels take a 2-D block
``X`` of shape ``(p, m)`` (one pytree leaf, or a chunk of one) in the
backend's array library and never change their inputs.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

Array = Any


@runtime_checkable
class Backend(Protocol):
    """What a backend provides.

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"numba"``.
    """

    name: str

    def accepts(self, x: Array) -> bool:
        """Whether this backend computes on arrays like ``x`` (library and device)."""

    def gram(self, X: Array, ref: int | None = None,
             scale: np.ndarray | None = None) -> np.ndarray:
        """Return the float64 Gram matrix ``Y @ Y.T`` of a transformed ``(p, m)`` block.

        ``Y = X`` by default. With ``ref`` (a row index), every row is first
        shifted by row ``ref`` of the same block, ``Y_i = X_i - X_ref`` (so
        ``Y_ref = 0``): the Gram of the shifted rows gives distances without
        the cancellation of ``K_ii + K_jj - 2 K_ij`` when the rows share a
        large common part, and ``sum_i c_i X_i`` is unchanged for
        coefficients summing to 1. With ``scale`` (a float64 vector of
        ``p`` powers of two), row ``i`` is also multiplied by ``scale[i]``:
        ``Y_i = scale[i] X_i - scale[i] X_ref``, scaled before subtracting,
        so that rows near the overflow (or underflow) threshold give a
        representable Gram. Both are applied a cache-sized chunk of columns
        at a time, never to a copy of the block.

        Products are accumulated in float64 whatever the input dtype. Rows
        holding NaN or Inf only spoil their own row and column of the result
        (all of it when ``X_ref`` holds one: choose a finite reference).
        Kernels that take a row list (per-layer inputs) follow the same
        signature.
        """

    def combine(self, coef: np.ndarray, X: Array) -> Array:
        """Return ``sum_i coef[i] * X[i]`` for a ``(p, m)`` block.

        ``coef`` is a float64 NumPy vector. Rows whose coefficient is exactly
        zero are not read, so excluded non-finite rows cannot leak NaN into
        the output. The result is in ``X``'s library and device, with dtype
        ``compute_dtype(X)``.
        """

    def coordinate_stat(self, X: Array, rows: np.ndarray, center: str, trim: int,
                        k: int) -> Array:
        """Return a per-column robust statistic of the rows ``rows`` of a ``(p, m)`` block.

        With the ``q = rows.size`` values of a column sorted (NaN counted as
        ``+inf``), the center is their median (``center="median"``) or their
        mean after dropping ``trim`` values at each end
        (``center="trimmed"``). With ``k == 0`` the result is the center;
        otherwise it is the mean of the ``k`` values closest to the center
        (of two values at equal distance on either side, the smaller is kept).
        Centers and sums are computed in float64. Only the rows in ``rows``
        (an int64 NumPy vector) are read. The result is as for
        :meth:`combine`. See :mod:`flagagg.backends._order_stats`.
        """

    # Leaves given as p separate rows (pytrees of per-layer arrays): each
    # leaf is a list of the p workers' 1-D rows of one length and dtype, all
    # leaves are passed at once, and no leaf is stacked into a (p, m) copy.

    def gram_rows(self, leaves: list) -> np.ndarray:
        """Return the float64 Gram matrix summed over ``leaves``, as :meth:`gram`."""

    def combine_rows(self, coef: np.ndarray, leaves: list) -> list:
        """Return each leaf's ``sum_i coef[i] * row_i``, as :meth:`combine`."""

    def coordinate_stat_rows(self, leaves: list, rows: np.ndarray, center: str, trim: int,
                             k: int) -> list:
        """Return each leaf's statistic of the rows ``rows``, as :meth:`coordinate_stat`."""


def compute_dtype_name(dtype_name: str) -> str:
    """Name of the float dtype used for arithmetic on inputs of ``dtype_name``.

    Half-precision inputs are computed in float32 (and cast back on output).
    """
    return "float32" if dtype_name in ("float16", "bfloat16") else dtype_name
