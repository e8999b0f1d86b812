"""NumPy backend: the generic array-API kernels, restricted to NumPy arrays.

Gram and combine go through BLAS (``syrk``/``gemv``) on float64 chunks; this
is the fallback for NumPy inputs when numba is not installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._array_api import ArrayAPIBackend


class NumpyBackend(ArrayAPIBackend):
    """Array-API kernels on NumPy arrays."""

    name = "numpy"

    def accepts(self, x: Any) -> bool:
        """Accept NumPy arrays only."""
        return isinstance(x, np.ndarray)


BACKEND = NumpyBackend()
