"""Textbook definitions of the peers' rules added by r2, slow and obvious.

ClippedClustering, FLTrust, Aksel, DnC and SignGuard, each written from its
paper (or, for Aksel, from the definition the ``krum`` package gives) in
n-space and float64: vectors are formed explicitly, norms are nrm2's (scaled
by the largest magnitude, so a row at 1e300 is exact), loops are plain. No
Gram matrix anywhere. Inputs holding NaN or Inf are left out of every rule
(they are infinitely far from everything and have no direction), as the
distance-based rules of flagagg do.
"""

from __future__ import annotations

import numpy as np

from rule_oracles import norm


def _f64(G):
    return np.asarray(G, dtype=np.float64)


def _finite(G):
    return np.isfinite(_f64(G)).all(axis=1)


def _median(x):
    s = np.sort(np.asarray(x, dtype=np.float64))
    q = s.size
    return s[q // 2] if q % 2 else (s[q // 2 - 1] + s[q // 2]) / 2


def _unit(x):
    n = norm(x)
    return np.zeros_like(x) if n == 0 else (x / np.abs(x).max()) / (n / np.abs(x).max())


def cosine(x, y):
    """Cosine of two vectors from their unit vectors (0 when either is zero)."""
    return float(np.clip(_unit(x) @ _unit(y), -1.0, 1.0))


def clip(x, tau):
    """``x * min(1, tau / ||x||)``; a zero row stays zero."""
    n = norm(x)
    return x if n <= tau else x * (tau / n)


# ----------------------------------------------------------------------------- ClippedClustering

def average_linkage_two(D):
    """Agglomerative clustering of ``D`` (a distance matrix) with average linkage, down to 2.

    At each step the two clusters of smallest mean pairwise distance merge;
    on equal distances the pair whose (smallest member, smallest member) is
    lexicographically first. Returns the list of clusters (sorted lists).
    """
    clusters = [[i] for i in range(D.shape[0])]
    while len(clusters) > 2:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = np.mean([D[i, j] for i in clusters[a] for j in clusters[b]])
                key = (d, clusters[a][0], clusters[b][0])
                if best is None or key < best[0]:
                    best = (key, a, b)
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    clusters.sort(key=lambda c: c[0])
    return clusters


def larger_cluster(clusters):
    """The larger cluster; on a tie, the one holding the smallest index."""
    return max(clusters, key=lambda c: (len(c), -c[0]))


def clipped_clustering(G):
    """Li et al. (clipped clustering), per-round median norm.

    Rows are clipped to the median norm of the finite rows, clustered in
    two by average linkage on the cosine distance ``1 - cos``, and the
    larger cluster's clipped rows are averaged. Returns (out, chosen).
    """
    G = _f64(G)
    idx = np.flatnonzero(_finite(G))
    X = G[idx]
    tau = _median([norm(x) for x in X])
    C = np.array([clip(x, tau) for x in X])
    q = len(idx)
    D = np.array([[0.0 if i == j else 1.0 - cosine(X[i], X[j]) for j in range(q)]
                  for i in range(q)])
    if q == 1:
        chosen = [0]
    else:
        chosen = larger_cluster(average_linkage_two(D))
    return C[chosen].mean(axis=0), [int(idx[i]) for i in chosen]


# ----------------------------------------------------------------------------- FLTrust

def fltrust(G, g0):
    """Cao et al. 2021: ``sum_i ReLU(cos(g_i, g0)) ||g0|| / ||g_i|| g_i`` / sum of trusts.

    Zero and non-finite rows have trust 0. When no row has a positive trust
    the update is zero. Returns (out, trust).
    """
    G, g0 = _f64(G), _f64(g0)
    p = G.shape[0]
    n0 = norm(g0)
    ts = np.zeros(p)
    out = np.zeros(G.shape[1])
    for i in range(p):
        if not np.isfinite(G[i]).all() or norm(G[i]) == 0:
            continue
        ts[i] = max(cosine(G[i], g0), 0.0)
    if ts.sum() == 0:
        return out, ts
    for i in range(p):
        if ts[i] > 0:
            out += ts[i] * (n0 * _unit(G[i]))
    return out / ts.sum(), ts


# ----------------------------------------------------------------------------- Aksel

def aksel(G, f):
    """The krum package's Aksel: mean of the ``p - f`` rows closest to the coordinate-wise median.

    The median is flagagg's (NaN counts as +inf per coordinate, the mean of
    the two middle values at even p); distances are nrm2's; ties go to the
    lower index; rows holding NaN or Inf are never kept. Returns (out, kept).
    """
    G = _f64(G)
    p = G.shape[0]
    ok = _finite(G)
    m = np.array([_median(np.where(np.isnan(G[:, j]), np.inf, G[:, j]))
                  for j in range(G.shape[1])])
    d = [norm(G[i] - m) if ok[i] else np.inf for i in range(p)]
    order = sorted((i for i in range(p) if ok[i]), key=lambda i: (d[i], i))
    kept = sorted(order[: p - f])
    return G[kept].mean(axis=0), kept


# ----------------------------------------------------------------------------- DnC

def dnc_coordinates(n, b, niters, seed):
    """The coordinate samples DnC draws: ``niters`` sorted samples of ``min(b, n)`` of ``n``.

    ``np.random.default_rng(seed).choice(n, b, replace=False)`` per
    iteration, sorted; every coordinate when ``b >= n``.
    """
    if b >= n:
        return [np.arange(n)] * niters
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n, size=b, replace=False)) for _ in range(niters)]


def dnc(G, f, samples, c=1.0):
    """Shejwalkar & Houmansadr 2021 (NDSS), Algorithm 2 (Divide-and-Conquer).

    For each coordinate sample: centre the sampled finite rows on their
    mean, take the top right singular vector ``v`` of the centred matrix,
    score ``s_i = ((x_i - mu) . v)^2``, keep the ``p - floor(c f)`` rows of
    lowest score (ties: lower index). The kept set is the intersection over
    the samples; the output is the mean of the kept rows over every
    coordinate. Returns (out, kept).
    """
    G = _f64(G)
    p = G.shape[0]
    ok = _finite(G)
    keep = p - int(np.floor(c * f))
    good = set(np.flatnonzero(ok).tolist())
    idx = np.flatnonzero(ok)
    for r in samples:
        X = G[np.ix_(idx, r)]
        C = X - X.mean(axis=0)
        _, _, Vt = np.linalg.svd(C, full_matrices=False)
        v = Vt[0]
        s = {int(i): float(C[k] @ v) ** 2 for k, i in enumerate(idx)}
        order = sorted(s, key=lambda i: (s[i], i))
        good &= set(order[:keep])
    kept = sorted(good)
    return G[kept].mean(axis=0), kept


# ----------------------------------------------------------------------------- SignGuard

def two_means(F):
    """Lloyd's 2-means on the rows of ``F`` from the two rows farthest apart.

    Start: the centres are the pair (i < j) of largest distance, first in
    lexicographic order on ties; each point joins the nearer centre (the
    first on a tie); stop when the assignment no longer changes. Returns
    the labels (0 or 1).
    """
    q = F.shape[0]
    best = (-1.0, 0, 0)
    for i in range(q):
        for j in range(i + 1, q):
            d = float(np.sum((F[i] - F[j]) ** 2))
            if d > best[0]:
                best = (d, i, j)
    centres = [F[best[1]].copy(), F[best[2]].copy()]
    labels = None
    for _ in range(1000):
        new = np.array([0 if np.sum((x - centres[0]) ** 2) <= np.sum((x - centres[1]) ** 2)
                        else 1 for x in F])
        if labels is not None and (new == labels).all():
            break
        labels = new
        centres = [F[labels == k].mean(axis=0) if (labels == k).any() else centres[k]
                   for k in (0, 1)]
    return labels


def sign_features(x):
    """Fractions of positive, zero and negative coordinates."""
    n = x.size
    return np.array([np.sum(x > 0) / n, np.sum(x == 0) / n, np.sum(x < 0) / n])


def signguard(G, lower=0.1, upper=3.0):
    """Xu et al. 2022 (SignGuard), plain variant on every coordinate.

    ``M`` = median norm of the finite rows; S1 = rows with
    ``lower <= ||g_i|| / M <= upper``; S2 = the larger cluster (ties: the one
    holding the lowest index) of a 2-means of the sign features of the
    finite rows; output = mean over S1 & S2 of the rows clipped to norm
    ``M``. Returns (out, kept).
    """
    G = _f64(G)
    idx = np.flatnonzero(_finite(G))
    X = G[idx]
    norms = np.array([norm(x) for x in X])
    M = _median(norms)
    s1 = {int(i) for k, i in enumerate(idx) if lower * M <= norms[k] <= upper * M}
    if len(idx) == 1:
        s2 = {int(idx[0])}
    else:
        labels = two_means(np.array([sign_features(x) for x in X]))
        clusters = [[int(i) for i in idx[labels == k]] for k in (0, 1)]
        s2 = set(larger_cluster([c for c in clusters if c]))
    kept = sorted(s1 & s2)
    pos = {int(i): k for k, i in enumerate(idx)}
    out = np.mean([clip(X[pos[i]], M) for i in kept], axis=0)
    return out, kept
