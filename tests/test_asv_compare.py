"""The asv-compare gate: a slowdown is confirmed by further runs before it fails, noise is not."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("asv")

# benchmark / docs / packaging smoke: out of `pytest -m "not tooling"` (make test runs it)
pytestmark = pytest.mark.tooling

PATH = Path(__file__).resolve().parent.parent / "asv_bench" / "compare.py"
_spec = importlib.util.spec_from_file_location("flagagg_asv_compare", PATH)
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

ROW = "bench_rules.Rules.track_ratio_over_mean('numba', 'median', 1000000)"
OTHER = "bench_rules.Rules.track_ratio_over_mean('numba', 'krum', 1000000)"


def test_row_names_are_the_ones_asv_selects_with_bench():
    assert compare.row_name("bench_rules.Rules.track_ratio_over_mean",
                            ("'numba'", "'median'", "1000000")) == ROW
    assert compare.row_name("bench_flag.Plain.track_x", ()) == "bench_flag.Plain.track_x"


def test_flagged_rows_are_the_slower_and_the_newly_broken():
    base = {ROW: 5.0, OTHER: 2.0, "a": 1.0, "b": math.nan, "c": 1.0}
    head = {ROW: 7.0, OTHER: 2.5, "a": math.nan, "b": math.nan, "c": 0.5, "only-head": 9.0}
    slower, broken = compare.flagged(base, head, 1.3)
    assert slower == [ROW]           # 1.4x; krum's 1.25x is under the factor
    assert broken == ["a"]           # fails at HEAD only; "b" fails at both


def test_the_verdict_is_on_medians_so_one_outlier_does_not_decide():
    # one noisy HEAD run at 1.5x, two at 1.0x: the medians agree
    assert compare.verdict([2.0, 2.1, 1.9], [3.0, 2.0, 2.05], 1.3) == (pytest.approx(2.05 / 2.0),
                                                                     False)
    ratio, worse = compare.verdict([2.0, 2.1, 1.9], [4.6, 4.4, math.nan, 4.5], 1.3)
    assert worse and ratio == pytest.approx(4.5 / 2.0)
    # a row whose every re-run failed on one side is not cleared
    ratio, worse = compare.verdict([2.0, 2.1, 1.9], [math.nan, math.nan], 1.3)
    assert worse and math.isnan(ratio)
    assert compare.verdict([math.nan], [2.0, 2.0], 1.3)[1]


class _FakeAsv:
    """Stands in for asv: the first run flags ROW; confirmation runs give ``later`` at HEAD."""

    def __init__(self, later, continuous_status=1):
        self.later = later
        self.continuous_status = continuous_status
        self.calls = []
        self.head_runs = 0

    def run(self, args):
        self.calls.append(args)
        if args[0] == "run":
            if args[-1].startswith("HEAD"):
                self.head_runs += 1
            return 0
        return self.continuous_status

    def values(self, results_dir, machine, commit, bench):
        if commit == "BASE":
            return {ROW: 5.0, OTHER: 2.0}
        first = self.head_runs == 0
        return {ROW: 8.0 if first else self.later[self.head_runs - 1], OTHER: 2.0}


def _main(monkeypatch, fake, confirm=2):
    monkeypatch.setattr(compare, "_asv", fake.run)
    monkeypatch.setattr(compare, "read_values", fake.values)
    return compare.main(["--base", "BASE", "--head", "HEAD", "--machine", "m",
                         "--confirm", str(confirm), "--", "--launch-method", "forkserver"])


def test_a_flag_of_one_run_that_does_not_repeat_passes(monkeypatch, capsys):
    fake = _FakeAsv(later=[5.1, 4.9])
    assert _main(monkeypatch, fake) == 0
    runs = [c for c in fake.calls if c[0] == "run"]
    # only the flagged row is re-run, on both commits, alternating which goes first
    assert len(runs) == 4
    assert [c[-1] for c in runs] == ["HEAD^!", "BASE^!", "BASE^!", "HEAD^!"]
    assert all(c[1:3] == ["--bench", "^" + compare.re.escape(ROW) + "$"] for c in runs)
    assert all(c[-3:-1] == ["--launch-method", "forkserver"] for c in runs)
    assert "noise" in capsys.readouterr().out


def test_a_slowdown_that_repeats_fails(monkeypatch, capsys):
    fake = _FakeAsv(later=[7.9, 8.2])
    assert _main(monkeypatch, fake) == 1
    out = capsys.readouterr().out
    assert "SLOWER" in out and "1 of 1 flagged rows confirmed" in out


def test_no_flag_no_confirmation_and_no_confirmation_asked(monkeypatch):
    fake = _FakeAsv(later=[], continuous_status=0)
    assert _main(monkeypatch, fake) == 0
    assert [c[0] for c in fake.calls] == ["continuous"]
    assert _main(monkeypatch, _FakeAsv(later=[]), confirm=0) == 1
