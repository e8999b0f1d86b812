"""One honest worker training the MNIST-1D CNN: ``python one_worker.py ROUNDS LRS [BATCH]``.

LRS is a comma-separated list of learning rates; prints the test accuracy curve of each.
"""

import sys
import time

import torch

from flagagg import sim

torch.set_num_threads(1)
data = sim.load_dataset("mnist1d")
rounds = int(sys.argv[1])
lrs = [float(x) for x in sys.argv[2].split(",")]
bs = int(sys.argv[3]) if len(sys.argv) > 3 else 32
for lr in lrs:
    t = time.perf_counter()
    r = sim.simulate(data, "mean", workers=1, f=0, model="cnn1d",
                     model_params={"channels": (25, 25, 25)}, rounds=rounds, batch_size=bs,
                     lr=lr, eval_every=max(rounds // 10, 1), seed=0)
    curve = " ".join(f"{a:.3f}" for a in r.accuracy)
    print(f"lr={lr} bs={bs} rounds={rounds}: test acc {r.final_accuracy:.4f}  curve {curve}"
          f"  ({time.perf_counter() - t:.1f}s)", flush=True)
