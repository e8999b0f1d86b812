"""The simulator skips the faulty workers' gradients that their attack never reads.

An attack such as A Little Is Enough replaces the f faulty rows with rows
built from the honest ones; computing the faulty workers' own gradients
first is f of p gradients a round for nothing. The simulator leaves them
out where :attr:`flagagg.attacks.Attack.reads_own` is False. The reference
here is the full computation (``reads_own`` forced True): the same runs,
bit for bit, and the engine is handed p - f workers instead of p.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from flagagg import attacks, sim  # noqa: E402
from flagagg.attacks import Attack, available_attacks, get_attack  # noqa: E402
from flagagg.sim._cluster import simulate_lockstep  # noqa: E402
from flagagg.training._grads import GradientEngine  # noqa: E402
from flagagg.training._replica import Replica  # noqa: E402

# the gradient attacks that build the faulty rows from their own honest gradients
READERS = {"reverse", "sign_flip", "partial_drop", "fang_krum_partial",
           "fang_trimmed_mean_partial"}


def _bound(name):
    attack = get_attack(name)
    if attack.defence_aware:
        attack = attack.with_rule(lambda rows: rows.mean(axis=0))
    return attack


@pytest.mark.parametrize("name", available_attacks("gradient"))
def test_reads_own_says_whether_own_changes_the_rows(name):
    """Every gradient attack that declares ``own`` unused gives the same rows with any
    ``own`` (hostile ones included) as without it; every one that reads it gives other
    rows for another ``own``. A wrong declaration would let the simulator skip
    gradients an attack reads."""
    attack = _bound(name)
    assert attack.reads_own is (name in READERS)
    gen = np.random.default_rng(0)
    honest = gen.normal(size=(9, 12)).astype(np.float32)
    own = gen.normal(size=(3, 12)).astype(np.float32)
    if attack.reads_own:
        a, b = (np.asarray(attack(honest, 3, rng=7, own=o)) for o in (own, own[::-1] * 3 + 1))
        assert not np.array_equal(a, b)
        return
    ref = np.asarray(attack(honest, 3, rng=7))
    for o in (own, np.full_like(own, 1e30), np.full_like(own, np.nan), -own * 1e3):
        np.testing.assert_array_equal(np.asarray(attack(honest, 3, rng=7, own=o)), ref)


@pytest.mark.parametrize("name", ["none", "label_flip", "distorted_data"])
def test_attacks_that_send_the_faulty_gradients_read_them(name):
    """The faulty workers of a data attack and of "none" send their own (poisoned or
    honest) gradients: those are always computed."""
    assert get_attack(name).reads_own


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = {"digits": sim.load_dataset("digits")}
    try:
        import mnist1d  # noqa: F401
    except ImportError:  # pragma: no cover - the sim extra without mnist1d
        return out
    out["mnist1d"] = sim.load_dataset("mnist1d", n_samples=600,
                                      cache=tmp_path_factory.mktemp("cache"))
    return out


@pytest.fixture
def engine_workers(monkeypatch):
    """The number of workers of every gradient engine call."""
    calls = []
    real = GradientEngine.__call__

    def counting(self, flats, xb, yb):
        calls.append(int(yb.shape[1]))
        return real(self, flats, xb, yb)

    monkeypatch.setattr(GradientEngine, "__call__", counting)
    return calls


def _full(monkeypatch):
    """Make every attack claim to read ``own``: the simulator computes every row."""
    monkeypatch.setattr(Attack, "reads_own", property(lambda self: True))


def _same(a, b):
    assert a.rounds == b.rounds and a.accuracy == b.accuracy
    assert (a.diverged, a.diverged_round, a.faulty) == (b.diverged, b.diverged_round, b.faulty)
    np.testing.assert_array_equal(a.parameters, b.parameters)


def _model_cases():
    return [("digits", "mlp", {"hidden": 9}), ("mnist1d", "cnn1d", {"channels": (6, 6, 6)}),
            ("digits", "cnn", {"channels": (3, 4)})]


@pytest.mark.parametrize(("name", "model", "params"), _model_cases())
@pytest.mark.parametrize(("attack", "attack_params", "worker_momentum"), [
    ("little_is_enough", None, 0.0), ("little_is_enough", None, 0.9), ("random", None, 0.0),
    ("gaussian", {"scale": 3.0}, 0.9), ("mimic", {"target": 1}, 0.0),
    ("optimal_little_is_enough", None, 0.0), ("fang_krum", None, 0.9), ("reverse", None, 0.9),
    ("label_flip", None, 0.0)])
def test_skipping_gives_the_full_computations_runs_bit_for_bit(
        data, monkeypatch, engine_workers, name, model, params, attack, attack_params,
        worker_momentum):
    """A run whose attack does not read the faulty workers' gradients computes p - f
    gradients a round instead of p, and gives the accuracy curve and the final
    parameters of the full computation bit for bit (the minibatch and attack streams
    advance as before); with worker momentum too (the attack reads honest momenta)."""
    if name not in data:
        pytest.skip("needs mnist1d")
    kw = dict(rule="trimmed_mean", f=2, attack=attack, attack_params=attack_params,
              workers=7, model=model, model_params=params, rounds=10, eval_every=3,
              batch_size=8, lr=0.05, worker_momentum=worker_momentum, seed=3)
    skipped = sim.simulate(data[name], **kw)
    reads = get_attack(attack).reads_own
    if model == "cnn":
        # no engine (max-pooling): vmap computes every row, nothing is skipped
        assert engine_workers == []
    else:
        assert set(engine_workers) == {7 if reads else 5} and len(engine_workers) == 10
    engine_workers.clear()
    with monkeypatch.context() as m:
        _full(m)
        full = sim.simulate(data[name], **kw)
    assert set(engine_workers) == ({7} if model != "cnn" else set())
    _same(skipped, full)
    assert not skipped.diverged and np.isfinite(skipped.parameters).all()


def test_lockstep_with_and_without_skipping_attacks_equals_runs_alone(data, monkeypatch):
    """A lockstep group whose runs skip different rows (A Little Is Enough: p - f, reverse
    and a data attack: p) gives each run as it is alone and as the full computation."""
    ds = data.get("mnist1d", data["digits"])
    model = ("cnn1d", {"channels": (6, 6, 6)}) if "mnist1d" in data else ("mlp", {"hidden": 9})
    common = dict(workers=7, model=model[0], model_params=model[1], rounds=10, eval_every=5,
                  batch_size=8)
    runs = [dict(rule="median", f=2, attack="little_is_enough", seed=0, lr=0.05),
            dict(rule="median", f=2, attack="reverse", seed=1, lr=0.05),
            dict(rule="median", f=2, attack="label_flip", seed=2, lr=0.05),
            dict(rule="mean", f=1, attack="nan", seed=3, lr=0.05)]
    got = simulate_lockstep(ds, runs, **common)
    with monkeypatch.context() as m:
        _full(m)
        full = simulate_lockstep(ds, runs, **common)
    for spec, a, b in zip(runs, got, full, strict=True):
        _same(a, b)
        _same(a, sim.simulate(ds, **spec, **common))


@pytest.mark.parametrize("attack", ["little_is_enough", "random", "mimic", "reverse"])
@pytest.mark.parametrize("rows", ["all", [0], [4, 1], "faulty", "one faulty"])
def test_replica_rows_with_and_without_skipping(data, attack, rows):
    """``Replica.gradients(..., skip_unread=True)`` gives the rows of the full computation
    for any set of wanted rows, faulty ones alone included (an attack that reads no
    honest row still needs the full rows' shape: nothing is skipped then)."""
    ds = data["digits"]
    reps = [Replica(ds, workers=7, f=2, seed=5, model="mlp", model_params={"hidden": 9})
            for _ in range(2)]
    faulty = [int(w) for w in reps[0].faulty]
    want = ({"all": list(range(7)), "faulty": faulty, "one faulty": faulty[:1]}[rows]
            if isinstance(rows, str) else rows)
    att = get_attack(attack)
    flat = reps[0].initial_parameters()
    for _ in range(3):
        idx = [r.draw_batches(8) for r in reps]
        np.testing.assert_array_equal(idx[0], idx[1])
        a = reps[0].gradients(flat, idx[0], att, want, skip_unread=True)
        b = reps[1].gradients(flat, idx[1], att, want)
        assert a.shape == (len(want), reps[0].n_params)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        flat = flat - 0.1 * b.nan_to_num().mean(0)


def test_registry_declares_own_for_every_gradient_attack():
    """Every registered gradient function says whether it reads ``own`` (through the
    shared docstring decorator); an undeclared one would be treated as reading it."""
    for name in available_attacks("gradient"):
        func = attacks._lookup(name)[0]
        assert isinstance(getattr(func, "_reads_own", None), bool), name
