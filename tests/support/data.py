"""Test inputs shared by several test modules."""

from __future__ import annotations

import numpy as np


def attacked_stack(p, n, f, seed, dtype="float64", kind="reverse"):
    """p - f honest rows around a common direction plus f faulty rows."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=n)
    honest = base + 0.5 * rng.normal(size=(p - f, n))
    if kind == "reverse":
        bad = -10 * honest[:f]
    elif kind == "random":
        bad = rng.uniform(-5, 5, size=(f, n))
    else:
        bad = np.repeat(honest.mean(0, keepdims=True) - 2 * honest.std(0), f, axis=0)
    return np.vstack([honest, bad]).astype(dtype)
