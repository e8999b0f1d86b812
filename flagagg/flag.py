"""The Flag Aggregator's public face; it lives in :mod:`flagagg.rules._flag`.

Kept so that ``from flagagg.flag import flag_aggregate`` keeps working.
"""

from .rules._flag import FlagAggregator, FlagResult, flag_aggregate, solve_gram

__all__ = ["FlagAggregator", "FlagResult", "flag_aggregate", "solve_gram"]
