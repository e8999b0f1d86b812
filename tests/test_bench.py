"""``make bench`` (asv_bench/report.py) runs end to end, and its dense reference is right."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import flagagg

from oracle import flag_dense

# benchmark / docs / packaging smoke: out of `pytest -m "not tooling"` (make test runs it)
pytestmark = pytest.mark.tooling

REPORT = Path(__file__).resolve().parent.parent / "asv_bench" / "report.py"


def _load_report():
    spec = importlib.util.spec_from_file_location("flagagg_bench_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_bench = _load_report()


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_dense_reference_matches_oracle_and_solver(lam):
    G = _bench.make_stack(7, 400).astype(np.float64)
    out, setup_s, step_s = _bench.dense_flag(G, 3, lam, steps=5)
    assert setup_s >= 0 and len(step_s) == 5
    ref, *_ = flag_dense(G, 3, lam, max_iter=5, tol=0.0)
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-12)
    fast = flagagg.flag_aggregate(G, 3, lam, max_iter=5, tol=0.0, rescale=None, backend="numpy")
    np.testing.assert_allclose(fast, out, rtol=1e-8, atol=1e-10)


def test_make_stack_shape_and_dtype():
    G = _bench.make_stack(5, 100, f=2)
    assert G.shape == (5, 100) and G.dtype == np.float32
    assert np.all(np.sign(G[3:]) == -np.sign(G[3:] / -10))  # the last f rows are reversed


def test_paired_ratio_is_a_ratio():
    r = _bench.paired_ratio(lambda: sum(range(100)), lambda: sum(range(100)), 3)
    assert r.base_s > 0 and r.cand_s > 0 and r.ratio > 0


def test_bench_runs_tiny(capsys):
    parser = argparse.ArgumentParser()
    _bench.add_arguments(parser)
    # The detection section has its own cheap test below (and tests/test_detection.py).
    args = parser.parse_args(["--quick", "-n", "20000", "--rules-n", "5000", "--dense-n", "2000",
                              "--repeats", "1", "--skip", "detection"])
    assert _bench.run(args) == 0
    out = capsys.readouterr().out
    for text in ("flag_aggregate lam=0 / np.mean", "time of G @ G.T / kernel",
                 "dense / flag_aggregate, lam=1", "20 steps / 1 step", "tracemalloc peak"):
        assert text in out
    for name in flagagg.available_rules():
        assert f"  {name} " in out


def test_report_shares_the_asv_suites_data_builders():
    # one definition of the inputs: make bench and asv measure the same data
    data = sys.modules["benchmarks._data"]
    assert _bench.make_stack is data.make_stack and _bench.per_layer is data.per_layer
    assert _bench.paired_ratio is data.paired_ratio


def test_bench_is_not_a_cli_command_and_the_package_has_no_bench_module():
    assert importlib.util.find_spec("flagagg._bench") is None
    out = subprocess.run([sys.executable, "-m", "flagagg", "bench"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "invalid choice: 'bench'" in out.stderr


def test_detection_section_judges_the_targeted_attacks(capsys, monkeypatch):
    import detection

    def fake_run(steps, attacks, progress):
        table = {(r, a): (1.0, 1.0) for r in ("flag", "median") for a in attacks}
        table["median", "nan"] = (0.5, 1.0)  # a miss on a targeted attack
        return table

    monkeypatch.setattr(detection, "run", fake_run)
    table = _bench._Table(judge=True)
    _bench._detection_section(table, quick=False)
    out = capsys.readouterr().out
    assert "nan: precision / recall" in out and "0.50 (median)" in out
    assert table.missed == ["nan: precision / recall"]
    assert "alie: precision / recall" in out and "reported" in out
