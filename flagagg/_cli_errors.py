"""How every ``flagagg`` sub-command reports a configuration or data error."""

from __future__ import annotations

import sys

__all__ = ["report_error"]


def report_error(exc: BaseException) -> int:
    """Print a configuration or data error without a traceback; return the exit status."""
    print(f"flagagg: error: {exc}", file=sys.stderr)
    return 2
