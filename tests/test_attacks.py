"""Each attack checked against its definition, for NumPy and PyTorch inputs."""

import inspect
import math
import re
import subprocess
import sys
from statistics import NormalDist

import numpy as np
import pytest

from flagagg import attacks
from flagagg.attacks import available_attacks, get_attack

torch = pytest.importorskip("torch")

LIBS = ["numpy", "torch"]
DTYPES = ["float32", "float64"]


def _make(lib, dtype, a):
    a = np.asarray(a, dtype=dtype)
    return a if lib == "numpy" else torch.from_numpy(a)


def _np(x):
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_like(out, like, shape):
    assert type(out) is type(like)
    assert out.dtype == like.dtype
    assert tuple(out.shape) == shape


@pytest.fixture
def honest_np():
    return np.random.default_rng(7).normal(size=(12, 40))


@pytest.fixture
def own_np():
    # no zero coordinates, so that dropped coordinates are recognisable
    return np.random.default_rng(8).uniform(1.0, 2.0, size=(3, 40))


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", available_attacks("gradient") + available_attacks("none"))
def test_gradient_attacks_keep_library_dtype_shape(lib, dtype, name, honest_np, own_np):
    honest, own = _make(lib, dtype, honest_np), _make(lib, dtype, own_np)
    attack = get_attack(name)
    if attack.defence_aware:
        # the rule under test, here the mean, in the input's library
        attack = attack.with_rule(lambda rows: rows.mean(0))
    out = attack(honest, 3, rng=0, own=own)
    _check_like(out, honest, (3, 40))
    empty = attack(honest, 0, rng=0, own=own[:0])
    _check_like(empty, honest, (0, 40))


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_is_uniform_in_range_and_seeded(lib, dtype, honest_np):
    honest = _make(lib, dtype, honest_np)
    out = _np(attacks.random_gradients(honest, 3, rng=1, scale=2.5))
    assert np.all(np.abs(out) <= 2.5)
    assert out.std() > 1.0  # spread over the range, not a constant
    same = _np(attacks.random_gradients(honest, 3, rng=np.random.default_rng(1), scale=2.5))
    np.testing.assert_array_equal(out, same)
    other = _np(attacks.random_gradients(honest, 3, rng=2, scale=2.5))
    assert not np.array_equal(out, other)


def test_random_same_rows_for_numpy_and_torch(honest_np):
    a = attacks.random_gradients(honest_np, 3, rng=5)
    b = attacks.random_gradients(torch.from_numpy(honest_np), 3, rng=5)
    np.testing.assert_array_equal(a, b.numpy())


def test_gaussian_moments():
    honest = np.zeros((2, 20000))
    out = attacks.gaussian(honest, 3, rng=0, loc=0.5, scale=2.0)
    assert abs(out.mean() - 0.5) < 0.05
    assert abs(out.std() - 2.0) < 0.05


@pytest.mark.parametrize("lib", LIBS)
def test_reverse_scales_own_gradient(lib, honest_np, own_np):
    honest, own = _make(lib, "float64", honest_np), _make(lib, "float64", own_np)
    np.testing.assert_allclose(_np(attacks.reverse(honest, 3, own=own)), -10.0 * own_np)
    np.testing.assert_allclose(_np(get_attack("sign_flip")(honest, 3, own=own)), -own_np)
    # without own: the honest mean, reversed
    expect = np.tile(-4.0 * honest_np.mean(axis=0), (3, 1))
    np.testing.assert_allclose(_np(attacks.reverse(honest, 3, scale=-4.0)), expect)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_partial_drop_zeroes_exactly_that_fraction(lib, fraction, honest_np, own_np):
    honest, own = _make(lib, "float32", honest_np), _make(lib, "float32", own_np)
    out = _np(attacks.partial_drop(honest, 3, rng=3, fraction=fraction, own=own))
    k = round(fraction * 40)
    assert ((out == 0).sum(axis=1) == k).all()
    kept = out != 0
    np.testing.assert_array_equal(out[kept], own_np.astype(np.float32)[kept])
    if 0 < k < 40:
        # each row draws its own coordinates
        assert not np.array_equal(out[0] == 0, out[1] == 0)


def test_little_is_enough_z_formula():
    # Baruch et al.: s = floor(p/2 + 1) - f, z = Phi^-1((p - s) / p)
    assert attacks.little_is_enough_z(15, 3) == pytest.approx(NormalDist().inv_cdf(10 / 15))
    assert attacks.little_is_enough_z(50, 12) == pytest.approx(NormalDist().inv_cdf(36 / 50))
    with pytest.raises(ValueError, match="pass z explicitly"):
        attacks.little_is_enough_z(15, 8)


@pytest.mark.parametrize("lib", LIBS)
def test_little_is_enough_is_mean_minus_z_std(lib, honest_np):
    honest = _make(lib, "float64", honest_np)
    mu, sigma = honest_np.mean(axis=0), honest_np.std(axis=0)
    out = _np(attacks.little_is_enough(honest, 3, z=1.5))
    np.testing.assert_allclose(out, np.tile(mu - 1.5 * sigma, (3, 1)), rtol=1e-12)
    z = attacks.little_is_enough_z(12 + 3, 3)
    out = _np(attacks.little_is_enough(honest, 3))
    np.testing.assert_allclose(out[2], mu - z * sigma, rtol=1e-12)


@pytest.mark.parametrize("lib", LIBS)
def test_fall_of_empires_is_reversed_scaled_mean(lib, honest_np):
    honest = _make(lib, "float64", honest_np)
    out = _np(attacks.fall_of_empires(honest, 2, eps=0.7))
    np.testing.assert_allclose(out, np.tile(-0.7 * honest_np.mean(axis=0), (2, 1)), rtol=1e-12)


@pytest.mark.parametrize("lib", LIBS)
def test_mimic_copies_one_honest_worker(lib, honest_np):
    honest = _make(lib, "float32", honest_np)
    out = _np(attacks.mimic(honest, 3, target=4))
    np.testing.assert_array_equal(out, np.tile(honest_np[4].astype(np.float32), (3, 1)))
    with pytest.raises(ValueError, match="target"):
        attacks.mimic(honest, 3, target=12)


@pytest.mark.parametrize("lib", LIBS)
def test_nan_and_inf_rows(lib, honest_np):
    honest = _make(lib, "float32", honest_np)
    assert np.isnan(_np(get_attack("nan")(honest, 2))).all()
    out = _np(get_attack("inf")(honest, 2))
    assert np.isposinf(out).all()
    assert np.isneginf(_np(attacks.non_finite(honest, 1, value=-math.inf))).all()


@pytest.mark.parametrize("lib", LIBS)
def test_label_flip(lib):
    X = _make(lib, "float32", np.ones((5, 2)))
    y = np.array([0, 1, 2, 8, 9])
    y = y if lib == "numpy" else torch.from_numpy(y)
    X2, y2 = attacks.label_flip(X, y, n_classes=10)
    assert X2 is X
    np.testing.assert_array_equal(_np(y2), [9, 8, 7, 1, 0])
    assert y2.dtype == y.dtype


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_distorted_data(lib, dtype):
    X_np = np.random.default_rng(0).normal(size=(400, 1, 5, 5))
    X = _make(lib, dtype, X_np)
    y = np.arange(400)
    noisy, y2 = attacks.distorted_data(X, y, rng=0, mode="noise", scale=3.0)
    _check_like(noisy, X, (400, 1, 5, 5))
    assert y2 is y
    noise = _np(noisy) - X_np.astype(dtype)
    assert abs(noise.std() - 3.0) < 0.1
    scrambled, _ = attacks.distorted_data(X, y, rng=0, mode="scramble")
    _check_like(scrambled, X, (400, 1, 5, 5))
    s, x = _np(scrambled).reshape(400, -1), X_np.astype(dtype).reshape(400, -1)
    # every sample keeps its own values, in another order
    np.testing.assert_array_equal(np.sort(s, axis=1), np.sort(x, axis=1))
    assert (s != x).any(axis=1).mean() > 0.99
    with pytest.raises(ValueError, match="mode"):
        attacks.distorted_data(X, y, mode="blur")


def test_registry():
    names = set(available_attacks())
    assert {"none", "random", "gaussian", "reverse", "sign_flip", "partial_drop",
            "little_is_enough", "fall_of_empires", "mimic", "nan", "inf", "label_flip",
            "distorted_data"} <= names
    assert set(available_attacks("data")) == {"label_flip", "distorted_data"}
    assert get_attack("little_is_enough").omniscient
    assert not get_attack("reverse").omniscient
    a = get_attack("reverse", scale=-3.0)
    assert a.kind == "gradient" and dict(a.params) == {"scale": -3.0}
    np.testing.assert_array_equal(a(np.ones((2, 2)), 1, own=np.ones((1, 2))), [[-3.0, -3.0]])
    assert attacks.attack_parameters("sign_flip") == {"scale": -1.0}
    with pytest.raises(ValueError, match="unknown attack 'revers'.*reverse"):
        get_attack("revers")
    with pytest.raises(TypeError, match="has no parameter 'eps'.*scale"):
        get_attack("reverse", eps=1.0)


def test_bad_inputs_are_explained(honest_np):
    with pytest.raises(ValueError, match="2-D"):
        attacks.reverse(honest_np[0], 1)
    with pytest.raises(ValueError, match=r"own must have shape \(f, n\)"):
        attacks.reverse(honest_np, 2, own=np.ones((3, 40)))
    with pytest.raises(ValueError, match="need f >= 0"):
        attacks.gaussian(honest_np, -1)
    # One convention with the rules: a wrong type is a TypeError, a wrong value a ValueError.
    with pytest.raises(TypeError, match="f must be an integer"):
        attacks.gaussian(honest_np, 1.5)
    with pytest.raises(TypeError, match="scale must be a real number for gaussian"):
        attacks.gaussian(honest_np, 1, scale="big")
    with pytest.raises(ValueError, match="need scale >= 0 for gaussian"):
        attacks.gaussian(honest_np, 1, scale=-1.0)
    with pytest.raises(TypeError, match="target must be an integer for mimic"):
        attacks.mimic(honest_np, 1, target=0.5)
    with pytest.raises(ValueError, match="perturbation must be one of"):
        attacks.min_max(honest_np, 1, perturbation="nope")
    with pytest.raises(ValueError, match="at least one honest row"):
        attacks.little_is_enough(honest_np[:0], 2)
    with pytest.raises(ValueError, match="fraction"):
        attacks.partial_drop(honest_np, 1, fraction=1.5)


def test_shared_parameter_blocks_are_filled_in():
    # Written once (attacks._gradient_doc), they read as numpydoc in every docstring.
    from numpydoc.docscrape import FunctionDoc

    for name in attacks.available_attacks("gradient") + attacks.available_attacks("none"):
        func = attacks.get_attack(name).func
        assert "{gradient_parameters}" not in func.__doc__ and "{own}" not in func.__doc__
        params = [p.name for p in FunctionDoc(func)["Parameters"]]
        assert params[:3] == ["honest", "f", "rng"] and params[-1] == "own", (name, params)
        if "rule" in inspect.signature(func).parameters:
            assert "rule" in params, (name, params)
    # every registered attack, of every kind: no shared block left unfilled
    for name in attacks.available_attacks():
        doc = attacks.get_attack(name).func.__doc__
        assert not re.search(r"\{(gradient_parameters|own|rule|reference)\}", doc), name


def test_import_does_not_load_torch():
    code = "import sys, flagagg.attacks; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# the fast column standard deviation of torch rows (A Little Is Enough and the
# attacks built on it) against the old formula (torch.std) and an exact reference

def _hostile_rows(case, dtype):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((12, 257))
    if case == "offset":
        # a one-pass E[x^2] - E[x]^2 loses every digit here
        a = 1e8 + 100.0 * a
    elif case == "huge":
        a[0] = 1e30  # squared, 1e60 overflows float32
    elif case == "tiny":
        a = a * 1e-30
    elif case == "constant":
        a[:] = 7.0
    return a.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["plain", "offset", "huge", "tiny", "constant"])
def test_std0_torch_matches_old_formula_and_exact(case, dtype):
    a = _hostile_rows(case, dtype)
    t = torch.from_numpy(a)
    got = attacks._std0(torch, t)
    assert got.dtype == t.dtype and got.shape == (a.shape[1],)
    old = torch.std(t, dim=0, correction=0)
    # exact reference: two-pass in extended precision on the stored values
    wide = a.astype(np.longdouble)
    ref = np.sqrt(((wide - wide.mean(axis=0)) ** 2).mean(axis=0))
    assert np.all(np.isfinite(got.numpy()))
    # float64 rows at an offset of 1e8 with spread 100 condition the variance
    # by 1e6: a two-pass result is good to ~1e-10 there, a one-pass one to none
    rtol = 1e-6 if dtype == "float32" else 1e-9
    np.testing.assert_allclose(got.numpy(), ref.astype(dtype), rtol=rtol, atol=0)
    np.testing.assert_allclose(got.numpy(), old.numpy(), rtol=4 * rtol, atol=0)


def test_std0_torch_propagates_nan_and_inf_like_torch_std():
    a = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    a[1, 0], a[2, 1] = np.nan, np.inf
    t = torch.from_numpy(a)
    got, old = attacks._std0(torch, t), torch.std(t, dim=0, correction=0)
    np.testing.assert_array_equal(np.isnan(got.numpy()), np.isnan(old.numpy()))
    np.testing.assert_allclose(got.numpy()[2:], old.numpy()[2:], rtol=1e-6)


def test_little_is_enough_torch_equals_numpy_on_offset_rows():
    a = _hostile_rows("offset", "float64")
    out_t = attacks.little_is_enough(torch.from_numpy(a), 3)
    out_n = attacks.little_is_enough(a, 3)
    np.testing.assert_allclose(out_t.numpy(), out_n, rtol=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf, 1e200, 1e300])
@pytest.mark.parametrize("name", available_attacks("gradient"))
def test_every_gradient_attack_ends_on_hostile_honest_rows(name, bad):
    """A diverging run hands an attack NaN, Inf or huge rows: it must return, not loop.

    Fang et al.'s search halved an infinite or NaN lambda forever. Each attack
    runs in a thread with a deadline, so that a hang fails the test instead of
    stalling the suite.
    """
    import threading
    import warnings

    import flagagg

    rng = np.random.default_rng(0)
    honest, own = rng.normal(size=(12, 30)), rng.normal(size=(3, 30))
    honest[0, 0] = own[0, 0] = bad
    attack = get_attack(name)
    if attack.defence_aware:
        attack = attack.with_rule(flagagg.get_rule("median", f=3))
    out = {}

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # overflow on the way is expected
            try:
                out["rows"] = attack(honest, 3, rng=np.random.default_rng(1), own=own)
            except ValueError as exc:  # refusing such rows in words is an answer too
                out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), f"{name} did not return on honest rows holding {bad}"
    assert "rows" in out or "error" in out
    if "rows" in out:
        assert np.shape(out["rows"]) == (3, 30)
