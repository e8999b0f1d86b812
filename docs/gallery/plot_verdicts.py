"""
Who was named when: verdicts over a training run
================================================

Every aggregation result says, per worker, how much it counted
(``influence``: its signed share of the aggregate's squared norm) and a
short ``verdict``: ``trusted``, ``down-weighted``, ``not selected``,
``outsized``, ``pulls against`` or ``excluded`` (:doc:`/rules-and-attacks`). Recorded
round by round, they show which workers a rule listened to over a whole
run, and whether it named the faulty ones.
"""

# %%
# Recording the results of every round
# ------------------------------------
# :func:`flagagg.sim.simulate` accepts any callable ``(p, n) -> (n,)`` as
# its rule. This one runs the Flag Aggregator, keeps the result of each round
# and returns the aggregate. Three of the 15 workers are faulty (the
# simulator draws which from the seed; they are printed below). For the
# first 30 rounds they send reversed gradients, then they switch to "A
# little is enough", an attack that hides within the honest spread.

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap, TwoSlopeNorm

import flagagg
from flagagg import attacks, sim


class Recorder:
    """A rule that aggregates with ``rule`` and keeps every round's result."""

    def __init__(self, rule, **params):
        self.rule = flagagg.get_rule(rule, **params)
        self.results = []

    def __call__(self, G):
        """Aggregate the round's ``(p, n)`` gradients; keep the result."""
        result = self.rule(G, return_result=True)
        self.results.append(result)
        return result.aggregate


SWITCH = 30
calls = []


def reverse_then_alie(honest, f, *, rng=None, own=None):
    """Reversed gradients for SWITCH rounds, then "A little is enough"."""
    calls.append(1)
    if len(calls) <= SWITCH:
        return attacks.reverse(honest, f, rng=rng, own=own)
    return attacks.little_is_enough(honest, f, rng=rng, own=own)


attack = attacks.Attack(name="reverse, then ALIE", kind="gradient",
                        omniscient=True, func=reverse_then_alie)
# The models are tiny: one thread is faster than waking a pool of them for
# every small operation (several times faster on a busy machine).
torch.set_num_threads(1)
data = sim.load_dataset("digits")
rec = Recorder("flag")
run = sim.simulate(data, rec, f=3, attack=attack, workers=15, rounds=60,
                   eval_every=10, seed=0)
print("faulty workers:", run.faulty)
print("accuracy:", " ".join(f"{a:.3f}" for a in run.accuracy))
print()
print("round 1:")
print(rec.results[0].summary())

# %%
# The picture: one row per worker, one column per round
# -----------------------------------------------------
# Left, each worker's influence (blue counts for the output, red pulls
# against it, white is nothing); right, the verdict. The faulty workers'
# rows are labelled in red.

influence = np.array([r.influence for r in rec.results]).T      # (p, rounds)
names = ["trusted", "down-weighted", "not selected", "outsized", "pulls against", "excluded"]


def kind(verdict):
    """The verdict's class, one of ``names`` ("not selected, outsized" is outsized)."""
    if "outsized" in verdict:
        return names.index("outsized")
    return next(i for i, n in enumerate(names) if verdict.startswith(n))


verdicts = np.array([[kind(v) for v in r.verdict] for r in rec.results]).T
p, rounds = influence.shape

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
lim = np.abs(influence).max()
im = ax1.imshow(influence, aspect="auto", cmap="RdBu",
                norm=TwoSlopeNorm(0, -lim, lim), interpolation="nearest")
fig.colorbar(im, ax=ax1, label="influence (share of ||out||^2)")
colours = ListedColormap(["#4c9a2a", "#e3c84b", "#bbbbbb", "#8e44ad", "#c0392b", "#222222"])
ax2.imshow(verdicts, aspect="auto", cmap=colours, vmin=-0.5, vmax=len(names) - 0.5,
           interpolation="nearest")
for k, name in enumerate(names):
    ax2.bar(0, 0, color=colours(k), label=name)
ax2.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
for ax, title in ((ax1, "influence per round"), (ax2, "verdict per round")):
    ax.axvline(SWITCH - 0.5, color="k", ls=":", lw=1)
    ax.set(xlabel="round", title=title, yticks=range(p))
    ax.set_xticks(range(0, rounds, 10), range(1, rounds + 1, 10))
ax1.set_ylabel("worker")
for label in ax1.get_yticklabels():
    if int(label.get_text()) in run.faulty:
        label.set_color("C3")
        label.set_fontweight("bold")
fig.suptitle("Flag Aggregator, 15 workers: reversed gradients until round 30, "
             "then 'A little is enough'", fontsize=10)
fig.tight_layout()

# %%
# How often each worker was named
# -------------------------------
# A worker is *named* in a round when its verdict is ``outsized``,
# ``pulls against`` or ``excluded`` (``result.suspects``).

named = np.array([[i in r.suspects for i in range(p)] for r in rec.results])
first, second = named[:SWITCH].mean(axis=0), named[SWITCH:].mean(axis=0)
print(f"{'worker':>6} {'named, rounds 1-30':>19} {'named, rounds 31-60':>20}")
for i in range(p):
    mark = "  faulty" if i in run.faulty else ""
    print(f"{i:>6} {first[i]:>19.0%} {second[i]:>20.0%}{mark}")

# %%
# The reversed gradients are named in nearly every one of the first 30
# rounds (they point against the output), honest workers only now and then,
# when their minibatch gradient disagrees with the others. After the switch
# honest workers are named more often (up to a third of the rounds): late in
# training some minibatch gradients point against the consensus or are over
# three times the median norm ("outsized"), and with the attackers now close
# to the mean nothing else stands out. "A little is enough" is
# built to look like an honest worker: after round 30 the faulty workers are
# never named, and their three identical rows even carry the largest
# influence (left, the dark rows), because they sit close to the honest
# mean. Training is not hurt here (the accuracy above keeps rising: the
# shift is small for 15 workers), but the verdicts did not find the attack.
# Naming a worker is a diagnostic, not a proof, and not naming one is no
# proof of honesty.
