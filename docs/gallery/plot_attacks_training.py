"""
Training under attack, rule by rule
===================================

Fifteen simulated workers train a logistic regression on scikit-learn's
handwritten digits (:doc:`/simulation`); three of them are faulty. For
each attack, every rule trains the same model from the same start on the
same minibatches (runs are paired by the seed), so the curves differ only
by how the rule aggregates.
"""

# %%
# The runs
# --------
# Five rules against four gradient attacks and one data fault, plus no
# attack for reference: 30 short runs of 40 rounds.

import matplotlib.pyplot as plt
import numpy as np
import torch

from flagagg import sim

# The models are tiny: one thread is faster than waking a pool of them for
# every small operation (several times faster on a busy machine).
torch.set_num_threads(1)
data = sim.load_dataset("digits")
rules = ["mean", "flag", "median", "multi_krum", "geometric_median"]
attacks = ["none", "reverse", "random", "little_is_enough", "fall_of_empires",
           "label_flip"]

runs = {}
for attack in attacks:
    for rule in rules:
        runs[attack, rule] = sim.simulate(
            data, rule, f=3, attack=attack, workers=15, rounds=40,
            eval_every=5, lr=0.1, seed=0)

short = {"multi_krum": "m-krum", "geometric_median": "geo-med"}
print(f"{'final accuracy':<18}" + "".join(f"{short.get(r, r):>9}" for r in rules))
for attack in attacks:
    cells = "".join(f"{runs[attack, r].final_accuracy:9.3f}" for r in rules)
    print(f"{attack:<18}{cells}")

# %%
# Accuracy curves
# ---------------
# One panel per attack, one curve per rule. A run whose parameters stop
# being finite counts as accuracy 0 from then on.

fig, axes = plt.subplots(2, 3, figsize=(11, 6), sharex=True, sharey=True)
for ax, attack in zip(axes.flat, attacks, strict=True):
    for k, rule in enumerate(rules):
        run = runs[attack, rule]
        ax.plot(run.rounds, run.accuracy, label=rule, color=f"C{k}",
                lw=2.5 if rule == "flag" else 1.3)
    ax.set_title(attack, fontsize=10)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
for ax in axes[-1]:
    ax.set_xlabel("round")
for ax in axes[:, 0]:
    ax.set_ylabel("test accuracy")
handles, labels = axes.flat[0].get_legend_handles_labels()
fig.legend(handles, labels, loc="lower center", ncol=len(rules), frameon=False)
fig.suptitle("digits, 15 workers, 3 faulty: accuracy per rule under each attack")
fig.tight_layout(rect=(0, 0.06, 1, 1))

# %%
# Each rule's worst case
# ----------------------
# What a rule guarantees is its worst case over the attacks it may meet.

worst = np.array([[runs[a, r].final_accuracy for a in attacks[1:]] for r in rules])
order = np.argsort(worst.min(axis=1))[::-1]
fig, ax = plt.subplots(figsize=(7, 3.2))
im = ax.imshow(worst[order], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
ax.set(xticks=range(len(attacks) - 1), yticks=range(len(rules)),
       yticklabels=[rules[i] for i in order])
ax.set_xticklabels(attacks[1:], rotation=25, ha="right")
for (i, j), acc in np.ndenumerate(worst[order]):
    ax.text(j, i, f"{acc:.2f}", ha="center", va="center", fontsize=8)
fig.colorbar(im, ax=ax, label="final accuracy")
ax.set_title("final accuracy (rows: best worst case first)")
fig.tight_layout()

# %%
# This is one seed of a small problem with one learning rate for every
# rule: :doc:`/simulation` shows how to run grids over seeds and tune the
# learning rate per rule, which a fair comparison needs.
