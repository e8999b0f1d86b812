"""Cross-check flagagg's CGE, MoNNA, CAF, SMEA and ARC against ByzFL and byzpy (issue 24, item 5).

The peers are never a dependency of flagagg: they live in a scratch virtualenv
(installed with ``pip install --no-deps byzfl byzpy`` plus ``cloudpickle``),
and this script runs twice::

    # 1. in the peers' environment: their outputs on every case, to an .npz
    /work/peers-r1/bin/python docs/crosscheck-r1.py peers /tmp/peers-r1.npz
    # 2. in flagagg's environment: flagagg's outputs, compared, as a markdown table
    PYTHONPATH=$PWD python docs/crosscheck-r1.py compare /tmp/peers-r1.npz

Cases: p in {7, 11, 15}, n in {1, 5, 1000}, f in {2, (p - 1) // 2}, and six
kinds of input: Gaussian, f outliers at 50x, ties (three distinct rows
repeated), Gaussian on a common offset of 1e8, f rows at 1e200, one NaN row.
SMEA only where C(p, f) <= 500 (the peers loop over subsets in Python).
"""

from __future__ import annotations

import sys
import zlib

import numpy as np

PS, NS, KINDS = (7, 11, 15), (1, 5, 1000), ("gauss", "outliers", "ties", "offset", "huge", "nan")
# (rule, peer) pairs whose definitions match (MoNNA with the pivot / idx / reference_index 0).
LIMIT_S = 20  # seconds per peer call
PAIRS = (("cge", "byzpy"), ("monna", "byzfl"), ("monna", "byzpy"), ("caf", "byzfl"),
         ("caf", "byzpy"), ("smea", "byzfl"), ("smea", "byzpy"), ("arc", "byzfl"),
         ("arc", "byzpy"))


def cases():
    """``(key, G, f)`` for every case, the same in both environments."""
    for p in PS:
        for n in NS:
            for f in sorted({2, (p - 1) // 2}):
                for kind in KINDS:
                    key = f"p{p}-n{n}-f{f}-{kind}"
                    rng = np.random.default_rng(zlib.crc32(key.encode()))
                    G = rng.normal(size=(p, n))
                    if kind == "outliers":
                        G[p - f:] *= 50.0
                    elif kind == "ties":
                        G = G[np.arange(p) % 3]
                    elif kind == "offset":
                        G += 1e8
                    elif kind == "huge":
                        G[p - f:] = 1e200 * np.sign(rng.normal(size=(f, n)))
                    elif kind == "nan":
                        G[-1] = np.nan
                    yield key, G, f


def skip(rule, G, f) -> bool:
    """SMEA beyond 500 subsets: the peers' Python loops over subsets take minutes there."""
    import math

    return rule == "smea" and math.comb(G.shape[0], f) > 500


def peers(path: str) -> None:
    """Run ByzFL and byzpy on every case; save outputs (NaN-filled with the error on failure)."""
    import signal
    import warnings
    from unittest import mock

    def give_up(signum, frame):
        raise TimeoutError(f"no result within {LIMIT_S} s")

    signal.signal(signal.SIGALRM, give_up)

    # ByzFL's package __init__ imports its benchmark (torchvision, plotting, data frames):
    # stand-ins for those that are missing, as only its aggregators are used.
    import importlib.util

    names = ("torchvision", "torchvision.datasets", "torchvision.transforms",
             "matplotlib", "matplotlib.pyplot", "seaborn", "pandas", "tqdm")
    missing = {m for m in names if "." not in m and importlib.util.find_spec(m) is None}
    for m in names:
        if m.split(".")[0] in missing:
            sys.modules.setdefault(m, mock.MagicMock())
    import torch
    from byzfl.aggregators import aggregators as fl
    from byzfl.aggregators import preaggregators as flpre
    from byzpy.aggregators.geometric_wise.monna import MoNNA as PyMoNNA
    from byzpy.aggregators.geometric_wise.smea import SMEA as PySMEA
    from byzpy.aggregators.norm_wise.caf import CAF as PyCAF
    from byzpy.aggregators.norm_wise.comparative_gradient_elimination import (
        ComparativeGradientElimination as PyCGE,
    )
    from byzpy.pre_aggregators.arc import ARC as PyARC

    def byzpy_rows(G):
        return [torch.as_tensor(g.copy()) for g in G]

    def run(peer, rule, G, f):
        np.random.seed(0)  # noqa: NPY002 - ByzFL's power method draws from np.random.randn
        torch.manual_seed(0)
        if peer == "byzfl":
            if rule == "monna":
                return fl.MoNNA(f=f, idx=0)(G.copy())
            if rule == "caf":
                return fl.CAF(f=f)(G.copy())
            if rule == "smea":
                return fl.SMEA(f=f)(G.copy())
            if rule == "arc":
                return np.asarray(flpre.ARC(f=f)(G.copy())).mean(axis=0)
        else:
            X = byzpy_rows(G)
            if rule == "cge":
                out = PyCGE(f).aggregate(X)
            elif rule == "monna":
                out = PyMoNNA(f, reference_index=0).aggregate(X)
            elif rule == "caf":
                out = PyCAF(f).aggregate(X)
            elif rule == "smea":
                out = PySMEA(f).aggregate(X)
            elif rule == "arc":
                out = torch.stack(list(PyARC(f).pre_aggregate(X))).mean(dim=0)
            return out.numpy()
        raise ValueError(rule)

    out, errors = {}, {}
    for key, G, f in cases():
        for rule, peer in PAIRS:
            if skip(rule, G, f):
                continue
            name = f"{rule}/{peer}/{key}"
            signal.alarm(LIMIT_S)  # a peer's loop that does not end is a result too
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out[name] = np.asarray(run(peer, rule, G, f), dtype=np.float64).reshape(-1)
            except Exception as exc:  # noqa: BLE001 - a peer's failure is a result
                out[name] = np.full(G.shape[1], np.nan)
                errors[name] = f"{type(exc).__name__}: {exc}"[:120]
            finally:
                signal.alarm(0)
        print(key, flush=True)
    np.savez(path, **out, _errors=np.array(sorted(errors.items()), dtype=object))
    print(f"{len(out)} peer outputs, {len(errors)} errors -> {path}")


def flagagg_output(rule, G, f):
    """The output of flagagg for the peers' definition (MoNNA around input 0, ARC then the mean)."""
    import flagagg

    if rule == "cge":
        return flagagg.aggregate(G, rule="cge", f=f)
    if rule == "monna":
        return flagagg.aggregate(G, rule="monna", f=f, pivot=0)
    if rule == "caf":
        return flagagg.aggregate(G, rule="caf", f=f)
    if rule == "smea":
        return flagagg.aggregate(G, rule="smea", f=f, max_subsets=10**6)
    if rule == "arc":
        return flagagg.aggregate(G, rule="mean", f=f, pre=["arc"])
    raise ValueError(rule)


def compare(path: str) -> None:
    """Compare flagagg with the saved peer outputs; print the table, one row per pair and kind."""
    data = np.load(path, allow_pickle=True)
    errors = dict(data["_errors"].tolist()) if data["_errors"].size else {}
    rows = {}
    for key, G, f in cases():
        kind = key.rsplit("-", 1)[1]
        for rule, peer in PAIRS:
            if skip(rule, G, f):
                continue
            name = f"{rule}/{peer}/{key}"
            try:
                ours = np.asarray(flagagg_output(rule, G, f), dtype=np.float64)
            except ValueError as exc:
                ours, why = None, str(exc)
            theirs = data[name]
            r = rows.setdefault((rule, peer, kind), {"n": 0, "agree": 0, "err": 0.0,
                                                     "peer_nonfinite": 0, "peer_error": 0,
                                                     "ours_error": 0})
            r["n"] += 1
            if ours is None:
                r["ours_error"] += 1
                r.setdefault("why", why)
                continue
            if name in errors:
                r["peer_error"] += 1
                r.setdefault("peer_why", errors[name])
                continue
            if not np.isfinite(theirs).all():
                r["peer_nonfinite"] += 1
                continue
            scale = max(1.0, float(np.abs(ours).max()))
            err = float(np.abs(ours - theirs).max()) / scale
            r["err"] = max(r["err"], err)
            r["agree"] += err <= 1e-9
    print("| rule | peer | input | agree | max rel. error (both finite) | peer non-finite "
          "/ error | flagagg error |")
    print("|---|---|---|---|---|---|---|")
    for (rule, peer, kind), r in rows.items():
        print(f"| {rule} | {peer} | {kind} | {r['agree']}/{r['n']} | {r['err']:.1e} | "
              f"{r['peer_nonfinite']} / {r['peer_error']} | {r['ours_error']} |")
    for (rule, peer, kind), r in rows.items():
        if "peer_why" in r:
            print(f"\n{rule}/{peer}/{kind}: peer error, e.g. {r['peer_why']}")
        if "why" in r:
            print(f"\n{rule}/{peer}/{kind}: flagagg error, e.g. {r['why']}")


if __name__ == "__main__":
    {"peers": peers, "compare": compare}[sys.argv[1]](sys.argv[2])
