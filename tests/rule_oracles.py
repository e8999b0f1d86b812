"""Textbook definitions of the baseline rules, slow and obvious.

Everything here works on the (p, n) inputs in float64 in n-space: distances
are formed from the vectors (no Gram matrix), coordinates are looped over
one at a time. The NaN conventions are the documented policies of the
rules: a NaN value is +inf for the coordinate-wise rules, and an input
holding NaN or Inf is infinitely far from every other one for the
distance-based rules.
"""

from __future__ import annotations

import itertools

import numpy as np


def _f64(G):
    return np.asarray(G, dtype=np.float64)


def _finite(G):
    return np.isfinite(G).all(axis=1)


def sq_dist(G):
    """Squared distances in n-space; +inf to and from rows holding NaN or Inf."""
    G = _f64(G)
    p = G.shape[0]
    ok = _finite(G)
    D = np.full((p, p), np.inf)
    for i in range(p):
        for j in range(p):
            if i == j:
                D[i, j] = 0.0
            elif ok[i] and ok[j]:
                d = G[i] - G[j]
                D[i, j] = float(d @ d)
    return D


# ----------------------------------------------------------------------------- coordinate-wise

def _column_values(G, j, rows=None):
    x = _f64(G)[:, j] if rows is None else _f64(G)[rows, j]
    return np.where(np.isnan(x), np.inf, x)


def _median_1d(x):
    s = np.sort(x)
    q = s.size
    return s[q // 2] if q % 2 else (s[q // 2 - 1] + s[q // 2]) / 2


def _trimmed_1d(x, t):
    s = np.sort(x)
    return s[t : s.size - t].mean()


def _closest_mean_1d(x, c, k):
    """Mean of the k values closest to c; at equal distance the smaller value wins."""
    order = sorted(range(x.size), key=lambda i: (abs(x[i] - c), x[i]))
    return float(np.mean([x[i] for i in order[:k]]))


def median(G):
    return np.array([_median_1d(_column_values(G, j)) for j in range(G.shape[1])])


def trimmed_mean(G, f):
    return np.array([_trimmed_1d(_column_values(G, j), f) for j in range(G.shape[1])])


def meamed(G, f):
    p = G.shape[0]
    out = []
    for j in range(G.shape[1]):
        x = _column_values(G, j)
        out.append(_closest_mean_1d(x, _median_1d(x), p - f))
    return np.array(out)


def phocas(G, f):
    p = G.shape[0]
    out = []
    for j in range(G.shape[1]):
        x = _column_values(G, j)
        out.append(_closest_mean_1d(x, _trimmed_1d(x, f), p - f))
    return np.array(out)


# ----------------------------------------------------------------------------- Krum family

def krum_scores(D, candidates, f):
    """Blanchard et al. 2017: sum of squared distances to the |R| - f - 2 closest others in R."""
    n_nb = max(len(candidates) - f - 2, 0)
    scores = {}
    for i in candidates:
        others = sorted(D[i, j] for j in candidates if j != i)
        scores[i] = float(sum(others[:n_nb]))
    return scores


def krum_select(G, f):
    D = sq_dist(G)
    ok = _finite(G)
    scores = krum_scores(D, list(range(G.shape[0])), f)
    best = min((i for i in scores if ok[i]), key=lambda i: (scores[i], i))
    return best


def krum(G, f):
    return _f64(G)[krum_select(G, f)]


def multi_krum(G, f, m=None):
    p = G.shape[0]
    m = p - f if m is None else m
    D = sq_dist(G)
    ok = _finite(G)
    scores = krum_scores(D, list(range(p)), f)
    chosen = sorted((i for i in scores if ok[i]), key=lambda i: (scores[i], i))[:m]
    return _f64(G)[chosen].mean(axis=0), chosen


def bulyan(G, f):
    """El Mhamdi et al. 2018: theta = p - 2f by recursive Krum, then beta = p - 4f per column."""
    p = G.shape[0]
    theta, beta = p - 2 * f, p - 4 * f
    D = sq_dist(G)
    ok = _finite(G)
    left = list(range(p))
    picks = []
    for _ in range(theta):
        scores = krum_scores(D, left, f)
        best = min((i for i in left if ok[i]), key=lambda i: (scores[i], i))
        picks.append(best)
        left.remove(best)
    out = []
    for j in range(G.shape[1]):
        x = _column_values(G, j, picks)
        out.append(_closest_mean_1d(x, _median_1d(x), beta))
    return np.array(out), picks


# ----------------------------------------------------------------------------- others

def norm(x):
    """``||x||`` as nrm2 computes it: scaled by its largest magnitude, 1e200 included."""
    x = _f64(x)
    m = float(np.abs(x).max()) if x.size else 0.0
    return 0.0 if m == 0.0 else m * float(np.linalg.norm(x / m))


def geometric_median(G, *, max_iter=5000, tol=1e-14, eps=1e-6):
    """Smoothed Weiszfeld in n-space over the finite rows, from the coordinate-wise median.

    The start is robust (the mean would sit next to a far outlier) and every
    norm is nrm2's, so a row at 1e300 is exact. Stops when a step is below
    ``tol`` times the median distance to the iterate.
    """
    X = _f64(G)[_finite(G)]
    z = np.median(X, axis=0)
    for _ in range(max_iter):
        d = np.array([norm(x - z) for x in X])
        w = 1.0 / np.maximum(d, eps)
        z_new = (w[:, None] * X).sum(axis=0) / w.sum()
        if norm(z_new - z) <= tol * max(float(np.median(d)), eps):
            return z_new
        z = z_new
    return z


def centered_clipping(G, tau, n_iter, v0=None):
    """Karimireddy et al. 2021; rows holding NaN/Inf contribute nothing (counted in 1/p)."""
    G = _f64(G)
    p, n = G.shape
    ok = _finite(G)
    v = np.zeros(n) if v0 is None else _f64(v0).copy()
    for _ in range(n_iter):
        step = np.zeros(n)
        for i in range(p):
            if not ok[i]:
                continue
            d = G[i] - v
            dn = norm(d)
            step += d * (min(1.0, tau / dn) if dn > 0 else 1.0)
        v = v + step / p
    return v


def mda(G, f):
    """Mean of the p - f rows of smallest diameter; ties: the lexicographically first kept set."""
    p = G.shape[0]
    D = sq_dist(G)
    best, best_d = None, np.inf
    for kept in itertools.combinations(range(p), p - f):
        diam = max((D[i, j] for i in kept for j in kept if i < j), default=0.0)
        if best is None or diam < best_d:
            best, best_d = kept, diam
    return _f64(G)[list(best)].mean(axis=0), list(best)


def nnm(G, f):
    """Allouah et al. 2023: each row becomes the mean of its p - f nearest rows (itself first)."""
    G = _f64(G)
    p = G.shape[0]
    D = sq_dist(G)
    ok = _finite(G)
    k = min(p - f, int(ok.sum()))
    out = np.empty_like(G)
    for i in range(p):
        if not ok[i]:
            out[i] = np.nan
            continue
        order = sorted(range(p), key=lambda j: (-1.0 if j == i else D[i, j], j))
        out[i] = G[order[:k]].mean(axis=0)
    return out


def bucket_means(G, s, perm):
    G = _f64(G)
    return np.array([G[perm[j : j + s]].mean(axis=0) for j in range(0, G.shape[0], s)])


def clip_rows(G, tau):
    G = _f64(G)
    norms = np.linalg.norm(G, axis=1)
    scale = np.where(norms > tau, tau / np.where(norms > 0, norms, 1.0), 1.0)
    return G * scale[:, None]
