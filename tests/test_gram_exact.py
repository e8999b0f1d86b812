"""The Gram matrix under hostile numerics: large common offsets, 1e300, 1e-300, many rows.

Every case is checked against a textbook n-space computation (tests/rule_oracles.py) on
the very same stored inputs, or against the rule's own output on a well-scaled copy.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flagagg
from flagagg._array import as_stack
from flagagg._gram import Gram, as_gram, choose_reference, scale_exponents
from flagagg._linalg import PARTIAL_MAX_FRACTION, PARTIAL_MIN_SIZE, top_eigh
from flagagg.backends import get_backend_impl
from flagagg.rules._base import in_unit, unit_distances

import rule_oracles as orc
from conftest import has_module

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def offset_stack(offset, seed, p=7, n=20, shift0=1.5, dtype="float64"):
    """The issue's reproducer: p rows of spread 1 around ``offset``, row 0 moved by ``shift0``."""
    G = offset + np.random.default_rng(seed).normal(size=(p, n))
    G[0] += shift0
    return G.astype(dtype)


# --------------------------------------------------------------------------- kernels


def _reference_gram(X, ref=None, scale=None):
    Y = np.asarray(X, dtype=np.float64)
    s = np.ones(Y.shape[0]) if scale is None else np.asarray(scale)
    Y = Y * s[:, None]
    if ref is not None:
        Y = Y - s[:, None] * np.asarray(X, dtype=np.float64)[ref]
    return Y @ Y.T


@pytest.mark.parametrize("ref", [None, 2])
@pytest.mark.parametrize("scaled", [False, True])
def test_backend_gram_shift_and_scale(lib, dtype, ref, scaled):
    rng = np.random.default_rng(3)
    X = (1e3 + rng.normal(size=(6, 5000))).astype(dtype)
    scale = np.ldexp(1.0, rng.integers(-20, 20, size=6)) if scaled else None
    impl = get_backend_impl(lib.backend)
    K = impl.gram(lib.to(X), ref, scale)
    want = _reference_gram(X, ref, scale)
    assert K.dtype == np.float64 and K.shape == (6, 6)
    np.testing.assert_allclose(K, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    if ref is not None:
        np.testing.assert_array_equal(K[ref], 0.0)


@pytest.mark.skipif(not has_module("torch"), reason="torch missing")
@pytest.mark.parametrize("ref", [None, 1])
def test_torch_device_kernel_shift_and_scale(ref):
    # The GPU code path, run on CPU tensors.
    import torch

    from flagagg.backends._torch import BACKEND

    rng = np.random.default_rng(4)
    X = (1e4 + rng.normal(size=(5, 3000))).astype(np.float32)
    scale = np.ldexp(1.0, np.array([-3, 0, 2, 5, -1]))
    K = BACKEND._gram_device(torch.from_numpy(X), ref, scale)
    want = _reference_gram(X, ref, scale)
    np.testing.assert_allclose(K, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


@pytest.mark.skipif(not has_module("numba"), reason="numba missing")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_blas_path_matches_tiled_kernel(dtype):
    from flagagg.backends._numba import BLAS_MIN_ROWS, _gram_blocked

    rng = np.random.default_rng(5)
    X = rng.normal(size=(BLAS_MIN_ROWS + 3, 3000)).astype(dtype)
    impl = get_backend_impl("numba")
    K = impl.gram(X)  # BLAS path by shape
    tiled = _gram_blocked(X, None, None, blas=False)
    want = _reference_gram(X)
    np.testing.assert_allclose(K, want, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(tiled, want, rtol=1e-12, atol=1e-10)
    np.testing.assert_array_equal(K, K.T)
    # A column slice (strided rows) goes through the same path.
    np.testing.assert_allclose(impl.gram(X[:, 7:2900]), _reference_gram(X[:, 7:2900]),
                               rtol=1e-12, atol=1e-10)


@pytest.mark.skipif(not has_module("numba"), reason="numba missing")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shifted", [False, True])
def test_numba_blas_path_over_many_chunks(monkeypatch, dtype, shifted):
    # syrk accumulates chunk after chunk into one matrix, and the last chunk is narrower.
    from flagagg.backends import _numba

    monkeypatch.setattr(_numba, "_blocked_width", lambda p: 256)
    rng = np.random.default_rng(6)
    X = (1e3 + rng.normal(size=(_numba.BLAS_MIN_ROWS + 5, 3000))).astype(dtype)[:, 3:]
    ref, scale = (4, np.ldexp(1.0, -rng.integers(-3, 4, size=X.shape[0]))) if shifted else (
        None, None)
    K = _numba._gram_blocked(X, ref, scale, blas=True)
    want = _reference_gram(X, ref, scale)
    np.testing.assert_allclose(K, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    np.testing.assert_array_equal(K, K.T)


@pytest.mark.parametrize("k,frac", [(5, 3), (PARTIAL_MIN_SIZE + 4, 3),
                                    (PARTIAL_MIN_SIZE + 4, round(1 / PARTIAL_MAX_FRACTION))])
def test_top_eigh_matches_full_decomposition(monkeypatch, k, frac):
    # k // 3 eigenpairs take the full decomposition, k // 5 of a large B the partial one.
    import scipy.linalg

    calls = []
    partial = scipy.linalg.eigh
    monkeypatch.setattr(scipy.linalg, "eigh",
                        lambda *a, **kw: calls.append(kw) or partial(*a, **kw))
    rng = np.random.default_rng(k)
    A = rng.normal(size=(k, k))
    B = A @ A.T
    r = k // frac
    vals, vecs = top_eigh(B, r)
    assert len(calls) == (k >= PARTIAL_MIN_SIZE and r <= PARTIAL_MAX_FRACTION * k) == (frac == 5)
    full = np.linalg.eigvalsh(B)[::-1][:r]
    np.testing.assert_allclose(vals, full, rtol=1e-10)
    np.testing.assert_allclose(B @ vecs, vecs * vals, atol=1e-8 * full[0])
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(r), atol=1e-10)
    with pytest.raises(ValueError, match="eigenpairs"):
        top_eigh(B, 0)


# --------------------------------------------------------------------------- cancellation


def test_issue_reproducer_krum_offset_1e8(lib):
    G = offset_stack(1e8, 0)
    res = flagagg.aggregate(lib.to(G), rule="krum", f=1, return_result=True,
                            backend=lib.backend)
    assert res.selected == (orc.krum_select(G, 1),) == (5,)


@pytest.mark.parametrize("offset", [1e6, 1e7, 1e8, 3e8, 1e9])
def test_krum_offset_sweep_matches_exact_krum(offset):
    wrong = [seed for seed in range(25)
             if flagagg.aggregate(offset_stack(offset, seed), rule="krum", f=1,
                                  return_result=True).selected[0]
             != orc.krum_select(offset_stack(offset, seed), 1)]
    assert wrong == []


def slow_choose_reference(K, ok):
    """choose_reference written out pair by pair, as its docstring states it."""
    from flagagg._gram import SHIFT_BELOW

    idx = [int(i) for i in np.flatnonzero(ok)]
    if len(idx) < 2:
        return None

    def d2(i, j):
        return max(K[i, i] + K[j, j] - 2.0 * K[i, j], 0.0)

    nearest = [min(d2(i, j) / (K[i, i] + K[j, j]) for j in idx if j != i) for i in idx]
    if np.median(nearest) >= SHIFT_BELOW:
        return None
    spread = [np.median([d2(i, j) for j in idx if j != i]) for i in idx]
    return idx[int(np.argmin(spread))]


@pytest.mark.parametrize("offset", [0.0, 10.0, 1e2, 1e4, 1e8])
@pytest.mark.parametrize("seed", range(4))
def test_choose_reference_matches_slow_reference(offset, seed):
    rng = np.random.default_rng(seed)
    p = int(rng.integers(2, 12))
    G = offset + rng.normal(size=(p, 30)) * rng.uniform(0.1, 10.0, size=(p, 1))
    G[rng.integers(p)] *= -50.0  # a far-off input
    ok = rng.uniform(size=p) > 0.2
    K = G @ G.T
    assert choose_reference(K, ok) == slow_choose_reference(K, ok)
    assert choose_reference(K, np.ones(p, bool)) == slow_choose_reference(K, np.ones(p, bool))


def test_shift_only_when_ill_conditioned():
    G = np.random.default_rng(0).normal(size=(9, 200))
    K = G @ G.T
    assert choose_reference(K, np.ones(9, bool)) is None
    G2 = G + 1e7
    G2[3] = -1e30  # a far-off input is never the reference
    ref = choose_reference(G2 @ G2.T, np.ones(9, bool))
    assert ref is not None and ref != 3
    K = flagagg._array.as_stack(G2).gram(get_backend_impl("numpy"), shift=True)
    assert isinstance(K, Gram) and K.ref == ref
    np.testing.assert_allclose(K.sq_distances(), orc.sq_dist(G2),
                               rtol=1e-10)


SPREAD_RULES = {
    "krum": {"f": 2},
    "multi_krum": {"f": 2},
    "mda": {"f": 2},
    "bulyan": {"f": 1},
    "geometric_median": {"tol": 1e-12, "max_iter": 500},
}


def _translation_case(draw_seed, offset, dtype):
    rng = np.random.default_rng(draw_seed)
    p, n = 9, 30
    G = rng.normal(size=(p, n))
    G[-2:] += rng.uniform(-3, 3, size=(2, n))  # two outliers
    direction = rng.normal(size=n)
    t = offset * direction / np.abs(direction).max()
    return G.astype(dtype), (G + t).astype(dtype), t


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), log_offset=st.floats(0.0, 8.0),
       rule=st.sampled_from(sorted(SPREAD_RULES) + ["nnm+krum", "centered_clipping"]))
def test_gram_rules_are_translation_equivariant_float64(seed, log_offset, rule):
    """Selections equal exact n-space selections on the translated inputs; outputs move with t."""
    _, Gt, t = _translation_case(seed, 10.0 ** log_offset, "float64")
    if rule == "nnm+krum":
        res = flagagg.aggregate(Gt, rule="krum", f=2, pre=["nnm"], return_result=True)
        want = orc.krum(orc.nnm(Gt, 2), 2)
        np.testing.assert_allclose(res.aggregate, want, rtol=0, atol=1e-9 * (1 + abs(t).max()))
        return
    if rule == "centered_clipping":
        v0 = t + 0.1  # centered clipping is equivariant when its center moves with the inputs
        res = flagagg.aggregate(Gt, rule=rule, tau=1.0, n_iter=5, center=v0, return_result=True)
        want = orc.centered_clipping(Gt, 1.0, 5, v0)
        np.testing.assert_allclose(res.aggregate, want, rtol=0, atol=1e-7)
        return
    res = flagagg.aggregate(Gt, rule=rule, return_result=True, **SPREAD_RULES[rule])
    if rule == "krum":
        assert res.selected == (orc.krum_select(Gt, 2),)
    elif rule == "multi_krum":
        assert sorted(res.selected) == sorted(orc.multi_krum(Gt, 2)[1])
    elif rule == "mda":
        assert list(res.selected) == orc.mda(Gt, 2)[1]
    elif rule == "bulyan":
        assert list(res.selected) == orc.bulyan(Gt, 1)[1]
    else:
        want = orc.geometric_median(Gt, tol=1e-14)
        np.testing.assert_allclose(res.aggregate, want, rtol=0, atol=1e-5)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), log_offset=st.floats(0.0, 4.0))
def test_krum_family_translation_equivariant_float32(seed, log_offset):
    # float32 holds 7 digits: an offset of 1e4 x spread leaves 3 of them for the spread,
    # as 1e8 x spread does in float64 (the same cancellation in the Gram formula).
    _, Gt, _ = _translation_case(seed, 10.0 ** log_offset, "float32")
    res = flagagg.aggregate(Gt, rule="krum", f=2, return_result=True)
    assert res.selected == (orc.krum_select(Gt, 2),)
    res = flagagg.aggregate(Gt, rule="multi_krum", f=2, return_result=True)
    assert sorted(res.selected) == sorted(orc.multi_krum(Gt, 2)[1])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), log_offset=st.floats(0.0, 8.0), lam=st.sampled_from([0.0, 1.0]))
def test_flag_objective_non_increasing_at_offsets(seed, log_offset, lam):
    _, Gt, _ = _translation_case(seed, 10.0 ** log_offset, "float64")
    res = flagagg.flag_aggregate(Gt, 3, lam, max_iter=30, tol=0.0, return_result=True)
    h = res.objective_history
    assert np.all(np.diff(h) <= 0), np.diff(h).max()
    assert res.n_iter == h.size


# --------------------------------------------------------------------------- overflow


def test_issue_reproducer_overflow(lib):
    G = np.ones((5, 3))
    G[0] = 1e200
    out = flagagg.aggregate(lib.to(G), rule="mean", pre=[("clipping", {"tau": 2.0})],
                            backend=lib.backend)
    # Row 0 clipped to norm 2: 2 / sqrt(3) per coordinate; the others are kept.
    np.testing.assert_allclose(lib.back(out), (2 / np.sqrt(3) + 4) / 5, rtol=1e-12)
    out = flagagg.aggregate(lib.to(G), rule="mean", pre=["nnm"], f=1, backend=lib.backend)
    np.testing.assert_allclose(lib.back(out), orc.nnm(G, 1).mean(axis=0), rtol=1e-12)


def test_finite_huge_row_is_not_nonfinite():
    G = np.ones((5, 3))
    G[0] = 1e200
    G[4, 1] = np.nan
    K = as_stack(G).gram(get_backend_impl("numpy"))
    assert K.usable.tolist() == [True, True, True, True, False]
    assert [i for i, _ in K.excluded] == [4]
    np.testing.assert_allclose(K.row_norms()[:4], [np.sqrt(3) * 1e200] + [np.sqrt(3)] * 3)
    Kn = K.normalized(np.arange(4))
    np.testing.assert_allclose(Kn, 1.0)
    res = flagagg.aggregate(G, rule="krum", f=1, return_result=True)
    assert res.selected[0] in (1, 2, 3) and [i for i, _ in res.excluded] == [4]
    res = flagagg.flag_aggregate(G, return_result=True)
    assert [i for i, _ in res.excluded] == [4]
    # An overflowing Gram written out as a plain matrix still reads as non-finite there.
    assert not as_gram(np.asarray(K)).usable[0]


def _sharded_gram(G, shards=3):
    """The Gram a sharded producer builds: p row maxima exchanged, scaled pieces summed."""
    finite = np.isfinite(G).all(axis=1)
    e = scale_exponents(np.abs(np.where(np.isfinite(G), G, 0.0)).max(axis=1), finite)
    S = sum(np.ldexp(np.where(finite[:, None], piece, 0.0), -e[:, None])
            @ np.ldexp(np.where(finite[:, None], piece, 0.0), -e[:, None]).T
            for piece in np.array_split(G, shards, axis=1))
    return Gram.from_scaled(S, e, finite=finite)


@pytest.mark.parametrize("rule,params", [("geometric_median", {}), ("krum", {"f": 1}),
                                         ("centered_clipping", {"n_iter": 3}),
                                         ("flag", {"r": 2}), ("mda", {"f": 1})])
def test_overflow_decided_alike_on_every_path(rule, params):
    # A finite row whose squared norm overflows (1e160) and a row holding NaN: the
    # Gram built from the data and the one a sharded producer assembles from scaled
    # pieces make the same decision (Gram.usable) and give the same coefficients.
    G = np.random.default_rng(3).normal(size=(7, 12))
    G[5] = 1e160
    G[6, 3] = np.nan
    local = as_stack(G).gram(get_backend_impl("numpy"))
    sharded = _sharded_gram(G)
    for K in (local, sharded):
        assert K.usable.tolist() == [True] * 6 + [False]
        assert [i for i, _ in K.excluded] == [6] and "NaN" in K.excluded[0][1]
    r = flagagg.get_rule(rule, **params)
    c_local = r.solve_gram(local).coefficients
    c_sharded = r.solve_gram(sharded).coefficients
    np.testing.assert_allclose(c_sharded, c_local, rtol=1e-9, atol=1e-12 * np.abs(c_local).max())
    # Without the data, the diagonal cannot tell an overflow from an Inf: the same
    # function decides, says so, and the row is not used (never a NaN output).
    plain = np.asarray(local)
    usable, excluded = as_gram(plain).usable, as_gram(plain).excluded
    assert usable.tolist() == [True] * 5 + [False, False]
    assert "cannot tell" in dict(excluded)[5]
    try:
        coef = r.solve_gram(plain).coefficients
    except ValueError as exc:  # MDA with f=1 and two inputs not used: its own error
        assert rule == "mda" and "more than f=1" in str(exc)
    else:
        assert np.isfinite(coef).all() and coef[5] == coef[6] == 0.0
    # Rows known finite but given without a scaled form: not held, and the reason says so.
    bare = Gram.from_data(plain, finite=np.isfinite(G).all(axis=1))
    usable, excluded = bare.usable, bare.excluded
    assert usable.tolist() == [True] * 5 + [False, False]
    assert "scale_exponents" in dict(excluded)[5] and "NaN" in dict(excluded)[6]


def _mixed_rows(seed=0):
    """Rows from 1e-300 to 1e300 (squared norms under- and overflow), two of them equal."""
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(8, 6)) * np.array([1e-300, 1e-150, 1.0, 1.0, 3.0, 1e150, 1e200,
                                            1e300])[:, None]
    G[3] = G[2]
    return G


def test_distances_and_their_order_at_any_magnitude():
    G = _mixed_rows()
    K = as_stack(G).gram(get_backend_impl("numpy"))
    want = np.array([[orc.norm(a - b) for b in G] for a in G])
    E = -7
    np.testing.assert_allclose(np.ldexp(K.distances(E), E), want, rtol=1e-12)
    R = K.distance_ranks()
    # Same order as the n-space distances, ties (the equal rows) kept as ties.
    iu = np.triu_indices(8, 1)
    w, r = want[iu], R[iu]
    assert np.array_equal(np.sign(w[:, None] - w[None, :]), np.sign(r[:, None] - r[None, :]))


@pytest.mark.parametrize("r", [None, 2, 7])
def test_relative_unit_gram_and_unit_distances_at_any_magnitude(r):
    # Lengths and directions of g_i - g_r from the scaled Gram, and distances from a
    # combination of them, against n-space with nrm2-safe norms.
    G = _mixed_rows(1)
    K = as_stack(G).gram(get_backend_impl("numpy"))
    n, t, U = K.relative_unit(np.arange(8), r)
    Y = G - (0.0 if r is None else G[r])
    lengths = np.array([orc.norm(y) for y in Y])
    np.testing.assert_allclose(np.ldexp(n, t), lengths, rtol=1e-12)
    pos = lengths > 0
    unit = np.array([y / orc.norm(y) if orc.norm(y) > 0 else 0.0 * y for y in Y])
    np.testing.assert_allclose(U[np.ix_(pos, pos)], (unit @ unit.T)[np.ix_(pos, pos)],
                               atol=1e-12)
    # z = 0.3 u_a + 0.2 u_b in units of 2 (lengths in that unit may overflow: +inf).
    s = in_unit(n, t, 2.0)
    b = np.zeros(8)
    a, c = (3, 4) if r != 2 else (4, 5)
    b[a], b[c] = 0.3, 0.2
    z = 2.0 * (0.3 * unit[a] + 0.2 * unit[c])
    want = np.array([orc.norm(z - y) for y in Y]) / 2.0
    got = unit_distances(s, U, b)
    finite = np.isfinite(s)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-10)
    assert np.all(np.isinf(got[~finite]))


def test_transform_gram_and_combination_norm_huge():
    G = np.array([[1e200, 2e200], [1.0, 1.0], [3.0, -1.0]])
    K = as_stack(G).gram(get_backend_impl("numpy"))
    M = np.array([[1e-200, 0.0, 0.0], [0.25, 0.5, 0.25]])
    K2 = K.transform(M)
    np.testing.assert_allclose(K2.row_norms(), _scaled_norm(M @ G), rtol=1e-12)
    c = np.array([1e-201, 1.0, 0.0])
    np.testing.assert_allclose(K.combination_norm(c), _scaled_norm(c @ G), rtol=1e-12)


def _scaled_norm(Y):
    """Row norms computed as nrm2 does (np.linalg.norm overflows above 1e154)."""
    Y = np.atleast_2d(Y)
    m = np.abs(Y).max(axis=1, keepdims=True)
    n = m[:, 0] * np.linalg.norm(Y / m, axis=1)
    return n if n.size > 1 else n[0]


SCALE_CASES = [
    ("krum", {"f": 1}, True),
    ("multi_krum", {"f": 1}, True),
    ("mda", {"f": 1}, True),
    ("bulyan", {"f": 1}, True),
    ("flag", {"r": 2}, True),  # drop-in default: on the inputs' scale (median norm)
    ("flag", {"r": 2, "rescale": None}, False),  # published output: normalised, scale-free
    ("geometric_median", {"tol": 1e-12, "max_iter": 300}, True),
    ("centered_clipping", {"tau": 0.7, "n_iter": 3}, True),
    ("mean", {"pre": [("clipping", {"tau": 0.7})]}, True),
    ("krum", {"f": 1, "pre": ["nnm"]}, True),
]
_LENGTH_PARAMS = {"tau", "eps"}


def _scaled_params(params, c):
    out = {}
    for k, v in params.items():
        if k == "pre":
            out[k] = [(name, {kk: vv * c for kk, vv in kw.items()}) if isinstance(name, str) and
                      isinstance(kw, dict) else (name, kw)
                      for name, kw in ((s, {}) if isinstance(s, str) else s for s in v)]
        else:
            out[k] = v * c if k in _LENGTH_PARAMS else v
    return out


@pytest.mark.parametrize("c", [1e-300, 1e300], ids=["1e-300", "1e300"])
@pytest.mark.parametrize("rule,params,scales", SCALE_CASES,
                         ids=[f"{n}{'+pre' if 'pre' in p else ''}" for n, p, _ in SCALE_CASES])
def test_rules_at_extreme_scales(lib, c, rule, params, scales):
    """Every rule on c * G equals c * (the rule on G), with lengths (tau, eps) scaled alike."""
    G = np.random.default_rng(7).normal(size=(7, 16))
    G[-1] *= 6.0
    base = {**params}
    if rule == "geometric_median":
        base["eps"] = 1e-6
    res1 = flagagg.aggregate(G, rule=rule, return_result=True, backend="numpy", **base)
    resc = flagagg.aggregate(lib.to(G * c), rule=rule, return_result=True, backend=lib.backend,
                             **_scaled_params(base, c))
    assert not getattr(resc, "excluded", ())
    want = res1.aggregate * (c if scales else 1.0)
    np.testing.assert_allclose(lib.back(resc.aggregate), want, rtol=1e-9,
                               atol=1e-12 * np.abs(want).max())
    if getattr(res1, "selected", ()):
        assert resc.selected == res1.selected


def test_mixed_magnitudes_krum_and_flag():
    # Honest rows of size 1 with one row at 1e300 and one at 1e-300: the huge one is
    # never picked, the tiny one is a finite input like any other.
    G = np.random.default_rng(8).normal(size=(8, 10))
    G[0] *= 1e300
    G[1] *= 1e-300
    res = flagagg.aggregate(G, rule="krum", f=1, return_result=True)
    assert res.excluded == () and res.selected == (orc.krum_select(G, 1),)
    res = flagagg.flag_aggregate(G, return_result=True)
    assert res.excluded == () and np.all(np.isfinite(res.aggregate))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_per_layer_inputs_take_the_shifted_and_scaled_passes(backend):
    # Per-layer inputs (lists of rows) go through the per-row kernels in the common case
    # and through stacked chunks in the shifted or scaled pass: same answers as stacked.
    if backend == "numba":
        pytest.importorskip("numba")
    G = 1e8 + np.random.default_rng(0).normal(size=(7, 20))
    G[0] += 1.5
    rows = [[g[:8], g[8:]] for g in G]
    res = flagagg.aggregate(rows, rule="krum", f=1, return_result=True, backend=backend)
    assert res.selected == (orc.krum_select(G, 1),) == (5,)
    H = np.ones((5, 3))
    H[0] = 1e200
    out = flagagg.aggregate([[h[:1], h[1:]] for h in H], rule="mean", backend=backend,
                            pre=[("clipping", {"tau": 2.0})])
    want = flagagg.aggregate(H, rule="mean", backend=backend, pre=[("clipping", {"tau": 2.0})])
    np.testing.assert_allclose(np.concatenate(out), want, rtol=1e-12)
    assert np.all(np.isfinite(want)) and abs(want[0] - 1.0309401) < 1e-6
