"""The regression gate of ``make asv-compare``: asv's comparison, then a confirmation.

Run from ``asv_bench/`` by the Makefile::

    python compare.py --base SHA --head SHA --machine NAME [--factor 1.3]
                      [--bench REGEX] [--confirm 2] [-- asv options]

First ``asv continuous`` measures both commits and prints its tables. A
``track_ratio`` benchmark is one number per run, with no samples for asv to
test against, so one unlucky run of a noisy machine can move it past the
factor (seen here: 1.3x on unchanged code, idle machine). So every row asv
flags as slower is measured ``--confirm`` more times on each commit,
alternating which goes first, and the gate fails only where the median over
all runs at HEAD is still more than ``factor`` times the median at BASE. A
benchmark that fails at HEAD and ran at BASE fails the gate at once.

Exit status: 0 when nothing is confirmed slower, 1 when something is, 2 on
an error of asv itself.
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def row_name(key: str, params: tuple[str, ...]) -> str:
    """A benchmark row as asv names it for ``--bench``: ``name(param0, param1, ...)``."""
    return f"{key}({', '.join(params)})" if params else key


def read_values(results_dir: Path, machine: str, commit: str, bench: str) -> dict[str, float]:
    """``{row name: value}`` of the matching benchmarks of one commit (NaN where it failed).

    Only results of virtualenv environments (commits asv built) are read.
    """
    from asv.results import iter_results_for_machine_and_hash

    values: dict[str, float] = {}
    for res in iter_results_for_machine_and_hash(str(results_dir), machine, commit):
        if not res.env_name.startswith("virtualenv"):
            continue
        for key in res.get_all_result_keys():
            params = res.get_result_params(key)
            combos = list(itertools.product(*params)) if params else [()]
            for combo, value in zip(combos, res.get_result_value(key, params), strict=True):
                name = row_name(key, combo)
                if re.search(bench, name):
                    values[name] = math.nan if value is None else float(value)
    return values


def flagged(base: dict[str, float], head: dict[str, float], factor: float):
    """Rows slower at HEAD by more than ``factor`` and rows that fail only at HEAD.

    Returns
    -------
    slower, broken : list of str
    """
    slower, broken = [], []
    for name in sorted(set(base) & set(head)):
        b, h = base[name], head[name]
        if math.isnan(h) and not math.isnan(b):
            broken.append(name)
        elif not (math.isnan(b) or math.isnan(h)) and b > 0 and h / b > factor:
            slower.append(name)
    return slower, broken


def verdict(base_runs: list[float], head_runs: list[float], factor: float) -> tuple[float, bool]:
    """The ratio of the medians, and whether it confirms a slowdown of more than ``factor``.

    Failed runs (NaN) are left out; a side with no finished run leaves the
    slowdown unrefuted, so it counts as confirmed (ratio NaN).
    """
    b_ok = [v for v in base_runs if not math.isnan(v)]
    h_ok = [v for v in head_runs if not math.isnan(v)]
    if not b_ok or not h_ok:
        return math.nan, True
    ratio = statistics.median(h_ok) / statistics.median(b_ok)
    return ratio, ratio > factor


def _asv(args: list[str]) -> int:
    print("$ asv " + " ".join(args), flush=True)
    return subprocess.call([sys.executable, "-m", "asv", *args], cwd=HERE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--head", required=True)
    parser.add_argument("--machine", required=True)
    parser.add_argument("--factor", type=float, default=1.3)
    parser.add_argument("--bench", default="track_ratio")
    parser.add_argument("--confirm", type=int, default=2,
                        help="further runs per commit of each flagged row (0: asv's verdict)")
    parser.add_argument("asv_args", nargs="*", help="passed to every asv call (after --)")
    args = parser.parse_args(argv)
    from asv.config import Config

    results_dir = Path(Config.load(str(HERE / "asv.conf.json")).results_dir)
    common = ["--machine", args.machine, *args.asv_args]

    status = _asv(["continuous", "--factor", str(args.factor), "--split", "--bench", args.bench,
                   *common, args.base, args.head])
    if status == 0:
        print(f"\nasv-compare: nothing slower than {args.factor}x at HEAD.")
        return 0
    base = read_values(results_dir, args.machine, args.base, args.bench)
    head = read_values(results_dir, args.machine, args.head, args.bench)
    if not base or not head:
        print("\nasv-compare: asv failed before any result of both commits was recorded.")
        return 2
    slower, broken = flagged(base, head, args.factor)
    if broken:
        print("\nasv-compare: FAILED, benchmarks that run at BASE fail at HEAD:")
        for name in broken:
            print(f"  {name}")
        return 1
    if not slower:
        # asv flagged something this reading does not (e.g. a failure at both)
        print("\nasv-compare: asv reported a change, but no row is slower than "
              f"{args.factor}x or broken at HEAD.")
        return 0
    if args.confirm <= 0:
        print(f"\nasv-compare: FAILED, {len(slower)} rows slower than {args.factor}x "
              "(no confirmation runs asked for).")
        return 1

    print(f"\nasv-compare: {len(slower)} rows slower than {args.factor}x in one run; "
          f"measuring them {args.confirm} more times on each commit.", flush=True)
    runs = {name: ([base[name]], [head[name]]) for name in slower}
    select = [arg for name in slower for arg in ("--bench", "^" + re.escape(name) + "$")]
    for k in range(args.confirm):
        # HEAD first on even rounds, BASE first on odd: a drift of the machine hits both
        order = [(1, args.head), (0, args.base)] if k % 2 == 0 else [(0, args.base), (1, args.head)]
        for side, commit in order:
            status = _asv(["run", *select, *common, f"{commit}^!"])
            if status not in (0, 2):  # 2: some benchmark failed, recorded as NaN
                return 2
            values = read_values(results_dir, args.machine, commit, args.bench)
            for name in slower:
                runs[name][side].append(values.get(name, math.nan))

    confirmed = []
    print(f"\n{'base runs':>26}  {'head runs':>26}  ratio of medians  verdict  benchmark")
    for name in slower:
        b_runs, h_runs = runs[name]
        ratio, worse = verdict(b_runs, h_runs, args.factor)
        confirmed += [name] if worse else []
        b_text = " ".join(f"{v:.3g}" for v in b_runs)
        h_text = " ".join(f"{v:.3g}" for v in h_runs)
        print(f"{b_text:>26}  {h_text:>26}  {ratio:16.2f}  {'SLOWER' if worse else 'noise':7s}"
              f"  {name}")
    if confirmed:
        print(f"\nasv-compare: FAILED, {len(confirmed)} of {len(slower)} flagged rows confirmed "
              f"slower than {args.factor}x (median of {args.confirm + 1} runs per commit).")
        return 1
    print(f"\nasv-compare: passed; none of the {len(slower)} flagged rows was confirmed "
          f"(median of {args.confirm + 1} runs per commit): noise of one run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
