"""The names of the backends and whether their library is installed (nothing imported).

Kept apart from :mod:`flagagg.backends` so that :mod:`flagagg._config` can
validate names without importing the module that reads the configuration
back (no import cycle).
"""

from __future__ import annotations

import importlib.util

__all__ = ["BACKEND_NAMES", "installed_backends"]

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


def installed_backends() -> list[str]:
    """Names of the backends whose library is installed (nothing is imported)."""
    return [name for name, (_, lib, _) in _REGISTRY.items() if _library_installed(lib)]
