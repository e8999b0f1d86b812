"""The verdicts name the faulty workers: every rule, every blatant attack (p=15, f=3)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import flagagg

pytest.importorskip("torch")
pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "asv_bench"))
import detection  # noqa: E402 - asv_bench/ is not a package on the path

from support.rules import call  # noqa: E402


@pytest.fixture(scope="module")
def table():
    return detection.run(3, attacks=detection.TARGETED, progress=False)


def test_every_rule_names_every_blatant_attacker(table):
    assert len(table) == len(flagagg.available_rules()) * len(detection.TARGETED)
    assert detection.misses(table) == []


def test_the_table_formats_for_the_docs(table):
    text = detection.format_table(table, rst=True)
    assert text.splitlines()[0].startswith("====")
    assert "scaled x100" in text and "flag" in text


def _honest(seed=0, p=15, n=200):
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 0.3, size=(p, n))


@pytest.mark.parametrize("name", flagagg.available_rules())
def test_an_outsized_worker_is_never_trusted(name):
    """A worker whose norm no honest worker could have: a suspect, whatever its weight."""
    G = _honest()
    G[14] *= 100.0
    res = call(flagagg.get_rule(name, f=3), G, return_result=True, backend="numpy")
    assert res.verdict[14] != "trusted" and "outsized" in res.verdict[14], res.summary()
    assert 14 in res.suspects
    assert set(res.suspects) == {14}, res.summary()


def test_one_huge_worker_under_the_mean_names_it_not_the_honest():
    """The issue's case: one 1e30 row made the mean call the honest rows down-weighted."""
    G = _honest()[:8]
    G[7] = 1e30
    res = flagagg.aggregate(G, rule="mean", return_result=True, backend="numpy")
    assert res.suspects == (7,), res.summary()
    assert res.verdict[:7] == ("down-weighted",) * 7
    # Huge numbers print in scientific notation, in the column's width.
    text = res.summary()
    row = next(line for line in text.splitlines() if line.strip().startswith("7 "))
    assert "e+00" in row or "e-" in row or "e+" in row, text
    assert "00000000000" not in text


def test_influence_and_cosine_never_disagree_in_sign():
    rng = np.random.default_rng(1)
    G = _honest(1)
    G[12:] = -rng.uniform(1, 10) * G[12:]
    for name in flagagg.available_rules():
        res = call(flagagg.get_rule(name, f=3), G, return_result=True, backend="numpy")
        assert np.all(res.influence * np.nan_to_num(res.cosine) >= 0), (name, res.summary())
