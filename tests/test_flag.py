"""The Flag Aggregator against the dense oracle, its properties and diagnostics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.linalg import subspace_angles

import flagagg

from oracle import PairTermsDense, flag_dense

# The published, normalised output: what the dense oracle computes (the default
# rescales it to the median input norm, tested in test_interface.py).
PUBLISHED = {"rescale": None, "backend": "numpy"}


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


ORACLE_CASES = [
    # p, n, r, lam
    (7, 50, 3, 0.0),
    (7, 50, 4, 1.0),
    (15, 200, 8, 0.0),
    (15, 200, 8, 4.0),
    (5, 3, 2, 0.5),   # n < p: the inputs' span is smaller than p
    (12, 400, 1, 2.0),
]


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("p,n,r,lam", ORACLE_CASES)
def test_matches_dense_oracle(p, n, r, lam, variant, dtype):
    G = attacked_stack(p, n, 2, seed=p * n + r, dtype=dtype, kind="random")
    res = flagagg.flag_aggregate(G, r, lam, max_iter=6, tol=0.0, variant=variant,
                                 return_result=True, **PUBLISHED)
    out, Y, history, _ = flag_dense(G, r, lam, max_iter=6, tol=0.0, variant=variant)
    rtol = 1e-9 if dtype == "float64" else 2e-5
    err = np.linalg.norm(res.aggregate - out) / np.linalg.norm(out)
    assert err < rtol, err
    assert res.aggregate.dtype == np.dtype(dtype)
    Yfast = G.astype(np.float64).T @ res.basis_coefficients
    assert Yfast.shape == Y.shape
    np.testing.assert_allclose(Yfast.T @ Yfast, np.eye(Y.shape[1]), atol=1e-8)
    angles = subspace_angles(Yfast, Y)
    # Principal angles only mean something where the eigengap is clear.
    if res.eigengap > 1e-3 * res.eigenvalues[0]:
        assert angles.max() < 1e-6, angles.max()
    if variant == "paper":
        np.testing.assert_allclose(res.objective_history, history, rtol=1e-9)


def test_oracle_deviation_converged_default():
    """Iterated to tol: the largest deviation seen stays tiny."""
    G = attacked_stack(15, 2000, 3, seed=1, kind="little")
    res = flagagg.flag_aggregate(G, 8, max_iter=100, return_result=True, **PUBLISHED)
    out, _, history, _ = flag_dense(G, 8, max_iter=100)
    assert res.converged and res.n_iter == len(history)
    assert np.linalg.norm(res.aggregate - out) / np.linalg.norm(out) < 1e-8


def test_default_takes_two_steps():
    G = attacked_stack(15, 300, 3, seed=4, kind="little")
    res = flagagg.flag_aggregate(G, 8, return_result=True, **PUBLISHED)
    assert res.n_iter == 2 and len(res.objective_history) == 2
    assert not res.converged
    two = flagagg.flag_aggregate(G, 8, max_iter=2, tol=0, **PUBLISHED)
    np.testing.assert_array_equal(res.aggregate, two)


def test_reference_equals_one_paper_step_without_pairs():
    G = attacked_stack(9, 100, 2, seed=3)
    ref = flagagg.flag_aggregate(G, 4, variant="reference", **PUBLISHED)
    one = flagagg.flag_aggregate(G, 4, max_iter=1, **PUBLISHED)
    np.testing.assert_allclose(ref, one, rtol=1e-12, atol=1e-12)
    # ... but not with the pairwise term, whose scaling differs.
    ref = flagagg.flag_aggregate(G, 4, 8.0, variant="reference", **PUBLISHED)
    one = flagagg.flag_aggregate(G, 4, 8.0, max_iter=1, **PUBLISHED)
    assert np.linalg.norm(ref - one) > 1e-6 * np.linalg.norm(one)


def paper_objective(G, Y, lam, eps=1e-7):
    """F(Y) of the specification, straight from the definition in n-space."""
    H = G / np.linalg.norm(G, axis=1, keepdims=True)
    p = len(H)
    F = np.sum(np.sqrt(np.maximum(1 - np.sum((H @ Y) ** 2, 1), 0) + eps))
    for i in range(p):
        for j in range(i + 1, p):
            d = (H[i] - H[j]) / np.linalg.norm(H[i] - H[j])
            F += lam / (p * (p - 1) / 2) * np.sqrt(max(1 - np.sum((d @ Y) ** 2), 0) + eps)
    return F


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_diagnostics_are_those_of_the_paper_objective(variant):
    G = attacked_stack(8, 60, 2, seed=13, kind="random")
    res = flagagg.flag_aggregate(G, 3, 3.0, variant=variant, max_iter=4, tol=0,
                                 return_result=True, backend="numpy")
    Y = G.T @ res.basis_coefficients
    np.testing.assert_allclose(res.objective_history[-1], paper_objective(G, Y, 3.0),
                               rtol=1e-10)
    H = G / np.linalg.norm(G, axis=1, keepdims=True)
    np.testing.assert_allclose(res.reconstruction_ratios, np.sum((H @ Y) ** 2, 1), atol=1e-10)


def test_output_norm_bound_and_rescale():
    G = attacked_stack(15, 300, 3, seed=5) * 1e-3
    out = flagagg.flag_aggregate(G, 8, backend="numpy")
    assert np.linalg.norm(out) <= 15 / 8 + 1e-9
    res = flagagg.flag_aggregate(G, 8, rescale="median_norm", return_result=True,
                                 backend="numpy")
    med = np.median(np.linalg.norm(G, axis=1))
    np.testing.assert_allclose(np.linalg.norm(res.aggregate), med, rtol=1e-10)
    # Same direction as the published output.
    cos = res.aggregate @ out / (np.linalg.norm(res.aggregate) * np.linalg.norm(out))
    assert cos > 1 - 1e-12


def test_faulty_workers_get_low_ratios():
    # Mutually orthogonal random rows each own a direction: with r >= 1 + f
    # they would be reconstructed exactly, so look with r = 1.
    G = attacked_stack(15, 500, 3, seed=7, kind="random")
    res = flagagg.flag_aggregate(G, 1, max_iter=2, return_result=True, **PUBLISHED)
    assert res.reconstruction_ratios[-3:].max() < res.reconstruction_ratios[:12].min()


def test_diagnostics_are_consistent():
    G = attacked_stack(11, 300, 2, seed=11)
    res = flagagg.flag_aggregate(G, 5, 1.0, max_iter=100, return_result=True, **PUBLISHED)
    assert res.converged
    assert res.stationarity < 1e-2
    assert res.eigengap > 0
    assert np.all(np.diff(res.eigenvalues) <= 1e-12)
    np.testing.assert_allclose(res.weights, (1 - res.reconstruction_ratios + 1e-7) ** -0.5,
                               rtol=1e-6)
    np.testing.assert_allclose(G.T @ res.coefficients, res.aggregate, rtol=1e-10)
    assert "rank r = 5" in res.summary()
    with pytest.raises(AttributeError):
        res.n_iter = 3  # frozen


def test_stationarity_drops_along_iterations():
    G = attacked_stack(15, 300, 3, seed=2, kind="random")
    few = flagagg.flag_aggregate(G, 8, max_iter=1, return_result=True, **PUBLISHED)
    many = flagagg.flag_aggregate(G, 8, tol=1e-12, max_iter=500, return_result=True,
                                  backend="numpy")
    assert many.stationarity < few.stationarity
    assert many.stationarity < 1e-4


# --- properties -------------------------------------------------------------

stacks = st.tuples(
    st.integers(2, 9), st.integers(2, 30), st.integers(0, 2**31 - 1), st.sampled_from(
        ["random", "reverse", "little"])
)


def _draw(p, n, seed, kind):
    f = min(2, p - 1)
    return attacked_stack(p, n, f, seed, kind=kind)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stacks, st.floats(0, 8), st.integers(1, 5))
def test_objective_never_increases(shape, lam, r):
    G = _draw(*shape)
    res = flagagg.flag_aggregate(G, r, lam, max_iter=30, tol=0, return_result=True,
                                 backend="numpy")
    h = res.objective_history
    # Round-off: an error d in 1 - v moves sqrt(. + eps) by d / (2 sqrt(eps)),
    # about 1e-12 per term for d ~ 1e-15 and eps = 1e-7.
    assert np.all(np.diff(h) <= 1e-10 * np.abs(h[:-1]) + 1e-9), h


@settings(max_examples=25, deadline=None)
@given(stacks, st.floats(0, 4), st.integers(0, 2**31 - 1))
def test_permutation_invariance(shape, lam, seed):
    G = _draw(*shape)
    perm = np.random.default_rng(seed).permutation(G.shape[0])
    a = flagagg.flag_aggregate(G, 2, lam, max_iter=5, tol=0, **PUBLISHED)
    b = flagagg.flag_aggregate(G[perm], 2, lam, max_iter=5, tol=0, **PUBLISHED)
    res = flagagg.flag_aggregate(G, 2, lam, max_iter=5, return_result=True, **PUBLISHED)
    if res.eigengap > 1e-6 * res.eigenvalues[0]:
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(stacks, st.floats(1e-3, 1e3), st.integers(0, 1000))
def test_invariant_to_rescaling_one_input(shape, scale, which):
    G = _draw(*shape)
    i = which % G.shape[0]
    H = G.copy()
    H[i] *= scale
    a = flagagg.flag_aggregate(G, 2, 1.0, max_iter=5, tol=0, **PUBLISHED)
    b = flagagg.flag_aggregate(H, 2, 1.0, max_iter=5, tol=0, **PUBLISHED)
    res = flagagg.flag_aggregate(G, 2, 1.0, max_iter=5, return_result=True, **PUBLISHED)
    if res.eigengap > 1e-6 * res.eigenvalues[0]:
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(stacks, st.integers(0, 2**31 - 1))
def test_rotation_equivariance(shape, seed):
    G = _draw(*shape)
    n = G.shape[1]
    Q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    a = flagagg.flag_aggregate(G, 2, 0.5, max_iter=5, tol=0, **PUBLISHED)
    b = flagagg.flag_aggregate(G @ Q.T, 2, 0.5, max_iter=5, tol=0, **PUBLISHED)
    np.testing.assert_allclose(Q @ a, b, rtol=1e-6, atol=1e-8)


def test_pytree_equals_flat_stack():
    rng = np.random.default_rng(0)
    G = attacked_stack(6, 50, 1, seed=4).astype(np.float32)
    shapes = {"w": (5, 6), "b": (6,), "extra": [(2, 7)]}

    def split(row):
        return {"w": row[:30].reshape(5, 6), "b": row[30:36],
                "extra": [row[36:].reshape(2, 7)]}

    trees = [split(g) for g in G]
    res_tree = flagagg.flag_aggregate(trees, 3, 1.0, return_result=True, **PUBLISHED)
    flat = flagagg.flag_aggregate(G, 3, 1.0, **PUBLISHED)
    out = res_tree.aggregate
    assert set(out) == set(shapes)
    assert out["w"].shape == (5, 6) and out["b"].shape == (6,)
    assert isinstance(out["extra"], list) and out["extra"][0].shape == (2, 7)
    assert out["w"].dtype == np.float32
    rebuilt = np.concatenate([out["w"].ravel(), out["b"], out["extra"][0].ravel()])
    np.testing.assert_allclose(rebuilt, flat, rtol=1e-5, atol=1e-7)
    del rng


def test_sequence_of_rows_equals_stack():
    G = attacked_stack(5, 40, 1, seed=9)
    a = flagagg.flag_aggregate(list(G), 2, **PUBLISHED)
    b = flagagg.flag_aggregate(G, 2, **PUBLISHED)
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_higher_dimensional_stack_keeps_shape():
    G = attacked_stack(5, 24, 1, seed=9)
    out = flagagg.flag_aggregate(G.reshape(5, 2, 3, 4), 2, **PUBLISHED)
    assert out.shape == (2, 3, 4)
    np.testing.assert_allclose(out.ravel(), flagagg.flag_aggregate(G, 2, **PUBLISHED))


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_deferred_subspace_diagnostics_equal_eager_ones(lam):
    # The aggregate-only path leaves out the final eigendecomposition; result_ and
    # return_result form it, equal to solve_gram's eager one.
    from flagagg._array import as_stack
    from flagagg.backends import get_backend_impl
    from flagagg.rules._flag import solve_gram

    G = attacked_stack(9, 40, 2, seed=3)
    agg = flagagg.FlagAggregator(r=3, lam=lam, backend="numpy")
    agg(G)
    lazy = agg.result_
    res = agg(G, return_result=True)
    eager = solve_gram(as_stack(G).gram(get_backend_impl("numpy")), 3, lam)
    for got in (lazy, res):
        np.testing.assert_array_equal(got.eigenvalues, eager.eigenvalues)
        assert got.stationarity == eager.stationarity
        assert got.eigengap == eager.eigengap > 0


def test_aggregator_object_keeps_result():
    agg = flagagg.FlagAggregator(r=3, backend="numpy")
    G = attacked_stack(7, 30, 1, seed=0)
    out = agg(G)
    # result_ keeps the diagnostics of the last call, not the gradient-sized aggregate
    assert isinstance(agg.result_, flagagg.FlagResult)
    assert agg.result_.aggregate is None
    res = agg(G, return_result=True)
    np.testing.assert_array_equal(res.aggregate, out)
    np.testing.assert_array_equal(agg.result_.coefficients, res.coefficients)
    assert "FlagAggregator(r=3" in repr(agg)


def _pair_stack(kind, p, seed):
    """Inputs for the pair-term checks; hostile kinds stress cancellation and range."""
    rng = np.random.default_rng(seed)
    n = 3 * p
    base = rng.normal(size=n)
    G = base + 0.5 * rng.normal(size=(p, n))
    if kind == "random":
        G = rng.normal(size=(p, n))
    elif kind.startswith("near"):
        # a quarter of the rows near-copies of one: pair differences far below the norms
        G[: p // 4] = G[0] + float(kind[4:]) * rng.normal(size=(p // 4, n))
    elif kind.startswith("offset"):
        G = float(kind[6:]) + rng.normal(size=(p, n))
    elif kind == "scales_nan":
        G[0] *= 1e300
        G[1] *= 1e-300
        G[2, 1] = np.nan
        G[3] = 0.0
    return G


PAIR_KINDS = ["random", "cluster", "near1e-3", "near1e-5", "offset1e2", "offset1e4",
              "offset1e8", "scales_nan"]


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("kind", PAIR_KINDS)
@pytest.mark.parametrize("p", [9, 48])
def test_pair_terms_match_explicit_pair_vectors(monkeypatch, p, kind, variant):
    """The Laplacian pair algebra gives what the explicit q(q-1)/2 pair vectors give."""
    from flagagg.rules import _flag

    G = _pair_stack(kind, p, seed=p)
    kw = dict(r=p // 3, lam=4.0, variant=variant, max_iter=5, tol=0.0, return_result=True,
              **PUBLISHED)
    new = flagagg.flag_aggregate(G, **kw)
    monkeypatch.setattr(_flag, "_Terms", PairTermsDense)
    old = flagagg.flag_aggregate(G, **kw)
    assert new.excluded == old.excluded
    assert new.n_iter == old.n_iter and new.rank == old.rank

    def close(a, b, rtol):
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
        err = np.max(np.abs(a - b), initial=0.0)
        assert err <= rtol * np.max(np.abs(b), initial=0.0), (err, rtol)

    close(new.aggregate, old.aggregate, 1e-10)
    close(new.objective_history, old.objective_history, 1e-10)
    # Weights (1 - v_i + eps)^(-1/2) of rows the subspace fits have slack ~eps,
    # where either implementation's round-off of 1e-16 in v_i moves them by
    # ~1e-9 relative: compare the slacks, and B's eigenvalues (built from the
    # weights) as loosely. Slacks lie in [eps, 1 + eps]: an absolute bound.
    np.testing.assert_allclose(1 / new.weights[new.weights > 0] ** 2,
                               1 / old.weights[old.weights > 0] ** 2, rtol=0, atol=1e-13)
    close(new.eigenvalues, old.eigenvalues, 1e-7)
    if not kind.startswith("near"):
        # Each input's share c_i ||g_i|| (the coefficients span 600 decades
        # here). Near-copies have loose coefficients: only their sum matters.
        m = np.abs(np.nan_to_num(G)).max(axis=1, keepdims=True)
        norms = np.ravel(m) * np.linalg.norm(np.nan_to_num(G) / np.where(m > 0, m, 1), axis=1)
        close(new.coefficients * norms, old.coefficients * norms, 1e-10)
        close(new.stationarity, old.stationarity, 1e-6)


def test_pair_terms_take_both_paths():
    """Near-copies go through the explicit differences, the other pairs the Gram form."""
    from flagagg.rules._flag import _Terms

    G = _pair_stack("near1e-5", 16, seed=1)
    H = G / np.linalg.norm(G, axis=1, keepdims=True)
    s, V = np.linalg.eigh(H @ H.T)
    T = V[:, s > 1e-10 * s.max()] * np.sqrt(s[s > 1e-10 * s.max()])
    terms = _Terms(T, 1.0, "paper")
    close_pairs = {(int(i), int(j)) for i, j in zip(terms.ci, terms.cj, strict=True)}
    assert close_pairs == {(i, j) for i in range(4) for j in range(i + 1, 4)}
    assert np.count_nonzero(terms.inv_far) == 16 * 15 - 2 * len(close_pairs)


def test_pair_terms_memory_is_quadratic_in_p():
    """Peak memory of a lam > 0 solve grows like p^2 (the explicit pairs: p^3)."""
    import tracemalloc

    from flagagg.rules._flag import solve_gram

    peaks = []
    for p in (96, 192):
        G = np.random.default_rng(p).normal(size=(p, 2 * p))
        K = G @ G.T
        solve_gram(K[:8, :8], lam=1.0)  # imports outside the measurement
        tracemalloc.start()
        try:
            solve_gram(K, lam=1.0)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    # p^2: ratio 4; p^3: 8. The explicit pair vectors alone are 192^3 * 4 bytes = 28 MB.
    assert peaks[1] / peaks[0] < 5.0, peaks
    assert peaks[1] < 64 * 192**2 * 8, peaks
