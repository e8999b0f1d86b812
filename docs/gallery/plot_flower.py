"""
Federated learning with Flower under attack
===========================================

``docs/examples/flower_digits.py`` runs one Flower simulation (Ray backend)
of 15 clients, 3 of them Byzantine, each training a softmax regression on
its share of scikit-learn's digits. The server compares Flower's FedAvg
with :class:`flagagg.flower.RobustStrategy` for the Flag Aggregator and
Multi-Krum, with no attack, reversed updates, and "A little is enough"
(:doc:`/flower`). This page runs the script and draws the table it prints.
"""

# %%
# Running the simulation
# ----------------------
# Flower starts Ray workers, so the script runs in a process of its own.
# It needs the ``flower-sim`` extra.

import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

# docs/examples/, next to this gallery's folder: sphinx-gallery runs each
# example from its own folder (as does ``cd docs/gallery; python plot_flower.py``)
script = Path("..", "examples", "flower_digits.py").resolve()
env = dict(os.environ, RAY_DEDUP_LOGS="0")
proc = subprocess.run([sys.executable, str(script), "--rounds", "8"],
                      capture_output=True, text=True, check=True, env=env)
print(proc.stdout)

# %%
# The table it printed
# --------------------
# A header of strategy names, then one row per attack. Strategy names hold
# spaces only inside their parentheses, so a column is a run of non-blanks.

rows = [ln.split() for ln in proc.stdout.splitlines()]
header = next(i for i, r in enumerate(rows) if r[:1] == ["attack"])
strategies = rows[header][1:]
table = {}
for r in rows[header + 1:]:
    if len(r) != len(strategies) + 1:
        break
    table[r[0]] = [float(x) for x in r[1:]]
assert table, proc.stdout  # the script's output format changed

attacks = list(table)
x = np.arange(len(attacks))
width = 0.8 / len(strategies)
fig, ax = plt.subplots(figsize=(8, 3.6))
for k, name in enumerate(strategies):
    acc = [table[a][k] for a in attacks]
    bars = ax.bar(x + (k - (len(strategies) - 1) / 2) * width, acc, width,
                  label=name)
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
ax.set(xticks=x, xticklabels=attacks, ylim=(0, 1.1), ylabel="test accuracy",
       title="final global model, 15 clients, 3 Byzantine")
ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3,
          frameon=False, fontsize=8)
fig.tight_layout()

# %%
# FedAvg's average is ruined by the reversed updates; both robust
# strategies keep the model close to its accuracy without an attack.
