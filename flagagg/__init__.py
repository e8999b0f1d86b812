"""flagagg: Byzantine-robust gradient aggregation around the Flag Aggregator.

NumPy in, NumPy out; torch and CuPy inputs stay on their device. Nothing heavy
is imported here: numba, torch and cupy load on first use of their backend.
"""

from __future__ import annotations

from typing import Any

from ._config import available_backends, backend, get_backend, set_backend
from .rules import AggregationResult, aggregate, available_rules, get_rule
from .rules._flag import FlagAggregator, FlagResult, flag_aggregate

__version__ = "0.1.0.dev0"

__all__ = [
    "AggregationResult",
    "FlagAggregator",
    "FlagResult",
    "aggregate",
    "attacks",
    "available_backends",
    "available_rules",
    "backend",
    "flag_aggregate",
    "get_backend",
    "get_rule",
    "set_backend",
]


def __getattr__(name: str) -> Any:
    # Submodules with heavier imports load on first attribute access.
    if name in ("attacks", "sim", "distributed"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'flagagg' has no attribute {name!r}")
