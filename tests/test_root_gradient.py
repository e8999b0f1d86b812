"""The server's root dataset (FLTrust's reference gradient) for the simulated cluster."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flagagg  # noqa: E402
from flagagg.attacks import get_attack  # noqa: E402
from flagagg.training._data import Dataset  # noqa: E402
from flagagg.training._replica import Replica, sgd_step  # noqa: E402
from flagagg.training._root import RootGradient, needs_reference  # noqa: E402
from flagagg.training._step import aggregate_step, build_rule  # noqa: E402


def _dataset(m=300, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(d, classes))
    X = rng.normal(size=(m, d)).astype(np.float32)
    y = np.argmax(X @ W + 0.3 * rng.normal(size=(m, classes)), axis=1).astype(np.int64)
    return Dataset("synthetic", X[:200], y[:200], X[200:250], y[200:250], X[250:], y[250:],
                   classes, (d,))


def test_root_gradient_is_the_loss_gradient_on_the_root_examples():
    rep = Replica(_dataset(), workers=5, f=1, seed=3)
    root = RootGradient(rep, size=40, seed=3)
    flat = rep.initial_parameters() + 0.01
    g = root(flat)
    # Plain autograd on a copy of the model holding flat.
    net = rep.net
    with torch.no_grad():
        start = 0
        for p in net.parameters():
            p.copy_(flat[start:start + p.numel()].view_as(p))
            start += p.numel()
    net.zero_grad()
    sel = torch.from_numpy(root.indices)
    loss = torch.nn.functional.cross_entropy(net(rep.X_train[sel]), rep.y_train[sel])
    loss.backward()
    want = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    assert g.dtype == torch.float32 and g.shape == (rep.n_params,)
    torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)
    assert len(set(root.indices.tolist())) == 40


def test_root_stream_leaves_the_run_unchanged_and_is_seeded():
    data = _dataset()
    a, b = Replica(data, workers=5, f=1, seed=7), Replica(data, workers=5, f=1, seed=7)
    root = RootGradient(b, size=30, batch_size=8, seed=7)
    root(b.initial_parameters())
    np.testing.assert_array_equal(a.draw_batches(4), b.draw_batches(4))
    again = RootGradient(Replica(data, workers=5, f=1, seed=7), size=30, batch_size=8, seed=7)
    np.testing.assert_array_equal(root.indices, again.indices)
    other = RootGradient(a, size=30, seed=8)
    assert not np.array_equal(root.indices, other.indices)


def test_root_dataset_size_is_checked():
    rep = Replica(_dataset(), workers=5, f=1, seed=0)
    with pytest.raises(ValueError, match="larger than the training split"):
        RootGradient(rep, size=10_000)
    with pytest.raises(TypeError):
        RootGradient(rep, size=2.5)


@pytest.mark.parametrize("array", ["numpy", "torch"])
def test_bound_rule_gets_the_reference_in_the_rows_library(array):
    rep = Replica(_dataset(), workers=7, f=2, seed=1)
    root = RootGradient(rep, size=50, seed=1)
    rule = build_rule("fltrust", 2, None)
    assert needs_reference(rule) and not needs_reference(build_rule("median", 2, None))
    # Read from the contract (contract.call_inputs), through a composed rule too.
    assert needs_reference(flagagg.get_rule("fltrust", f=2, pre=["nnm"]))
    assert not needs_reference(lambda rows: rows[0])
    flat = rep.initial_parameters()
    G = rep.gradients(flat, rep.draw_batches(16), get_attack("sign_flip"), range(7))
    bound = root.bind(rule, flat, array)
    step = aggregate_step(bound, G, array=array, backend="numpy" if array == "numpy" else None,
                          diagnostics=True)
    assert step.gradient is not None, step.problem
    rows = G.numpy()
    want = flagagg.get_rule("fltrust")(rows, reference=root(flat).numpy(), backend="numpy")
    np.testing.assert_allclose(step.gradient.numpy(), want, rtol=1e-5, atol=1e-7)
    # The sign-flipping workers point against the root gradient: no trust.
    assert (step.result.scores[rep.faulty] == 0).all()


def test_simulator_glue_trains_with_fltrust_under_sign_flip():
    """The loop simulate() runs, with the few lines of glue the report describes."""
    data = _dataset()
    rep = Replica(data, workers=7, f=3, seed=2)
    root = RootGradient(rep, size=60, seed=2)
    rule = build_rule("fltrust", 3, None)
    attack = get_attack("sign_flip")
    flat, buf = rep.initial_parameters(), None
    for _ in range(60):
        G = rep.gradients(flat, rep.draw_batches(16), attack, range(7))
        bound = root.bind(rule, flat, "numpy") if needs_reference(rule) else rule
        step = aggregate_step(bound, G, array="numpy", backend="numpy")
        flat, buf = sgd_step(flat, buf, step.gradient, lr=0.1, momentum=0.9, weight_decay=0.0)
    acc = rep.accuracy(flat, "test")
    mean_rep = Replica(data, workers=7, f=3, seed=2)
    flat_m, buf_m = mean_rep.initial_parameters(), None
    for _ in range(60):
        G = mean_rep.gradients(flat_m, mean_rep.draw_batches(16), attack, range(7))
        step = aggregate_step(build_rule("mean", 3, None), G, array="numpy", backend="numpy")
        flat_m, buf_m = sgd_step(flat_m, buf_m, step.gradient, lr=0.1, momentum=0.9,
                                 weight_decay=0.0)
    # 3 of 7 workers flip their signs: the mean barely learns, FLTrust does.
    assert acc > 0.7
    assert acc > mean_rep.accuracy(flat_m, "test") + 0.1


def test_simulate_gives_fltrust_the_server_reference_every_round():
    """The simulator's root dataset feeds FLTrust; 3 of 7 workers flip their sign."""
    from flagagg import sim

    kw = dict(f=3, attack="sign_flip", workers=7, rounds=60, seed=0, eval_every=60)
    trust = sim.simulate("digits", "fltrust", **kw).final_accuracy
    mean = sim.simulate("digits", "mean", **kw).final_accuracy
    assert trust > 0.85 and trust > mean + 0.2, (trust, mean)


def test_simulate_refuses_a_defence_aware_attack_on_fltrust():
    from flagagg import sim

    with pytest.raises(ValueError, match="reference"):
        sim.simulate("digits", "fltrust", f=3, attack="optimal_little_is_enough", workers=7,
                     rounds=2)
