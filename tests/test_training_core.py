"""The training core: the simulator and the distributed trainer's pieces take the same step.

The end-to-end identity (real processes over loopback) is in
``tests/test_distributed.py``; here the distributed workers' gradient
sources and the server's aggregation run in-process, for a defence-aware
attack (the workers call the rule under test) and for failing rules.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from flagagg import distributed, sim  # noqa: E402
from flagagg.distributed._server import _Round, _ServerCore  # noqa: E402
from flagagg.distributed._worker import GradientSource  # noqa: E402
from flagagg.training._replica import sgd_step  # noqa: E402
from flagagg.training._step import aggregate_step, build_rule, rule_columns  # noqa: E402


def _config(rule, attack):
    return sim.parse_config({
        "experiment": {"name": "core", "rounds": 2, "seeds": [0], "validation_seeds": [1],
                       "eval_every": 1},
        "data": {"dataset": "digits"},
        "cluster": {"workers": 5, "f": [1]},
        "rules": {rule: {"lr": 0.1}},
        "attacks": {attack: {}},
    })


@pytest.mark.parametrize(("rule", "attack"), [("median", "optimal_little_is_enough"),
                                             ("flag", "reverse")])
def test_distributed_pieces_step_as_the_simulator(rule, attack):
    config = _config(rule, attack)
    spec = distributed.make_spec(config, rule=rule, attack=attack, f=1)
    sources = [GradientSource(spec, w, "cpu") for w in range(config.workers)]
    core = _ServerCore(spec)
    flat, buf = core.flat, None
    for t in (1, 2):
        st = _Round(t, 0.0)
        for w, source in enumerate(sources):
            payload, _ = source.compute(t, flat.numpy())
            st.status[w] = ("ok", "", torch.as_tensor(payload))
        g, rows, result, problem = core._aggregate(st)
        assert problem is None and rows == list(range(config.workers))
        flat, buf = sgd_step(flat, buf, g, lr=core.lr, momentum=config.momentum,
                             weight_decay=config.weight_decay)
    ref = sim.simulate(sim.load_dataset("digits"), rule, f=1, attack=attack,
                       workers=config.workers, rounds=2, eval_every=1, lr=config.lr_of(rule),
                       momentum=config.momentum, weight_decay=config.weight_decay,
                       batch_size=config.batch_size, seed=config.seeds[0])
    # float tolerance, as tests/test_distributed.py: a worker computes its own row
    # alone, the simulator all rows in one batch
    np.testing.assert_allclose(flat.numpy(), ref.parameters, rtol=1e-5, atol=1e-6)
    if rule == "flag":
        # the server's diagnostics columns are the rule's own
        columns = rule_columns(result, rows, range(config.workers))
        np.testing.assert_array_equal([columns[w]["coefficient"] for w in rows],
                                      np.asarray(result.coefficients, dtype=float))
        assert all(0 <= columns[w]["reconstruction_ratio"] <= 1 + 1e-6 for w in rows)


def test_aggregate_step_says_why_there_is_no_gradient():
    G = torch.randn(5, 8)
    ok = aggregate_step(build_rule("mean", 0), G, diagnostics=True)
    assert ok.problem == "" and ok.error is None and ok.result.rule == "mean"
    torch.testing.assert_close(ok.gradient, G.mean(dim=0))
    # the aggregate does not depend on asking for diagnostics
    assert torch.equal(aggregate_step(build_rule("mean", 0), G).gradient, ok.gradient)

    failed = aggregate_step(build_rule("krum", 2), G)
    assert failed.gradient is None and isinstance(failed.error, ValueError)
    assert failed.problem.startswith("the rule cannot aggregate these 5 gradients: ValueError")

    wrong = aggregate_step(lambda rows: rows[:, :3].mean(axis=0), G)
    assert wrong.gradient is None and wrong.error is None
    assert wrong.problem == "the rule returned shape (3,); expected (8,)"

    torch_rows = aggregate_step(build_rule("median", 1), G, array="torch", backend="torch")
    torch.testing.assert_close(torch_rows.gradient, G.median(dim=0).values)


def test_simulator_raises_what_a_failing_rule_raised(monkeypatch):
    def broken(rows):
        raise RuntimeError("broken rule")

    with pytest.raises(RuntimeError, match="broken rule"):
        sim.simulate("digits", broken, workers=3, rounds=1)
    with pytest.raises(ValueError, match=r"the rule returned shape \(3,\)"):
        sim.simulate("digits", lambda rows: rows[:, :3].mean(axis=0), workers=3, rounds=1)


def test_rule_columns_of_workers_without_a_row():
    G = torch.randn(4, 6)
    G[1] = float("nan")
    step = aggregate_step(build_rule("mean", 1), G, diagnostics=True)
    columns = rule_columns(step.result, [0, 2, 5, 6], range(8))
    assert columns[2]["rule_excluded"]          # the NaN row, worker 2
    assert columns[0]["rule_excluded"] == ""
    assert columns[1] == {"reconstruction_ratio": None, "coefficient": None,
                          "rule_excluded": ""}
    assert columns[0]["reconstruction_ratio"] is None  # not the Flag Aggregator


@pytest.mark.parametrize("lr, momentum, weight_decay", [
    (0.1, 0.0, 0.0),      # plain SGD
    (0.05, 0.9, 0.0),     # heavy ball
    (0.2, 0.0, 1e-2),     # weight decay alone
    (0.01, 0.99, 5e-4),   # both, as the configs use them
])
def test_sgd_step_is_torch_optim_sgd(lr, momentum, weight_decay):
    # the trainers' update (simulator and parameter server) against PyTorch's
    # own optimiser, fed the same gradients: the same parameters after k steps.
    # sgd_step has no dampening and no Nesterov term; SGD is built without them.
    rng = np.random.default_rng(7)
    start = torch.from_numpy(rng.normal(size=50))
    grads = [torch.from_numpy(rng.normal(scale=3.0, size=50)) for _ in range(12)]
    param = torch.nn.Parameter(start.clone())
    opt = torch.optim.SGD([param], lr=lr, momentum=momentum, weight_decay=weight_decay,
                          dampening=0.0, nesterov=False)
    flat, buf = start.clone(), None
    for k, g in enumerate(grads, start=1):
        param.grad = g.clone()
        opt.step()
        flat, buf = sgd_step(flat, buf, g, lr=lr, momentum=momentum, weight_decay=weight_decay)
        torch.testing.assert_close(flat, param.detach(), rtol=1e-13, atol=1e-13,
                                   msg=lambda m, k=k: f"after step {k}: {m}")
    assert not torch.equal(flat, start)  # the steps moved the parameters
    if momentum:
        torch.testing.assert_close(buf, opt.state[param]["momentum_buffer"], rtol=1e-13,
                                   atol=1e-13)
