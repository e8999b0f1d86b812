"""FLTrust in the Flower strategy: the server's reference update from ``reference_fn``.

The replies are the Messages a ServerApp would receive; the expected global
arrays are FLTrust applied to the flattened updates with the flattened
reference, computed independently (``oracles_peers_r2.fltrust``).
"""

from __future__ import annotations

import os

import numpy as np
import oracles_peers_r2 as orc
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before flwr is imported
pytest.importorskip("flwr.serverapp.strategy", reason="needs the flower extra")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from flagagg.flower import RobustStrategy  # noqa: E402


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """The identity Flower's runtime gives the ServerApp process; Messages need it."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class _Grid:
    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


def _record(arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _round(strategy, glob, updates, server_round=1):
    node_ids = [1000 + i for i in range(len(updates))]
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        server_round, _record(glob), ConfigRecord(), _Grid(node_ids))}
    replies = []
    for nid, u in zip(node_ids, updates, strict=True):
        content = RecordDict({"arrays": _record({k: glob[k] + u[k] for k in glob}),
                              "metrics": MetricRecord({"num-examples": 10})})
        replies.append(Message(content, reply_to=msgs[nid]))
    return strategy.aggregate_train(server_round, replies)


def _setup(seed=0, p=9):
    rng = np.random.default_rng(seed)
    glob = {"w": rng.normal(size=(5, 3)), "b": rng.normal(size=3),
            "steps": np.array([4], dtype=np.int64)}
    direction = {k: rng.normal(size=glob[k].shape) for k in ("w", "b")}
    updates = [{k: direction[k] + 0.3 * rng.normal(size=glob[k].shape) for k in ("w", "b")}
               for _ in range(p)]
    updates[0] = {k: -20 * v for k, v in updates[0].items()}  # a reversed, huge client
    # Integer arrays go back unchanged (the lower median); only floats are updates.
    updates = [{**u, "steps": np.zeros(1, dtype=np.int64)} for u in updates]
    server = {k: direction[k] + 0.1 * rng.normal(size=glob[k].shape) for k in ("w", "b")}
    return glob, updates, server


def test_fltrust_strategy_uses_the_server_reference_every_round():
    glob, updates, server = _setup()
    seen = []

    def reference_fn(server_round, arrays):
        seen.append((server_round, sorted(arrays)))
        np.testing.assert_array_equal(arrays["w"], glob["w"])
        return server

    strategy = RobustStrategy("fltrust", reference_fn=reference_fn)
    arrays, metrics = _round(strategy, glob, updates)
    assert seen == [(1, ["b", "steps", "w"])]
    keys = ("b", "w")  # any fixed order: FLTrust does not depend on the coordinates' order
    flat = np.stack([np.concatenate([u[k].ravel() for k in keys]) for u in updates])
    ref = np.concatenate([server[k].ravel() for k in keys])
    out, trust = orc.fltrust(flat, ref)
    assert trust[0] == 0.0  # the reversed client gets no trust
    got = np.concatenate([arrays[k].numpy().ravel() - glob[k].ravel() for k in keys])
    np.testing.assert_allclose(got, out, rtol=1e-9, atol=1e-12)
    assert metrics["flagagg.skipped"] == 0
    np.testing.assert_array_equal(arrays["steps"].numpy(), glob["steps"])


def test_fltrust_strategy_needs_a_reference_fn_and_checks_it():
    with pytest.raises(TypeError, match="needs the server's reference update"):
        RobustStrategy("fltrust")
    # The strategy reads the rule's contract (call_inputs), behind a step too.
    with pytest.raises(TypeError, match="rule 'nnm\\+fltrust' needs the server's reference"):
        RobustStrategy("fltrust", f=1, pre=["nnm"])
    with pytest.raises(TypeError, match="reference_fn is for rules that take a reference"):
        RobustStrategy("median", reference_fn=lambda r, a: {})
    with pytest.raises(TypeError, match="must be callable"):
        RobustStrategy("fltrust", reference_fn=3)
    glob, updates, server = _setup(1)
    bad_keys = RobustStrategy("fltrust", reference_fn=lambda r, a: {"w": server["w"]})
    with pytest.raises(TypeError, match="must return a dict of the floating-point arrays"):
        _round(bad_keys, glob, updates)
    bad_dtype = RobustStrategy("fltrust", reference_fn=lambda r, a: {
        k: v.astype(np.float32) for k, v in server.items()})
    with pytest.raises(ValueError, match="must have shape"):
        _round(bad_dtype, glob, updates)
