"""The subspace tilt against every rule on a synthetic stack (p = 15, f = 3).

Cosine between each rule's output and the honest mean (1 = unharmed, below 0 =
pointing uphill), for the attacks that turn outputs: the stack of
tests/test_attack_flag.py (12 honest rows of 2,000 coordinates, cosine 0.3 to a
shared direction, norms spread over [0.5, 2]). Defence-aware attacks search
against the rule in the row. Run: python docs/robustness-study/fa_attack_table.py
"""

import math

import numpy as np

import flagagg
from flagagg.attacks import get_attack

P, F, N, C = 15, 3, 2000, 0.3
rng = np.random.default_rng(0)
mu = rng.normal(size=N)
mu /= np.linalg.norm(mu)
noise = rng.normal(size=(P - F, N)) / math.sqrt(N)
norms = rng.uniform(0.5, 2.0, size=(P - F, 1))
H = (C * mu + math.sqrt(1 - C * C) * noise) * norms
hm = H.mean(axis=0)

RULES = ["mean", "flag", "nnm-flag", "median", "trimmed_mean", "meamed", "phocas", "krum",
         "multi_krum", "bulyan", "geometric_median", "centered_clipping", "mda"]
ATTACKS = [("none", "none"), ("ALIE", "little_is_enough"), ("IPM", "fall_of_empires"),
           ("opt-ALIE", "optimal_little_is_enough"), ("opt-IPM", "optimal_fall_of_empires"),
           ("min-max", "min_max"), ("min-sum", "min_sum"), ("tilt", "flag_tilt"),
           ("opt-tilt", "optimal_flag_tilt"), ("Fang-Krum", "fang_krum"),
           ("Fang-TM", "fang_trimmed_mean"), ("small-pert", "small_perturbation")]


def rule_of(label):
    """The rule with this label as a (p, n) -> (n,) function (nnm-X: NNM, then X)."""
    name, pre = (label[4:], ["nnm"]) if label.startswith("nnm-") else (label, None)
    if name == "mean" and pre is None:
        return lambda X: X.mean(axis=0)
    return lambda X: flagagg.aggregate(X, name, f=F, pre=pre, backend="numpy")


def cos(a):
    """Cosine between a row and the honest mean."""
    return float(a @ hm / (np.linalg.norm(a) * np.linalg.norm(hm)))


print(f"{'rule':<18}" + "".join(f"{a:>11}" for a, _ in ATTACKS))
for label in RULES:
    rule = rule_of(label)
    cells = []
    for _, name in ATTACKS:
        attack = get_attack(name)
        if attack.defence_aware:
            attack = attack.with_rule(rule)
        rows = attack(H, F, rng=1, own=H[:F])
        cells.append(cos(rule(np.vstack([H, rows]))))
    print(f"{label:<18}" + "".join(f"{c:>11.2f}" for c in cells), flush=True)
