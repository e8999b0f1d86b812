"""Shared fixtures: one backend fixture built from the registry.

The helpers behind them live in the ``support`` package (tests/support/),
which test modules import instead of importing this file or each other.
"""

from __future__ import annotations

import pytest

from support.backends import BACKEND_CASES, Lib, make_lib


@pytest.fixture(params=BACKEND_CASES)
def lib(request) -> Lib:
    return make_lib(request.param)


@pytest.fixture(params=["float32", "float64"])
def dtype(request) -> str:
    return request.param
