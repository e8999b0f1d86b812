"""The names of the backends and whether their library is installed (nothing imported)."""

from __future__ import annotations

import importlib.util

__all__ = ["BACKEND_NAMES"]

# name -> (module holding ``BACKEND``, library it needs, extra that installs it)
_REGISTRY = {
    "numpy": ("flagagg.backends._numpy", "numpy", None),
    "numba": ("flagagg.backends._numba", "numba", "numba"),
    "torch": ("flagagg.backends._torch", "torch", "torch"),
    "cupy": ("flagagg.backends._cupy", "cupy", "cupy"),
    "array_api": ("flagagg.backends._array_api", "numpy", None),
}
BACKEND_NAMES = tuple(_REGISTRY)


def _library_installed(library: str) -> bool:
    return importlib.util.find_spec(library) is not None
