"""Thread benchmark: does a training loop that aggregates with flagagg keep torch's speed?

Run from a checkout: ``python asv_bench/threads.py [--steps 60] [--check]``.

The loop is the one the issue measured: an 8-worker MLP (5.6k parameters,
20 -> 64 -> 64 -> 2) on CPU; each step computes the 8 workers' gradients
(8 forward/backward passes), aggregates them with the Flag Aggregator and
steps SGD. Timed variants, per step, each in its own process:

``plain``
    the step with the gradients averaged by torch (no flagagg);
``agg``
    the aggregation alone, on fixed gradients, in a process that does not train;
``step``
    the step with the aggregation.

Per aggregation path (``torch``: ``flagagg.torch.aggregate_grads`` on the
tensors, torch backend; ``numba``: the flattened gradients as a NumPy array,
numba backend), two ratios:

* alone: ``step / (plain + agg)``, one process at a time (target <= 1.15);
* 4 loops: four ``step`` processes at once (as torchrun starts ranks, with
  ``OMP_NUM_THREADS=1``) against the same four with threads tamed by hand
  (``OMP_WAIT_POLICY=PASSIVE NUMBA_NUM_THREADS=1``) (target <= 1.15).

Every figure is the median over rounds that run the variants interleaved
(baseline, candidate, ...), so machine load hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.15
WORKERS = 8
TAMED = {"OMP_WAIT_POLICY": "PASSIVE", "NUMBA_NUM_THREADS": "1"}


def _child(kind: str, path: str, steps: int) -> float:
    """Run ``steps`` steps of one variant in this process; return seconds per step."""
    import numpy as np
    import torch

    import flagagg
    import flagagg.torch as fat

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(WORKERS, 64, 20, generator=g)
    y = torch.randint(0, 2, (WORKERS, 64), generator=g)
    params = list(model.parameters())

    def worker_grads():
        out = []
        for w in range(WORKERS):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[w]), y[w]).backward()
            out.append(fat.collect_grads(model))
        return out

    def aggregate(grads):
        if path == "torch":
            fat.aggregate_grads(model, grads, "flag")
            return
        names = list(grads[0])
        G = np.stack([np.concatenate([gr[n].reshape(-1).numpy() for n in names])
                      for gr in grads])
        out = flagagg.flag_aggregate(G, backend="numba")
        start = 0
        for q in params:
            q.grad = torch.from_numpy(out[start:start + q.numel()]).reshape(q.shape)
            start += q.numel()

    fixed = worker_grads()

    def one():
        if kind == "agg":
            aggregate(fixed)
            return
        grads = worker_grads()
        if kind == "plain":
            for q, n in zip(params, grads[0], strict=True):
                q.grad = torch.stack([gr[n] for gr in grads]).mean(dim=0)
        else:
            aggregate(grads)
        opt.step()

    for _ in range(5):  # warm-up: compilation, caches, pools
        one()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - t0) / steps


def _spawn(kind, path, steps, n, env_extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in TAMED:
        env.pop(k, None)
    env.update(env_extra)
    procs = [subprocess.Popen([sys.executable, __file__, "--child", kind, path, str(steps)],
                              env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(n)]
    times = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"child {kind} {path} failed")
        times.append(float(out.strip().splitlines()[-1]))
    return statistics.mean(times)


def measure(steps=60, rounds=3, paths=("torch", "numba"), concurrent=4):
    """Seconds per step of every variant (medians over rounds) and the two ratios per path."""
    rows = {}
    for path in paths:
        runs = {"plain": [], "agg": [], "step": [], "step4": [], "tamed4": []}
        for _ in range(rounds):
            runs["plain"].append(_spawn("plain", path, steps, 1, {}))
            runs["agg"].append(_spawn("agg", path, steps, 1, {}))
            runs["step"].append(_spawn("step", path, steps, 1, {}))
            runs["step4"].append(_spawn("step", path, steps, concurrent, {}))
            runs["tamed4"].append(_spawn("step", path, steps, concurrent, TAMED))
        med = {k: statistics.median(v) for k, v in runs.items()}
        rows[path] = {**med, "alone": med["step"] / (med["plain"] + med["agg"]),
                      "loops": med["step4"] / med["tamed4"]}
    return rows


def main(argv=None):
    """Command line."""
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(_child(sys.argv[2], sys.argv[3], int(sys.argv[4])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paths", nargs="*", default=["torch", "numba"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    rows = measure(args.steps, args.rounds, tuple(args.paths))
    print(f"ms per step, median of {args.rounds} rounds; {os.cpu_count()} CPUs")
    print(f"{'path':<7}{'plain':>8}{'agg':>8}{'step':>8}{'alone':>8}"
          f"{'4 loops':>9}{'tamed':>8}{'4 loops/tamed':>15}")
    bad = False
    for path, r in rows.items():
        print(f"{path:<7}{1e3 * r['plain']:>8.2f}{1e3 * r['agg']:>8.2f}{1e3 * r['step']:>8.2f}"
              f"{r['alone']:>8.2f}{1e3 * r['step4']:>9.2f}{1e3 * r['tamed4']:>8.2f}"
              f"{r['loops']:>15.2f}")
        bad |= r["alone"] > TARGET or r["loops"] > TARGET
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
