"""Aggregation rules: a registry and one entry point.

``get_rule(name, **params)`` builds a callable rule; ``aggregate(G, rule=...)``
is the one-shot form. Rules register themselves in :data:`_RULES` by name.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

from . import _pre
from ._base import NothingLeftError, Rule
from ._contract import Bound, Contract, Reference, Solution
from ._pre import compose
from ._result import AggregationResult

__all__ = [
    "AggregationResult",
    "Bound",
    "Contract",
    "NothingLeftError",
    "Reference",
    "Rule",
    "Solution",
    "aggregate",
    "available_pre",
    "available_rules",
    "get_rule",
]

# name -> "module:Class", imported on first use.
_RULES: dict[str, str] = {
    "mean": "flagagg.rules._mean:Mean",
    "median": "flagagg.rules._coordinate:Median",
    "trimmed_mean": "flagagg.rules._coordinate:TrimmedMean",
    "meamed": "flagagg.rules._coordinate:MeaMed",
    "phocas": "flagagg.rules._coordinate:Phocas",
    "krum": "flagagg.rules._krum:Krum",
    "multi_krum": "flagagg.rules._krum:MultiKrum",
    "bulyan": "flagagg.rules._krum:Bulyan",
    "geometric_median": "flagagg.rules._geomed:GeometricMedian",
    "centered_clipping": "flagagg.rules._clipping:CenteredClipping",
    "mda": "flagagg.rules._mda:MDA",
    "flag": "flagagg.rules._flag:FlagAggregator",
    "cge": "flagagg.rules._peers_cge:CGE",
    "medoid": "flagagg.rules._peers_medoid:Medoid",
    "monna": "flagagg.rules._peers_monna:MoNNA",
    "caf": "flagagg.rules._peers_caf:CAF",
    "smea": "flagagg.rules._peers_smea:SMEA",
    "clipped_clustering": "flagagg.rules._peers_clippedclustering:ClippedClustering",
    "fltrust": "flagagg.rules._peers_fltrust:FLTrust",
    "aksel": "flagagg.rules._peers_aksel:Aksel",
    "dnc": "flagagg.rules._peers_dnc:DnC",
    "signguard": "flagagg.rules._peers_signguard:SignGuard",
}


def available_rules() -> list[str]:
    """Names accepted by :func:`get_rule` and :func:`aggregate`.

    Returns
    -------
    names : list of str
    """
    return sorted(_RULES)


def available_pre() -> list[str]:
    """Names of the pre-aggregation steps accepted by ``pre=`` in :func:`get_rule`.

    Returns
    -------
    names : list of str
    """
    return _pre.available_pre()


def _rule_class(name: str) -> type[Rule]:
    if not isinstance(name, str):
        raise TypeError(f"rule name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in _RULES:
        raise ValueError(f"unknown rule {name!r}; available rules: {', '.join(available_rules())}")
    module_name, cls_name = _RULES[key].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def get_rule(name: str, *, pre: Any = None, backend: str | None = None, **params: Any) -> Rule:
    """Build the aggregation rule called ``name``.

    Parameters
    ----------
    name : str
        One of :func:`available_rules`.
    pre : list, optional
        Pre-aggregation steps applied first, in order: names from
        :func:`available_pre` (``"nnm"``, ``"bucketing"``, ``"clipping"``),
        ``(name, params)`` pairs, or step objects. ``f`` is passed to the
        steps that take it. A Gram rule after the steps still reads the
        inputs only twice; see :mod:`flagagg.rules._pre`.
    **params
        The rule's parameters (e.g. ``f`` for the Byzantine-robust rules,
        ``r`` and ``lam`` for ``"flag"``), checked against the rule's
        declared contract.
    backend : str, optional
        The backend of every call of the rule that names none (see
        :func:`flagagg.backend`); any rule takes it.

    Returns
    -------
    rule : Rule
        A callable ``rule(gradients, return_result=False, backend=None)``.

    Raises
    ------
    ValueError
        If the rule is unknown, or a parameter is out of its range.
    TypeError
        If a parameter is not one of the rule's, or of the wrong type.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> flagagg.get_rule("krum", f=3, pre=["nnm"])
    ComposedRule(rule=Krum(f=3), pre=[NNM(f=3)])
    >>> rule = flagagg.get_rule("trimmed_mean", f=1, pre=("nnm", ("bucketing", {"s": 2})))
    >>> rule.name
    'nnm+bucketing+trimmed_mean'
    """
    cls = _rule_class(name)
    _check_names(cls, params)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a backend name or None: got {backend!r}")
    try:
        if pre is not None and not (isinstance(pre, (list, tuple)) and len(pre) == 0):
            rule = compose(cls, pre, params)
        else:
            rule = cls(**params)
    except TypeError as exc:
        raise TypeError(f"invalid parameters for rule {name!r}: {exc}") from None
    if backend is not None:
        rule.backend = backend
    return rule


_MEANING = {"f": "the number of Byzantine inputs tolerated"}


@functools.cache
def _parameters(cls: type[Rule]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``cls``'s declared parameters, and those its constructor needs (read once per class)."""
    sig = inspect.signature(cls.__init__).parameters
    names = tuple(k for k in cls.contract.params if k != "backend")
    return names, tuple(k for k in names if sig[k].default is inspect.Parameter.empty)


def _check_names(cls: type[Rule], params: dict[str, Any]) -> None:
    """Give flagagg's own message for a missing or unknown parameter, before Python's."""
    names, required = _parameters(cls)
    unknown = sorted(set(params) - set(names) - {"backend"})
    if unknown:
        raise TypeError(
            f"rule {cls.name!r} takes no parameter {', '.join(map(repr, unknown))}; "
            f"its parameters: {', '.join(names) or 'none'}"
        )
    missing = [k for k in required if k not in params]
    if missing:
        what = ", ".join(f"{k} ({_MEANING[k]})" if k in _MEANING else k for k in missing)
        raise TypeError(
            f"rule {cls.name!r} needs {what}: pass it, e.g. "
            f"get_rule({cls.name!r}, {missing[0]}=...) or aggregate(G, rule={cls.name!r}, "
            f"{missing[0]}=...)"
        )


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
