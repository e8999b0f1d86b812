"""The asv suite must not rot: every benchmark runs once with its smallest parameters."""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ASV_DIR = Path(__file__).resolve().parent.parent / "asv_bench"
PREFIXES = ("time_", "peakmem_", "track_", "mem_")


def _load_suite():
    """Import asv_bench/benchmarks as a package under a name that cannot clash."""
    name = "flagagg_asv_benchmarks"
    if name in sys.modules:
        return sys.modules[name]
    path = ASV_DIR / "benchmarks"
    spec = importlib.util.spec_from_file_location(
        name, path / "__init__.py", submodule_search_locations=[str(path)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    for info in pkgutil.iter_modules([str(path)]):
        importlib.import_module(f"{name}.{info.name}")
    return package


def _benchmark_classes():
    package = _load_suite()
    found = []
    for mod_name, module in sorted(sys.modules.items()):
        if not mod_name.startswith(package.__name__ + "."):
            continue
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            methods = [m for m in dir(cls) if m.startswith(PREFIXES)]
            if methods:
                found.append(pytest.param(cls, methods, id=f"{mod_name.rsplit('.', 1)[1]}."
                                                          f"{cls_name}"))
    return found


def _smallest(values):
    """The smallest of numeric parameter values; every value of the others (rule names)."""
    if all(isinstance(v, (int, float)) for v in values):
        return [min(values)]
    return list(values)


@pytest.mark.parametrize("cls,methods", _benchmark_classes())
def test_every_benchmark_runs_with_smallest_params(cls, methods, monkeypatch):
    monkeypatch.setenv("FLAGAGG_ASV_MAX_BYTES", str(1 << 30))
    monkeypatch.setenv("FLAGAGG_ASV_LARGE_P_BYTES", str(1 << 22))  # bench_large_p: 4 MiB
    params = getattr(cls, "params", [])
    if params and not isinstance(params[0], (list, tuple)):
        params = [params]
    ran = 0
    for combo in itertools.product(*(_smallest(v) for v in params)):
        bench = cls()
        try:
            if hasattr(bench, "setup"):
                bench.setup(*combo)
        except NotImplementedError:
            continue  # asv's skip: library, device or size not available here
        for name in methods:
            result = getattr(bench, name)(*combo)
            if name.startswith("track_"):
                assert isinstance(result, (int, float)), (name, combo, result)
        if hasattr(bench, "teardown"):
            bench.teardown(*combo)
        ran += 1
    assert ran, f"{cls.__name__}: every parameter combination was skipped"


@pytest.mark.skipif(importlib.util.find_spec("asv") is None,
                    reason="asv missing (pip install 'flagagg[bench]')")
def test_asv_discovers_the_suite(tmp_path):
    # `asv check` imports every benchmark in the current environment without running it.
    env = dict(os.environ, HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "asv", "check", "--python=same"], cwd=ASV_DIR,
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "No problems found" in out.stdout
