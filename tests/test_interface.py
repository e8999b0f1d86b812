"""One interface for every rule: f, errors, NaN policy, results with per-worker diagnostics."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import flagagg
from flagagg.rules import _rule_class
from flagagg.rules._flag import FlagAggregator
from flagagg.rules._pre import Bucketing

from support.rules import aggregate, call

P, F = 11, 2


def honest_and_reversed(p=P, f=F, n=200, seed=0, scale=1.0):
    """p - f honest rows around a common direction, the last f reversed and larger."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=n)
    G = base + 0.3 * rng.normal(size=(p, n))
    G[p - f:] = -3.0 * G[p - f:]
    return scale * G


# ----------------------------------------------------------------------------- one interface

@pytest.mark.parametrize("name", flagagg.available_rules())
def test_every_rule_takes_f(name):
    G = honest_and_reversed()
    out = aggregate(G, rule=name, f=F, backend="numpy")
    assert out.shape == (G.shape[1],) and np.all(np.isfinite(out))
    assert flagagg.get_rule(name, f=F).f == F


@pytest.mark.parametrize("name", flagagg.available_rules())
def test_every_rule_takes_f_with_nnm(name):
    G = honest_and_reversed()
    res = aggregate(G, rule=name, f=F, pre=["nnm"], backend="numpy", return_result=True)
    assert res.rule == f"nnm+{name}"
    assert len(res.verdict) == P


def test_missing_and_unknown_parameters_give_flagaggs_message():
    with pytest.raises(TypeError, match=r"rule 'krum' needs f \(the number of Byzantine"):
        flagagg.aggregate(np.ones((7, 2)), rule="krum")
    with pytest.raises(TypeError, match="rule 'mean' takes no parameter 'm'; its parameters: f"):
        flagagg.get_rule("mean", m=3)


def test_flag_with_nnm_keeps_its_result_type():
    res = flagagg.aggregate(honest_and_reversed(), rule="flag", f=F, pre=["nnm"],
                            backend="numpy", return_result=True)
    assert isinstance(res, flagagg.FlagResult)
    assert res.reconstruction_ratios.shape == (P,) and res.rank >= 1


def test_flag_is_a_gram_rule_computable_from_the_gram_alone():
    G = honest_and_reversed()
    rule = FlagAggregator(r=3)
    assert rule.space == "gram"
    sol = rule.solve_gram(G @ G.T)  # a plain matrix, as summed across ranks
    np.testing.assert_allclose(sol.coefficients @ G, rule(G, backend="numpy"), rtol=1e-10)
    assert sol.rank == 3


# ----------------------------------------------------------------------------- NaN policy

@pytest.mark.parametrize("name", flagagg.available_rules())
def test_a_nan_worker_is_reported_by_every_rule(name):
    G = honest_and_reversed()
    G[3] = np.nan
    res = aggregate(G, rule=name, f=F, backend="numpy", return_result=True)
    assert np.all(np.isfinite(res.aggregate))
    assert 3 in res.excluded_indices, res.excluded
    assert res.verdict[3].startswith("excluded")
    assert np.isnan(res.cosine[3])


def test_mean_excludes_nan_rows_instead_of_returning_nan():
    G = honest_and_reversed()
    G[0, 5] = np.inf
    res = flagagg.aggregate(G, rule="mean", backend="numpy", return_result=True)
    np.testing.assert_allclose(res.aggregate, G[1:].mean(axis=0), rtol=1e-12)
    assert res.excluded_indices == (0,)


def test_coordinate_rule_refuses_a_non_finite_output():
    G = honest_and_reversed()
    G[:6, 0] = np.nan  # more than half of one coordinate
    with pytest.raises(ValueError, match="median: some coordinates of the aggregate are not"):
        flagagg.aggregate(G, rule="median", backend="numpy")


# ----------------------------------------------------------------------------- diagnostics

def _slow_diagnostics(G, out, coef):
    """Obvious dense definitions of influence and cosine."""
    inner = G @ out
    cos = inner / (np.linalg.norm(G, axis=1) * np.linalg.norm(out))
    if coef is not None:
        # |c_i|: the sign of an input's influence is the sign of its cosine.
        influence = np.abs(coef) * inner / (out @ out)
    else:
        influence = inner / (G.shape[0] * (out @ out))
    return influence, cos


@pytest.mark.parametrize("name", flagagg.available_rules())
def test_influence_and_cosine_match_the_dense_definitions(name):
    G = honest_and_reversed(seed=3)
    res = aggregate(G, rule=name, f=F, backend="numpy", return_result=True)
    influence, cos = _slow_diagnostics(G, res.aggregate, res.coefficients)
    np.testing.assert_allclose(res.cosine, cos, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.influence, influence, rtol=1e-9, atol=1e-12)
    if res.coefficients is not None and (res.coefficients >= 0).all():
        assert res.influence.sum() == pytest.approx(1.0, rel=1e-9)
    # Never opposite signs: negative influence means pulling the other way.
    assert np.all(res.influence * np.nan_to_num(res.cosine) >= 0)
    # The reversed workers are the ones marked, by every rule.
    assert res.suspects == tuple(range(P - F, P)), res.summary()
    text = res.summary()
    for i in range(P - F, P):
        assert f"{i:>5}" in text
    assert text.count("<<") == F


def test_readme_example_marks_the_three_reversed_workers():
    rng = np.random.default_rng(0)
    honest = rng.normal(1.0, 0.1, size=(12, 1000))
    G = np.vstack([honest, -honest[:3], rng.normal(0, 5, size=(2, 1000))])
    res = flagagg.flag_aggregate(G, return_result=True)
    # The reversed rows pull against; the two N(0, 5) rows have 5x an honest norm.
    assert res.suspects == (12, 13, 14, 15, 16)
    assert res.verdict[15] == res.verdict[16] == "outsized"
    assert ("suspects (excluded, outsized or pulling the other way): 12, 13, 14, 15, 16"
            in res.summary())


# ----------------------------------------------------------------------------- drop-in scale

@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3])
def test_default_output_is_on_the_inputs_scale(scale):
    G = honest_and_reversed(f=0, scale=scale)
    out = flagagg.flag_aggregate(G, backend="numpy")
    mean = G.mean(axis=0)
    ratio = np.linalg.norm(out) / np.linalg.norm(mean)
    assert 0.8 < ratio < 1.5, ratio
    ref = flagagg.flag_aggregate(G, variant="reference", backend="numpy")
    # The published output ignores the scale: its norm is at most p / r.
    assert np.linalg.norm(ref) <= P / np.ceil(P / 2) + 1e-9
    np.testing.assert_allclose(flagagg.flag_aggregate(G, rescale=None, backend="numpy")
                               * np.linalg.norm(out) / np.linalg.norm(
                                   flagagg.flag_aggregate(G, rescale=None, backend="numpy")),
                               out, rtol=1e-10)


# ----------------------------------------------------------------------------- statelessness

def test_rules_keep_no_gradient_sized_state():
    G = honest_and_reversed()
    for name in flagagg.available_rules():
        rule = flagagg.get_rule(name, f=F)
        call(rule, G, backend="numpy")
        assert rule.result_.aggregate is None
        big = [k for k, v in vars(rule).items()
               if isinstance(v, np.ndarray) and v.size >= G.shape[1]]
        assert not big, (name, big)


def test_diagnostics_only_when_a_result_is_asked_for(monkeypatch):
    # They cost more than a small aggregation: the aggregate-only path skips them,
    # result_ forms them on first access, identical to return_result=True.
    from flagagg.rules import _result

    calls = []
    real = _result.linear_stats
    monkeypatch.setattr(_result, "linear_stats",
                        lambda *a: calls.append(1) or real(*a))
    G = honest_and_reversed()
    rules = [flagagg.get_rule(name, f=F) for name in flagagg.available_rules()]
    rules.append(flagagg.get_rule("krum", f=F, pre=["nnm"]))
    rules.append(flagagg.get_rule("flag", f=F, pre=["nnm"]))
    linear = 0
    for rule in rules:
        calls.clear()
        call(rule, G, backend="numpy")
        assert calls == [], rule
        lazy = rule.result_
        res = call(rule, G, backend="numpy", return_result=True)
        assert res._deferred is None and rule.result_._deferred is None
        if res.coefficients is None or rule.name == "mean":
            continue  # diagnostics from a pass over the data, only with return_result
        linear += 1
        assert len(calls) == 2, rule  # once for result_, once for return_result
        assert lazy.verdict == res.verdict and len(res.verdict) == G.shape[0]
        np.testing.assert_array_equal(lazy.influence, res.influence)
        np.testing.assert_array_equal(lazy.cosine, res.cosine)
    assert linear >= 6


def test_result_before_first_call_is_an_attribute_error():
    rule = flagagg.get_rule("krum", f=1)
    assert not hasattr(rule, "result_")


def test_centered_clipping_previous_center_is_explicit_state():
    G = honest_and_reversed(f=0)
    cc = flagagg.get_rule("centered_clipping", tau=0.5, center="previous")
    first = cc(G, backend="numpy")
    np.testing.assert_array_equal(cc.previous_, first)
    second = cc(G, backend="numpy")
    assert not np.allclose(first, second)
    cc.reset()
    np.testing.assert_allclose(cc(G, backend="numpy"), first)
    # through pre-aggregation, the composed output is the one remembered
    composed = flagagg.get_rule("centered_clipping", tau=0.5, center="previous", f=1,
                                pre=["nnm"])
    out = composed(G, backend="numpy")
    np.testing.assert_array_equal(composed.rule.previous_, out)


def test_bucketing_shared_by_threads_draws_each_permutation_once():
    step = Bucketing(s=1, random_state=0)
    ref = Bucketing(s=1, random_state=0)
    K = np.eye(6)
    expected = sorted(tuple(ref.mixing(K)[1]["buckets"]) for _ in range(200))
    got = []

    def work():
        for _ in range(50):
            got.append(tuple(step.mixing(K)[1]["buckets"]))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == expected


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("name, params, err, match", [
    ("krum", {"f": 1.5}, TypeError, "f must be an integer for krum"),
    ("krum", {"f": -1}, ValueError, "need f >= 0 for krum"),
    ("flag", {"lam": "x"}, TypeError, "lam must be a real number for flag"),
    ("flag", {"variant": "fast"}, ValueError, "variant must be one of"),
    ("geometric_median", {"eps": 0.0}, ValueError, "need eps > 0 for geometric_median"),
    ("multi_krum", {"f": 1, "m": 0}, ValueError, "need m >= 1 for multi_krum"),
])
def test_validation_type_vs_value(name, params, err, match):
    with pytest.raises(err, match=match):
        flagagg.get_rule(name, **params)


def test_bucketing_copies_and_pickles_with_its_own_lock():
    import copy
    import pickle

    step = Bucketing(s=2, random_state=3)
    for clone in (copy.deepcopy(step), pickle.loads(pickle.dumps(step))):
        assert clone._lock is not step._lock
        assert clone.mixing(np.eye(6))[1] == copy.deepcopy(step).mixing(np.eye(6))[1]


# ----------------------------------------------------------------------------- one interface


@pytest.mark.parametrize("name", flagagg.available_rules())
def test_every_rule_refuses_an_f_no_rule_could_tolerate(name):
    """An f beyond the rule's declared bound is refused, also by rules that do not use f.

    A rule that relies on an honest majority refuses f faulty of p with 2f >= p.
    A rule that takes its trust from a trusted per-call input instead (FLTrust:
    the server's reference gradient, ``contract.call_inputs``) declares its own
    bound, below a majority, and refuses only what that bound refuses.
    """
    G = np.random.default_rng(0).normal(size=(8, 5))
    rule_class = _rule_class(name)
    bound = rule_class.contract.bound
    trusted = bool(rule_class.contract.call_inputs)
    # The f refused at p = 8: every f with 2f >= 8 for a majority rule; for a rule
    # with a trusted input, those its own bound refuses (FLTrust, p >= f + 1: f >= 8).
    refused = (8, 100) if trusted else (4, 100)
    for f in refused:
        with pytest.raises(ValueError, match=rf"need p >= (\d+)?f( \+ \d+)? for {name}.*"
                                             rf"p=8, f={f}"):
            aggregate(G, rule=name, f=f, backend="numpy")
        with pytest.raises(ValueError, match=f"for {name}"):
            flagagg.get_rule(name, f=f).check_workers(8)
    if trusted:
        # Trust from the server's reference, not a majority: 7 faulty of 8 are accepted.
        assert bound is not None and bound.a == 1 and bound.need(7) <= 8
        assert flagagg.get_rule(name, f=7).check_workers(8) == 8
        assert np.isfinite(aggregate(G, rule=name, f=7, backend="numpy")).all()
    else:
        # Every f with 2f >= p is refused: the declared bound is at least p >= 2f + 1.
        assert bound is not None and all(bound.need(f) > 2 * f for f in range(50))
    # f = 1 of 8 is allowed wherever the rule's own bound allows it.
    rule = flagagg.get_rule(name, f=1)
    assert rule.check_workers(8) == 8


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_integer_and_boolean_inputs_are_cast_to_float64_for_every_library(lib):
    G = np.arange(12).reshape(4, 3)
    if lib == "torch":
        torch = pytest.importorskip("torch")
        ints, bools = torch.as_tensor(G), torch.as_tensor(G % 2 == 0)
        f64 = torch.float64
    else:
        ints, bools, f64 = G, G % 2 == 0, np.float64
    for rule in ("mean", "median", "flag"):
        out = flagagg.aggregate(ints, rule=rule)
        assert out.dtype == f64, (rule, out.dtype)
        out = flagagg.aggregate(bools, rule=rule)
        assert out.dtype == f64
    np.testing.assert_allclose(np.asarray(flagagg.aggregate(ints, rule="mean")), G.mean(axis=0))


def test_complex_input_error_states_the_policy():
    with pytest.raises(TypeError, match="integer and boolean ones are cast to float64"):
        flagagg.aggregate(np.ones((3, 2)) + 1j, rule="mean")
