"""Every backend against the oracle, and the output-follows-input contract."""

from __future__ import annotations

import numpy as np
import pytest

import flagagg
from flagagg.backends import _implementation

from oracle import flag_dense
from support.data import attacked_stack


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_flag_on_every_backend_matches_oracle(lib, dtype, lam):
    G = attacked_stack(9, 3000, 2, seed=21, dtype=dtype, kind="little")
    # rescale=None: the published output, which the dense oracle computes
    res = flagagg.flag_aggregate(lib.to(G), 4, lam, max_iter=5, tol=0.0, return_result=True,
                                 rescale=None, backend=lib.backend)
    lib.check(res.aggregate, dtype)
    assert res.backend == lib.backend
    out, _, _, _ = flag_dense(G, 4, lam, max_iter=5, tol=0.0)
    err = np.linalg.norm(lib.back(res.aggregate) - out) / np.linalg.norm(out)
    assert err < (1e-10 if dtype == "float64" else 1e-5), err


def test_mean_on_every_backend(lib, dtype):
    G = attacked_stack(5, 1000, 1, seed=2, dtype=dtype)
    out = flagagg.aggregate(lib.to(G), rule="mean", backend=lib.backend)
    lib.check(out, dtype)
    np.testing.assert_allclose(lib.back(out), G.astype(np.float64).mean(0),
                               rtol=1e-5 if dtype == "float32" else 1e-12, atol=1e-6)


def test_pytree_on_every_backend(lib):
    G = attacked_stack(4, 30, 1, seed=3, dtype="float32")
    trees = [(lib.to(g[:10].reshape(2, 5)), [lib.to(g[10:])]) for g in G]
    out = flagagg.flag_aggregate(trees, 2, backend=lib.backend)
    assert isinstance(out, tuple) and isinstance(out[1], list)
    lib.check(out[0], "float32")
    flat = flagagg.flag_aggregate(G, 2, backend="numpy")
    got = np.concatenate([lib.back(out[0]).ravel(), lib.back(out[1][0])])
    np.testing.assert_allclose(got, flat, rtol=1e-5, atol=1e-6)


def test_gram_and_combine_kernels_agree(lib, dtype):
    rng = np.random.default_rng(5)
    # Several segments and a ragged tail for the blocked kernels.
    X = rng.normal(size=(13, 70_001)).astype(dtype)
    impl = _implementation(lib.backend)
    K = impl.gram(lib.to(X))
    K64 = X.astype(np.float64) @ X.astype(np.float64).T
    assert isinstance(K, np.ndarray) and K.dtype == np.float64
    np.testing.assert_allclose(K, K64, rtol=1e-12, atol=1e-9)
    coef = rng.normal(size=13)
    coef[[2, 7]] = 0.0
    Xn = X.copy()
    Xn[2] = np.nan  # a zero coefficient means the row is not read
    out = impl.combine(coef, lib.to(Xn))
    lib.check(out, dtype)
    ref = coef @ X.astype(np.float64)
    np.testing.assert_allclose(lib.back(out), ref, rtol=1e-4 if dtype == "float32" else 1e-12,
                               atol=1e-4 if dtype == "float32" else 1e-10)


def test_gram_is_deterministic_and_float64_accurate():
    pytest.importorskip("numba")
    impl = _implementation("numba")
    X = np.random.default_rng(0).normal(size=(15, 300_000)).astype(np.float32)
    K1, K2 = impl.gram(X), impl.gram(X)
    np.testing.assert_array_equal(K1, K2)
    K64 = X.astype(np.float64) @ X.astype(np.float64).T
    err_numba = np.abs(K1 - K64).max() / np.abs(K64).max()
    err_blas32 = np.abs((X @ X.T) - K64).max() / np.abs(K64).max()
    assert err_numba < 1e-13
    assert err_numba < err_blas32


def test_named_backend_refuses_foreign_arrays():
    torch = pytest.importorskip("torch")
    G = torch.ones(3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend 'numpy' cannot compute on torch arrays"):
        flagagg.flag_aggregate(G, backend="numpy")


def test_the_torch_backend_keeps_no_tensor_it_was_given():
    """A training loop hands the torch backend a fresh gradient tensor every step;
    none of them may stay alive after its call (a cache on the host view did keep
    every one, and the memory grew with the steps)."""
    torch = pytest.importorskip("torch")
    import gc
    import weakref

    refs = []
    for step in range(3):
        G = torch.randn(5, 64, generator=torch.Generator().manual_seed(step))
        out = flagagg.flag_aggregate(G, backend="torch")
        assert out.shape == (64,)
        refs.append(weakref.ref(G))
        del G, out
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
