"""Robust data-parallel training on torch.distributed with the Flag Aggregator.

Every rank computes a gradient on its own shard of the data; the ranks
exchange their gradients with ``all_gather``, and every rank aggregates the
same ``p`` gradients with the same deterministic rule, so the model replicas
stay identical without a parameter server. The last ``--faulty`` ranks are
Byzantine: they send ``-10`` times their gradient.

Run it with, e.g.::

    python allgather_flag.py --workers 4 --faulty 1

It trains softmax regression on a synthetic 3-class problem once with the
plain mean and once with the Flag Aggregator, and prints the accuracy of each
and whether the replicas ended identical.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import flagagg


def make_data(workers: int, rank: int):
    """The whole data set (same on every rank) and this rank's shard of it."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(workers * 200, 20, generator=gen)
    y = (X @ torch.randn(20, 3, generator=gen)).argmax(dim=1)
    return X, y, X[rank::workers], y[rank::workers]


def train(rule, args, rank: int) -> tuple[float, float]:
    """Train one model with ``rule``; return its accuracy and a checksum of it."""
    X, y, Xs, ys = make_data(args.workers, rank)
    torch.manual_seed(0)  # the same initial model on every rank
    model = torch.nn.Linear(20, 3)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9)
    batches = torch.Generator().manual_seed(1 + rank)  # each rank its own minibatches
    for _ in range(args.steps):
        idx = torch.randint(0, ys.numel(), (32,), generator=batches)
        grads = torch.autograd.grad(F.cross_entropy(model(Xs[idx]), ys[idx]), params)
        flat = torch.cat([g.reshape(-1) for g in grads])
        if rank >= args.workers - args.faulty:
            flat = -10.0 * flat  # a Byzantine rank
        gathered = [torch.empty_like(flat) for _ in range(args.workers)]
        dist.all_gather(gathered, flat)
        g = rule(torch.stack(gathered))  # (p, n) -> (n,), the same on every rank
        start = 0
        for p in params:
            p.grad = g[start : start + p.numel()].view_as(p).clone()
            start += p.numel()
        opt.step()
    with torch.no_grad():
        acc = float((model(X).argmax(dim=1) == y).float().mean())
        checksum = float(sum(p.double().sum() for p in params))
    return acc, checksum


def worker(rank: int, args, init_file: str) -> None:
    """One rank: join the group, train with each rule, report from rank 0."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=args.workers)
    rules = {
        "mean": flagagg.get_rule("mean"),
        # rescale: the output on the gradients' scale, so one lr suits both rules
        "flag": flagagg.FlagAggregator(max_iter=2, rescale="median_norm"),
    }
    for name, rule in rules.items():
        acc, checksum = train(rule, args, rank)
        sums = [torch.zeros(1, dtype=torch.float64) for _ in range(args.workers)]
        dist.all_gather(sums, torch.tensor([checksum], dtype=torch.float64))
        same = all(float(s) == checksum for s in sums)
        if rank == 0:
            print(f"{name:>4}: accuracy {acc:.3f}, replicas identical: {same}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    """Parse the arguments and start the ranks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--faulty", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        # fork starts the ranks quickly on Linux; use "spawn" where fork is unavailable
        mp.start_processes(worker, args=(args, init_file), nprocs=args.workers, join=True,
                           start_method="fork")


if __name__ == "__main__":
    main()
