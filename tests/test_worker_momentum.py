"""Worker (local) momentum: m = beta m + (1 - beta) g, and attacks that see the momenta.

Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust
Optimization" (ICML 2021); ByzFL's benchmark trains honest clients with
beta = 0.9 and hands the honest momenta to its attacks.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from flagagg import attacks, sim  # noqa: E402
from flagagg.training._replica import Replica  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return sim.load_dataset("digits")


def _replica(ds, beta, f=0):
    return Replica(ds, workers=6, f=f, seed=4, model="mlp", model_params={"hidden": 8},
                   worker_momentum=beta)


def _params(rep, t):
    gen = torch.Generator().manual_seed(t)
    return rep.initial_parameters() + 0.1 * torch.randn(rep.n_params, generator=gen)


def test_workers_send_the_running_average_of_their_gradients(digits):
    beta = 0.9
    with_m, plain = _replica(digits, beta), _replica(digits, 0.0)
    none = attacks.get_attack("none")
    m = torch.zeros(6, with_m.n_params)
    for t in range(4):
        flat = _params(plain, t)
        g = plain.gradients(flat, plain.draw_batches(5), none, range(6))
        got = with_m.gradients(flat, with_m.draw_batches(5), none, range(6))
        m = beta * m + (1 - beta) * g
        torch.testing.assert_close(got, m, rtol=1e-6, atol=1e-7)
    # beta = 0: the gradient itself, bit for bit
    a, b = _replica(digits, 0.0), Replica(digits, workers=6, f=0, seed=4, model="mlp",
                                          model_params={"hidden": 8})
    flat = _params(a, 9)
    assert torch.equal(a.gradients(flat, a.draw_batches(5), none, range(6)),
                       b.gradients(flat, b.draw_batches(5), none, range(6)))


@pytest.mark.parametrize("name", ["little_is_enough", "optimal_little_is_enough", "mimic",
                                  "sign_flip"])
def test_gradient_attacks_see_the_honest_momenta(digits, name):
    beta, f = 0.8, 2
    with_m, plain = _replica(digits, beta, f), _replica(digits, 0.0, f)
    attack = attacks.get_attack(name)
    if attack.defence_aware:
        from flagagg.training._step import build_rule, rule_for_attack

        attack = attack.with_rule(rule_for_attack(build_rule("median", f)))
    none = attacks.get_attack("none")
    faulty, honest = list(with_m.faulty), list(with_m.honest)
    m = torch.zeros(6, with_m.n_params)
    rng = np.random.default_rng(np.random.SeedSequence(4).spawn(4)[3])  # the attack stream
    for t in range(3):
        flat = _params(plain, t)
        g = plain.gradients(flat, plain.draw_batches(5), none, range(6))
        got = with_m.gradients(flat, with_m.draw_batches(5), attack, range(6))
        m = beta * m + (1 - beta) * g
        want = m.clone()
        want[faulty] = attack(m[honest], f, rng=rng, own=m[faulty])
        torch.testing.assert_close(got[honest], m[honest], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got[faulty], want[faulty], rtol=1e-5, atol=1e-6)


def test_a_distributed_worker_keeps_the_momentum_of_its_own_row(digits):
    """One process computing one worker's row sends what the simulator's worker sends."""
    beta = 0.9
    sim_rep, one = _replica(digits, beta, f=1), _replica(digits, beta, f=1)
    attack = attacks.get_attack("little_is_enough")
    w = int(one.honest[0])
    for t in range(3):
        flat = _params(sim_rep, t)
        every = sim_rep.gradients(flat, sim_rep.draw_batches(5), attack, range(6))
        mine = one.gradients(flat, one.draw_batches(5), attack, [w])
        # the same row, up to the order of sums in a batch of 1 worker or 6
        torch.testing.assert_close(mine[0], every[w], rtol=1e-5, atol=1e-7)


def test_momentum_must_be_in_zero_one(digits):
    with pytest.raises(ValueError, match=r"worker_momentum must be in \[0, 1\)"):
        _replica(digits, 1.0)
    with pytest.raises(ValueError, match="worker_momentum"):
        sim.simulate(digits, "mean", rounds=1, worker_momentum=-0.1)


def test_simulate_and_grids_train_with_worker_momentum(digits, tmp_path):
    kw = dict(f=2, workers=7, attack="little_is_enough", rounds=30, eval_every=10, lr=0.3,
              momentum=0.0)
    a = sim.simulate(digits, "median", worker_momentum=0.9, **kw)
    b = sim.simulate(digits, "median", worker_momentum=0.0, **kw)
    assert not a.diverged and a.final_accuracy > 0.5
    assert not np.array_equal(a.parameters, b.parameters)
    cfg = sim.parse_config({
        "experiment": {"rounds": 30, "seeds": [0], "validation_seeds": [1], "eval_every": 10},
        "cluster": {"workers": 7, "f": 2},
        "optimizer": {"lr": 0.3, "momentum": 0.0, "worker_momentum": 0.9},
        "rules": {"median": {}}, "attacks": {"little_is_enough": {}},
    })
    assert cfg.worker_momentum == 0.9 and cfg.to_dict()["optimizer"]["worker_momentum"] == 0.9
    res = sim.run_experiment(cfg, store=tmp_path, progress=False)
    assert res.runs[0]["final_accuracy"] == pytest.approx(a.final_accuracy)
    # the momentum is part of a run's stored settings: another beta is another run
    res0 = sim.run_experiment(cfg.replace(worker_momentum=0.0), store=tmp_path, progress=False)
    assert res0.runs[0]["final_accuracy"] == pytest.approx(b.final_accuracy)
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_config_key_default_and_shipped_values():
    base = {"rules": {"mean": {}}, "attacks": {"none": {}}}
    assert sim.parse_config(base).worker_momentum == 0.0
    with pytest.raises(sim.ConfigError, match=r"\[optimizer\] worker_momentum must be"):
        sim.parse_config({**base, "optimizer": {"worker_momentum": 1.0}})
    # the configs whose published numbers were measured without it keep 0; the
    # MNIST-1D benchmarks train honest workers as ByzFL's benchmark does
    for name in ("demo", "fa_ablation", "hard"):
        assert sim.load_config(name).worker_momentum == 0.0
    for name in ("mnist1d", "mnist1d_dirichlet"):
        cfg = sim.load_config(name)
        assert cfg.worker_momentum == 0.9 and cfg.momentum == 0.0
