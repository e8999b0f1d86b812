"""The peers' rules CGE, Medoid, MoNNA, CAF, SMEA and the ARC step against their oracles.

Each rule is checked against the n-space definition in ``oracles_peers_r1`` on
random stacks (every backend, float32 and float64), under a common offset of
1e8, with rows at 1e30 ... 1e300, rows holding NaN, and exact ties; then its
breakdown property (``f`` rows far away do not move it beyond the honest
spread), its errors, and its diagnostics.
"""

from __future__ import annotations

import math

import numpy as np
import oracles_peers_r1 as orc
import pytest

import flagagg

import rule_oracles
from support.backends import has_module, make_lib

P, F = 9, 2


def stack(p=P, n=12, f=F, seed=0, dtype="float64", kind="spread"):
    """``p - f`` honest rows around a common point, then ``f`` faulty rows."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=n)
    honest = base + 0.5 * rng.normal(size=(p - f, n))
    if kind == "spread":
        bad = base + rng.uniform(-3, 3, size=(f, n))
    elif kind == "huge":
        bad = 1e30 * rng.normal(size=(f, n))
    elif kind == "nan":
        bad = np.full((f, n), np.nan)
    else:
        raise ValueError(kind)
    return np.vstack([honest, bad]).astype(dtype)


# name -> (rule, get_rule params, oracle(G, f) -> output)
CASES = {
    "cge": ("cge", {}, lambda G, f: orc.cge(G, f)[0]),
    "medoid": ("medoid", {}, lambda G, f: orc.medoid(G)),
    "monna": ("monna", {}, lambda G, f: orc.monna(G, f)[0]),
    "monna-pivot": ("monna", {"pivot": 3}, lambda G, f: orc.monna(G, f, pivot=3)[0]),
    "caf": ("caf", {}, lambda G, f: orc.caf(G, f)[0]),
    "smea": ("smea", {}, lambda G, f: orc.smea(G, f)[0]),
    # flagagg's mean leaves out rows holding NaN; the median counts NaN as +inf.
    "arc+mean": ("mean", {"pre": ["arc"]},
                 lambda G, f: orc.arc(G, f)[0][orc._finite(G)].mean(axis=0)),
    # (Not arc+cge: ARC leaves k + 1 rows of one norm, a tie CGE breaks by rounding.)
    "arc+krum": ("krum", {"pre": ["arc"]}, lambda G, f: rule_oracles.krum(orc.arc(G, f)[0], f)),
    # (a step hands a non-finite input on as NaN: +inf for the median, whatever its sign)
    "arc+median": ("median", {"pre": ["arc"]},
                   lambda G, f: rule_oracles.median(np.where(orc._finite(G)[:, None],
                                                             orc.arc(G, f)[0], np.nan))),
}
TRANSLATION_INVARIANT = ("medoid", "monna", "monna-pivot", "caf", "smea")


def run(name, G, f=F, lib=None, **kw):
    rule, params, _ = CASES[name]
    X = G if lib is None else lib.to(G)
    return flagagg.aggregate(X, rule=rule, f=f, return_result=True,
                             backend=None if lib is None else lib.backend, **params, **kw)


def tol(dtype):
    return {"rtol": 1e-9, "atol": 1e-9} if dtype == "float64" else {"rtol": 2e-5, "atol": 2e-5}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_oracle(lib, dtype, name):
    G = stack(seed=len(name), dtype=dtype)
    res = run(name, G, lib=lib)
    lib.check(res.aggregate, dtype)
    assert res.backend == lib.backend
    # The oracle reads the very values the rule got (float32 inputs, float64 arithmetic).
    expected = CASES[name][2](G.astype(np.float64), F)
    np.testing.assert_allclose(lib.back(res.aggregate).astype(np.float64), expected, **tol(dtype))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("p,f", [(5, 1), (7, 3), (10, 2), (12, 5)])
def test_selection_matches_oracle_on_random_shapes(p, f, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 7))
    G = rng.normal(size=(p, n)) * rng.uniform(0.1, 10, size=(p, 1))
    got = flagagg.aggregate(G, rule="cge", f=f, return_result=True)
    assert list(got.selected) == orc.cge(G, f)[1]
    got = flagagg.aggregate(G, rule="medoid", return_result=True)
    assert got.selected == (orc.medoid_index(G),)
    got = flagagg.aggregate(G, rule="monna", f=f, return_result=True)
    assert list(got.selected) == orc.monna(G, f)[1]
    assert got.details["pivot"] == orc.medoid_index(G)
    if math.comb(p, f) <= 1000:
        got = flagagg.aggregate(G, rule="smea", f=f, return_result=True)
        mean, subset, lam = orc.smea(G, f)
        assert list(got.selected) == subset
        np.testing.assert_allclose(got.details["eigenvalue"], lam, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(got.aggregate, mean, rtol=1e-12, atol=1e-12)
    got = flagagg.aggregate(G, rule="caf", f=f, return_result=True)
    mean, lam, it = orc.caf(G, f)
    assert got.n_iter == it
    np.testing.assert_allclose(got.details["eigenvalue"], lam, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(got.aggregate, mean, rtol=1e-9, atol=1e-9)
    clipped, thr = orc.arc(G, f)
    got = flagagg.aggregate(G, rule="mean", f=f, pre=["arc"], return_result=True)
    assert got.details["pre"][0]["threshold"] == pytest.approx(thr, rel=1e-12)
    np.testing.assert_allclose(got.aggregate, clipped.mean(axis=0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", TRANSLATION_INVARIANT)
def test_exact_under_a_large_offset(name):
    # On a common 1e8 the Gram formula would lose 16 digits of the distances; the
    # shifted Gram keeps them: the same choice and output as without the offset.
    G = stack(seed=21)
    a = run(name, G)
    b = run(name, G + 1e8)
    np.testing.assert_allclose(b.aggregate - 1e8, a.aggregate, rtol=0, atol=1e-6)
    assert a.selected == b.selected


@pytest.mark.parametrize("name", ["cge", "arc+mean"])
def test_norm_rules_on_a_large_offset_match_oracle(name):
    # Not translation invariant: compared with the definition on the offset inputs.
    G = stack(seed=22) + 1e8
    np.testing.assert_allclose(run(name, G).aggregate, CASES[name][2](G, F), rtol=1e-12)


@pytest.mark.parametrize("mag", [1e30, 1e155, 1e300])
@pytest.mark.parametrize("name", list(CASES))
def test_huge_rows_match_oracle(name, mag):
    # f rows at 1e30 ... 1e300: squared norms overflow from 1e155 on; the rules read
    # the scaled Gram and choose (and average) exactly what the definition does.
    G = stack(seed=23)
    G[-F:] = mag * np.sign(np.random.default_rng(1).normal(size=(F, G.shape[1])))
    res = run(name, G)
    out = res.aggregate
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, CASES[name][2](G, F), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", list(CASES))
def test_nan_rows_are_excluded(name, value):
    G = stack(seed=24, kind="nan")
    G[-1, 1:] = value  # the last row holds one NaN and the rest +-Inf (or all NaN)
    res = run(name, G)
    assert np.isfinite(res.aggregate).all()
    assert {i for i, _ in res.excluded} == {P - 2, P - 1}
    np.testing.assert_allclose(res.aggregate, CASES[name][2](G, F), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["cge", "medoid", "monna", "smea", "arc+mean"])
def test_ties_go_to_the_lowest_index(name):
    # Duplicated rows and equal norms: the choice is the definition's, not the sort's.
    G = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0],
                  [0.0, -1.0], [1.0, 0.0]])
    res = run(name, G)
    np.testing.assert_allclose(res.aggregate, CASES[name][2](G, F), rtol=1e-12, atol=1e-12)
    again = run(name, G)
    assert res.selected == again.selected


def test_caf_ties_are_deterministic():
    G = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0],
                  [0.0, -1.0], [1.0, 0.0]])
    a = run("caf", G).aggregate
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, run("caf", G).aggregate)


# One compiled backend and one through the array API, in float32.
BREAKDOWN_CASES = [pytest.param(c, marks=pytest.mark.skipif(not has_module(c.split("-")[0]),
                                                            reason=f"{c} missing"))
                   for c in ("numba", "torch-cpu")]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("case", BREAKDOWN_CASES)
def test_breakdown(name, case):
    # f rows at 1e30 do not move the output beyond the honest spread: CGE, Medoid,
    # MoNNA and SMEA average or pick honest rows only; CAF's weighted mean keeps
    # the far rows at weight 0; ARC clips them to an honest norm.
    lib = make_lib(case)
    G = stack(seed=25, dtype="float32", kind="huge")
    H = G[: P - F].astype(np.float64)
    c = H.mean(axis=0)
    R = np.linalg.norm(H - c, axis=1).max()
    res = run(name, G, lib=lib)
    out = lib.back(res.aggregate).astype(np.float64)
    assert np.isfinite(out).all()
    if name == "arc+mean":
        # F of P rows clipped to an honest norm: at most F/P of twice the largest honest norm.
        bound = R + F / P * 2 * np.linalg.norm(H, axis=1).max()
    elif name == "arc+krum":
        bound = 3 * R
    else:
        bound = R
    assert np.linalg.norm(out - c) <= bound * (1 + 1e-4)
    if name != "arc+mean" and res.selected:
        assert max(res.selected) < P - F


def test_breakdown_check_can_fail():
    # The faulty rows are what a non-robust mean returns: the bound above rejects it.
    G = stack(seed=25, kind="huge")
    H = G[: P - F]
    out = G.mean(axis=0)
    assert np.linalg.norm(out - H.mean(axis=0)) > np.linalg.norm(H - H.mean(axis=0), axis=1).max()


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("rule", ["cge", "monna", "caf", "smea"])
def test_bound_on_f(rule):
    G = stack(p=4, f=0)
    with pytest.raises(ValueError, match=rf"need p >= 2f \+ 1 for {rule}: got p=4, f=2"):
        flagagg.aggregate(G, rule=rule, f=2)
    with pytest.raises(ValueError, match="need p >= 2f"):
        flagagg.aggregate(G, rule="mean", f=2, pre=["arc"])
    with pytest.raises(TypeError, match="f must be an integer"):
        flagagg.get_rule(rule, f=1.5)
    with pytest.raises(ValueError, match="need f >= 0"):
        flagagg.get_rule(rule, f=-1)


def test_medoid_f_is_optional_but_checked():
    G = stack(p=4, f=0)
    assert flagagg.aggregate(G, rule="medoid").shape == (G.shape[1],)
    with pytest.raises(ValueError, match="need p >= 2f"):
        flagagg.aggregate(G, rule="medoid", f=2)


def test_monna_pivot_errors():
    G = stack(seed=3)
    with pytest.raises(ValueError, match="need pivot >= 0"):
        flagagg.get_rule("monna", f=1, pivot=-1)
    with pytest.raises(TypeError, match="pivot must be an integer or None"):
        flagagg.get_rule("monna", f=1, pivot=1.0)
    with pytest.raises(ValueError, match="need pivot < p for monna: got pivot=9, p=9"):
        flagagg.aggregate(G, rule="monna", f=1, pivot=P)
    G[4] = np.nan
    with pytest.raises(ValueError, match="the pivot, input 4, holds NaN"):
        flagagg.aggregate(G, rule="monna", f=2, pivot=4)


def test_monna_trusted_pivot_is_not_the_default():
    # ByzFL trusts worker 0 by default; here a faulty worker 0 cannot pick the neighbours.
    G = stack(seed=4)
    G = np.vstack([G[-1:] * 0 + 50.0, G[:-1]])  # a far row first
    far = flagagg.aggregate(G, rule="monna", f=F, pivot=0, return_result=True)
    assert 0 in far.selected
    res = flagagg.aggregate(G, rule="monna", f=F, return_result=True)
    assert 0 not in res.selected and res.details["pivot"] == orc.medoid_index(G)


def test_smea_refuses_beyond_its_limit():
    G = np.random.default_rng(0).normal(size=(30, 3))
    n = math.comb(30, 6)
    with pytest.raises(ValueError, match=rf"C\(30, 6\) = {n} exceeds max_subsets=200000"):
        flagagg.aggregate(G, rule="smea", f=6)
    with pytest.raises(ValueError, match="exceeds max_subsets=10"):
        flagagg.aggregate(G[:7], rule="smea", f=2, max_subsets=10)
    res = flagagg.aggregate(G[:7], rule="smea", f=2, max_subsets=21, return_result=True)
    assert res.details["n_subsets"] == 21


@pytest.mark.parametrize("rule", ["cge", "smea"])
def test_more_than_f_nan_rows_is_an_error(rule):
    G = stack(seed=5)
    G[:3] = np.nan
    with pytest.raises(ValueError, match=rf"{rule}: more than f=2 inputs hold NaN"):
        flagagg.aggregate(G, rule=rule, f=2)


@pytest.mark.parametrize("rule", ["cge", "medoid", "monna", "caf", "smea"])
def test_all_nan_raises(rule):
    G = np.full((5, 3), np.nan)
    with pytest.raises(ValueError, match=rf"{rule}: all 5 inputs were excluded"):
        flagagg.aggregate(G, rule=rule, f=1)


# ----------------------------------------------------------------------------- diagnostics

@pytest.mark.parametrize("name", list(CASES))
def test_diagnostics_and_summary(name):
    G = stack(seed=6, kind="huge")
    res = run(name, G)
    assert res.influence.shape == (P,) and res.cosine.shape == (P,)
    assert len(res.verdict) == P
    if name == "arc+mean":
        # The mean of the clipped rows, on the original rows: 1/p, or C / ||g_i|| / p.
        # (k = floor(2f (p - f) / p) = 3 rows clipped: the two far ones and an honest one.)
        _, thr = orc.arc(G, F)
        assert res.details["pre"][0]["threshold"] == pytest.approx(thr, rel=1e-12)
        scale = np.minimum(1.0, thr / np.linalg.norm(G, axis=1))
        assert (scale < 1).sum() == orc.arc_k(P, F) == 3
        np.testing.assert_allclose(res.coefficients, scale / P, rtol=1e-12)
    elif name != "arc+median":  # a coordinate-wise rule has no coefficients
        np.testing.assert_allclose(res.coefficients.sum(), 1.0)
    text = res.summary()
    assert res.rule in text and "influence" in text
    # The far rows have no weight (ARC clips them but keeps them in the mean).
    if name not in ("arc+mean", "arc+median"):
        assert np.all(res.coefficients[-F:] == 0)


@pytest.mark.parametrize("mag", [1.0, 1e155, 1e300, 1e-300])
def test_monna_distance_order_is_the_ranks_row(mag):
    # MoNNA orders one row in O(p); it must be the row of the all-pairs exact ranks,
    # with ties (a duplicated row) to the lower index and NaN rows last.
    from flagagg._array import as_stack
    from flagagg._backend_choice import select_backend
    from flagagg.rules._peers_monna import distance_order

    G = np.random.default_rng(7).normal(size=(9, 5))
    G[7:] *= mag
    G[3] = G[2]
    G[5] = np.nan
    st = as_stack(G)
    K = st.gram(select_backend("numpy", st.sample, st.library))
    for c in (0, 2, 3, 7):
        r = K.distance_ranks()[c].copy()
        r[c] = -1.0
        np.testing.assert_array_equal(distance_order(K, c), np.argsort(r, kind="stable"))
