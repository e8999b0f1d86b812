"""Backend registry.

Backends are imported lazily: this module names them and checks with
:func:`importlib.util.find_spec` whether their library is installed, without
importing numba, torch or cupy.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache

from ._base import Backend

__all__ = ["BACKEND_NAMES", "Backend", "get_backend_impl", "installed_backends", "select_backend"]

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
