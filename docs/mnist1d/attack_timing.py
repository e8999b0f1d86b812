"""CPU time per round of each attack at p = 15, f = 3 on the MNIST-1D CNN (5,210 parameters)."""

import time

import torch

from flagagg import sim
from flagagg.attacks import get_attack
from flagagg.training._replica import Replica
from flagagg.training._step import rule_for_attack

torch.set_num_threads(1)
data = sim.load_dataset("mnist1d")
rep = Replica(data, workers=15, f=3, seed=0, model="cnn1d",
              model_params={"channels": (25, 25, 25)})
flat = rep.initial_parameters()
idx = rep.draw_batches(32)
none = get_attack("none")
t = time.process_time()
for _ in range(20):
    G = rep.gradients(flat, idx, none, list(range(15)))
grad_s = (time.process_time() - t) / 20
print(f"n_params {rep.n_params}; 15 worker gradients per round: {1e3 * grad_s:.1f} ms CPU")
H = G[3:]


for rule_name in ("median", "flag"):
    agg = sim.build_rule(rule_name, 3)
    agg(G.numpy())
    t = time.process_time()
    for _ in range(20):
        agg(G.numpy())
    print(f"rule {rule_name}: {1e3 * (time.process_time() - t) / 20:.2f} ms CPU per aggregation")
    for name in ("little_is_enough", "fall_of_empires", "min_max", "min_sum",
                 "optimal_little_is_enough", "optimal_fall_of_empires"):
        a = get_attack(name)
        if a.defence_aware:
            a = a.with_rule(rule_for_attack(agg, "numpy", "numpy"))
        elif rule_name != "median":
            continue
        a(H, 3, rng=0)
        reps = 5 if a.defence_aware else 20
        t = time.process_time()
        for _ in range(reps):
            a(H, 3, rng=0)
        against = f" (against {rule_name})" if a.defence_aware else ""
        print(f"  {name:26s} {1e3 * (time.process_time() - t) / reps:8.2f} ms CPU per round"
              + against)
