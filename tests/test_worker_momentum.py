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


# --------------------------------------------------------------------------
# checkpoints: a resumed run continues the workers' momenta


def _continue(rep, rounds, atk):
    return [rep.gradients(_params(rep, 10 + t), rep.draw_batches(5), atk, range(6))
            for t in range(rounds)]


def _same_streams(dst, src):
    dst.batch_rng.bit_generator.state = src.batch_rng.bit_generator.state
    dst.attack_rng.bit_generator.state = src.attack_rng.bit_generator.state


def test_momentum_state_continues_a_replica_bit_for_bit(digits):
    atk = attacks.get_attack("little_is_enough")
    rep = _replica(digits, 0.9, f=2)
    empty = rep.momentum_state()
    assert empty["workers"].numel() == 0 and empty["momenta"].shape == (0, rep.n_params)
    for t in range(3):  # a faulty worker's row: the attack needs every row
        rep.gradients(_params(rep, t), rep.draw_batches(5), atk, [int(rep.faulty[0])])
    state = rep.momentum_state()
    assert state["workers"].tolist() == list(range(6))  # omniscient: every worker's row
    restored, forgotten = _replica(digits, 0.9, f=2), _replica(digits, 0.9, f=2)
    restored.load_momentum_state(state)
    _same_streams(restored, rep)
    _same_streams(forgotten, rep)
    want = _continue(rep, 2, atk)
    for got, w in zip(_continue(restored, 2, atk), want, strict=True):
        assert torch.equal(got, w)
    assert not torch.equal(_continue(forgotten, 2, atk)[-1], want[-1])
    # an honest distributed worker keeps its own row only
    one = _replica(digits, 0.9, f=2)
    honest = int(one.honest[0])
    one.gradients(_params(one, 0), one.draw_batches(5), atk, [honest])
    assert one.momentum_state()["workers"].tolist() == [honest]


def test_momentum_state_that_does_not_fit_is_refused(digits):
    rep = _replica(digits, 0.9)
    with pytest.raises(ValueError, match="outside"):
        rep.load_momentum_state({"workers": torch.tensor([6]),
                                 "momenta": torch.zeros(1, rep.n_params)})
    with pytest.raises(ValueError, match="shape"):
        rep.load_momentum_state({"workers": torch.tensor([1]), "momenta": torch.zeros(1, 3)})
    with pytest.raises(TypeError, match="tensors"):
        rep.load_momentum_state({"workers": [1], "momenta": [[0.0]]})


def _run_in_threads(spec, **options):
    """A distributed run in this process (server and workers on threads), with the
    checkpoint options given to the server and to every worker, as ``run_node`` does."""
    import tempfile
    import threading
    from pathlib import Path

    from flagagg import distributed
    from flagagg.distributed._tls import file_of, issue

    certs = Path(tempfile.mkdtemp(prefix="flagagg-momenta-certs-"))
    issue(certs, spec.workers)
    server = distributed.Server(spec, tls=file_of(certs, 0), **options)
    out = {}
    threads = [threading.Thread(target=lambda: out.setdefault("record", server.run()),
                                daemon=True)]
    threads += [threading.Thread(target=distributed.run_worker, daemon=True,
                                 args=(spec, w, server.address),
                                 kwargs={"tls": file_of(certs, w + 1), **options})
                for w in range(spec.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive()
    return out["record"]


@pytest.mark.parametrize("attack", ["little_is_enough", "none"])
def test_a_resumed_distributed_run_continues_the_worker_momenta_bit_for_bit(tmp_path, attack):
    """Stopped after round 3 and resumed: the same parameters as a run never stopped
    (the omniscient attacker keeps every worker's momentum, the others their own)."""
    import dataclasses

    from flagagg import distributed

    config = sim.load_config("demo").replace(worker_momentum=0.9)
    spec = distributed.make_spec(config, rule="flag", attack=attack, f=1, workers=4,
                                 rounds=6, eval_every=3, round_timeout=20, quorum=4,
                                 connect_timeout=20)
    ck = tmp_path / "ck.pt"
    first = _run_in_threads(dataclasses.replace(spec, config=spec.config.replace(rounds=3)),
                            checkpoint=ck, checkpoint_every=2)
    assert [r["round"] for r in first["rounds"]] == [1, 2, 3]
    # each worker kept round 3 (the last) and round 2 (a checkpoint round)
    kept = sorted(p.name for p in (tmp_path / "ck.pt.momenta").iterdir())
    assert kept == sorted(f"worker-{w}-round-{t}.pt" for w in range(4) for t in (2, 3))
    resumed = _run_in_threads(spec, resume=ck)
    assert [r["round"] for r in resumed["rounds"]] == [4, 5, 6]
    straight = _run_in_threads(spec)
    np.testing.assert_array_equal(resumed["parameters"], straight["parameters"])
    # without a worker's momenta the resumed run would be another run: refused
    from flagagg.distributed._worker import MomentumFiles

    (tmp_path / "ck.pt.momenta" / "worker-2-round-3.pt").unlink()
    files = MomentumFiles(None, 0, ck)
    with pytest.raises(ValueError, match="worker 2: resuming at round 4 .* not there"):
        files.restore(_replica(sim.load_dataset("digits"), 0.9), 2, 4)
    # a file of another worker or round is not taken for this one's
    (tmp_path / "ck.pt.momenta" / "worker-1-round-3.pt").rename(
        tmp_path / "ck.pt.momenta" / "worker-2-round-3.pt")
    with pytest.raises(ValueError, match="worker 1's momenta after round 3, not worker 2's"):
        MomentumFiles(None, 0, ck).restore(_replica(sim.load_dataset("digits"), 0.9), 2, 4)
