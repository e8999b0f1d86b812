"""Backend selection: context manager, threads, environment, errors, light import."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import flagagg

from support.backends import has_module


def test_default_is_auto_and_contexts_nest():
    assert flagagg.get_backend() == "auto"
    with flagagg.backend("numpy") as name:
        assert name == "numpy" == flagagg.get_backend()
        with flagagg.backend("array_api"):
            assert flagagg.get_backend() == "array_api"
        assert flagagg.get_backend() == "numpy"
    assert flagagg.get_backend() == "auto"


def test_context_resets_on_exception():
    with pytest.raises(RuntimeError):
        with flagagg.backend("numpy"):
            raise RuntimeError("boom")
    assert flagagg.get_backend() == "auto"


def test_context_does_not_leak_across_threads():
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def worker():
        with flagagg.backend("numpy"):
            inside.set()
            release.wait(5)
            seen["worker"] = flagagg.get_backend()

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(5)
    seen["main"] = flagagg.get_backend()
    release.set()
    t.join()
    assert seen == {"worker": "numpy", "main": "auto"}


def test_context_is_task_local_in_asyncio():
    async def task(name, delay):
        with flagagg.backend(name):
            await asyncio.sleep(delay)
            return flagagg.get_backend()

    async def main():
        return await asyncio.gather(task("numpy", 0.02), task("array_api", 0.01))

    assert asyncio.run(main()) == ["numpy", "array_api"]


def test_set_backend_and_env_precedence(monkeypatch):
    monkeypatch.setenv("FLAGAGG_BACKEND", "array_api")
    assert flagagg.get_backend() == "array_api"
    flagagg.set_backend("numpy")
    try:
        assert flagagg.get_backend() == "numpy"
        with flagagg.backend("auto"):
            assert flagagg.get_backend() == "auto"
    finally:
        flagagg.set_backend(None)
    assert flagagg.get_backend() == "array_api"
    monkeypatch.setenv("FLAGAGG_BACKEND", "nope")
    with pytest.raises(ValueError, match="FLAGAGG_BACKEND"):
        flagagg.get_backend()


def test_per_call_keyword_wins():
    G = np.random.default_rng(0).normal(size=(4, 10))
    with flagagg.backend("array_api"):
        res = flagagg.flag_aggregate(G, backend="numpy", return_result=True)
    assert res.backend == "numpy"


def test_the_precedence_table_row_by_row(monkeypatch):
    # docs/backends.rst, "How the backend is chosen": the first row that is set wins
    G = np.random.default_rng(0).normal(size=(4, 10))
    rule = flagagg.FlagAggregator(backend="numpy")
    monkeypatch.setenv("FLAGAGG_BACKEND", "numpy")
    flagagg.set_backend("array_api")  # row 3: set_backend before the environment
    try:
        assert flagagg.get_backend() == "array_api"
        assert flagagg.flag_aggregate(G, return_result=True).backend == "array_api"
        with flagagg.backend("numpy"):  # row 2 over row 3
            assert flagagg.flag_aggregate(G, return_result=True).backend == "numpy"
            with flagagg.backend("array_api"):
                # row 1: the rule object's backend= over any block ...
                assert rule(G, return_result=True).backend == "numpy"
                # ... and the call's backend= over the rule object's
                assert rule(G, return_result=True, backend="array_api").backend == "array_api"
    finally:
        flagagg.set_backend(None)
    assert flagagg.get_backend() == "numpy"  # row 3 again: the environment
    monkeypatch.delenv("FLAGAGG_BACKEND")
    assert flagagg.get_backend() == "auto"  # row 4


def test_auto_picks_from_inputs():
    G = np.random.default_rng(0).normal(size=(4, 10))
    res = flagagg.flag_aggregate(G, return_result=True)
    assert res.backend == ("numba" if has_module("numba") else "numpy")


def test_unknown_backend_lists_known_names():
    with pytest.raises(ValueError, match="unknown backend 'fortran'.*numba"):
        with flagagg.backend("fortran"):
            pass


def test_missing_library_names_the_extra():
    if has_module("cupy"):
        pytest.skip("cupy is installed")
    with pytest.raises(ImportError, match=r"pip install 'flagagg\[cupy\]'"):
        flagagg.flag_aggregate(np.ones((2, 3)), backend="cupy")


def test_available_backends():
    names = flagagg.available_backends()
    assert "numpy" in names and "array_api" in names
    assert ("numba" in names) == has_module("numba")


def test_a_numpy_aggregation_loads_no_numpy_extras():
    """On NumPy >= 2.1 flagagg computes in numpy itself: array_api_compat's numpy
    wrapper would run ``from numpy import *`` (numpy.ma, numpy.testing, numpy.f2py:
    0.1 s of every process's first aggregation). Older NumPy keeps the wrapper."""
    loaded = _loaded_after(
        "G = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)\n"
        "for rule in ('mean', 'flag', 'median', 'krum'):\n"
        "    flagagg.aggregate(G, rule=rule, backend='numpy', f=1)\n",
        ("numpy.ma", "numpy.testing", "numpy.f2py", "array_api_compat.numpy"))
    from flagagg._namespace import _NUMPY_IS_STANDARD

    if _NUMPY_IS_STANDARD:
        assert loaded == [], f"a numpy aggregation loaded: {loaded}"
    else:
        assert "array_api_compat.numpy" in loaded


def test_the_namespace_is_numpy_for_numpy_arrays_and_compat_for_others():
    from flagagg._namespace import _NUMPY_IS_STANDARD, array_namespace

    a = np.ones(3)
    assert (array_namespace(a) is np) == _NUMPY_IS_STANDARD
    assert (array_namespace(a, a) is np) == _NUMPY_IS_STANDARD
    assert array_namespace(np.float64(1.0)) is not np  # a NumPy scalar: the wrapper's rules
    torch = pytest.importorskip("torch")
    t = torch.ones(3)
    assert array_namespace(t).__name__ == "array_api_compat.torch"
    with pytest.raises(TypeError):
        array_namespace(a, t)


def _loaded_after(body, modules):
    """Which of ``modules`` a fresh process holds after ``import flagagg`` and ``body``."""
    code = ("import sys, flagagg, numpy as np\n" + body
            + f"print(','.join(m for m in {tuple(modules)!r} if m in sys.modules))\n")
    env = {k: v for k, v in os.environ.items() if k != "FLAGAGG_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    return [m for m in out.stdout.strip().split(",") if m]


def test_import_is_light():
    loaded = _loaded_after("flagagg.aggregate(np.ones((3, 4)), rule='mean', backend='numpy')\n",
                           ("numba", "torch", "cupy", "flagagg.sim"))
    assert loaded == [], f"import flagagg pulled in: {loaded}"
