"""The user's choice of backend, and how a call turns it into an implementation.

The choice made by ``with flagagg.backend(...)`` lives in a
:class:`contextvars.ContextVar`, so a block is scoped to the current thread or
asyncio task and is undone with a token reset even when the block raises.
The order in which the choices apply is one table in the docs
(``docs/backends.rst``, "How the backend is chosen"); :func:`select_backend`
is the one place that applies it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

from .backends import _REGISTRY, BACKEND_NAMES, Backend, _implementation, _library_installed

__all__ = ["available_backends", "backend", "get_backend", "select_backend", "set_backend"]

_UNSET = "__unset__"

# Context-local choice made by ``backend(...)``; _UNSET means "not inside a block".
_context_backend: contextvars.ContextVar[str] = contextvars.ContextVar(
    "flagagg_backend", default=_UNSET
)
# Process default made by ``set_backend``; None means "not set" (FLAGAGG_BACKEND applies).
_default_backend: str | None = None

# Input library -> backend that "auto" picks for it (NumPy: see select_backend).
_AUTO = {"torch": "torch", "cupy": "cupy"}


def _validate(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    known = ("auto", *BACKEND_NAMES)
    if key not in known:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(known)}")
    return key


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend.

    Parameters
    ----------
    name : str or None
        A name from :func:`available_backends` (or ``"auto"``); ``None``
        clears the default so that ``FLAGAGG_BACKEND`` or ``"auto"`` apply.

    Raises
    ------
    TypeError
        If the name is not a string.
    ValueError
        If the name is unknown.
    """
    global _default_backend
    _default_backend = None if name is None else _validate(name)


def get_backend() -> str:
    """Return the name of the backend that a call without ``backend=`` uses.

    Returns
    -------
    name : str
        ``"auto"`` unless a ``with flagagg.backend(...)`` block,
        :func:`set_backend` or the ``FLAGAGG_BACKEND`` environment variable
        chose another.
    """
    name = _context_backend.get()
    if name != _UNSET:
        return name
    if _default_backend is not None:
        return _default_backend
    env = os.environ.get("FLAGAGG_BACKEND", "").strip()
    if env:
        try:
            return _validate(env)
        except ValueError as exc:
            raise ValueError(f"FLAGAGG_BACKEND: {exc}") from None
    return "auto"


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Use backend ``name`` inside a ``with`` block.

    Blocks nest; leaving a block (also through an exception) restores the
    previous choice. The choice is local to the thread or asyncio task.

    Parameters
    ----------
    name : str
        A name from :func:`available_backends`, or ``"auto"``.

    Yields
    ------
    name : str
        The normalised backend name.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> with flagagg.backend("numpy"):
    ...     flagagg.get_backend()
    'numpy'
    >>> flagagg.get_backend()
    'auto'
    """
    key = _validate(name)
    token = _context_backend.set(key)
    try:
        yield key
    finally:
        _context_backend.reset(token)


def available_backends() -> list[str]:
    """List the backends whose libraries are installed.

    Returns
    -------
    names : list of str
        Installed backends, in registry order. Checking does not import the
        libraries.
    """
    return [name for name, (_, lib, _) in _REGISTRY.items() if _library_installed(lib)]


def select_backend(name: str | None, sample: object, library: str) -> Backend:
    """Resolve the backend implementation for one call.

    Parameters
    ----------
    name : str or None
        The ``backend=`` given to the call (or to the rule object); ``None``
        uses :func:`get_backend`.
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
    key = get_backend() if name is None else _validate(name)
    if key == "auto":
        if library == "numpy":
            key = "numba" if _library_installed("numba") else "numpy"
        else:
            key = _AUTO.get(library, "array_api")
    impl = _implementation(key)
    if not impl.accepts(sample):
        raise TypeError(
            f"backend {key!r} cannot compute on {library} arrays; use backend='auto' "
            "or convert the inputs yourself"
        )
    return impl
