"""CuPy backend: the array-API kernels on CuPy arrays, on their GPU."""

from __future__ import annotations

from typing import Any

import cupy

from ._array_api import ArrayAPIBackend


class CupyBackend(ArrayAPIBackend):
    """Array-API kernels on CuPy arrays."""

    name = "cupy"

    def accepts(self, x: Any) -> bool:
        """Accept CuPy arrays."""
        return isinstance(x, cupy.ndarray)


BACKEND = CupyBackend()
