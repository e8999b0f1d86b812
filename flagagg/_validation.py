"""Parameter checks shared by rules, attacks, configs and the command line.

One convention everywhere: a value of the wrong type is a TypeError, a value
of the right type outside its range is a ValueError, and the message names
the parameter, the owner (rule, attack, option) and what was given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Anything", "Choice", "Constraint", "Int", "Real", "Text", "check_choice",
           "check_int", "check_params", "check_real", "check_text"]


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
               strict: bool = False, none: bool = False, high: float | None = None,
               high_strict: bool = False) -> float | None:
    """Check a finite real parameter.

    Parameters
    ----------
    name, value, owner, none
        As in :func:`check_int`.
    low : float, optional
        Bound below.
    strict : bool, default=False
        Whether ``low`` itself is excluded (``value > low``).
    high : float, optional
        Bound above.
    high_strict : bool, default=False
        Whether ``high`` itself is excluded (``value < high``).

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
    if high is not None and (value >= high if high_strict else value > high):
        op = "<" if high_strict else "<="
        raise ValueError(f"need {name} {op} {high:g}{_owner(owner)}: got {name}={value:g}")
    return value


def check_text(name: str, value: Any, *, owner: str | None = None) -> str:
    """Check a non-empty string parameter.

    Raises
    ------
    TypeError
        If ``value`` is not a string.
    ValueError
        If it is empty.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string{_owner(owner)}: got {value!r}")
    if not value:
        raise ValueError(f"{name} must not be empty{_owner(owner)}")
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


# --------------------------------------------------------------------------
# Declared constraints: what a rule (or step, or attack) states once about each of
# its parameters. ``check`` applies the helpers above; ``describe`` is the phrase
# the docs tables and error messages use.


@dataclass(frozen=True)
class Int:
    """An integer parameter, optionally bounded below and optionally None."""

    low: int | None = None
    none: bool = False

    def check(self, name: str, value: Any, owner: str | None = None) -> int | None:
        """Return ``value`` as an int (or None), or raise TypeError / ValueError."""
        return check_int(name, value, owner=owner, low=self.low, none=self.none)

    def describe(self) -> str:
        """The constraint in words, e.g. ``"an integer >= 1, or None"``."""
        text = "an integer" if self.low is None else f"an integer >= {self.low}"
        return f"{text}, or None" if self.none else text


@dataclass(frozen=True)
class Real:
    """A finite real parameter, optionally bounded below (strictly or not) and None."""

    low: float | None = None
    strict: bool = False
    none: bool = False
    high: float | None = None
    high_strict: bool = False

    def check(self, name: str, value: Any, owner: str | None = None) -> float | None:
        """Return ``value`` as a float (or None), or raise TypeError / ValueError."""
        return check_real(name, value, owner=owner, low=self.low, strict=self.strict,
                          none=self.none, high=self.high, high_strict=self.high_strict)

    def describe(self) -> str:
        """The constraint in words, e.g. ``"a finite number > 0 and < 1"``."""
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.strict else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_strict else '<='} {self.high:g}")
        text = " ".join(["a finite number", " and ".join(bounds)]).strip()
        return f"{text}, or None" if self.none else text


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of values."""

    values: tuple

    def check(self, name: str, value: Any, owner: str | None = None) -> Any:
        """Return ``value``, or raise ValueError listing the choices."""
        return check_choice(name, value, self.values, owner=owner)

    def describe(self) -> str:
        """The constraint in words, e.g. ``"one of 'paper', 'reference'"``."""
        return "one of " + ", ".join(repr(v) for v in self.values)


@dataclass(frozen=True)
class Text:
    """A non-empty string."""

    def check(self, name: str, value: Any, owner: str | None = None) -> str:
        """Return ``value``, or raise TypeError / ValueError."""
        return check_text(name, value, owner=owner)

    def describe(self) -> str:
        """``"a non-empty string"``."""
        return "a non-empty string"


@dataclass(frozen=True)
class Anything:
    """A parameter checked where it is used (an array, a seed); ``what`` says what it is."""

    what: str

    def check(self, name: str, value: Any, owner: str | None = None) -> Any:
        """Return ``value`` unchanged."""
        return value

    def describe(self) -> str:
        """``what``."""
        return self.what


Constraint = Int | Real | Choice | Text | Anything


def check_params(owner: str, constraints: Mapping[str, Constraint],
                 values: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``values`` against their declared ``constraints``; return the checked values.

    Raises
    ------
    TypeError
        A value of the wrong type, or a name without a declared constraint.
    ValueError
        A value of the right type out of range.
    """
    out = {}
    for name, value in values.items():
        if name not in constraints:
            raise TypeError(f"{owner} declares no parameter {name!r}; its parameters: "
                            f"{', '.join(constraints) or 'none'}")
        out[name] = constraints[name].check(name, value, owner)
    return out
