"""Cross-check flagagg's Aksel, ClippedClustering, SignGuard, DnC and FLTrust against the peers.

The peers that ship these rules, krum 0.9.1 (``Aksel``) and Blades (its
aggregators ``Clippedclustering``, ``Signguard``, ``Dnc`` and ``Fltrust``, taken
from its git history, with small local stubs for the two Blades helpers they
import), are never a dependency of flagagg: they live in a scratch
virtualenv, and this script runs twice::

    # 1. in the peers' environment (Blades' aggregators importable, e.g. from SHIM):
    PYTHONPATH=SHIM /work/peers-r2/bin/python docs/crosscheck-r2.py peers /tmp/peers-r2.npz
    # 2. in flagagg's environment: flagagg's outputs, compared, as a table
    PYTHONPATH=$PWD python docs/crosscheck-r2.py compare /tmp/peers-r2.npz

Cases (the same in both environments, each from its own seed): p in {7, 11,
15, 30}, n in {1, 5, 1000}, 3 repeats, five kinds: ``gauss`` (rows around a
common point), ``offset`` (the same + 1e8 on every coordinate), ``ties`` (half
the rows duplicated), ``attack`` (f rows = -3 x honest rows), ``signflip``
(honest coordinates mostly positive, f rows sign-flipped); f = (p - 1) // 2 - 1
(1 for ``ties``); FLTrust's reference is the common point plus noise.
Agreement: max |flagagg - peer| / max |peer| <= 1e-6 (1e-5 for FLTrust, which
Blades computes in float32); for the translation-invariant rules (Aksel, DnC)
the offset is left out of the output's scale. Cases where the definitions
differ on purpose (:func:`by_design`) are counted apart.
"""

from __future__ import annotations

import sys
import zlib
from collections import defaultdict

import numpy as np

PS, NS, REPEATS = (7, 11, 15, 30), (1, 5, 1000), 3
KINDS = ("gauss", "offset", "ties", "attack", "signflip")
RULES = ("aksel", "clipped_clustering", "signguard", "dnc", "fltrust")
PEER_NAMES = {"aksel": "krum 0.9.1 Aksel", "clipped_clustering": "Blades Clippedclustering",
              "signguard": "Blades Signguard", "dnc": "Blades Dnc (num_iters=1, sub_dim=n)",
              "fltrust": "Blades Fltrust"}


def cases():
    """``(key, G, f, g0, kind)`` for every case."""
    for p in PS:
        for n in NS:
            for kind in KINDS:
                for rep in range(REPEATS):
                    key = f"p{p}-n{n}-{kind}-{rep}"
                    rng = np.random.default_rng(zlib.crc32(key.encode()))
                    f = 1 if kind == "ties" else (p - 1) // 2 - 1
                    base = rng.normal(size=n)
                    G = base + 0.5 * rng.normal(size=(p, n))
                    if kind == "offset":
                        G = G + 1e8
                    elif kind == "ties":
                        G[p // 2:] = G[: p - p // 2]
                    elif kind == "attack":
                        G[:f] = -3.0 * G[f:2 * f]
                    elif kind == "signflip":
                        G = 1.0 + 0.5 * rng.normal(size=(p, n))
                        G[:f] = -G[f:2 * f]
                    g0 = base + 0.2 * rng.normal(size=n)
                    yield key, G, f, g0, kind


def run_peers(out: str) -> None:
    """The peers' outputs on every case (an error's repr where one raises), to ``out``."""
    import torch
    from blades.aggregators.clippedclustering import Clippedclustering
    from blades.aggregators.dnc import Dnc
    from blades.aggregators.fltrust import Fltrust
    from blades.aggregators.signguard import Signguard
    from blades.clients.client import BladesClient
    from krum.primitives.aggregators.aksel import Aksel

    def fltrust(T, g0):
        # Blades forms its trust scores in float32: float32 inputs throughout.
        clients = [BladesClient(torch.from_numpy(g0.astype(np.float32)), True)]
        return Fltrust()(clients + [BladesClient(r.clone().float()) for r in T])

    def dnc(T, f):
        torch.manual_seed(0)
        return Dnc(f, sub_dim=T.shape[1], num_iters=1)(T.clone())

    peers = {
        "aksel": lambda T, f, g0: Aksel.aggregate(T.clone(), f=f),
        "clipped_clustering": lambda T, f, g0: Clippedclustering()([r.clone() for r in T]),
        "signguard": lambda T, f, g0: Signguard()([r.clone() for r in T]),
        "dnc": lambda T, f, g0: dnc(T, f),
        "fltrust": lambda T, f, g0: fltrust(T, g0),
    }
    results = {}
    for key, G, f, g0, _ in cases():
        T = torch.from_numpy(G.copy())
        for name, fn in peers.items():
            try:
                results[f"{name}/{key}"] = np.asarray(fn(T, f, g0).numpy(), dtype=np.float64)
            except Exception as exc:  # noqa: BLE001 - a peer's failure is a result here
                results[f"{name}/{key}"] = np.array(repr(exc))
    np.savez(out, **results)


def ours(name: str, G: np.ndarray, f: int, g0: np.ndarray) -> np.ndarray:
    """The output of flagagg's rule, with the peer's settings where the rule has any."""
    import flagagg

    if name == "fltrust":
        return flagagg.get_rule("fltrust")(G.astype(np.float32),
                                           reference=g0.astype(np.float32), backend="numpy")
    if name == "dnc":
        return flagagg.aggregate(G, rule="dnc", f=f, n_iter=1, sample=G.shape[1],
                                 backend="numpy")
    params = {"f": f} if name == "aksel" else {}
    return flagagg.aggregate(G, rule=name, backend="numpy", **params)


def by_design(name: str, G: np.ndarray, mine: np.ndarray, theirs: np.ndarray) -> bool:
    """Cases where the two definitions differ on purpose (see docs/crosscheck.rst)."""
    if name == "fltrust":  # no input trusted: Blades divides 0 by 0, flagagg returns 0
        return bool(np.isnan(theirs).all() and (mine == 0).all())
    if name == "clipped_clustering":
        # Blades caps the clipping threshold at 1e5; at n = 1 every cosine is +-1
        # and the clustering is a tie that each side breaks its own way.
        return bool(np.median(np.linalg.norm(G, axis=1)) > 1e5 or G.shape[1] == 1)
    return False


def compare(peers_file: str) -> str:
    """The table of agreement, one row per rule and kind of input."""
    peers = np.load(peers_file)
    # agree, total, max rel. error, errors (either side), by design
    stats = defaultdict(lambda: [0, 0, 0.0, 0, 0])
    for key, G, f, g0, kind in cases():
        for name in RULES:
            s = stats[name, kind]
            s[1] += 1
            theirs = peers[f"{name}/{key}"]
            try:
                mine = np.asarray(ours(name, G, f, g0), dtype=np.float64)
            except ValueError:
                mine = None
            if mine is None or theirs.dtype.kind in "US":
                s[3] += 1
                continue
            if by_design(name, G, mine, theirs):
                s[4] += 1
                continue
            shift = 1e8 if kind == "offset" and name in ("aksel", "dnc") else 0.0
            scale = max(float(np.abs(theirs - shift).max()), 1e-12)
            err = float(np.abs(mine - theirs).max()) / scale
            s[2] = max(s[2], err)
            s[0] += err <= (1e-5 if name == "fltrust" else 1e-6)
    lines = ["rule | peer | kind | agree | max rel. error | by design | errors"]
    for (name, kind), (agree, total, err, errors, design) in stats.items():
        lines.append(f"{name} | {PEER_NAMES[name]} | {kind} | {agree}/{total - design} | "
                     f"{err:.1e} | {design} | {errors}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("peers", "compare"):
        sys.exit(__doc__)
    if sys.argv[1] == "peers":
        run_peers(sys.argv[2])
    else:
        print(compare(sys.argv[2]))
