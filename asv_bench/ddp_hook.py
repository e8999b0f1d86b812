"""DDP hook benchmark: the flag hook's step time and traffic against DDP's all-reduce.

Run from a checkout: ``python asv_bench/ddp_hook.py [--world 4] [--steps 20]``.

``world`` gloo ranks on this machine (loopback, ``OMP_NUM_THREADS=1`` as
torchrun sets it) train two DDP replicas of the same model side by side,
one with DDP's default all-reduce and one with
``flagagg.torch.ddp_comm_hook(rule, mode)``, alternating steps so that load
hits both alike. Reported per model: median step time of each (forward,
backward with the communication, SGD step), their ratio, and the bytes each
rank sends to the others per step (``state.bytes_sent``: gradient shards and
the hook's own messages) against a ring all-reduce's ``2 n (p - 1) / p``
elements. Models: the issue's 5.6k MLP (20-64-64-2) and a 1.06M-parameter
MLP (512-1024-512-10). Target (issue 23): the hook's step at most
:data:`TARGET` times the all-reduce step on the model of 1M+ parameters;
the small MLP is reported.

Both replicas use DDP's default buckets (``bucket_cap_mb=25``, the first
bucket 1 MB): the hook sends each bucket's all-to-all as the bucket is
ready, so more, smaller buckets overlap more of the backward pass but each
costs two more all-to-alls; ``--bucket-cap-mb`` tries others.

``--against PATH`` adds a third replica with the hook of another version
of ``flagagg/torch/_ddp.py`` (say, main's, from ``git show
main:flagagg/torch/_ddp.py``), in the same rotation: the ratio of two hook
versions measured side by side, under the same load. Each row also gives
the CPU time per step of one rank (the whole process, all its threads;
median, mean over ranks): with more ranks than cores, that is what the
ranks queue for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1.3
MODELS = {"mlp-5.6k": (20, 64, 64, 2), "mlp-1.06M": (512, 1024, 512, 10)}


def _model(sizes):
    import torch

    torch.manual_seed(0)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _against_module(path):
    """Another version of ``flagagg/torch/_ddp.py``, loaded beside this one."""
    import importlib.util

    import flagagg.torch  # noqa: F401 - the package its relative imports resolve in

    spec = importlib.util.spec_from_file_location("flagagg.torch._ddp_against", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _rank(rank, world, store, out, steps, rule, mode, bucket_cap_mb=25.0, against=None):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import flagagg.torch as fat

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    hooks = {"hook": fat.ddp_comm_hook}
    if against:
        hooks["against"] = _against_module(against).ddp_comm_hook
    results = {}
    for name, sizes in MODELS.items():
        models = {"plain": DDP(_model(sizes), bucket_cap_mb=bucket_cap_mb)}
        states = {}
        for k, make in hooks.items():
            models[k] = DDP(_model(sizes), bucket_cap_mb=bucket_cap_mb)
            states[k], hook = make(rule, mode)
            models[k].register_comm_hook(states[k], hook)
        opts = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in models.items()}
        g = torch.Generator().manual_seed(rank)
        X = torch.randn(32, sizes[0], generator=g)
        y = torch.randint(0, sizes[-1], (32,), generator=g)
        times = {k: [] for k in models}
        cpu = {k: [] for k in models}
        order = list(models)
        for i in range(steps + 3):
            # every replica goes first, second, ... in turn: load hits all alike
            for k in order[i % len(order):] + order[:i % len(order)]:
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                opts[k].zero_grad()
                torch.nn.functional.cross_entropy(models[k](X), y).backward()
                opts[k].step()
                if i >= 3:  # warm-up: buckets rebuilt after the first step, kernels loaded
                    times[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.process_time() - c0)
        n = sum(q.numel() for q in models["plain"].parameters())
        state = states["hook"]
        state.elements_sent = state.bytes_sent = 0
        opts["hook"].zero_grad()
        torch.nn.functional.cross_entropy(models["hook"](X), y).backward()
        ring = 2 * n * (world - 1) / world
        results[name] = {"n": n, "elements_per_step": state.elements_sent,
                         "bytes_per_step": state.bytes_sent,
                         "ring": ring, "ring_bytes": 4 * ring}
        for k in models:
            results[name][k] = statistics.median(times[k])
            results[name][f"{k}_cpu"] = statistics.median(cpu[k])
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(results, fh)
    dist.destroy_process_group()


def measure(world=4, steps=20, rule="flag", mode="sharded", bucket_cap_mb=25.0, against=None):
    """Per model: median step times (max over ranks), ratios, CPU per step, elements sent."""
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, os.path.join(tmp, "store"), os.path.join(tmp, "out"),
                              steps, rule, mode, bucket_cap_mb, against), nprocs=world,
                 join=True)
        runs = [json.loads(Path(tmp, f"out.{r}").read_text()) for r in range(world)]
    rows = {}
    for name in MODELS:
        row = dict(runs[0][name])
        for k in ("plain", "hook", "against"):
            if k in row:
                row[k] = max(r[name][k] for r in runs)
                row[f"{k}_cpu"] = statistics.mean(r[name][f"{k}_cpu"] for r in runs)
        row["ratio"] = row["hook"] / row["plain"]
        if "against" in row:
            row["against_ratio"] = row["against"] / row["plain"]
        rows[name] = row
    return rows


def main(argv=None):
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rule", default="flag")
    parser.add_argument("--mode", default="sharded")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0)
    parser.add_argument("--against", default=None, metavar="PATH",
                        help="another version of flagagg/torch/_ddp.py, run side by side")
    parser.add_argument("--json", default=None)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    against = str(Path(args.against).resolve()) if args.against else None
    rows = measure(args.world, args.steps, args.rule, args.mode, args.bucket_cap_mb, against)
    print(f"{args.world} gloo ranks, {os.cpu_count()} CPUs; {args.rule} hook ({args.mode}) "
          "against DDP's all-reduce; median ms per step")
    print(f"{'model':<11}{'n':>10}{'all-reduce':>12}{'hook':>9}{'ratio':>7}{'target':>9}"
          f"{'bytes/rank/step':>17}{'ring all-reduce':>17}")
    bad = False
    for name, r in rows.items():
        target = r["n"] >= 1_000_000
        verdict = ("ok" if r["ratio"] <= TARGET else "MISSED") if target else "-"
        print(f"{name:<11}{r['n']:>10,}{1e3 * r['plain']:>12.2f}{1e3 * r['hook']:>9.2f}"
              f"{r['ratio']:>7.2f}{verdict:>9}{r['bytes_per_step']:>17,.0f}"
              f"{r['ring_bytes']:>17,.0f}")
        bad |= target and r["ratio"] > TARGET
    print("CPU ms per step and rank (whole process): "
          + "; ".join(f"{name} all-reduce {1e3 * r['plain_cpu']:.2f}, "
                      f"hook {1e3 * r['hook_cpu']:.2f}" for name, r in rows.items()))
    if against:
        print(f"against {args.against}: "
              + "; ".join(f"{name} {1e3 * r['against']:.2f} ms (ratio {r['against_ratio']:.2f}, "
                          f"CPU {1e3 * r['against_cpu']:.2f} ms); this hook / that one "
                          f"{r['hook'] / r['against']:.3f}" for name, r in rows.items()))
    print(f"target: hook / all-reduce <= {TARGET} for models of 1M+ parameters")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
