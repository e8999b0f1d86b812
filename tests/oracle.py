"""Slow, obviously correct references, written from the math in n-space.

No Gram tricks here: the vectors of the objective are formed explicitly and
each IRLS step takes an SVD of the weighted n-dimensional data.
"""

from __future__ import annotations

import math

import numpy as np


def flag_dense(G, r=None, lam=0.0, *, max_iter=100, tol=1e-6, eps=1e-7, variant="paper"):
    """Flag Aggregator by dense n-space IRLS. Returns (out, Y, history, kept)."""
    G = np.asarray(G, dtype=np.float64)
    p = G.shape[0]
    norms = np.linalg.norm(G, axis=1)
    kept = np.flatnonzero(np.isfinite(G).all(axis=1) & (norms > 0))
    H = G[kept] / norms[kept, None]
    q = len(kept)
    r = math.ceil(p / 2) if r is None else r
    s = np.linalg.svd(H, compute_uv=False)
    r = min(r, int(np.sum(s**2 > s[0] ** 2 * 1e-10)))

    if variant == "paper":
        pairs = []
        for i in range(q):
            for j in range(i + 1, q):
                d = H[i] - H[j]
                if d @ d > 1e-12:
                    pairs.append(d / np.linalg.norm(d))
        D = np.array(pairs).reshape(-1, G.shape[1])
        P = q * (q - 1) / 2
        pair_scale = lam / P if P else 0.0
    else:
        # Published code: ordered pairs i != j, column scale lam / (q(q-1)).
        c = lam / (q * (q - 1)) if q > 1 else 0.0
        D = np.array([c * (H[i] - H[j]) for i in range(q) for j in range(q) if i != j])
        D = D.reshape(-1, G.shape[1]) if lam > 0 else np.zeros((0, G.shape[1]))

    def slack(Y, V):
        return np.maximum(1 - np.sum((V @ Y) ** 2, axis=1), 0) + eps

    def objective(Y):
        pair = pair_scale * np.sqrt(slack(Y, D)).sum() if variant == "paper" else 0.0
        return np.sqrt(slack(Y, H)).sum() + pair

    def top(A):
        _, _, Vt = np.linalg.svd(A, full_matrices=False)
        return Vt[:r].T

    if variant == "reference":
        Y = top(np.vstack([H, D]))  # every column weight equal (uniform)
        history = [None]
    else:
        w, wp = np.ones(q), np.full(len(D), pair_scale)
        history = []
        for it in range(max_iter):
            Y = top(np.vstack([np.sqrt(w)[:, None] * H, np.sqrt(wp)[:, None] * D]))
            history.append(objective(Y))
            w = slack(Y, H) ** -0.5
            wp = pair_scale * slack(Y, D) ** -0.5 if len(D) else wp
            if it > 0 and history[-2] - history[-1] <= tol * abs(history[-2]):
                break
    out = Y @ (Y.T @ H.sum(axis=0)) / r
    return out, Y, np.array(history, dtype=float), kept
