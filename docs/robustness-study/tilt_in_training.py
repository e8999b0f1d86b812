"""The fixed subspace tilt in training, a first look (not part of the study).

fa_ablation's setting (digits, MLP, Dirichlet(0.3) shards, p = 15, f = 3, 200
rounds, its tuned learning rates), 7 rules, seeds 0 and 1, against no attack,
A Little Is Enough, IPM, optimal ALIE and the fixed tilt. Output:
tilt_in_training.txt. Run: python docs/robustness-study/tilt_in_training.py
"""

from flagagg import sim
from flagagg.sim._experiment import run_experiment

base = sim.load_config("fa_ablation")
keep_rules = ["flag", "nnm-flag", "mean", "median", "trimmed_mean", "multi_krum",
              "geometric_median"]
d = base.to_dict()
d["rules"] = {k: v for k, v in d["rules"].items() if k in keep_rules}
d["attacks"] = {"none": {}, "lie": {"attack": "little_is_enough"},
                "ipm": {"attack": "fall_of_empires", "params": {"eps": 0.1}},
                "opt-lie": {"attack": "optimal_little_is_enough"},
                "tilt": {"attack": "flag_tilt"}}
d["experiment"]["seeds"] = [0, 1]
cfg = sim.parse_config(d)
res = run_experiment(cfg, output="results/tilt_in_training", plots=False, progress=False)
print(res.table())
