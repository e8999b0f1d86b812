"""Server-side aggregation time per round: flagagg's RobustStrategy vs Flower's own strategies.

Every strategy's ``aggregate_train`` gets the same replies (Flower Messages
holding client weights = global + update, float32), interleaved, repeated,
in one run; the median time is printed. Run with ``nice``::

    nice -n 5 python asv_bench/flower_aggregation.py --clients 100 --params 1000000
    nice -n 5 python asv_bench/flower_aggregation.py --clients 15 --params 4000000
"""

from __future__ import annotations

import argparse
import logging
import os
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np  # noqa: E402
from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from flagagg.flower import RobustStrategy  # noqa: E402


class _Grid:
    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return list(self.ids)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=15)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--f", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    rng = np.random.default_rng(0)
    sizes = [a.params // a.layers] * a.layers
    glob = {f"l{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate(sizes)}
    ids = list(range(1, a.clients + 1))
    p, f = a.clients, a.f
    common = dict(fraction_evaluate=0.0, min_available_nodes=p, min_train_nodes=p)
    strategies = {
        "flagagg flag": RobustStrategy("flag", f=f, **common),
        "flagagg multi_krum": RobustStrategy("multi_krum", f=f, **common),
        "flagagg krum": RobustStrategy("krum", f=f, **common),
        "flagagg median": RobustStrategy("median", f=f, **common),
        "flagagg trimmed_mean": RobustStrategy("trimmed_mean", f=f, **common),
        "flwr Krum": Krum(num_malicious_nodes=f, **common),
        "flwr MultiKrum": MultiKrum(num_malicious_nodes=f, num_nodes_to_select=p - f, **common),
        "flwr FedMedian": FedMedian(**common),
        "flwr FedTrimmedAvg": FedTrimmedAvg(beta=f / p, **common),
    }
    if p >= 4 * f + 3:
        strategies["flagagg bulyan"] = RobustStrategy("bulyan", f=f, **common)
        strategies["flwr Bulyan"] = Bulyan(num_malicious_nodes=f, **common)
    grec = ArrayRecord({k: Array(v) for k, v in glob.items()})
    ins = {}
    for name, s in strategies.items():
        ins[name] = {m.metadata.dst_node_id: m
                     for m in s.configure_train(1, grec, ConfigRecord(), _Grid(ids))}
    contents = []
    for _ in ids:
        sent = {k: g + 0.01 * rng.normal(size=g.shape).astype(np.float32)
                for k, g in glob.items()}
        contents.append({k: Array(v) for k, v in sent.items()})
    times = {name: [] for name in strategies}
    for rep in range(a.repeat + 1):  # the first pass warms up (Numba compiles)
        for name, s in strategies.items():
            # Fresh records each call: some of Flower's strategies empty them
            # (to_numpy_ndarrays(keep_input=False)); the Arrays' bytes are shared.
            replies = [Message(RecordDict({"arrays": ArrayRecord(dict(c)),
                                           "metrics": MetricRecord({"num-examples": 10})}),
                               reply_to=ins[name][nid])
                       for nid, c in zip(ids, contents, strict=True)]
            t0 = time.perf_counter()
            arrays, _ = s.aggregate_train(1, replies)
            if rep:
                times[name].append(time.perf_counter() - t0)
            assert arrays is not None, (name, getattr(s, "diagnostics_", {}))
    print(f"{p} clients x {a.params:,} float32 parameters ({a.layers} layers), f={f}; "
          f"aggregate_train, median of {a.repeat}:")
    for name, ts in times.items():
        print(f"  {name:<22} {1e3 * np.median(ts):9.1f} ms")


if __name__ == "__main__":
    main()
