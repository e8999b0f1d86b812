"""The ratio history: asv's results -> a small CSV digest -> the plot the docs show.

Run by ``make asv-publish`` after ``asv run`` over the last commits of main::

    python asv_bench/history.py --machine NAME     # results -> digest -> plot
    python asv_bench/history.py --from-digest      # redraw the plot from the digest

Only results of commits asv built (virtualenv environments) are read; a
``make asv`` run of a checkout (the "existing" environment) may hold
uncommitted code and is left out. The digest, ``asv_bench/history.csv``,
holds one row per commit, benchmark and parameter set (a few KiB, kept in the
repository); asv's own results are machine-specific and regenerable and stay
in the ignored ``asv_bench/.asv/``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import itertools
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DIGEST = HERE / "history.csv"
PLOT = ROOT / "docs" / "_static" / "asv_ratio_history.png"
FIELDS = ["commit", "date", "subject", "env", "benchmark", "params", "ratio"]


def digest(machine: str, results_dir: Path, branch: str = "main") -> list[dict[str, str]]:
    """Rows of every ``track_ratio_*`` result of ``machine``'s built commits of ``branch``.

    Commits off the branch's first-parent line (e.g. measured by
    ``make asv-compare`` on a feature branch) are left out.
    """
    from asv.results import iter_results_for_machine

    on_branch = set(_git("rev-list", "--first-parent", branch).split())
    rows = []
    for res in iter_results_for_machine(str(results_dir), machine):
        if not res.env_name.startswith("virtualenv") or res.commit_hash not in on_branch:
            continue
        date = dt.datetime.fromtimestamp(res.date / 1000, dt.timezone.utc)
        subject = _git("log", "-1", "--format=%s", res.commit_hash)
        for key in sorted(res.get_all_result_keys()):
            if ".track_ratio" not in key:
                continue
            params = res.get_result_params(key)
            values = res.get_result_value(key, params)
            for combo, value in zip(itertools.product(*params), values, strict=True):
                if value is None or not math.isfinite(value):
                    continue  # skipped or failed at that commit (an older API)
                rows.append({"commit": res.commit_hash[:10], "date": date.isoformat(),
                             "subject": subject[:80], "env": res.env_name, "benchmark": key,
                             "params": ", ".join(p.strip("'") for p in combo),
                             "ratio": f"{value:.4g}"})
    rows.sort(key=lambda r: (r["date"], r["benchmark"], r["params"]))
    return rows


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip()


def write_digest(rows: list[dict[str, str]], path: Path = DIGEST) -> None:
    """Write ``rows`` as CSV."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def read_digest(path: Path = DIGEST) -> list[dict[str, str]]:
    """The rows of a digest written by :func:`write_digest`."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _panel(key: str) -> str:
    cls = key.split(".")[1]
    return "Rules: time / mean(G, 0), (15, 1M) float32" if cls == "Rules" else (
        "The other ratio tracks (Flag Aggregator, kernels, per-layer, large p)")


def _label(key: str, params: str) -> str:
    cls, method = key.split(".")[1:3]
    what = method.removeprefix("track_ratio_")
    parts = [p for p in params.split(", ") if p not in ("numba", "numpy", "1000000")]
    if cls == "Rules":
        return parts[0]
    return f"{cls} {what} [{', '.join(parts)}]" if parts else f"{cls} {what}"


def plot(rows: list[dict[str, str]], path: Path = PLOT) -> None:
    """One line per ratio benchmark over the commits, oldest left; two panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    commits = list(dict.fromkeys(r["commit"] for r in rows))  # date order
    series: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        series[_panel(r["benchmark"])][_label(r["benchmark"], r["params"])][r["commit"]] = \
            float(r["ratio"])
    panels = sorted(series, reverse=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.2), squeeze=False)
    x = range(len(commits))
    for ax, panel in zip(axes[0], panels, strict=True):
        for label, by_commit in sorted(series[panel].items()):
            ax.plot(x, [by_commit.get(c, math.nan) for c in commits], marker="o", ms=3,
                    label=label)
        ax.set_yscale("log")
        ax.set_title(panel, fontsize=10)
        ax.set_xticks(list(x), commits, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("ratio (lower is faster)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    first, last = rows[0]["date"][:10], rows[-1]["date"][:10]
    fig.suptitle(f"asv ratio tracks over {len(commits)} commits of main ({first} .. {last}); "
                 f"machine {rows[0].get('machine', '') or os.environ.get('ASV_MACHINE', '')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Digest asv's results (or read the digest) and plot; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--machine", default=os.uname().nodename, help="asv machine name")
    ap.add_argument("--results", type=Path, default=HERE / ".asv" / "results")
    ap.add_argument("--branch", default="main", help="first-parent line of commits to plot")
    ap.add_argument("--from-digest", action="store_true",
                    help="redraw the plot from asv_bench/history.csv, without asv's results")
    args = ap.parse_args(argv)
    if args.from_digest:
        rows = read_digest()
    else:
        rows = digest(args.machine, args.results, args.branch)
        if not rows:
            print(f"no track_ratio results for machine {args.machine!r} in {args.results}",
                  file=sys.stderr)
            return 1
        write_digest(rows)
    os.environ.setdefault("ASV_MACHINE", args.machine)
    plot(rows)
    print(f"{len(rows)} ratios from {len(set(r['commit'] for r in rows))} commits -> "
          f"{DIGEST.relative_to(ROOT)}, {PLOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
