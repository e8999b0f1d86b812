"""``flagagg bench`` runs end to end, and its dense reference computes the same math."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

import flagagg
from flagagg import _bench

from oracle import flag_dense


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
    args = parser.parse_args(["--quick", "-n", "20000", "--rules-n", "5000", "--dense-n", "2000",
                              "--repeats", "1"])
    assert _bench.run(args) == 0
    out = capsys.readouterr().out
    for text in ("flag_aggregate lam=0 / np.mean", "time of G @ G.T / kernel",
                 "dense / flag_aggregate, lam=1", "20 steps / 1 step", "tracemalloc peak"):
        assert text in out
    for name in flagagg.available_rules():
        assert f"  {name} " in out
