"""CuPy backend: the array-API kernels on CuPy arrays, on their GPU.

The Gram matrix is accumulated in float64 a large chunk of columns at a
time (cuBLAS ``gemm`` on the widened chunk; no float64 copy of the input),
the combination is a ``gemv`` per run of rows with non-zero coefficients.
Only the ``p x p`` Gram matrix and the ``p`` coefficients cross the bus.
"""

from __future__ import annotations

from typing import Any

import cupy

from ._array_api import ArrayAPIBackend


class CupyBackend(ArrayAPIBackend):
    """Array-API kernels on CuPy arrays."""

    name = "cupy"
    # Chunks large enough that kernel launches are negligible on a GPU.
    chunk_bytes = 1 << 26

    def accepts(self, x: Any) -> bool:
        """Accept CuPy arrays."""
        return isinstance(x, cupy.ndarray)


BACKEND = CupyBackend()
