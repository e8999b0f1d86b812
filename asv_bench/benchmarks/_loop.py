"""The training loop of the thread benchmarks: an 8-worker MLP that aggregates every step.

Shared by ``asv_bench/threads.py`` (whole processes, ``make bench``) and the
asv suite (``bench_training.py``, one process).
"""

from __future__ import annotations

WORKERS = 8


def make_loop(path: str) -> dict:
    """``{"plain", "agg", "step"}`` callables of one loop; ``path`` is "torch" or "numba".

    ``plain``: the 8 workers' gradients averaged by torch, SGD step;
    ``agg``: the aggregation alone on fixed gradients; ``step``: the 8
    workers' gradients aggregated by the Flag Aggregator, SGD step. The
    "torch" path is ``flagagg.torch.aggregate_grads`` on the tensors (torch
    backend); "numba" aggregates the flattened gradients as a NumPy array.
    """
    import numpy as np
    import torch

    import flagagg
    import flagagg.torch as fat

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 2))  # 5,634 parameters
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

    def plain():
        grads = worker_grads()
        for q, n in zip(params, grads[0], strict=True):
            q.grad = torch.stack([gr[n] for gr in grads]).mean(dim=0)
        opt.step()

    def step():
        aggregate(worker_grads())
        opt.step()

    return {"plain": plain, "agg": lambda: aggregate(fixed), "step": step}
