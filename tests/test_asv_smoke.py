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

# benchmark / docs / packaging smoke: out of `pytest -m "not tooling"` (make test runs it)
pytestmark = pytest.mark.tooling

ASV_DIR = Path(__file__).resolve().parent.parent / "asv_bench"
PREFIXES = ("time_", "peakmem_", "track_", "mem_")


def _load_suite():
    """Import asv_bench/benchmarks as a package under a name that cannot clash.

    The full tier's parameters are loaded: its smallest shapes are smaller
    than the quick tier's, and every CPU backend installed is covered.
    """
    name = "flagagg_asv_benchmarks"
    if name in sys.modules:
        return sys.modules[name]
    path = ASV_DIR / "benchmarks"
    spec = importlib.util.spec_from_file_location(
        name, path / "__init__.py", submodule_search_locations=[str(path)])
    package = importlib.util.module_from_spec(spec)
    saved = os.environ.get("FLAGAGG_ASV_TIER")
    os.environ["FLAGAGG_ASV_TIER"] = "full"
    try:
        sys.modules[name] = package
        spec.loader.exec_module(package)
        for info in pkgutil.iter_modules([str(path)]):
            importlib.import_module(f"{name}.{info.name}")
    finally:
        if saved is None:
            del os.environ["FLAGAGG_ASV_TIER"]
        else:
            os.environ["FLAGAGG_ASV_TIER"] = saved
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
    monkeypatch.setattr(sys.modules["flagagg_asv_benchmarks.common"], "RATIO_REPEATS", 1)
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
                if name.startswith("track_ratio"):
                    assert 0 < result < float("inf"), (name, combo, result)
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


_TIER_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from benchmarks import bench_flag, bench_kernels, bench_large_p, bench_pytree, bench_rules, common
classes = [bench_flag.FlagAggregate, bench_flag.FlagIterations, bench_kernels.Kernels,
           bench_large_p.LargeP, bench_pytree.PerLayer, bench_rules.Rules]
print(json.dumps({"present": common.PRESENT,
                  "params": {c.__name__: c.params for c in classes},
                  "methods": {c.__name__: sorted(m for m in dir(c) if m.startswith(
                      ("time_", "peakmem_", "track_"))) for c in classes}}))
"""


def _tier(tier):
    import json

    out = subprocess.run([sys.executable, "-c", _TIER_PROBE, str(ASV_DIR)], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, FLAGAGG_ASV_TIER=tier))
    if tier not in ("quick", "full"):
        return out
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_tiers_choose_the_parameters_and_absent_backends_get_none():
    quick, full = _tier("quick"), _tier("full")
    present = [s for s, why in quick["present"].items() if why is None]
    for tier in (quick, full):
        for name, params in tier["params"].items():
            assert params[0], name  # at least one backend: numpy is always there
            assert set(params[0]) <= set(present), (name, params[0], tier["present"])
    rules = quick["params"]["Rules"][1]
    # the quick tier covers every rule family and FA; full adds shapes and the p-sweep
    assert {"flag", "krum", "median", "trimmed_mean", "bulyan", "mean", "nnm+krum"} <= set(rules)
    assert quick["params"]["LargeP"][1] == [256]
    assert full["params"]["LargeP"][1] == [15, 64, 256, 1024]
    assert len(quick["params"]["Kernels"][1]) == 1 and len(full["params"]["Kernels"][2]) == 3
    assert max(full["params"]["FlagAggregate"][2]) == 10_000_000
    assert "peakmem_rule" in full["methods"]["Rules"]
    assert "peakmem_rule" not in quick["methods"]["Rules"]
    # every class tracks a ratio in both tiers
    for tier in (quick, full):
        for name, methods in tier["methods"].items():
            assert any(m.startswith("track_ratio") for m in methods), name
    if quick["present"]["cupy"] is not None:
        assert all("cupy" not in p[0] for p in quick["params"].values())


def test_an_unknown_tier_is_an_error_that_names_the_choices():
    out = _tier("fast")
    assert out.returncode != 0 and "FLAGAGG_ASV_TIER='fast': use one of quick, full" in out.stderr


def test_plan_prints_one_line_per_class_with_what_was_left_out():
    out = subprocess.run([sys.executable, str(ASV_DIR / "plan.py")], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, FLAGAGG_ASV_TIER="quick"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("asv tier quick: ")
    assert sum(".Rules:" in line for line in lines) == 1
    if importlib.util.find_spec("cupy") is None:
        assert "cupy (cupy not installed)" in next(line for line in lines if ".Rules:" in line)
