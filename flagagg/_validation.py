"""Parameter checks shared by rules, attacks, configs and the command line.

One convention everywhere: a value of the wrong type is a TypeError, a value
of the right type outside its range is a ValueError, and the message names
the parameter, the owner (rule, attack, option) and what was given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["check_choice", "check_int", "check_real"]


def _owner(owner: str | None) -> str:
    return f" for {owner}" if owner else ""


def check_int(name: str, value: Any, *, owner: str | None = None, low: int | None = None,
              none: bool = False) -> int | None:
    """Check an integer parameter.

    Parameters
    ----------
    name : str
        Parameter name, for the message.
    value : object
        The value given.
    owner : str, optional
        What the parameter belongs to (a rule name), for the message.
    low : int, optional
        Smallest admissible value.
    none : bool, default=False
        Whether ``None`` is admissible (then returned as is).

    Returns
    -------
    value : int or None

    Raises
    ------
    TypeError
        If ``value`` is not an integer (``bool`` is not one).
    ValueError
        If ``value < low``.
    """
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        kind = "an integer or None" if none else "an integer"
        raise TypeError(f"{name} must be {kind}{_owner(owner)}: got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"need {name} >= {low}{_owner(owner)}: got {name}={value}")
    return int(value)


def check_real(name: str, value: Any, *, owner: str | None = None, low: float | None = None,
               strict: bool = False, none: bool = False) -> float | None:
    """Check a finite real parameter.

    Parameters
    ----------
    name, value, owner, none
        As in :func:`check_int`.
    low : float, optional
        Bound below.
    strict : bool, default=False
        Whether ``low`` itself is excluded (``value > low``).

    Returns
    -------
    value : float or None

    Raises
    ------
    TypeError
        If ``value`` is not a real number.
    ValueError
        If it is not finite or is out of range.
    """
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number{_owner(owner)}: got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite{_owner(owner)}: got {name}={value}")
    if low is not None and (value <= low if strict else value < low):
        op = ">" if strict else ">="
        raise ValueError(f"need {name} {op} {low:g}{_owner(owner)}: got {name}={value:g}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any], *,
                 owner: str | None = None) -> Any:
    """Check that ``value`` is one of ``choices``.

    Raises
    ------
    ValueError
        If it is not (the message lists the choices).
    """
    choices = tuple(choices)
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {listed}{_owner(owner)}: got {value!r}")
    return value
