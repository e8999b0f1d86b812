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

And the same 4-loop ratio with DDP (``ddp``): four gloo ranks (separate
processes, ``OMP_NUM_THREADS=1``) train the same MLP under
``DistributedDataParallel`` with the sharded flag hook registered as the
docs say, against the same four ranks with threads tamed by hand (target
<= 1.15).

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
sys.path.insert(0, str(Path(__file__).resolve().parent))
TARGET = 1.15
WORKERS = 8
TAMED = {"OMP_WAIT_POLICY": "PASSIVE", "NUMBA_NUM_THREADS": "1"}


def _child(kind: str, path: str, steps: int) -> float:
    """Run ``steps`` steps of one variant in this process; return seconds per step."""
    from benchmarks._loop import make_loop

    one = make_loop(path)[kind]
    for _ in range(5):  # warm-up: compilation, caches, pools
        one()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - t0) / steps


def _ddp_child(rank: int, world: int, store: str, steps: int) -> float:
    """One DDP rank with the flag hook: seconds per step (forward, backward, SGD)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import flagagg.torch as fat

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 2)))  # 5,634 parameters
    state, hook = fat.ddp_comm_hook("flag")
    model.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    X = torch.randn(64, 20, generator=g)
    y = torch.randint(0, 2, (64,), generator=g)

    def one():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()

    for _ in range(5):  # warm-up: buckets rebuilt after the first step, kernels loaded
        one()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    elapsed = (time.perf_counter() - t0) / steps
    dist.destroy_process_group()
    return elapsed


def _spawn_ddp(steps, world, env_extra):
    """Seconds per step of ``world`` DDP ranks started as torchrun would (mean over ranks)."""
    import tempfile

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    for k in TAMED:
        env.pop(k, None)
    env.update(env_extra)
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [subprocess.Popen([sys.executable, __file__, "--ddp-child", str(r), str(world),
                                   store, str(steps)], env=env, stdout=subprocess.PIPE,
                                  text=True) for r in range(world)]
        times = []
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode:
                raise RuntimeError("DDP rank failed")
            times.append(float(out.strip().splitlines()[-1]))
    return statistics.mean(times)


def measure_ddp(steps=60, rounds=3, world=4):
    """The DDP variant: 4 ranks with the flag hook, default threads against tamed by hand."""
    runs = {"step4": [], "tamed4": []}
    for _ in range(rounds):
        runs["step4"].append(_spawn_ddp(steps, world, {}))
        runs["tamed4"].append(_spawn_ddp(steps, world, TAMED))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {**med, "loops": med["step4"] / med["tamed4"]}


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


def format_rst(rows, note=""):
    """The table for the docs."""
    head = ("path", "plain (ms)", "aggregation (ms)", "step (ms)", "alone",
            "4 loops (ms)", "4 tamed (ms)", "4 loops / tamed")
    body = [(p, f"{1e3 * r['plain']:.2f}", f"{1e3 * r['agg']:.2f}", f"{1e3 * r['step']:.2f}",
             f"{r['alone']:.2f}", f"{1e3 * r['step4']:.2f}", f"{1e3 * r['tamed4']:.2f}",
             f"{r['loops']:.2f}") for p, r in rows.items()]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    rule = "  ".join("=" * w for w in widths)

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([note, "", rule, line(head), rule, *map(line, body), rule, ""])


def main(argv=None):
    """Command line."""
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(_child(sys.argv[2], sys.argv[3], int(sys.argv[4])))
        return 0
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--ddp-child":
        print(_ddp_child(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paths", nargs="*", default=["torch", "numba", "ddp"],
                        help="torch, numba (a .grad loop each), ddp (4 DDP ranks, flag hook)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--rst", default=None, help="write the table as reST to this file")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    rows = measure(args.steps, args.rounds, tuple(p for p in args.paths if p != "ddp"))
    ddp = measure_ddp(args.steps, args.rounds) if "ddp" in args.paths else None
    if args.rst:
        Path(args.rst).write_text(format_rst(
            rows, f".. generated by python asv_bench/threads.py --steps {args.steps} "
                  f"--rounds {args.rounds}"))
    print(f"ms per step, median of {args.rounds} rounds; {os.cpu_count()} CPUs")
    print(f"{'path':<7}{'plain':>8}{'agg':>8}{'step':>8}{'alone':>8}"
          f"{'4 loops':>9}{'tamed':>8}{'4 loops/tamed':>15}")
    bad = False
    for path, r in rows.items():
        print(f"{path:<7}{1e3 * r['plain']:>8.2f}{1e3 * r['agg']:>8.2f}{1e3 * r['step']:>8.2f}"
              f"{r['alone']:>8.2f}{1e3 * r['step4']:>9.2f}{1e3 * r['tamed4']:>8.2f}"
              f"{r['loops']:>15.2f}")
        bad |= r["alone"] > TARGET or r["loops"] > TARGET
    if ddp is not None:
        print(f"{'ddp':<7}{'':>8}{'':>8}{'':>8}{'':>8}{1e3 * ddp['step4']:>9.2f}"
              f"{1e3 * ddp['tamed4']:>8.2f}{ddp['loops']:>15.2f}")
        bad |= ddp["loops"] > TARGET
    print(f"targets: alone <= {TARGET}, 4 loops / tamed <= {TARGET}")
    if args.json:
        Path(args.json).write_text(json.dumps({**rows, **({"ddp": ddp} if ddp else {})},
                                              indent=1))
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
