"""Textbook definitions of CGE, Medoid, MoNNA, ARC, CAF and SMEA: slow and obvious.

Everything is in n-space and float64: distances and norms are formed from the
vectors themselves (``norm`` scales by the largest magnitude, as BLAS nrm2
does, so a row at 1e300 has its exact norm), covariances are explicit
``n x n`` matrices, subsets are enumerated with :mod:`itertools`. A row
holding NaN or Inf is faulty by definition: it is never averaged, never a
neighbour, and its norm is ``+inf``. Ties go to the lowest index (or the
lexicographically first subset).

These are the tests' oracles; flagagg's rules compute the same things from
the ``p x p`` Gram matrix.
"""

from __future__ import annotations

import itertools

import numpy as np


def _f64(G):
    return np.asarray(G, dtype=np.float64)


def _finite(G):
    return np.isfinite(_f64(G)).all(axis=1)


def norm(x):
    """``||x||`` without overflow: scaled by the largest magnitude."""
    x = _f64(x)
    m = float(np.abs(x).max()) if x.size else 0.0
    return 0.0 if m == 0.0 else m * float(np.linalg.norm(x / m))


def norms(G):
    """Row norms; ``+inf`` for rows holding NaN or Inf."""
    G = _f64(G)
    ok = _finite(G)
    return np.array([norm(G[i]) if ok[i] else np.inf for i in range(G.shape[0])])


def dist(G, i, j):
    """``||g_i - g_j||`` (``+inf`` when either row is not finite)."""
    G = _f64(G)
    if not (np.isfinite(G[i]).all() and np.isfinite(G[j]).all()):
        return np.inf
    # Each row scaled first: the difference of two rows near 1e308 does not overflow.
    m = max(float(np.abs(G[i]).max()), float(np.abs(G[j]).max()))
    if m == 0.0:
        return 0.0
    return m * float(np.linalg.norm(G[i] / m - G[j] / m))


# ----------------------------------------------------------------------------- CGE

def cge(G, f):
    """Gupta et al. 2021: drop the ``f`` inputs of largest norm, average the others.

    Returns the mean and the kept indices (ascending). Ties in norm: the
    lower index is kept.
    """
    G = _f64(G)
    p = G.shape[0]
    nrm = norms(G)
    order = sorted(range(p), key=lambda i: (nrm[i], i))
    kept = sorted(order[: p - f])
    if not all(np.isfinite(G[i]).all() for i in kept):
        raise ValueError("more than f inputs hold NaN or Inf")
    return G[kept].mean(axis=0), kept


# ----------------------------------------------------------------------------- Medoid

def medoid_index(G):
    """The finite input minimising the sum of its distances to the other finite inputs."""
    G = _f64(G)
    p = G.shape[0]
    ok = _finite(G)
    best, best_s = None, np.inf
    for i in range(p):
        if not ok[i]:
            continue
        s = sum(dist(G, i, j) for j in range(p) if ok[j] and j != i)
        if best is None or s < best_s:
            best, best_s = i, s
    if best is None:
        raise ValueError("no finite input")
    return best


def medoid(G):
    return _f64(G)[medoid_index(G)]


# ----------------------------------------------------------------------------- MoNNA

def monna(G, f, pivot=None):
    """Farhadkhani et al. 2023: the mean of the ``p - f`` inputs nearest to the pivot.

    ``pivot``: index of the trusted input; None takes the medoid. The pivot
    is its own nearest input; ties to the lower index; inputs holding NaN or
    Inf are nobody's neighbour (fewer than ``p - f`` finite: all of them).
    Returns the mean and the neighbour indices (ascending).
    """
    G = _f64(G)
    p = G.shape[0]
    ok = _finite(G)
    c = medoid_index(G) if pivot is None else pivot
    if not ok[c]:
        raise ValueError("the pivot holds NaN or Inf")
    k = min(p - f, int(ok.sum()))
    order = sorted((j for j in range(p) if ok[j]),
                   key=lambda j: (-1.0 if j == c else dist(G, c, j), j))
    kept = sorted(order[:k])
    return G[kept].mean(axis=0), kept


# ----------------------------------------------------------------------------- ARC

def arc_k(p, f):
    """Number of inputs ARC clips: ``floor(2 f (p - f) / p)``."""
    return (2 * f * (p - f)) // p


def arc(G, f):
    """Allouah et al. 2024: clip every input to the ``(k+1)``-th largest norm.

    Returns the clipped rows (rows holding NaN or Inf stay as they are) and
    the threshold.
    """
    G = _f64(G).copy()
    p = G.shape[0]
    nrm = norms(G)
    k = arc_k(p, f)
    thr = sorted(nrm, reverse=True)[k]
    for i in range(p):
        if np.isfinite(nrm[i]) and nrm[i] > thr:
            G[i] = G[i] * (thr / nrm[i])
    return G, thr


# ----------------------------------------------------------------------------- CAF and SMEA

def _top_eig(C):
    """Largest eigenvalue and a unit eigenvector of the symmetric matrix ``C``."""
    w, V = np.linalg.eigh(C)
    return float(w[-1]), V[:, -1]


def caf(G, f):
    """Allouah, Guerraoui and Stephan 2025 (CAF), with exact eigenpairs.

    Weights ``c = 1`` (0 for rows holding NaN or Inf). While ``sum c > p - 2f``
    (and at least once): weighted mean ``mu``, weighted covariance
    ``Sigma = sum c_i (x_i - mu)(x_i - mu)^T / sum c``, its top eigenpair
    ``(lam, v)``; the ``mu`` of the smallest ``lam`` so far is kept (the first
    on ties); ``tau_i = ((x_i - mu) . v)^2`` over the rows of positive weight,
    ``c_i *= 1 - tau_i / max tau`` (stop when ``max tau == 0``: the weighted
    inputs coincide). Each iteration divides the rows of positive weight by
    their largest magnitude ``s`` first (the algorithm commutes with scaling:
    ``mu`` scales by ``s``, ``lam`` by ``s^2``, ``tau`` ratios not at all), so
    rows at 1e300 do not overflow; eigenvalues are compared as ``log2``.
    Returns the kept mean, its eigenvalue and the number of iterations.
    """
    G = _f64(G)
    p, n = G.shape
    ok = _finite(G)
    X = np.where(ok[:, None], G, 0.0)
    c = ok.astype(float)
    best, best_log, it = None, np.inf, 0
    while True:
        it += 1
        s = float(np.abs(X[c > 0]).max()) or 1.0
        Xs = X / s
        mu = (c[:, None] * Xs).sum(axis=0) / c.sum()
        D = Xs - mu
        Sigma = sum(c[i] * np.outer(D[i], D[i]) for i in range(p) if c[i] > 0) / c.sum()
        lam, v = _top_eig(Sigma)
        log_lam = np.log2(lam) + 2 * np.log2(s) if lam > 0 else -np.inf
        if best is None or log_lam < best_log:
            best, best_log = mu * s, log_lam
        tau = np.array([float(D[i] @ v) ** 2 if c[i] > 0 else 0.0 for i in range(p)])
        tmax = tau.max()
        if tmax <= 0:
            break
        c = c * (1.0 - tau / tmax)
        if c.sum() <= p - 2 * f:
            break
    return best, float(np.exp2(best_log)), it


def smea(G, f):
    """Allouah et al. 2023: the mean of the ``p - f`` inputs whose covariance has the
    smallest largest eigenvalue, over all subsets (the first subset on ties).

    Returns the mean, the subset and its eigenvalue (covariance normalised by
    the subset size). Each subset is divided by its largest magnitude first
    and eigenvalues are compared as ``log2``, so rows at 1e300 do not overflow.
    """
    G = _f64(G)
    p = G.shape[0]
    ok = _finite(G)
    best, best_lam = None, np.inf
    for S in itertools.combinations(range(p), p - f):
        if not all(ok[i] for i in S):
            continue
        X = G[list(S)]
        sc = float(np.abs(X).max()) or 1.0  # lam(X) = sc^2 lam(X / sc): no overflow at 1e300
        D = X / sc - (X / sc).mean(axis=0)
        lam, _ = _top_eig(D.T @ D / len(S))
        lam = np.log2(lam) + 2 * np.log2(sc) if lam > 0 else -np.inf
        if best is None or lam < best_lam:
            best, best_lam = S, lam
    if best is None:
        raise ValueError("every subset of p - f inputs holds NaN or Inf")
    return G[list(best)].mean(axis=0), list(best), float(np.exp2(best_lam))
