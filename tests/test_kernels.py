"""The Gram and combine kernels of every backend against a float64 reference.

Odd shapes (p = 1 ... 64, m not a multiple of any block), strided, read-only,
unaligned and half-precision inputs, NaN rows, determinism across thread
counts, the torch device code path (run on CPU tensors), and a subprocess
that runs the numba kernel tests with ``NUMBA_DISABLE_JIT=1`` so that the
kernel bodies execute (and are covered) as Python.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from flagagg.backends import _implementation

from support.backends import has_module

# Under NUMBA_DISABLE_JIT the kernels run as Python: keep the data tiny there.
PYTHON_KERNELS = os.environ.get("NUMBA_DISABLE_JIT", "0") == "1"
needs_numba = pytest.mark.skipif(not has_module("numba"), reason="numba missing")
needs_torch = pytest.mark.skipif(not has_module("torch"), reason="torch missing")


def gram_ref(X):
    X64 = np.asarray(X, dtype=np.float64)
    return X64 @ X64.T


def combine_ref(coef, X):
    """Float64 reference, and an elementwise bound sum_i |c_i x_i| for the tolerance."""
    nz = np.flatnonzero(coef)
    X64 = np.asarray(X[nz], dtype=np.float64)
    return coef[nz] @ X64, np.abs(coef[nz]) @ np.abs(X64)


def assert_gram_close(K, X, rtol=1e-13):
    ref = gram_ref(X)
    assert isinstance(K, np.ndarray) and K.dtype == np.float64 and K.shape == ref.shape
    scale = np.sqrt(np.outer(np.diag(ref), np.diag(ref))) + 1e-300  # Cauchy-Schwarz bound
    assert np.all(np.abs(K - ref) <= rtol * scale * max(1, np.log2(X.shape[1]))), (
        np.max(np.abs(K - ref) / scale))
    np.testing.assert_array_equal(K, K.T)


def assert_combine_close(out, coef, X, rtol):
    ref, bound = combine_ref(coef, X)
    out = np.asarray(out, dtype=np.float64)
    assert out.shape == ref.shape
    assert np.all(np.abs(out - ref) <= rtol * bound + 1e-300), np.max(np.abs(out - ref) - rtol
                                                                      * bound)


def _out_rtol(dtype):
    return 1e-12 if np.dtype(dtype) == np.float64 else 2e-7  # one float32 rounding


SHAPES = [(1, 1), (1, 5000), (2, 3), (3, 2049), (5, 4097), (9, 3001), (15, 2050), (17, 4099),
          (64, 2051)]
if PYTHON_KERNELS:
    SHAPES = [(1, 1), (2, 3), (3, 70), (5, 33), (9, 20), (17, 9)]


@needs_numba
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("p,m", SHAPES)
def test_numba_kernels_odd_shapes(p, m, dtype):
    impl = _implementation("numba")
    rng = np.random.default_rng(p * 7919 + m)
    X = rng.normal(size=(p, m)).astype(dtype)
    assert_gram_close(impl.gram(X), X)
    coef = rng.normal(size=p)
    if p > 2:
        coef[::3] = 0.0
    out = impl.combine(coef, X)
    assert out.dtype == (np.float64 if dtype == "float64" else np.float32)
    assert_combine_close(out, coef, X, _out_rtol(out.dtype))


@needs_numba
def test_numba_kernels_small_blocks(monkeypatch):
    # Many chunks per segment, ragged everywhere, through both kernels.
    from flagagg.backends import _numba

    monkeypatch.setattr(_numba, "_GRAM_CHUNK_BYTES", 1)  # width clamps to 256 columns
    monkeypatch.setattr(_numba, "_COMBINE_WIDTH", 100)
    impl = _implementation("numba")
    m = 700 if PYTHON_KERNELS else 3 * 2048 + 5
    for p in (4, 7) if PYTHON_KERNELS else (4, 7, 13):
        X = np.random.default_rng(p).normal(size=(p, m)).astype(np.float32)
        assert_gram_close(impl.gram(X), X)
        coef = np.linspace(-1, 1, p)
        assert_combine_close(impl.combine(coef, X), coef, X, 2e-7)


def _views(rng, p, m):
    """(name, array, read in place) for layouts the kernels must handle."""
    base = rng.normal(size=(2 * p + 1, m + 9)).astype(np.float32)
    ro = base[:p, :m].copy()
    ro.flags.writeable = False
    raw = np.zeros(p * m * 4 + 1, dtype=np.uint8)
    unaligned = np.frombuffer(raw.data, dtype=np.float32, count=p * m, offset=1).reshape(p, m)
    unaligned[...] = base[:p, :m]
    return [
        ("column slice", base[:p, 3:m + 3], True),
        ("every other row", base[::2][:p, :m], True),
        ("every other column", base[:p, : 2 * (m // 2) : 2], False),
        ("fortran order", np.asfortranarray(base[:p, :m]), False),
        ("read-only", ro, True),
        ("negative column stride", base[:p, m - 1 :: -1], False),
        ("unaligned", unaligned, False),
    ]


@needs_numba
def test_numba_kernels_views():
    from flagagg.backends._numba import _row_major

    impl = _implementation("numba")
    rng = np.random.default_rng(3)
    p, m = (5, 37) if PYTHON_KERNELS else (6, 5003)
    for name, X, in_place in _views(rng, p, m):
        view = _row_major(X)
        assert (view is not None) == in_place, name
        if in_place:
            assert np.shares_memory(view[0], X), name
        assert_gram_close(impl.gram(X), X)
        coef = rng.normal(size=p)
        coef[1] = 0.0
        assert_combine_close(impl.combine(coef, X), coef, X, 2e-7)


@needs_numba
def test_numba_nonfinite_rows_stay_in_their_row():
    impl = _implementation("numba")
    rng = np.random.default_rng(1)
    X = rng.normal(size=(9, 70 if PYTHON_KERNELS else 9000)).astype(np.float32)
    X[2, 5] = np.nan
    X[7, 0] = np.inf
    K = impl.gram(X)
    bad = np.zeros(9, bool)
    bad[[2, 7]] = True
    assert np.isnan(K[2]).all() and np.isnan(K[:, 2]).all()
    assert not np.isfinite(K[7, ~bad]).any()
    assert np.isfinite(K[np.ix_(~bad, ~bad)]).all()
    assert_gram_close(K[np.ix_(~bad, ~bad)], X[~bad])
    coef = rng.normal(size=9)
    coef[bad] = 0.0
    out = impl.combine(coef, X)  # rows with a zero coefficient are not read
    assert np.isfinite(out).all()
    assert_combine_close(out, coef, X, 2e-7)
    assert (impl.combine(np.zeros(9), X) == 0).all()


@needs_numba
@pytest.mark.skipif(PYTHON_KERNELS, reason="thread counts do not apply to Python kernels")
def test_numba_results_do_not_depend_on_thread_count(monkeypatch):
    import numba

    from flagagg.backends import _numba

    # Parallel regions even for this size (small work runs on one thread).
    monkeypatch.setattr(_numba, "_PARALLEL_MIN_PRODUCTS", 0)
    monkeypatch.setattr(_numba, "_PARALLEL_MIN_ELEMENTS", 0)
    impl = _implementation("numba")
    X = np.random.default_rng(0).normal(size=(15, 300_001)).astype(np.float32)
    coef = np.random.default_rng(1).normal(size=15)
    saved = numba.get_num_threads()
    results = []
    try:
        for threads in sorted({1, 2, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            results.append((impl.gram(X), impl.combine(coef, X)))
    finally:
        numba.set_num_threads(saved)
    for K, out in results[1:]:
        np.testing.assert_array_equal(K, results[0][0])
        np.testing.assert_array_equal(out, results[0][1])
    assert_gram_close(results[0][0], X)


@needs_numba
@pytest.mark.skipif(PYTHON_KERNELS, reason="the comparison needs the compiled kernel")
def test_numba_gram_beats_float32_blas_accuracy():
    X = (np.random.default_rng(0).normal(size=(15, 200_000)) + 3.0).astype(np.float32)
    K64 = gram_ref(X)
    err_kernel = np.abs(_implementation("numba").gram(X) - K64).max()
    err_blas = np.abs((X @ X.T).astype(np.float64) - K64).max()
    assert err_kernel < 1e-6 * err_blas


@needs_numba
@pytest.mark.skipif(PYTHON_KERNELS, reason="this is the launcher of the Python run")
def test_kernels_as_python_in_a_subprocess():
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    env.pop("FLAGAGG_BACKEND", None)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "-k", "test_numba", __file__],
        capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout


# -- every backend, through the public kernel surface ---------------------------------------


@pytest.mark.parametrize("p,m", [(1, 7), (3, 1025), (17, 4099)])
def test_every_backend_odd_shapes(lib, dtype, p, m):
    impl = _implementation(lib.backend)
    rng = np.random.default_rng(p + m)
    X = rng.normal(size=(p, m)).astype(dtype)
    K = impl.gram(lib.to(X))
    assert_gram_close(K, X, rtol=1e-13)
    coef = rng.normal(size=p)
    if p > 2:
        coef[1] = 0.0
        X[1] = np.nan  # never read
    out = impl.combine(coef, lib.to(X))
    lib.check(out, dtype)
    # Library ops may sum float32 in float32 (p terms).
    assert_combine_close(lib.back(out), coef, X, 1e-12 if dtype == "float64" else 1e-6 * p)


@pytest.mark.parametrize("backend", ["numpy", "array_api"])
def test_generic_half_precision(backend):
    impl = _implementation(backend)
    rng = np.random.default_rng(4)
    X = rng.normal(size=(6, 70_001)).astype(np.float16)  # several conversion chunks
    assert_gram_close(impl.gram(X), X)
    coef = rng.normal(size=6)
    coef[[0, 3]] = 0.0
    X[3] = np.inf  # never read, not even converted
    out = impl.combine(coef, X)
    assert out.dtype == np.float32
    assert_combine_close(out, coef, X, 1e-6)


def test_nonzero_runs():
    from flagagg.backends._array_api import _nonzero_runs

    assert _nonzero_runs(np.array([0.0, 1, 2, 0, 0, 3])) == [(1, 3), (5, 6)]
    assert _nonzero_runs(np.array([1.0, 1])) == [(0, 2)]
    assert _nonzero_runs(np.zeros(3)) == []


# -- torch ---------------------------------------------------------------------------------


TORCH_DTYPES = ["float32", "float64", "float16", "bfloat16"]


def _torch_case(dtype, p=7, m=3001, seed=0):
    import torch

    rng = np.random.default_rng(seed)
    T = torch.as_tensor(rng.normal(size=(p, m)), dtype=getattr(torch, dtype))
    return T, T.double().numpy()  # the exact values the kernels see


@needs_torch
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("path", ["auto", "device"])
def test_torch_kernels_dtypes(dtype, path):
    """CPU tensors go to the host kernels; the device path (used on GPUs) runs here on CPU."""
    import torch

    impl = _implementation("torch")
    T, X = _torch_case(dtype)
    gram = impl.gram if path == "auto" else impl._gram_device
    combine = impl.combine if path == "auto" else impl._combine_device
    assert_gram_close(gram(T), X)
    coef = np.linspace(-1, 2, T.shape[0])
    coef[2] = 0.0
    T[2, 0] = float("nan")  # excluded: never read
    X[2, 0] = np.nan
    out = combine(coef, T)
    assert isinstance(out, torch.Tensor) and out.device == T.device
    assert out.dtype == (torch.float64 if dtype == "float64" else torch.float32)
    assert_combine_close(out.double().numpy(), coef, X, 1e-12 if dtype == "float64" else 1e-6)


@needs_torch
def test_torch_cpu_is_zero_copy_and_detached():
    import torch

    impl = _implementation("torch")
    T = torch.randn(5, 1000, dtype=torch.float32, requires_grad=True)
    view = T[:, 10:900]  # strided view: read in place through NumPy
    X = view.detach().double().numpy()
    assert_gram_close(impl.gram(view), X)
    out = impl.combine(np.ones(5), view)
    assert out.dtype == torch.float32 and not out.requires_grad
    assert_combine_close(out.double().numpy(), np.ones(5), X, 2e-7)
    assert impl.combine(np.zeros(5), view).abs().sum().item() == 0.0


@needs_torch
def test_torch_device_path_noncontiguous_and_runs():
    import torch

    impl = _implementation("torch")
    base = torch.randn(12, 2000, dtype=torch.float32)
    view = base[::2, 5:1905]
    X = view.double().numpy()
    assert_gram_close(impl._gram_device(view), X)
    coef = np.array([1.0, 0.0, -2.0, 3.0, 0.0, 0.5])
    assert_combine_close(impl._combine_device(coef, view).double().numpy(), coef, X, 1e-6)


@needs_torch
@pytest.mark.gpu
@pytest.mark.skipif(not has_module("torch") or not __import__("torch").cuda.is_available(),
                    reason="no CUDA device")
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_cuda_kernels(dtype):
    import torch

    impl = _implementation("torch")
    T, X = _torch_case(dtype, p=9, m=100_003)
    T = T.cuda()
    assert_gram_close(impl.gram(T), X)
    coef = np.linspace(-1, 1, 9)
    coef[4] = 0.0
    out = impl.combine(coef, T)
    assert out.device == T.device
    assert out.dtype == (torch.float64 if dtype == "float64" else torch.float32)
    assert_combine_close(out.double().cpu().numpy(), coef, X,
                         1e-12 if dtype == "float64" else 1e-6)
