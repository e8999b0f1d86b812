"""DistributedDataParallel with flagagg's communication hook, on 4 gloo ranks (CPU).

Every rank trains the same small network on its own data; the last rank is
faulty and sends -10 times its gradient. With the plain DDP all-reduce (the
mean) training goes the wrong way; with ``flagagg.torch.ddp_comm_hook``
every rank's ``loss.backward()`` leaves the same robust aggregate in
``.grad``. Run it with::

    python ddp_hook.py --steps 20
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import flagagg.torch

WORLD = 4


def data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes in 20 dimensions, ``n`` samples drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    X = torch.randn(n, 20, generator=g) + (2 * y[:, None] - 1) * torch.linspace(-1, 1, 20)
    return X, y


def train(rank: int, mode: str | None, steps: int) -> tuple[float, object]:
    """Train this rank's replica (``mode`` None: the plain all-reduce); return accuracy, state."""
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 2)))
    state = None
    if mode is not None:
        state, hook = flagagg.torch.ddp_comm_hook("flag", mode)
        model.register_comm_hook(state, hook)  # exactly as documented: no wrapper
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    X, y = data(rank, 64 * steps)
    for i in range(steps):
        opt.zero_grad()
        batch = slice(64 * i, 64 * (i + 1))
        loss = torch.nn.functional.cross_entropy(model(X[batch]), y[batch])
        if rank == WORLD - 1:
            loss = -10.0 * loss  # the fault: this rank's gradient, reversed, x10
        loss.backward()
        opt.step()
    Xt, yt = data(999, 2000)
    with torch.no_grad():
        acc = (model(Xt).argmax(1) == yt).float().mean().item()
    return acc, state


def worker(rank: int, store: str, steps: int) -> None:
    """One rank: join the gloo group, train with each aggregation, rank 0 prints."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD)
    for mode in (None, "sharded", "gather"):
        acc, state = train(rank, mode, steps)
        if rank == 0:
            name = "plain all-reduce (mean)" if mode is None else f"flag hook, {mode}"
            sent = "" if state is None else f", {state.elements_sent / steps:,.0f} elements " \
                                            "sent per step by rank 0"
            print(f"{name:24s} accuracy {acc:.3f}{sent}")
            if state is not None:
                print(f"{'':24s} last step: suspects {state.suspects}, verdicts {state.verdict}")
    dist.destroy_process_group()


def main() -> None:
    """Spawn the 4 ranks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on 127.0.0.1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "store"), args.steps), nprocs=WORLD)


if __name__ == "__main__":
    main()
