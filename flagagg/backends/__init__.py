"""Backend registry and the kernel implementations.

Backends are imported lazily: this module names them and checks with
:func:`importlib.util.find_spec` whether their library is installed, without
importing numba, torch or cupy. Which backend a call uses is decided above
this package, in :mod:`flagagg._backend_choice`; this package knows nothing of
the user's choice.
"""

from __future__ import annotations

import importlib
from functools import cache

from ._base import Backend, compute_dtype_name
from ._registry import _REGISTRY, BACKEND_NAMES, _library_installed

__all__ = ["BACKEND_NAMES", "Backend", "compute_dtype_name"]


@cache
def _implementation(name: str) -> Backend:
    """Import and return the implementation of backend ``name`` (a registry name, not "auto").

    Raises
    ------
    ValueError
        If the name is unknown.
    ImportError
        If its library is missing; the message names the extra to install.
    """
    try:
        module_name, library, extra = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; known backends: {', '.join(BACKEND_NAMES)}"
        ) from None
    if not _library_installed(library):
        raise ImportError(
            f"backend {name!r} needs {library}, which is not installed; "
            f"install it with: pip install 'flagagg[{extra}]'"
        )
    return importlib.import_module(module_name).BACKEND


@cache
def _host_backend() -> Backend:
    """The kernels for CPU tensors and host arrays: numba's when installed, else NumPy's."""
    return _implementation("numba" if _library_installed("numba") else "numpy")
