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


class PairTermsDense:
    """The Flag Aggregator's objective vectors with every pair vector formed explicitly.

    A drop-in for :class:`flagagg.rules._flag._Terms` (same constructor and
    methods) that materialises the ``q(q-1)/2`` difference vectors of the
    span coordinates ``t_i`` as rows, as flagagg did before the Laplacian
    form: ``O(q^2 k)`` memory, each pair's direction and projection from its
    own difference, so no cancellation between pairs. Pair weights are
    ``q x q`` symmetric matrices or scalars, as in ``_Terms``.
    """

    def __init__(self, T, lam, variant):
        q = T.shape[0]
        self.T = T
        self.q = q
        n_pairs_total = q * (q - 1) // 2
        self.pair_scale = lam / n_pairs_total if n_pairs_total else 0.0
        self.i = self.j = np.zeros(0, dtype=int)
        self.D = np.zeros((0, T.shape[1]))
        if lam > 0 and q > 1:
            i, j = np.triu_indices(q, 1)
            E = T[i] - T[j]
            nd2 = np.einsum("ij,ij->i", E, E)
            if variant == "paper":
                ok = nd2 > 1e-12
                self.i, self.j = i[ok], j[ok]
                self.D = E[ok] / np.sqrt(nd2[ok])[:, None]
            else:
                self.i, self.j = i, j
                self.D = E
        self.has_pairs = self.D.shape[0] > 0

    def objective_parts(self, U, eps, P=None):
        P = self.T @ U
        s_node = np.maximum(1.0 - np.einsum("ij,ij->i", P, P), 0.0) + eps
        PD = self.D @ U
        s = np.maximum(1.0 - np.einsum("ij,ij->i", PD, PD), 0.0) + eps
        s_pair = np.ones((self.q, self.q))
        s_pair[self.i, self.j] = s_pair[self.j, self.i] = s
        return s_node, s_pair

    def objective(self, s_node, s_pair):
        return float(np.sqrt(s_node).sum()
                     + self.pair_scale * np.sqrt(s_pair[self.i, self.j]).sum())

    def matrix(self, w_node, w_pair):
        B = (self.T * w_node[:, None]).T @ self.T
        if self.has_pairs:
            w = np.broadcast_to(w_pair, (self.q, self.q))[self.i, self.j]
            B += (self.D * w[:, None]).T @ self.D
        return (B + B.T) / 2
