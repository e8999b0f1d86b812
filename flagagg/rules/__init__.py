"""Aggregation rules: a registry and one entry point.

``get_rule(name, **params)`` builds a callable rule; ``aggregate(G, rule=...)``
is the one-shot form. Rules register themselves in :data:`_RULES` by name.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._base import GramRule, Rule, RuleResult

__all__ = ["GramRule", "Rule", "RuleResult", "aggregate", "available_rules", "get_rule"]

# name -> "module:Class", imported on first use.
_RULES: dict[str, str] = {
    "mean": "flagagg.rules._mean:Mean",
    "flag": "flagagg.flag:FlagAggregator",
}


def available_rules() -> list[str]:
    """Names accepted by :func:`get_rule` and :func:`aggregate`.

    Returns
    -------
    names : list of str
    """
    return sorted(_RULES)


def _rule_class(name: str) -> type[Rule]:
    if not isinstance(name, str):
        raise TypeError(f"rule name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in _RULES:
        raise ValueError(f"unknown rule {name!r}; available rules: {', '.join(available_rules())}")
    module_name, cls_name = _RULES[key].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def get_rule(name: str, **params: Any) -> Rule:
    """Build the aggregation rule called ``name``.

    Parameters
    ----------
    name : str
        One of :func:`available_rules`.
    **params
        The rule's parameters (e.g. ``f`` for the Byzantine-robust rules,
        ``r`` and ``lam`` for ``"flag"``).

    Returns
    -------
    rule : Rule
        A callable ``rule(gradients, return_result=False, backend=None)``.

    Raises
    ------
    ValueError
        If the rule is unknown.
    TypeError
        If a parameter is not one of the rule's.
    """
    cls = _rule_class(name)
    try:
        return cls(**params)
    except TypeError as exc:
        raise TypeError(f"invalid parameters for rule {name!r}: {exc}") from None


def aggregate(
    gradients: Any,
    rule: str = "flag",
    *,
    return_result: bool = False,
    backend: str | None = None,
    **params: Any,
) -> Any:
    """Aggregate ``gradients`` with the rule called ``rule``.

    Parameters
    ----------
    gradients : array of shape (p, n), or sequence of p arrays or pytrees
        One input per worker.
    rule : str, default="flag"
        One of :func:`available_rules`.
    return_result : bool, default=False
        Return the rule's result object (diagnostics) instead of the aggregate.
    backend : str, optional
        Backend for this call.
    **params
        Parameters of the rule.

    Returns
    -------
    aggregate or result
        In the input's structure, library, device and float dtype.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.arange(6.0).reshape(3, 2)
    >>> flagagg.aggregate(G, rule="mean", backend="numpy")
    array([2., 3.])
    """
    return get_rule(rule, **params)(gradients, return_result=return_result, backend=backend)
