"""Backend selection.

The active backend lives in a :class:`contextvars.ContextVar`, so a
``with flagagg.backend(...)`` block is scoped to the current thread or asyncio
task and is undone with a token reset even when the block raises.
Precedence, highest first: the per-call ``backend=`` keyword, the innermost
``backend(...)`` context, :func:`set_backend`, the ``FLAGAGG_BACKEND``
environment variable, and finally ``"auto"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

__all__ = ["available_backends", "backend", "get_backend", "set_backend"]

_UNSET = "__unset__"

# Context-local choice made by ``backend(...)``; _UNSET means "not inside a block".
_context_backend: contextvars.ContextVar[str] = contextvars.ContextVar(
    "flagagg_backend", default=_UNSET
)
# Process default made by ``set_backend``; None means "not set".
_default_backend: str | None = None


def _known_names() -> tuple[str, ...]:
    from .backends._registry import BACKEND_NAMES

    return ("auto", *BACKEND_NAMES)


def _validate(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    known = _known_names()
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
        ``"auto"`` unless a context, :func:`set_backend` or the
        ``FLAGAGG_BACKEND`` environment variable chose another.
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
    from .backends._registry import installed_backends

    return installed_backends()
