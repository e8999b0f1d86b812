"""The baseline rules against their textbook oracles, and their properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flagagg
from flagagg.backends import _implementation as get_backend_impl
from flagagg.backends._order_stats import coordinate_stat_sorted as generic_stat
from flagagg.backends._order_stats import network, sorting_network

import rule_oracles as orc
from support.backends import has_module, make_lib
from support.rules import aggregate

P, F = 11, 2  # Bulyan needs p >= 4f + 3


def stack(p=P, n=60, f=F, seed=0, dtype="float64", kind="spread"):
    """p - f honest rows around a common point, then f faulty rows."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=n)
    honest = base + 0.5 * rng.normal(size=(p - f, n))
    if kind == "spread":
        bad = base + rng.uniform(-4, 4, size=(f, n))
    elif kind == "huge":
        bad = 1e6 * honest[:f]
    elif kind == "nan":
        bad = np.full((f, n), np.nan)
    else:
        raise ValueError(kind)
    return np.vstack([honest, bad]).astype(dtype)


# name -> (get_rule kwargs, oracle(G) -> output)
CASES = {
    "median": ({}, orc.median),
    "trimmed_mean": ({"f": F}, lambda G: orc.trimmed_mean(G, F)),
    "meamed": ({"f": F}, lambda G: orc.meamed(G, F)),
    "phocas": ({"f": F}, lambda G: orc.phocas(G, F)),
    "krum": ({"f": F}, lambda G: orc.krum(G, F)),
    "multi_krum": ({"f": F}, lambda G: orc.multi_krum(G, F)[0]),
    "bulyan": ({"f": F}, lambda G: orc.bulyan(G, F)[0]),
    "geometric_median": ({"tol": 1e-13, "max_iter": 2000},
                         lambda G: orc.geometric_median(G)),
    "centered_clipping": ({"tau": 2.0, "n_iter": 4},
                          lambda G: orc.centered_clipping(G, 2.0, 4)),
    "mda": ({"f": F}, lambda G: orc.mda(G, F)[0]),
}
COMPOSED = {
    "nnm+krum": (("krum", {"f": F, "pre": ["nnm"]}),
                 lambda G: orc.krum(orc.nnm(G, F), F)),
    "nnm+meamed": (("meamed", {"f": F, "pre": ["nnm"]}),
                   lambda G: orc.meamed(orc.nnm(G, F), F)),
    "clipping+multi_krum": (("multi_krum", {"f": F, "pre": [("clipping", {"tau": 6.0})]}),
                            lambda G: orc.multi_krum(orc.clip_rows(G, 6.0), F)[0]),
}


def tol(dtype):
    return {"rtol": 1e-9, "atol": 1e-9} if dtype == "float64" else {"rtol": 2e-5, "atol": 2e-5}


@pytest.mark.parametrize("name", list(CASES) + list(COMPOSED))
def test_rule_matches_oracle(lib, dtype, name):
    if name in CASES:
        rule_name, params = name, CASES[name][0]
        oracle = CASES[name][1]
    else:
        (rule_name, params), oracle = COMPOSED[name]
    G = stack(seed=len(name), dtype=dtype)
    res = flagagg.aggregate(lib.to(G), rule=rule_name, backend=lib.backend, return_result=True,
                            **params)
    lib.check(res.aggregate, dtype)
    assert res.backend == lib.backend
    expected = oracle(G)
    got = lib.back(res.aggregate).astype(np.float64)
    t = tol(dtype)
    if name == "geometric_median":
        t = {"rtol": 1e-6, "atol": 1e-6} if dtype == "float64" else {"rtol": 1e-4, "atol": 1e-4}
    np.testing.assert_allclose(got, expected, **t)


def test_selected_indices_match_oracle():
    G = stack(seed=3)
    assert flagagg.aggregate(G, rule="krum", f=F, return_result=True).selected == (
        orc.krum_select(G, F),)
    res = flagagg.aggregate(G, rule="multi_krum", f=F, m=4, return_result=True)
    assert list(res.selected) == orc.multi_krum(G, F, 4)[1]
    np.testing.assert_allclose(res.coefficients.sum(), 1.0)
    res = flagagg.aggregate(G, rule="bulyan", f=F, return_result=True)
    assert list(res.selected) == orc.bulyan(G, F)[1]
    assert res.details == {"theta": P - 2 * F, "beta": P - 4 * F}
    res = flagagg.aggregate(G, rule="mda", f=F, return_result=True)
    assert list(res.selected) == orc.mda(G, F)[1]


# ----------------------------------------------------------------------------- properties

ROBUST = {
    "median": {},
    "trimmed_mean": {"f": F},
    "meamed": {"f": F},
    "phocas": {"f": F},
    "krum": {"f": F},
    "multi_krum": {"f": F},
    "bulyan": {"f": F},
    "geometric_median": {"tol": 1e-12, "max_iter": 1000},
    "mda": {"f": F},
    "nnm+krum": {"f": F, "pre": ["nnm"]},
    "nnm+trimmed_mean": {"f": F, "pre": ["nnm"]},
}


def _rule(name):
    return name.split("+")[-1]


@pytest.mark.parametrize("name", [n for n in ROBUST if n != "bulyan"] + ["centered_clipping"])
def test_permutation_invariance(name):
    # Not Bulyan: its late Krum rounds count one neighbour, so two mutual
    # nearest neighbours tie exactly and the lower index wins.
    G = stack(seed=11)
    params = ROBUST.get(name, {"tau": 1.5, "n_iter": 3})
    perm = np.random.default_rng(1).permutation(P)
    a = flagagg.aggregate(G, rule=_rule(name), **params)
    b = flagagg.aggregate(G[perm], rule=_rule(name), **params)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(ROBUST) + ["centered_clipping"])
def test_translation_equivariance(name):
    G = stack(seed=12)
    t = np.random.default_rng(2).normal(size=G.shape[1]) * 3
    params = dict(ROBUST.get(name, {"tau": 1.5, "n_iter": 3}))
    if name == "centered_clipping":
        # Equivariant when the starting center moves with the inputs.
        a = flagagg.aggregate(G, rule=name, center=G[0], **params)
        b = flagagg.aggregate(G + t, rule=name, center=G[0] + t, **params)
    else:
        a = flagagg.aggregate(G, rule=_rule(name), **params)
        b = flagagg.aggregate(G + t, rule=_rule(name), **params)
    np.testing.assert_allclose(b, a + t, rtol=1e-8, atol=1e-8)


# One compiled backend and one through the array API.
BREAKDOWN_CASES = [pytest.param(c, marks=pytest.mark.skipif(not has_module(c.split("-")[0]),
                                                            reason=f"{c} missing"))
                   for c in ("numba", "torch-cpu")]


@pytest.mark.parametrize("kind", ["huge", "nan"])
@pytest.mark.parametrize("name", list(ROBUST) + ["centered_clipping", "bucketing+median"])
@pytest.mark.parametrize("case", BREAKDOWN_CASES)
def test_breakdown(name, kind, case):
    lib = make_lib(case)
    G = stack(seed=13, dtype="float32", kind=kind)
    H = G[: P - F].astype(np.float64)
    center = H.mean(axis=0)
    radius = np.linalg.norm(H - center, axis=1).max()
    params = dict(ROBUST.get(name, {}))
    if name == "centered_clipping":
        params = {"tau": radius, "n_iter": 5, "center": lib.to(G[0])}
    if name == "bucketing+median":
        params = {"pre": [("bucketing", {"s": 2, "random_state": 0})]}
    res = flagagg.aggregate(lib.to(G), rule=_rule(name), backend=lib.backend,
                            return_result=True, **params)
    out = lib.back(res.aggregate).astype(np.float64)
    assert np.isfinite(out).all()
    if kind == "nan" and _rule(name) in ("krum", "multi_krum", "bulyan", "mda",
                                         "geometric_median", "centered_clipping"):
        assert {i for i, _ in res.excluded} == set(range(P - F, P))
    if _rule(name) in ("median", "trimmed_mean", "meamed", "phocas", "bulyan"):
        # Per coordinate, inside the honest values' range.
        slack = 1e-5 * (1 + np.abs(H).max())
        assert (out >= H.min(axis=0) - slack).all() and (out <= H.max(axis=0) + slack).all()
    else:
        bound = 1.0 if _rule(name) in ("krum", "multi_krum", "mda") else 3.0
        assert np.linalg.norm(out - center) <= bound * radius * (1 + 1e-5)


def test_nan_in_some_coordinates_only():
    G = stack(seed=14)
    rng = np.random.default_rng(0)
    for j in range(G.shape[1]):  # at most f NaN/Inf per coordinate, spread over all rows
        rows = rng.choice(P, size=F, replace=False)
        G[rows, j] = rng.choice([np.nan, np.inf, -np.inf], size=F)
    for name in ("median", "trimmed_mean", "meamed", "phocas"):
        params = {} if name == "median" else {"f": F}
        out = flagagg.aggregate(G, rule=name, **params)
        assert np.isfinite(out).all(), name
        np.testing.assert_allclose(out, CASES[name][1](G), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("rule,p,f,message", [
    ("krum", 7, 3, "need p >= 2f + 3 for krum: got p=7, f=3"),
    ("multi_krum", 6, 2, "need p >= 2f + 3 for multi_krum: got p=6, f=2"),
    ("bulyan", 10, 2, "need p >= 4f + 3 for bulyan: got p=10, f=2"),
    ("trimmed_mean", 4, 2, "need p >= 2f + 1 for trimmed_mean: got p=4, f=2"),
    ("meamed", 4, 2, "need p >= 2f + 1 for meamed: got p=4, f=2"),
    ("phocas", 4, 2, "need p >= 2f + 1 for phocas: got p=4, f=2"),
    ("mda", 4, 2, "need p >= 2f + 1 for mda: got p=4, f=2"),
    ("median", 4, 2, "need p >= 2f + 1 for median: got p=4, f=2"),
])
def test_precondition_errors(rule, p, f, message):
    G = np.ones((p, 3))
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        flagagg.aggregate(G, rule=rule, f=f)


def test_parameter_errors():
    with pytest.raises(ValueError, match="need f >= 0 for krum"):
        flagagg.get_rule("krum", f=-1)
    with pytest.raises(TypeError, match="f must be an integer"):
        flagagg.get_rule("meamed", f=1.5)
    with pytest.raises(TypeError, match="rule 'krum' needs f \\(the number of Byzantine"):
        flagagg.get_rule("krum")
    with pytest.raises(ValueError, match="need m <= p for multi_krum: got m=9, p=7"):
        flagagg.aggregate(np.ones((7, 2)), rule="multi_krum", f=1, m=9)
    with pytest.raises(ValueError, match="C\\(30, 5\\) = 142506 exceeds max_subsets=1000"):
        flagagg.aggregate(np.ones((30, 2)), rule="mda", f=5, max_subsets=1000)
    with pytest.raises(ValueError, match="need tau > 0 for centered_clipping"):
        flagagg.get_rule("centered_clipping", tau=0)
    with pytest.raises(ValueError, match="unknown pre-aggregation 'mix'"):
        flagagg.get_rule("krum", f=1, pre=["mix"])
    with pytest.raises(ValueError, match="bulyan needs at least 7 inputs with finite values"):
        G = stack(seed=1)
        G[:5] = np.nan
        flagagg.aggregate(G, rule="bulyan", f=F)
    with pytest.raises(ValueError, match="krum sees the 6 outputs of bucketing on p=11"):
        flagagg.aggregate(stack(), rule="krum", f=F, pre=[("bucketing", {"s": 2})])
    with pytest.raises(ValueError, match="center must be shaped like one input"):
        flagagg.aggregate(stack(), rule="centered_clipping", center=np.zeros(3))


def test_deterministic_ties(lib):
    # Integer values: every distance and sum is exact, so the ties are real.
    G = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 0.0], [0.0, 1.0],
                  [-1.0, 0.0]])
    res = flagagg.aggregate(lib.to(G), rule="krum", f=1, backend=lib.backend,
                            return_result=True)
    assert res.selected == (0,)
    res = flagagg.aggregate(lib.to(G), rule="multi_krum", f=1, m=3, backend=lib.backend,
                            return_result=True)
    assert res.selected == (0, 1, 2)  # scores 6, 6, 6, 8, 6, 6, 6
    # Equal distance on both sides of the median: the smaller value wins.
    T = np.array([[0.0], [1.0], [2.0]])
    out = flagagg.aggregate(lib.to(T), rule="meamed", f=1, backend=lib.backend)
    np.testing.assert_array_equal(lib.back(out), [0.5])
    res = flagagg.aggregate(lib.to(np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])), rule="mda",
                            f=1, backend=lib.backend, return_result=True)
    assert res.selected == (0, 1, 2, 3)


@pytest.mark.parametrize("name", flagagg.available_rules())
def test_all_nan_raises_one_message(name):
    # Never a silent all-NaN output: every rule raises, the Gram rules and the
    # mean with the one "nothing is left" message.
    G = np.full((7, 4), np.nan)
    with pytest.raises(ValueError, match="all 7 inputs were excluded|not finite|needs at least"):
        aggregate(G, rule=name, f=1)


# ----------------------------------------------------------------------------- rules in detail

def test_geometric_median_optimality_condition():
    G = stack(seed=21, kind="spread")
    res = flagagg.aggregate(G, rule="geometric_median", tol=1e-15, max_iter=5000,
                            return_result=True)
    z = res.aggregate
    d = G - z
    unit = d / np.linalg.norm(d, axis=1, keepdims=True)
    # The subgradient of sum ||z - g_i|| vanishes at the median.
    assert np.linalg.norm(unit.sum(axis=0)) < 1e-6 * P
    assert res.converged and res.n_iter == res.objective_history.size
    assert np.all(np.diff(res.objective_history) <= 1e-12 * res.objective_history[0])
    obj = np.linalg.norm(d, axis=1).sum()
    for _ in range(20):  # no nearby point is better
        y = z + 1e-3 * np.random.default_rng(_).normal(size=z.shape)
        assert np.linalg.norm(G - y, axis=1).sum() >= obj


def test_geometric_median_reports_non_convergence():
    res = flagagg.aggregate(stack(seed=2), rule="geometric_median", max_iter=2, tol=0.0,
                            return_result=True)
    assert res.n_iter == 2 and not res.converged


# The cases of issue 24: one input far off must not move the median (its breakdown
# point is 1/2), whatever its size; the mean start and an objective-based stop did.
@pytest.mark.parametrize("mag", [1e3, 1e6, 1e10, 1e30, 1e160, 1e300])
def test_geometric_median_one_far_outlier(lib, mag):
    G = np.random.default_rng(24).normal(size=(7, 5))
    G[6] = mag
    want = orc.geometric_median(G)
    res = flagagg.aggregate(lib.to(G), rule="geometric_median", backend=lib.backend,
                            return_result=True)
    err = orc.norm(lib.back(res.aggregate) - want) / orc.norm(want)
    assert res.converged and err < 1e-5, (err, res.n_iter)
    tight = flagagg.aggregate(lib.to(G), rule="geometric_median", backend=lib.backend,
                              tol=1e-12, max_iter=1000, return_result=True)
    assert tight.converged and orc.norm(lib.back(tight.aggregate) - want) < 1e-9 * orc.norm(want)
    # Stopped early, it says so (the old stop said converged after 9 iterations at 1e30).
    early = flagagg.aggregate(G, rule="geometric_median", max_iter=3, return_result=True)
    assert not early.converged and np.all(np.isfinite(early.aggregate))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_geometric_median_one_worker_at_minus_1e8_g(dtype):
    # p = 15, one worker sends -1e8 times the honest mean (5 % error before, float32 too).
    H = np.random.default_rng(8).normal(size=(15, 2000))
    H[14] = -1e8 * H[:14].mean(axis=0)
    G = H.astype(dtype)
    want = orc.geometric_median(G)
    res = flagagg.aggregate(G, rule="geometric_median", return_result=True)
    assert res.converged
    assert orc.norm(res.aggregate.astype(np.float64) - want) < 1e-5 * orc.norm(want)


def test_geometric_median_converged_means_stationary():
    # converged=True certifies the pulls balance: the sum of the unit vectors from the
    # output to the inputs is at most about tol * p (plus the eps smoothing).
    G = stack(seed=3, kind="huge")
    res = flagagg.aggregate(G, rule="geometric_median", tol=1e-8, return_result=True)
    d = G - res.aggregate
    unit = d / np.linalg.norm(d, axis=1, keepdims=True)
    assert res.converged and np.linalg.norm(unit.sum(axis=0)) < 1e-6 * P


@pytest.mark.parametrize("mag", [1e3, 1e155, 1e300, 3e38])
def test_centered_clipping_clips_any_size(lib, mag):
    # A row of 1e155 or more was not clipped (its squared distance overflowed): the
    # output was 3.7e199 instead of about 0.4.
    dtype = "float32" if mag == 3e38 else "float64"
    G = np.random.default_rng(5).normal(size=(7, 4)).astype(dtype)
    G[6] = mag
    want = orc.centered_clipping(G, 1.0, 3)
    for center in (None, np.full(4, 0.5, dtype=dtype)):
        if center is not None:
            want = orc.centered_clipping(G, 1.0, 3, v0=center)
        rule = flagagg.get_rule("centered_clipping", tau=1.0, n_iter=3,
                                center=None if center is None else lib.to(center))
        out = lib.back(rule(lib.to(G), backend=lib.backend)).astype(np.float64)
        rtol = 1e-5 if dtype == "float32" else 1e-10
        np.testing.assert_allclose(out, want, rtol=rtol, atol=rtol)
        assert orc.norm(out - (0 if center is None else center)) <= 3.0


@pytest.mark.parametrize("rule,params", [("geometric_median", {}), ("median", {}),
                                         ("krum", {"f": 1}), ("mean", {}),
                                         ("centered_clipping", {"center": np.zeros(5)})])
def test_diagnostics_of_a_huge_finite_input_are_finite(rule, params):
    # The cosines come from the scaled form of the Gram: a kept input of 1e200 (squared
    # norm beyond float64) has its exact cosine, and is flagged outsized.
    G = np.random.default_rng(6).normal(size=(7, 5))
    G[6] = 1e200
    res = flagagg.aggregate(G, rule=rule, return_result=True, **params)
    assert res.excluded == () and np.isfinite(res.aggregate).all()
    assert np.isfinite(res.cosine).all() and np.isfinite(res.influence).all()
    out = res.aggregate / np.abs(res.aggregate).max()  # (the mean is huge too)
    want = out.sum() / (np.sqrt(5) * np.linalg.norm(out))  # cos(1e200 * ones, out)
    np.testing.assert_allclose(res.cosine[6], np.clip(want, -1, 1), rtol=1e-9, atol=1e-12)
    assert "outsized" in res.verdict[6]


def test_centered_clipping_with_previous_center():
    G = stack(seed=5)
    rule = flagagg.get_rule("centered_clipping", tau=1.0, n_iter=2, center="previous")
    first = rule(G)
    np.testing.assert_allclose(first, orc.centered_clipping(G, 1.0, 2), rtol=1e-10, atol=1e-10)
    second = rule(G)
    np.testing.assert_allclose(second, orc.centered_clipping(G, 1.0, 2, v0=first), rtol=1e-10,
                               atol=1e-10)
    assert rule.result_.details["center_weight"] != 0


def test_centered_clipping_center_as_pytree(lib):
    G = stack(seed=6, n=30)
    v0 = G[1] + 0.1
    trees = [{"a": lib.to(g[:10]), "b": lib.to(g[10:].reshape(4, 5))} for g in G]
    center = {"a": lib.to(v0[:10]), "b": lib.to(v0[10:].reshape(4, 5))}
    out = flagagg.aggregate(trees, rule="centered_clipping", tau=0.7, n_iter=3, center=center,
                            backend=lib.backend)
    flat = np.concatenate([lib.back(out["a"]), lib.back(out["b"]).ravel()])
    np.testing.assert_allclose(flat, orc.centered_clipping(G, 0.7, 3, v0=v0), rtol=1e-9,
                               atol=1e-9)


def test_pytree_inputs_for_coordinate_rules(lib):
    G = stack(seed=7, n=30, dtype="float32")
    trees = [[lib.to(g[:12].reshape(3, 4)), {"w": lib.to(g[12:])}] for g in G]
    for name, params in [("meamed", {"f": F}), ("bulyan", {"f": F}),
                         ("phocas", {"f": F, "pre": ["nnm"]})]:
        out = flagagg.aggregate(trees, rule=name, backend=lib.backend, **params)
        lib.check(out[0], "float32")
        flat = np.concatenate([lib.back(out[0]).ravel(), lib.back(out[1]["w"])])
        ref = flagagg.aggregate(G, rule=name, backend="numpy", **params)
        np.testing.assert_allclose(flat, ref, rtol=1e-5, atol=1e-5)


def test_bucketing_is_seeded_and_matches_oracle():
    G = stack(seed=8)
    rule = flagagg.get_rule("median", pre=[("bucketing", {"s": 3, "random_state": 4})])
    out1, out2 = rule(G), rule(G)
    rng = np.random.default_rng(4)
    for out in (out1, out2):
        perm = rng.permutation(P)
        np.testing.assert_allclose(out, orc.median(orc.bucket_means(G, 3, perm)), rtol=1e-12)
    again = flagagg.get_rule("median", pre=[("bucketing", {"s": 3, "random_state": 4})])(G)
    np.testing.assert_array_equal(again, out1)


def test_composition_stays_in_gram_space_and_matches_explicit_mixing():
    G = stack(seed=9)
    res = flagagg.aggregate(G, rule="geometric_median", f=F, pre=["nnm", ("clipping", {})],
                            tol=1e-13, max_iter=2000, return_result=True)
    assert res.rule == "nnm+clipping+geometric_median"
    mixed = orc.nnm(G, F)
    tau = np.median(np.linalg.norm(mixed, axis=1))
    np.testing.assert_allclose(res.aggregate, orc.geometric_median(orc.clip_rows(mixed, tau)),
                               rtol=1e-6, atol=1e-6)
    # One combination of the original inputs gives the output.
    np.testing.assert_allclose(res.coefficients @ G, res.aggregate, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(res.details["mixing"] @ G, orc.clip_rows(mixed, tau),
                               rtol=1e-10, atol=1e-10)


def test_flag_after_nnm_matches_flag_on_mixed_inputs():
    G = stack(seed=10, kind="huge")
    out = flagagg.aggregate(G, rule="flag", f=F, pre=["nnm"], r=3)
    ref = flagagg.flag_aggregate(orc.nnm(G, F), 3)
    np.testing.assert_allclose(out, ref, rtol=1e-7, atol=1e-7)


def test_nnm_with_nan_rows():
    G = stack(seed=15, kind="nan")
    res = flagagg.aggregate(G, rule="multi_krum", f=F, pre=["nnm"], return_result=True)
    assert np.isfinite(res.aggregate).all()
    assert res.coefficients[P - F:].tolist() == [0.0] * F
    mixed = orc.nnm(G, F)
    np.testing.assert_allclose(res.aggregate, orc.multi_krum(mixed, F)[0], rtol=1e-10)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 9), st.integers(0, 2 ** 32 - 1), st.sampled_from(["ties", "spread", "inf"]))
def test_nearest_mask_is_the_first_k_of_a_stable_argsort(p, seed, kind):
    from flagagg.rules._pre import nearest_mask

    rng = np.random.default_rng(seed)
    # Few distinct values make ties the rule, not the exception.
    D2 = rng.integers(0, 3, size=(p, p)).astype(float) if kind == "ties" else rng.random((p, p))
    if kind == "inf":
        D2[rng.random((p, p)) < 0.3] = np.inf
    np.fill_diagonal(D2, -1.0)
    for k in range(1, p + 1):
        want = np.zeros((p, p), dtype=bool)
        for i in range(p):
            want[i, np.argsort(D2[i], kind="stable")[:k]] = True
        np.testing.assert_array_equal(nearest_mask(D2, k), want)


def test_nnm_mixing_is_the_per_row_definition_with_ties_and_nan():
    # Distances with exact ties (integer data), one NaN input: the vectorised
    # neighbourhoods must be those of the definition, row by row.
    rng = np.random.default_rng(3)
    G = rng.integers(-2, 3, size=(40, 3)).astype(float)
    G[7] = np.nan
    f = 5
    res = flagagg.aggregate(G, rule="mean", f=f, pre=["nnm"], return_result=True,
                            backend="numpy")
    A = res.details["mixing"]
    finite = np.isfinite(G).all(axis=1)
    for i in range(40):
        if not finite[i]:
            assert A[i].tolist() == [float(j == i) for j in range(40)]
            continue
        d = np.where(finite, ((G - G[i]) ** 2).sum(axis=1), np.inf)
        d[i] = -1.0
        want = np.zeros(40)
        want[np.argsort(d, kind="stable")[:40 - f]] = 1.0 / (40 - f)
        np.testing.assert_array_equal(A[i], want)


# ----------------------------------------------------------------------------- kernels

def test_sorting_network_sorts_every_binary_input():
    # 0-1 principle: a comparator network that sorts all 0/1 inputs sorts everything.
    for n in range(1, 13):
        X = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(np.int8)
        for i, j in sorting_network(n):
            X[:, i], X[:, j] = np.minimum(X[:, i], X[:, j]), np.maximum(X[:, i], X[:, j])
        assert (np.diff(X, axis=1) >= 0).all(), n
        assert len(network(n, "median", 0, 0)[0]) <= len(sorting_network(n))


STATS = [("median", 0, 0), ("trimmed", 3, 0), ("median", 0, 5), ("trimmed", 2, 9),
         ("median", 0, 1), ("trimmed", 0, 13)]


@pytest.mark.parametrize("center,trim,k", STATS)
def test_coordinate_kernel_agrees_with_generic(lib, center, trim, k):
    rng = np.random.default_rng(trim + 10 * k)
    # Several blocks with a ragged tail, integers for exact ties, NaN and +-Inf.
    X = rng.integers(-4, 5, size=(13, 5001)).astype(np.float64)
    X[2, ::3] = np.nan
    X[5, ::7] = np.inf
    X[7, ::11] = -np.inf
    rows = np.arange(13)
    if k == 5:
        rows = np.array([0, 3, 4, 6, 8, 9, 10, 11, 12])  # a subset, as Bulyan reads
    with np.errstate(invalid="ignore"):
        ref = generic_stat(X, rows, center, trim, k)
    impl = get_backend_impl(lib.backend)
    for dtype in ("float32", "float64"):
        got = lib.back(impl.coordinate_stat(lib.to(X.astype(dtype)), rows, center, trim, k))
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    # A column slice of a larger array (strided rows) and half precision.
    half = "float32" if lib.id == "array_api_strict" else "float16"  # it has no float16
    got = lib.back(impl.coordinate_stat(lib.to(X.astype(half))[:, 100:3000], rows, center,
                                        trim, k))
    np.testing.assert_allclose(got, ref[100:3000], rtol=1e-6)


@pytest.mark.parametrize("center,trim,k", STATS[:4])
def test_torch_device_path_and_bfloat16(center, trim, k):
    # The GPU code path runs on CPU tensors too; bfloat16 goes through float32 chunks.
    torch = pytest.importorskip("torch")
    from flagagg.backends._torch import BACKEND

    rng = np.random.default_rng(3)
    X = rng.integers(-4, 5, size=(13, 3001)).astype(np.float32)
    X[4, ::5] = np.nan
    rows = np.arange(13)
    ref = generic_stat(X, rows, center, trim, k)
    got = BACKEND._coordinate_stat_device(torch.from_numpy(X), rows, center, trim, k)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6)
    got = BACKEND.coordinate_stat(torch.from_numpy(X).to(torch.bfloat16), rows, center, trim, k)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6)  # small integers: exact in bf16


def test_coordinate_kernel_matches_numpy_median_and_is_deterministic():
    pytest.importorskip("numba")
    impl = get_backend_impl("numba")
    X = np.random.default_rng(0).normal(size=(15, 200_003)).astype(np.float32)
    a = impl.coordinate_stat(X, np.arange(15), "median", 0, 0)
    np.testing.assert_array_equal(a, np.median(X, axis=0))
    np.testing.assert_array_equal(a, impl.coordinate_stat(X, np.arange(15), "median", 0, 0))
    b = impl.coordinate_stat(X[:14], np.arange(14), "median", 0, 0)
    np.testing.assert_allclose(b, np.median(X[:14].astype(np.float64), axis=0), rtol=1e-6)


# ----------------------------------------------------------------------------- random shapes

RULE_ORACLES = {
    "median": lambda G, f: orc.median(G),
    "trimmed_mean": orc.trimmed_mean,
    "meamed": orc.meamed,
    "phocas": orc.phocas,
    "krum": orc.krum,
    "multi_krum": lambda G, f: orc.multi_krum(G, f)[0],
    "bulyan": lambda G, f: orc.bulyan(G, f)[0],
    "mda": lambda G, f: orc.mda(G, f)[0],
}
NEED = {"krum": (2, 3), "multi_krum": (2, 3), "bulyan": (4, 3)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(RULE_ORACLES)), p=st.integers(1, 16), n=st.integers(1, 40),
       f=st.integers(0, 3), seed=st.integers(0, 2**16), nan_rows=st.booleans(),
       integers=st.booleans())
def test_random_shapes_match_oracle(name, p, n, f, seed, nan_rows, integers):
    a, b = NEED.get(name, (2, 1))
    if p < a * f + b:
        f = max(0, (p - b) // a)
    if p < a * f + b:
        return
    rng = np.random.default_rng(seed)
    # Small integers make exact ties everywhere: the tie-breaking must agree too.
    G = rng.integers(-2, 3, size=(p, n)).astype(np.float64) if integers else rng.normal(
        size=(p, n))
    if nan_rows and f:
        G[rng.choice(p, size=f, replace=False)] = np.nan
    params = {} if name == "median" else {"f": f}
    expected = RULE_ORACLES[name](G, f)
    backends = ["numpy"] + (["numba"] if has_module("numba") else [])
    for backend in backends:
        out = flagagg.aggregate(G, rule=name, backend=backend, **params)
        assert out.shape == (n,)
        np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-9)


def test_every_rule_is_registered():
    names = set(flagagg.available_rules())
    assert {"mean", "median", "trimmed_mean", "meamed", "phocas", "krum", "multi_krum",
            "bulyan", "geometric_median", "centered_clipping", "mda", "flag"} <= names
    assert flagagg.rules.available_pre() == ["arc", "bucketing", "clipping", "nnm"]
    for name in names - {"mean", "flag"}:
        flagagg.get_rule(name, f=0)  # every robust rule takes f


def _bulyan_select_round_by_round(D2, finite, f, theta):
    """Recursive Krum as defined: rescore the inputs left in every round."""
    from flagagg.rules._krum import krum_scores

    left = np.ones(D2.shape[0], dtype=bool)
    picks, first = [], None
    for _ in range(theta):
        R = np.flatnonzero(left)
        scores = krum_scores(D2[np.ix_(R, R)], R.size - f - 2)
        first = scores if first is None else first
        cand = np.flatnonzero(finite[R])
        i = int(R[cand[np.argmin(scores[cand])]])
        picks.append(i)
        left[i] = False
    return picks, first


@pytest.mark.parametrize("kind", ["spread", "ties", "duplicates", "non-finite"])
def test_bulyan_selection_matches_round_by_round_definition(kind):
    from flagagg.rules._krum import _bulyan_select_incremental as bulyan_select

    rng = np.random.default_rng(["spread", "ties", "duplicates", "non-finite"].index(kind))
    for _ in range(150):
        p = int(rng.integers(3, 30))
        f = int(rng.integers(0, max(1, (p - 3) // 4) + 1))
        X = rng.normal(size=(p, 3))
        if kind == "ties":
            X = np.round(X)
        elif kind == "duplicates":
            X = np.round(X * 2) / 2
            X[: p // 3] = X[0]
        D2 = ((X[:, None] - X[None]) ** 2).sum(-1)
        finite = np.ones(p, dtype=bool)
        if kind == "non-finite":
            bad = rng.choice(p, int(rng.integers(0, 2 * f + 1)), replace=False)
            finite[bad] = False
            D2[bad, :] = np.inf
            D2[:, bad] = np.inf
            np.fill_diagonal(D2, 0.0)
        theta = max(1, min(p - 2 * f, int(finite.sum())))
        picks, first = bulyan_select(D2, finite, f, theta)
        want_picks, want_first = _bulyan_select_round_by_round(D2, finite, f, theta)
        assert picks == want_picks, (p, f)
        np.testing.assert_array_equal(first, want_first)


def test_bulyan_selection_at_many_inputs_matches_definition():
    from flagagg.rules._krum import BULYAN_INCREMENTAL_MIN, bulyan_select

    p = BULYAN_INCREMENTAL_MIN + 1
    f = (p - 3) // 4
    X = np.random.default_rng(7).normal(size=(p, 4))
    X[:f] = 3.0 + 0.01 * X[:f]  # a clustered minority
    D2 = ((X[:, None] - X[None]) ** 2).sum(-1)
    finite = np.ones(p, dtype=bool)
    got = bulyan_select(D2, finite, f, p - 2 * f)
    want = _bulyan_select_round_by_round(D2, finite, f, p - 2 * f)
    assert got[0] == want[0]
    np.testing.assert_array_equal(got[1], want[1])


def test_mda_and_smea_share_one_subset_search():
    # rules/_subsets.py: every k-subset once, in itertools' lexicographic order
    # (ties go to the lowest indices), across batch boundaries; one budget message.
    import itertools

    from flagagg.rules import _subsets

    for p, k, batch in [(7, 3, 4), (6, 6, 2), (5, 1, 100), (9, 4, 7)]:
        got = [tuple(r) for b in _subsets.combination_batches(p, k, batch) for r in b.tolist()]
        assert got == list(itertools.combinations(range(p), k))
    assert _subsets.check_subset_budget("mda", 7, 2, 21, "x") == 21
    for rule in ("mda", "smea"):
        with pytest.raises(ValueError, match=rf"{rule} searches all C\(p, f\) subsets exactly: "
                           r"C\(7, 2\) = 21 exceeds max_subsets=20; raise max_subsets"):
            flagagg.aggregate(np.ones((7, 2)), rule=rule, f=2, max_subsets=20)
