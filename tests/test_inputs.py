"""Input coercion, dtype policy and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

import flagagg

from support.backends import has_module


def honest(p=6, n=40, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=n) + 0.3 * rng.normal(size=(p, n))).astype(dtype)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_rows_are_excluded_and_reported(bad):
    G = honest()
    G[2, 5] = bad
    G[4] = 0.0
    res = flagagg.flag_aggregate(G, 2, 1.0, return_result=True, backend="numpy")
    assert np.isfinite(res.aggregate).all()
    assert res.excluded_indices == (2, 4)
    reasons = dict(res.excluded)
    assert "non-finite" in reasons[2] and "zero norm" in reasons[4]
    assert res.coefficients[2] == 0 and res.coefficients[4] == 0
    keep = [0, 1, 3, 5]
    np.testing.assert_allclose(
        res.aggregate, flagagg.flag_aggregate(G[keep], 2, 1.0, backend="numpy"), rtol=1e-10
    )


def test_nonfinite_rows_with_numba_and_pytree():
    G = honest(dtype=np.float32)
    G[1, :3] = np.nan
    trees = [{"a": g[:10], "b": g[10:].reshape(5, 6)} for g in G]
    for backend in flagagg.available_backends():
        if backend in ("torch", "cupy"):
            continue
        out = flagagg.flag_aggregate(trees, 2, backend=backend)
        assert np.isfinite(out["a"]).all() and np.isfinite(out["b"]).all()


def test_all_rows_excluded():
    G = np.full((3, 5), np.nan)
    with pytest.raises(ValueError, match="all 3 inputs were excluded"):
        flagagg.flag_aggregate(G, backend="numpy")


@pytest.mark.parametrize(
    "gradients, match",
    [
        (np.zeros((0, 5)), "at least one input"),
        ([], "at least one input"),
        (np.zeros((3, 0)), "no coordinates"),
        (np.zeros(5), r"shape \(p, n\)"),
        ([np.zeros(3), np.zeros(4)], "ragged"),
        ([{"a": np.ones(2)}, {"b": np.ones(2)}], "different structure"),
        ([{"a": np.ones(2)}, {"a": np.ones(3)}], "ragged"),
    ],
)
def test_bad_shapes(gradients, match):
    with pytest.raises(ValueError, match=match):
        flagagg.flag_aggregate(gradients, backend="numpy")


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"r": 0}, ValueError, "need r >= 1 for flag"),
        ({"r": 2.5}, TypeError, "r must be an integer"),
        ({"lam": -1.0}, ValueError, "need lam >= 0 for flag"),
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"tol": -1.0}, ValueError, "tol"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"variant": "fast"}, ValueError, "variant"),
        ({"rescale": "mean"}, ValueError, "rescale"),
    ],
)
def test_bad_parameters(kwargs, err, match):
    with pytest.raises(err, match=match):
        flagagg.flag_aggregate(honest(), backend="numpy", **kwargs)


def test_non_float_dtypes():
    with pytest.raises(TypeError, match="complex"):
        flagagg.flag_aggregate(honest() + 1j, backend="numpy")
    with pytest.raises(TypeError, match="pytree leaves must be arrays|unsupported leaf"):
        flagagg.flag_aggregate([{"a": "x"}, {"a": "y"}], backend="numpy")
    out = flagagg.flag_aggregate(np.arange(12).reshape(3, 4), backend="numpy")
    assert out.dtype == np.float64  # integers are averaged in float64, like np.mean
    with pytest.raises(TypeError, match="same dtype"):
        flagagg.flag_aggregate([np.ones(3, np.float32), np.ones(3)], backend="numpy")


def test_rank_is_clamped_and_reported():
    rng = np.random.default_rng(0)
    G = rng.normal(size=(2, 30))
    G = np.vstack([G, G[:1] * 3, G[1:] - 0.0])  # rank 2, p = 4
    res = flagagg.flag_aggregate(G, 4, return_result=True, backend="numpy")
    assert res.rank == 2 and res.r_requested == 4 and res.rank_clamped
    assert "clamped" in res.summary()


def test_single_input():
    g = np.array([[3.0, 4.0]])
    res = flagagg.flag_aggregate(g, rescale=None, return_result=True, backend="numpy")
    np.testing.assert_allclose(res.aggregate, [0.6, 0.8])
    out = flagagg.flag_aggregate(g, rescale="median_norm", backend="numpy")
    np.testing.assert_allclose(out, [3.0, 4.0])


def test_identical_inputs():
    G = np.tile(np.array([1.0, 2.0, 2.0]), (5, 1))
    res = flagagg.flag_aggregate(G, 3, 2.0, rescale=None, return_result=True, backend="numpy")
    assert res.rank == 1
    np.testing.assert_allclose(res.aggregate, 5 * np.array([1.0, 2.0, 2.0]) / 3)


def test_float16_is_accumulated_wider_and_returned_as_float16():
    G = honest(dtype=np.float16)
    for backend in ("numpy", "numba") if has_module("numba") else ("numpy",):
        res = flagagg.flag_aggregate(G, 2, return_result=True, backend=backend)
        assert res.aggregate.dtype == np.float16
        ref = flagagg.flag_aggregate(G.astype(np.float64), 2, backend="numpy")
        np.testing.assert_allclose(res.aggregate.astype(np.float64), ref, rtol=2e-3, atol=2e-3)


def test_float16_values_that_overflow_when_squared():
    # 300^2 * 40 overflows float16 but not the float64 Gram.
    G = np.full((3, 40), 300.0, dtype=np.float16)
    G[1] *= -1
    out = flagagg.flag_aggregate(G, 1, rescale="median_norm", backend="numpy")
    assert np.isfinite(out.astype(np.float64)).all()


def test_nested_lists_of_numbers():
    out = flagagg.aggregate([[1.0, 2.0], [3.0, 4.0]], rule="mean", backend="numpy")
    np.testing.assert_allclose(out, [2.0, 3.0])


def test_non_contiguous_views():
    G = honest(p=5, n=80)
    for backend in ("numpy", "numba") if has_module("numba") else ("numpy",):
        a = flagagg.flag_aggregate(G[:, ::2], 2, backend=backend)
        b = flagagg.flag_aggregate(np.ascontiguousarray(G[:, ::2]), 2, backend="numpy")
        np.testing.assert_allclose(a, b, rtol=1e-10)
        c = flagagg.flag_aggregate(np.asfortranarray(G), 2, backend=backend)
        np.testing.assert_allclose(c, flagagg.flag_aggregate(G, 2, backend="numpy"), rtol=1e-10)


@pytest.mark.skipif(not has_module("torch"), reason="torch missing")
def test_mixed_libraries_raise():
    import torch

    with pytest.raises(TypeError, match="mix array libraries"):
        flagagg.flag_aggregate([np.ones(3), torch.ones(3, dtype=torch.float64)])


def test_unknown_rule_and_bad_rule_params():
    with pytest.raises(ValueError, match="unknown rule 'krumm'"):
        flagagg.get_rule("krumm")
    with pytest.raises(TypeError, match="rule 'flag' takes no parameter 'gamma'"):
        flagagg.get_rule("flag", gamma=3)
    assert {"flag", "mean"} <= set(flagagg.available_rules())


def test_aggregate_entry_point_matches_flag_aggregate():
    G = honest()
    a = flagagg.aggregate(G, rule="flag", r=2, lam=0.5, backend="numpy")
    b = flagagg.flag_aggregate(G, 2, 0.5, backend="numpy")
    np.testing.assert_array_equal(a, b)
    res = flagagg.aggregate(G, rule="mean", return_result=True, backend="numpy")
    np.testing.assert_allclose(res.aggregate, G.mean(axis=0))
    assert res.rule == "mean"
