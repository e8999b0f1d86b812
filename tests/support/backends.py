"""The backends under test: one case per library (and device), from NumPy data and back.

Every backend case converts NumPy test data into its library (and device)
and back, so one test body checks all of them. Unavailable libraries and
devices skip cleanly. The ``lib`` fixture (tests/conftest.py) runs a test
once per case; ``make_lib`` builds one case by name.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from flagagg._array import array_library, to_numpy


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _cuda_available() -> bool:
    if not has_module("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def _cupy_gpu() -> bool:
    if not has_module("cupy"):
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no driver, no device: skip
        return False


@dataclass
class Lib:
    """A backend under test: how to move NumPy data there and back."""

    id: str
    backend: str
    library: str
    to: Callable[[np.ndarray], Any]
    device: Any = None

    def back(self, x: Any) -> np.ndarray:
        return np.asarray(to_numpy(x))

    def check(self, out: Any, like_dtype: str) -> None:
        """Assert that ``out`` has the library, device and dtype of the inputs."""
        assert array_library(out) == self.library, (array_library(out), self.library)
        name = str(out.dtype).replace("torch.", "")
        assert like_dtype in name, (name, like_dtype)
        if self.device is not None:
            assert str(out.device) == str(self.device)


def make_lib(case: str) -> Lib:
    if case in ("numpy", "numba"):
        return Lib(case, case, "numpy", lambda a: np.array(a))
    if case.startswith("torch"):
        import torch

        dev = case.split("-", 1)[1]
        return Lib(case, "torch", "torch", lambda a: torch.as_tensor(np.array(a), device=dev),
                   device=torch.device(dev) if dev == "cuda" else None)
    if case == "cupy":
        import cupy

        return Lib(case, "cupy", "cupy", lambda a: cupy.asarray(a))
    if case == "array_api_strict":
        import array_api_strict as xps

        return Lib(case, "array_api", "array_api_strict", lambda a: xps.asarray(np.array(a)))
    raise ValueError(case)


BACKEND_CASES = [
    pytest.param("numpy", id="numpy"),
    pytest.param("numba", id="numba",
                 marks=pytest.mark.skipif(not has_module("numba"), reason="numba missing")),
    pytest.param("torch-cpu", id="torch-cpu",
                 marks=pytest.mark.skipif(not has_module("torch"), reason="torch missing")),
    pytest.param("torch-cuda", id="torch-cuda",
                 marks=[pytest.mark.gpu,
                        pytest.mark.skipif(not _cuda_available(), reason="no CUDA device")]),
    pytest.param("cupy", id="cupy",
                 marks=[pytest.mark.gpu,
                        pytest.mark.skipif(not _cupy_gpu(), reason="no CuPy GPU")]),
    pytest.param("array_api_strict", id="array_api_strict",
                 marks=pytest.mark.skipif(not has_module("array_api_strict"),
                                          reason="array-api-strict missing")),
]
