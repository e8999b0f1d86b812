"""Each rule's declared contract: what the checks, errors, DDP hook and docs read."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import pytest

import flagagg
from flagagg._gram import Gram
from flagagg._validation import Anything, Choice, Int, Real
from flagagg.rules import _RULES, AggregationResult, Rule, Solution
from flagagg.rules._base import NothingLeftError
from flagagg.rules._contract import F_REQUIRED, Bound, Contract, Reference
from flagagg.rules._pre import available_pre, pre_class

from support.rules import call

RULE_CLASSES = {name: flagagg.rules._rule_class(name) for name in flagagg.available_rules()}


def _constructor_names(cls: type) -> set[str]:
    return {k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "backend")}


@pytest.mark.parametrize("cls", [*RULE_CLASSES.values(), *map(pre_class, available_pre())],
                         ids=lambda c: c.__name__)
def test_every_parameter_is_declared_once(cls):
    declared = set(cls.contract.params) - {"backend"}
    assert declared == _constructor_names(cls)
    assert all(isinstance(c, (Int, Real, Choice, Anything)) for c in cls.contract.params.values())


def _bad_values(constraint):
    """(wrong type, wrong value) for a declared constraint; None where there is none."""
    if isinstance(constraint, Int):
        return 1.5, (constraint.low - 1 if constraint.low is not None else None)
    if isinstance(constraint, Real):
        low = constraint.low
        return "x", (None if low is None else (low if constraint.strict else low - 1.0))
    if isinstance(constraint, Choice):
        return None, "no such choice"
    return None, None


CASES = [(name, param) for name, cls in RULE_CLASSES.items() for param in cls.contract.params
         if param != "backend"]


@pytest.mark.parametrize("name,param", CASES)
def test_one_exception_convention_from_the_declaration(name, param):
    cls = RULE_CLASSES[name]
    wrong_type, wrong_value = _bad_values(cls.contract.params[param])
    base = {"f": 1} if "f" in cls.contract.params else {}
    if wrong_type is not None:
        with pytest.raises(TypeError, match=param):
            flagagg.get_rule(name, **{**base, param: wrong_type})
    if wrong_value is not None:
        with pytest.raises(ValueError, match=param):
            flagagg.get_rule(name, **{**base, param: wrong_value})


@pytest.mark.parametrize("name", list(RULE_CLASSES))
def test_the_declared_bound_is_the_one_enforced(name):
    bound = RULE_CLASSES[name].contract.bound
    rule = flagagg.get_rule(name, f=2)
    need = bound.need(2)
    assert rule.check_workers(need) == need
    msg = f"need {bound} for {name}: got p={need - 1}, f=2"
    with pytest.raises(ValueError, match=msg.replace("+", r"\+")):
        rule(np.ones((need - 1, 3)), backend="numpy")


@pytest.mark.parametrize("name", list(RULE_CLASSES))
def test_get_rule_takes_backend_for_every_rule(name):
    G = np.random.default_rng(0).normal(size=(9, 6))
    kwargs = {"f": 1} if "f" in RULE_CLASSES[name].contract.params else {}
    rule = flagagg.get_rule(name, backend="numpy", **kwargs)
    assert call(rule, G, return_result=True).backend == "numpy"
    with pytest.raises(TypeError, match="backend"):
        flagagg.get_rule(name, backend=3, **kwargs)
    with pytest.raises(ValueError, match="nosuch"):
        call(flagagg.get_rule(name, backend="nosuch", **kwargs), G)


@pytest.mark.parametrize("name", list(RULE_CLASSES))
def test_gram_space_rules_solve_from_a_plain_gram(name):
    rule = flagagg.get_rule(name, f=1, backend="numpy")
    G = np.random.default_rng(1).normal(size=(9, 6))
    if rule.space != "gram":
        with pytest.raises(TypeError, match="Gram matrix alone"):
            rule.solve_gram(G @ G.T)
        return
    sol = rule.solve_gram(G @ G.T)
    assert isinstance(sol, Solution)
    np.testing.assert_allclose(sol.coefficients @ G, rule(G), rtol=1e-9, atol=1e-12)


def test_ddp_mode_choice_reads_the_declared_space():
    pytest.importorskip("torch")
    from flagagg.torch._ddp import _kind

    for name in RULE_CLASSES:
        rule = flagagg.get_rule(name, f=1)
        assert _kind(rule) == (rule.space if rule.space in ("gram", "coordinate") else "")
    assert _kind(flagagg.get_rule("centered_clipping", center=np.zeros(3))) == ""
    assert _kind(flagagg.get_rule("krum", f=1, pre=["nnm"])) == ""


def test_bound_and_reference_read_as_words():
    assert str(Bound(2, 3)) == "p >= 2f + 3" and str(Bound(1, 0)) == "p >= f"
    ref = Reference(("A", "B", "C"), "T", "ICML", 2020)
    assert ref.short() == "A et al. (ICML 2020)"
    assert Reference(("A", "B"), "T", "ICML", 2020).short() == "A and B (ICML 2020)"


# A rule written on the contract alone, as a new rule would be, registered for the test.

@dataclass(frozen=True, kw_only=True)
class ToyResult(AggregationResult):
    """With one extra field."""

    spread: float = 0.0


@dataclass(frozen=True, kw_only=True)
class ToySolution(Solution):
    """The same extra field."""

    spread: float


class Toy(Rule):
    """The mean of the ``k`` inputs of smallest norm (a test rule)."""

    name = "toy"
    result_type = ToyResult
    contract = Contract(params={"f": F_REQUIRED, "k": Int(low=1)}, bound=Bound(2, 2),
                        nan_policy="unused inputs are excluded", cost="p x p",
                        space="gram")

    def __init__(self, f: int, k: int = 2) -> None:
        self._store(f=f, k=k)

    def _solve_gram(self, K: Gram) -> ToySolution:
        idx = self.usable(K, need=self.k)
        norms = K.row_norms()
        chosen = idx[np.argsort(norms[idx], kind="stable")][: self.k]
        coef = np.zeros(K.p)
        coef[chosen] = 1.0 / self.k
        return ToySolution(coefficients=coef, selected=tuple(int(i) for i in chosen),
                           excluded=K.excluded, spread=float(np.ptp(norms[chosen])))


def test_a_rule_on_the_contract_alone(monkeypatch):
    monkeypatch.setitem(_RULES, "toy", f"{__name__}:Toy")
    G = np.array([[3.0, 0.0], [1.0, 0.0], [np.nan, 0.0], [2.0, 0.0], [9.0, 0.0]])
    res = flagagg.aggregate(G, rule="toy", f=1, k=2, backend="numpy", return_result=True)
    assert isinstance(res, ToyResult) and res.spread == 1.0
    np.testing.assert_allclose(res.aggregate, [1.5, 0.0])
    assert res.selected == (1, 3) and res.excluded_indices == (2,)
    assert res.verdict[2].startswith("excluded") and res.influence is not None
    with pytest.raises(TypeError, match="k must be an integer for toy"):
        flagagg.get_rule("toy", f=1, k=1.0)
    with pytest.raises(ValueError, match=r"need p >= 2f \+ 2 for toy: got p=3, f=1"):
        flagagg.aggregate(G[:3], rule="toy", f=1)
    with pytest.raises(NothingLeftError):
        flagagg.get_rule("toy", f=0, k=1).solve_gram(np.full((2, 2), np.nan))
    # The docs table reads the same declaration.
    assert flagagg.get_rule("toy", f=1).contract.cost == "p x p"


# One exception convention beyond the rules: configs and the simulator.

def _tiny_config():
    return {
        "experiment": {"name": "tiny", "rounds": 2, "seeds": [0], "validation_seeds": [100]},
        "data": {"dataset": "digits"},
        "cluster": {"workers": 7, "f": [1]},
        "rules": {"krum": {"lr": 0.1}},
        "attacks": {"none": {}},
    }


@pytest.mark.parametrize("section,key,value,kind,words", [
    ("cluster", "workers", "7", TypeError, "an integer >= 2"),
    ("cluster", "workers", 1, ValueError, "an integer >= 2"),
    ("experiment", "rounds", 2.0, TypeError, "an integer >= 1"),
    ("data", "test_fraction", 1.0, ValueError, "a finite number > 0 and < 1"),
    ("data", "dataset", 3, ValueError, "one of"),
    ("experiment", "name", 3, TypeError, "a non-empty string"),
])
def test_config_values_follow_the_one_convention(section, key, value, kind, words):
    from flagagg.sim import ConfigError, parse_config

    data = _tiny_config()
    data[section][key] = value
    with pytest.raises(ConfigError, match=rf"\[{section}\] {key} must be {words}") as info:
        parse_config(data, source="my.toml")
    assert isinstance(info.value, kind)
    if kind is ValueError:
        assert not isinstance(info.value, TypeError)


def test_config_check_reads_the_declared_bound():
    from flagagg.sim import ConfigError, parse_config

    data = _tiny_config()
    data["cluster"]["workers"] = 4  # krum declares p >= 2f + 3
    with pytest.raises(ConfigError, match=r"need p >= 2f \+ 3 for krum: got p=4, f=1"):
        parse_config(data, source="my.toml")


def test_simulate_with_a_fractional_f_says_so():
    pytest.importorskip("sklearn")
    from flagagg import sim

    with pytest.raises(TypeError, match="f must be an integer or None for mean: got 1.5"):
        sim.simulate("digits", "mean", f=1.5, workers=7, rounds=1)
    with pytest.raises(TypeError, match="f must be an integer or None for mean: got '2'"):
        sim.simulate("digits", "mean", f="2", workers=7, rounds=1)
    with pytest.raises(TypeError, match="workers must be an integer"):
        sim.simulate("digits", "mean", f=1, workers="7", rounds=1)


def test_docs_tables_read_the_declaration(monkeypatch):
    import sys
    from pathlib import Path

    pytest.importorskip("numpydoc")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "docs" / "_ext"))
    sys.modules.pop("flagagg_tables", None)
    import flagagg_tables

    infos = {i.name: i for i in flagagg_tables.rule_infos(f_values=(1,))}
    for name, cls in RULE_CLASSES.items():
        c = cls.contract
        info = infos[name]
        assert info.complexity == c.cost and info.nan_documented == c.nan_policy
        assert info.source == (c.reference.short() if c.reference else "--")
        assert info.precondition.startswith(str(c.bound).replace(">=", "≥"))
        assert [p.split("=")[0] for p in info.parameters] == [
            k for k in c.params if k != "backend"]
    from flagagg import attacks

    for row in flagagg_tables.attack_rows():
        ref = getattr(attacks.get_attack(row["name"]).func, "reference", None)
        assert row["source"] == (ref.short() if ref is not None else "--")
    assert attacks.min_max.reference.short() == "Shejwalkar and Houmansadr (NDSS 2021)"


def test_a_result_with_deferred_diagnostics_pickles():
    # Results cross process boundaries (simulator workers): the composed Gram they keep
    # for their deferred diagnostics pickles whole, scaled form and decision included.
    import pickle

    G = np.random.default_rng(2).normal(size=(7, 5))
    G[6] = 1e200
    rule = flagagg.get_rule("krum", f=1, backend="numpy")
    rule(G)
    # what the call keeps until result_ is read pickles too, and so does the
    # result formed from it, its diagnostics still deferred
    unread = pickle.loads(pickle.dumps(rule.__dict__["_last_result"]))
    deferred = rule._result(unread.outcome, unread.backend, aggregate=None)
    copy = pickle.loads(pickle.dumps(deferred))
    assert copy._deferred is not None
    assert copy._deferred.gram.usable.all() and copy._deferred.gram.exponents.any()
    from flagagg.rules._result import with_diagnostics

    np.testing.assert_array_equal(with_diagnostics(copy).cosine, rule.result_.cosine)
    assert np.isfinite(rule.result_.cosine).all()


# --- per-call inputs (contract.call_inputs) ------------------------------------------


def test_per_call_inputs_are_declared_in_the_contract():
    # FLTrust's reference is declared, as the one input besides the gradients any rule
    # needs; generic callers read the declaration, not an attribute of the class.
    needs = {name for name, cls in RULE_CLASSES.items() if cls.contract.call_inputs}
    assert needs == {"fltrust"}
    assert list(RULE_CLASSES["fltrust"].contract.call_inputs) == ["reference"]
    assert not hasattr(RULE_CLASSES["fltrust"], "needs_reference")
    # A per-call input may also be given once to the constructor: it must be declared there.
    with pytest.raises(TypeError, match="constructor parameter"):
        Contract(params={}, call_inputs={"reference": "a vector"})


def test_a_rule_called_without_its_per_call_input_says_what_it_needs():
    G = np.random.default_rng(2).normal(size=(5, 3))
    for rule in (flagagg.get_rule("fltrust"), flagagg.get_rule("fltrust", f=1, pre=["nnm"])):
        assert rule.missing_inputs() == ("reference",)
        with pytest.raises(TypeError, match=r"fltrust needs the server's reference gradient g0 "
                                            r".*rule\(gradients, reference=\.\.\.\)"):
            rule(G)
        with pytest.raises(TypeError, match="reference=None|needs the server"):
            rule(G, reference=None)
        out = rule(G, reference=G[0])
        assert out.shape == (3,) and np.isfinite(out).all()
    # Given once to the constructor, it is not needed per call; per call it wins.
    rule = flagagg.get_rule("fltrust", reference=G[0])
    assert rule.missing_inputs() == ()
    np.testing.assert_array_equal(rule(G), flagagg.get_rule("fltrust")(G, reference=G[0]))
    assert not np.array_equal(rule(G, reference=G[1]), rule(G))


def test_a_per_call_input_a_rule_does_not_declare_is_a_type_error():
    G = np.random.default_rng(3).normal(size=(5, 3))
    with pytest.raises(TypeError, match="median takes no per-call input 'reference'; it "
                                        "aggregates the gradients alone"):
        flagagg.get_rule("median")(G, reference=G[0])
    with pytest.raises(TypeError, match="fltrust takes no per-call input 'center'; its "
                                        "per-call inputs: reference"):
        flagagg.get_rule("fltrust")(G, reference=G[0], center=G[0])
