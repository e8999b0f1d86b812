"""The peers' rules added by r2 against their n-space oracles, on hostile inputs too.

ClippedClustering (Li et al.), FLTrust (Cao et al.), Aksel (the krum
package), DnC (Shejwalkar and Houmansadr) and SignGuard (Xu et al.): every
rule on every backend and float dtype against ``oracles_peers_r2``, under
+1e8 offsets, rows at 1e30 / 1e300, NaN rows and ties, and the breakdown
property (``f`` faulty rows at 1e30 do not move the output beyond the
honest spread).
"""

from __future__ import annotations

import numpy as np
import oracles_peers_r2 as orc
import pytest

import flagagg

from support.backends import has_module, make_lib

P, F = 11, 2


def stack(p=P, n=60, f=F, seed=0, dtype="float64", kind="spread", offset=0.0):
    """p - f honest rows around a common point, then f faulty rows."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=n) + 1.0
    honest = base + 0.5 * rng.normal(size=(p - f, n))
    if kind == "spread":
        bad = base + rng.uniform(-4, 4, size=(f, n))
    elif kind == "flip":
        bad = -3.0 * honest[:f]
    elif kind == "nan":
        bad = np.full((f, n), np.nan)
    elif kind.startswith("x"):  # "x1e30": honest rows scaled up
        bad = float(kind[1:]) * honest[:f]
    else:
        raise ValueError(kind)
    return (np.vstack([honest, bad]) + offset).astype(dtype)


def reference_of(G):
    """A server reference gradient for FLTrust: the honest rows' mean, slightly perturbed."""
    H = np.asarray(G[: P - F], dtype=np.float64)
    rng = np.random.default_rng(99)
    return H.mean(axis=0) + 0.1 * rng.normal(size=H.shape[1])


# name -> (get_rule kwargs for f, oracle(G, f) -> (out, selected or None),
#          call kwargs(G, lib) or None)
CASES = {
    "clipped_clustering": (lambda f: {"f": f}, lambda G, f: orc.clipped_clustering(G), None),
    "fltrust": (lambda f: {"f": f}, lambda G, f: _fltrust_oracle(G),
                lambda G, lib: {"reference": lib.to(reference_of(G).astype(G.dtype))}),
    "aksel": (lambda f: {"f": f}, lambda G, f: orc.aksel(G, f), None),
    "dnc": (lambda f: {"f": f, **DNC}, lambda G, f: _dnc_oracle(G, f), None),
    "signguard": (lambda f: {"f": f}, lambda G, f: orc.signguard(G), None),
}
DNC = {"seed": 0, "sample": 25, "n_iter": 3}


def _dnc_oracle(G, f, **params):
    d = {**DNC, **params}
    cols = orc.dnc_coordinates(G.shape[1], d["sample"], d["n_iter"], d["seed"])
    return orc.dnc(G, f, cols, d.get("c", 1.0))


def _fltrust_oracle(G):
    out, trust = orc.fltrust(G, reference_of(G).astype(G.dtype))
    return out, [int(i) for i in np.flatnonzero(trust)]
NAMES = list(CASES)

BACKENDS = ["numpy"] + [pytest.param(c, marks=pytest.mark.skipif(not has_module(m),
                                                                   reason=f"{m} missing"))
                        for c, m in (("numba", "numba"), ("torch-cpu", "torch"))]


def oracle(name, G, f=F):
    return CASES[name][1](G, f)


def run(name, G, lib=None, f=F, **extra):
    lib = lib or make_lib("numpy")
    params, _, call = CASES[name]
    kwargs = call(G, lib) if call else {}
    res = flagagg.get_rule(name, **{**params(f), **extra})(
        lib.to(G), backend=lib.backend, return_result=True, **kwargs)
    return res, lib.back(res.aggregate).astype(np.float64)


def tol(dtype):
    return {"rtol": 1e-9, "atol": 1e-9} if dtype == "float64" else {"rtol": 2e-5, "atol": 2e-5}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["spread", "flip"])
def test_rule_matches_oracle(lib, dtype, name, kind):
    G = stack(seed=3, dtype=dtype, kind=kind)
    res, out = run(name, G, lib)
    lib.check(res.aggregate, dtype)
    expected, chosen = oracle(name, G)
    if chosen is not None:
        assert list(res.selected) == list(chosen)
    np.testing.assert_allclose(out, expected, **tol(dtype))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", range(12))
def test_random_shapes_match_oracle(name, seed):
    rng = np.random.default_rng(seed)
    p = int(rng.integers(5, 16))
    f = int(rng.integers(0, (p - 1) // 2 + 1))
    G = stack(p=p, f=f, n=int(rng.integers(1, 40)), seed=seed,
              kind=["spread", "flip", "x1e3"][seed % 3])
    res, out = run(name, G, f=f)
    expected, chosen = oracle(name, G, f)
    if chosen is not None:
        assert list(res.selected) == list(chosen)
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_nan_rows_are_excluded(lib, name):
    G = stack(seed=5, kind="nan")
    res, out = run(name, G, lib)
    assert {i for i, _ in res.excluded} == {P - 2, P - 1}
    expected, chosen = oracle(name, G)
    if chosen is not None:
        assert list(res.selected) == list(chosen)
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_ties_are_deterministic(lib, name):
    # Duplicated rows: equal distances and cosines everywhere.
    rng = np.random.default_rng(7)
    rows = rng.normal(size=(4, 9)) + 1.0
    G = np.vstack([rows, rows, rows[:3]])
    res, out = run(name, G, lib)
    res2, out2 = run(name, G, lib)
    assert res.selected == res2.selected
    np.testing.assert_array_equal(out, out2)
    expected, chosen = oracle(name, G)
    if chosen is not None:
        assert list(res.selected) == list(chosen)
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-9)


def _honest(G, f=F):
    H = np.asarray(G[: G.shape[0] - f], dtype=np.float64)
    center = H.mean(axis=0)
    return H, center, np.linalg.norm(H - center, axis=1).max()


# How far from the honest mean a rule may land, in units of (honest radius, honest max norm).
BOUND = {"clipped_clustering": (1.0, 1.0), "fltrust": (1.0, 1.0), "aksel": (1.0, 0.0),
         "dnc": (1.0, 0.0), "signguard": (1.0, 1.0)}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mag", ["x1e3", "x1e30", "x1e300", "flip"])
@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_breakdown(name, mag, case, dtype):
    if dtype == "float32" and mag == "x1e300":
        pytest.skip("1e300 is not a float32")
    lib = make_lib(case)
    G = stack(seed=13, dtype=dtype, kind=mag)
    H, center, radius = _honest(G)
    res, out = run(name, G, lib)
    assert np.isfinite(out).all()
    a, b = BOUND[name]
    hn = np.linalg.norm(H, axis=1).max()
    assert np.linalg.norm(out - center) <= (a * radius + b * hn) * (1 + 1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_offsets(name):
    """+1e8 on every coordinate: finite, and as bounded as without the offset."""
    G = stack(seed=21, kind="x1e30", offset=1e8)
    H, center, radius = _honest(G)
    res, out = run(name, G)
    assert np.isfinite(out).all()
    a, b = BOUND[name]
    assert np.linalg.norm(out - center) <= (a * radius + b * np.linalg.norm(H, axis=1).max())


@pytest.mark.parametrize("name", NAMES)
def test_pytree_input_matches_array(name):
    G = stack(seed=8)
    tree = [{"w": G[i, :40].reshape(8, 5), "b": G[i, 40:]} for i in range(P)]
    params, _, call = CASES[name]
    kwargs = call(G, make_lib("numpy")) if call else {}
    if "reference" in kwargs:
        r = kwargs["reference"]
        kwargs["reference"] = {"w": r[:40].reshape(8, 5), "b": r[40:]}
    # DnC samples coordinates in the pytree's flattening order: compare on all of them.
    extra = {"sample": G.shape[1]} if name == "dnc" else {}
    out = flagagg.get_rule(name, **{**params(F), **extra})(tree, backend="numpy", **kwargs)
    flat = np.concatenate([out["w"].ravel(), out["b"]])
    np.testing.assert_allclose(flat, run(name, G, **extra)[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_summary_and_diagnostics(name):
    res, _ = run(name, stack(seed=2, kind="flip"))
    text = res.summary()
    assert name in text
    assert res.influence is not None and res.influence.shape == (P,)


@pytest.mark.parametrize("name", NAMES)
def test_too_few_inputs_and_bad_f(name):
    if "f" not in CASES[name][0](1):
        pytest.skip("the rule takes no f")
    G = stack(p=4, f=0, seed=1)
    f, text = (4, "p >= 1?f \\+ 1") if name == "fltrust" else (2, "p >= 2f \\+ 1")
    with pytest.raises(ValueError, match=f"need {text} for {name}: got p=4, f={f}"):
        run(name, G, f=f)
    with pytest.raises(TypeError):
        flagagg.get_rule(name, f=1.5)
    with pytest.raises(ValueError):
        flagagg.get_rule(name, f=-1)


# ----------------------------------------------------------------------------- ClippedClustering

@pytest.mark.skipif(not has_module("scipy"), reason="scipy missing")
@pytest.mark.parametrize("seed", range(20))
def test_average_linkage_matches_scipy(seed):
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    from flagagg.rules._peers_clippedclustering import average_linkage_two

    rng = np.random.default_rng(seed)
    q = int(rng.integers(3, 25))
    X = rng.normal(size=(q, 4))
    D = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
    ours = average_linkage_two(D)
    theirs = fcluster(linkage(squareform(D, checks=False), "average"), 2, "maxclust")
    # Same partition (labels differ by name only).
    assert len(set(zip(ours, theirs, strict=True))) == 2


def test_clipped_clustering_clips_to_the_median_norm():
    G = np.array([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0], [100.0, 1.0]])
    res = flagagg.aggregate(G, rule="clipped_clustering", backend="numpy", return_result=True)
    tau = np.median(np.linalg.norm(G, axis=1))
    assert res.details["tau"] == pytest.approx(tau)
    used = res.coefficients * len(res.selected)
    norms = np.linalg.norm(G, axis=1) * used
    assert (norms[list(res.selected)] <= tau * (1 + 1e-12)).all()


def test_clipped_clustering_splits_off_opposite_directions():
    rng = np.random.default_rng(4)
    good = rng.normal(size=(7, 20)) * 0.1 + 1.0
    G = np.vstack([good, -good[:3]])
    res = flagagg.aggregate(G, rule="clipped_clustering", f=3, backend="numpy",
                            return_result=True)
    assert res.selected == tuple(range(7))


# ----------------------------------------------------------------------------- FLTrust

def test_fltrust_reference_is_validated(lib):
    G = stack(seed=1)
    rule = flagagg.get_rule("fltrust")
    g0 = reference_of(G)
    with pytest.raises(TypeError, match="needs the server's reference gradient"):
        rule(lib.to(G), backend=lib.backend)
    with pytest.raises(ValueError, match="shaped like one input"):
        rule(lib.to(G), reference=lib.to(g0[:-1]), backend=lib.backend)
    with pytest.raises(TypeError, match="dtype float32 but the inputs have float64"):
        rule(lib.to(G), reference=lib.to(g0.astype(np.float32)), backend=lib.backend)
    if lib.library != "numpy":
        with pytest.raises(TypeError, match="is a numpy array"):
            rule(lib.to(G), reference=g0, backend=lib.backend)
    bad = g0.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="reference gradient holds NaN"):
        rule(lib.to(G), reference=lib.to(bad), backend=lib.backend)
    with pytest.raises(ValueError, match="reference gradient is zero"):
        rule(lib.to(G), reference=lib.to(0 * g0), backend=lib.backend)


def test_fltrust_reference_on_the_constructor_and_per_call():
    G = stack(seed=1)
    g0, g1 = reference_of(G), -reference_of(G) + 0.3
    by_ctor = flagagg.get_rule("fltrust", reference=g0)
    np.testing.assert_allclose(by_ctor(G, backend="numpy"), orc.fltrust(G, g0)[0], rtol=1e-12)
    # A per-call reference wins over the constructor's.
    np.testing.assert_allclose(by_ctor(G, reference=g1, backend="numpy"),
                               orc.fltrust(G, g1)[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(flagagg.aggregate(G, rule="fltrust", reference=g0,
                                                 backend="numpy"),
                               orc.fltrust(G, g0)[0], rtol=1e-12)
    assert "reference=<array>" in repr(by_ctor)


def test_fltrust_rescales_a_huge_aligned_input_to_the_reference_norm():
    G = stack(seed=2)
    g0 = reference_of(G)
    G[-1] = 1e300 * g0 / np.linalg.norm(g0)  # perfectly aligned, enormous
    res = flagagg.get_rule("fltrust")(G, reference=g0, backend="numpy", return_result=True)
    assert res.scores[-1] == pytest.approx(1.0)
    # Its contribution is g0 itself, weighted by its trust.
    assert np.linalg.norm(res.aggregate) <= np.linalg.norm(g0) * (1 + 1e-9)
    np.testing.assert_allclose(res.aggregate, orc.fltrust(G, g0)[0], rtol=1e-9)


def test_fltrust_no_trusted_input_gives_zero():
    G = stack(seed=3)
    res = flagagg.get_rule("fltrust")(G, reference=-G.mean(axis=0), backend="numpy",
                                      return_result=True)
    assert (G @ G.mean(axis=0) > 0).all()  # every input points away from the reference
    assert (res.scores == 0).all() and (res.aggregate == 0).all()
    assert res.selected == ()


def test_fltrust_torch_reference_in_torch_dtype():
    torch = pytest.importorskip("torch")
    G = stack(seed=4, dtype="float32")
    g0 = reference_of(G).astype(np.float32)
    out = flagagg.get_rule("fltrust")(torch.from_numpy(G), reference=torch.from_numpy(g0))
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), orc.fltrust(G, g0)[0], rtol=2e-5, atol=2e-6)


# ----------------------------------------------------------------------------- Aksel

@pytest.mark.parametrize("case", BACKENDS)
def test_aksel_selection_is_exact_under_offsets(case):
    lib = make_lib(case)
    G0 = stack(seed=21, kind="spread")
    res0, out0 = run("aksel", G0, lib)
    res, out = run("aksel", G0 + 1e8, lib)
    assert res.selected == res0.selected == tuple(orc.aksel(G0 + 1e8, F)[1])
    np.testing.assert_allclose(out - 1e8, out0, atol=1e-6)


def test_aksel_median_of_mostly_nan_coordinate_is_an_error():
    G = stack(seed=1)
    G[: P // 2 + 1, 3] = np.nan
    with pytest.raises(ValueError, match="aksel: some coordinates of the aggregate are not"):
        run("aksel", G)


# ----------------------------------------------------------------------------- DnC

def test_dnc_seed_semantics():
    G = stack(seed=6, n=400)
    a = flagagg.get_rule("dnc", f=F, sample=30, seed=5)
    r1, r2 = a(G, return_result=True), a(G, return_result=True)
    # An int seed: the same samples on every call.
    assert r1.details["kept_per_sample"] == r2.details["kept_per_sample"]
    cols = orc.dnc_coordinates(G.shape[1], 30, 5, 5)
    assert list(r1.selected) == orc.dnc(G, F, cols)[1]
    # A Generator: drawn from, reproducible from its own seed.
    g1 = flagagg.get_rule("dnc", f=F, sample=30, seed=np.random.default_rng(1))
    g2 = flagagg.get_rule("dnc", f=F, sample=30, seed=np.random.default_rng(1))
    for _ in range(2):
        np.testing.assert_array_equal(g1(G, backend="numpy"), g2(G, backend="numpy"))
    with pytest.raises(TypeError, match="seed must be an int"):
        flagagg.get_rule("dnc", f=1, seed=1.5)


def test_dnc_matches_oracle_with_several_samples_and_c():
    G = stack(seed=9, n=300, kind="spread")
    for c, n_iter in ((1.0, 1), (1.5, 4), (0.5, 2)):
        res, out = run("dnc", G, c=c, n_iter=n_iter, sample=40, seed=3)
        exp, kept = _dnc_oracle(G, F, c=c, n_iter=n_iter, sample=40, seed=3)
        assert list(res.selected) == kept
        np.testing.assert_allclose(out, exp, rtol=1e-12)


def test_dnc_finds_an_outlier_along_its_direction():
    # Honest spread is isotropic; the attackers shift along one direction: the top
    # singular direction of the centred inputs, where DnC looks.
    rng = np.random.default_rng(2)
    H = rng.normal(size=(9, 200))
    d = rng.normal(size=200)
    G = np.vstack([H, H[:2] * 0 + 1.5 * d])
    res = flagagg.aggregate(G, rule="dnc", f=2, sample=200, seed=0, return_result=True)
    assert res.selected == tuple(range(9))


def test_dnc_empty_intersection_and_c_too_large_are_errors():
    G = stack(p=5, f=2, seed=1)
    with pytest.raises(ValueError, match="removes every one"):
        run("dnc", G, f=2, c=3.0)
    with pytest.raises(ValueError, match="kept no input in common"):
        flagagg.get_rule("dnc", f=2, n_iter=30, sample=3, seed=0)(G)


# ----------------------------------------------------------------------------- SignGuard

def test_signguard_norm_filter_and_sign_features(lib):
    G = stack(seed=12)
    G[0] *= 1e-3  # below lower * median
    G[1] *= 5.0  # above upper * median
    G[2, :30] = 0.0  # more zeros: its sign statistics move, its norm stays in range
    res, out = run("signguard", G, lib)
    assert 0 not in res.details["norm_pass"] and 1 not in res.details["norm_pass"]
    expected = np.array([orc.sign_features(g) for g in G])
    np.testing.assert_array_equal(res.details["sign_features"], expected)
    exp, kept = orc.signguard(G)
    assert list(res.selected) == kept
    np.testing.assert_allclose(out, exp, rtol=1e-9, atol=1e-9)


def test_signguard_parameters_and_nothing_kept():
    with pytest.raises(ValueError, match="upper"):
        flagagg.get_rule("signguard", lower=2.0, upper=1.0)
    with pytest.raises(TypeError):
        flagagg.get_rule("signguard", lower="a")
    G = stack(seed=1)
    with pytest.raises(ValueError, match="no input passes both"):
        flagagg.get_rule("signguard", lower=5.0, upper=6.0)(G)


@pytest.mark.parametrize("seed", range(10))
def test_two_means_matches_oracle(seed):
    from flagagg.rules._peers_signguard import two_means

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(int(rng.integers(2, 30)), 3))
    labels = two_means(X)
    ref = orc.two_means(X)
    assert len(set(zip(labels, ref, strict=True))) == len(set(labels))
