"""Backend registry.

Backends are imported lazily: this module names them and checks with
:func:`importlib.util.find_spec` whether their library is installed, without
importing numba, torch or cupy.
"""

from __future__ import annotations

import importlib
from functools import cache

from ._base import Backend
from ._registry import _REGISTRY, BACKEND_NAMES, _library_installed, installed_backends

__all__ = ["BACKEND_NAMES", "Backend", "get_backend_impl", "installed_backends", "select_backend"]

@cache
def get_backend_impl(name: str) -> Backend:
    """Import and return the backend called ``name``.

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


# Input library -> backend that "auto" picks for it.
_AUTO = {"torch": "torch", "cupy": "cupy"}


def select_backend(name: str | None, sample: object, library: str) -> Backend:
    """Resolve the backend for one call.

    Parameters
    ----------
    name : str or None
        The per-call ``backend=`` argument; ``None`` uses
        :func:`flagagg.get_backend`.
    sample : array
        One of the input arrays (to check library and device).
    library : str
        The inputs' library, from :func:`flagagg._array.array_library`.

    Returns
    -------
    backend : Backend

    Raises
    ------
    TypeError
        If the named backend cannot compute on these arrays (nothing is
        converted silently).
    """
    from .._config import _validate, get_backend

    key = get_backend() if name is None else _validate(name)
    if key == "auto":
        if library == "numpy":
            key = "numba" if _library_installed("numba") else "numpy"
        else:
            key = _AUTO.get(library, "array_api")
    impl = get_backend_impl(key)
    if not impl.accepts(sample):
        raise TypeError(
            f"backend {key!r} cannot compute on {library} arrays; use backend='auto' "
            "or convert the inputs yourself"
        )
    return impl
