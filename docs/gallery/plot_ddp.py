"""
DistributedDataParallel with a faulty rank
==========================================

``docs/examples/ddp_hook.py`` trains one small network on 4 gloo ranks of
this machine's CPU, with PyTorch's ``DistributedDataParallel``. The last
rank is faulty: its communication hook multiplies its gradient bucket by
``-10`` before the aggregation. The script trains three times: with DDP's
plain all-reduce (the mean), and with :func:`flagagg.torch.ddp_comm_hook`
in its two modes (:doc:`/training-loop`), and rank 0 prints the test
accuracy of each. This page runs the script and draws what it printed.
"""

# %%
# Running the script
# ------------------
# Four processes, so it runs in a subprocess of its own (``torchrun`` would
# do the same). It needs the ``torch`` extra.

import re
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt

# docs/examples/, next to this gallery's folder: sphinx-gallery runs each
# example from its own folder (as does ``cd docs/gallery; python plot_ddp.py``)
script = Path("..", "examples", "ddp_hook.py").resolve()
out = subprocess.run([sys.executable, str(script), "--steps", "10"],
                     capture_output=True, text=True, check=True).stdout
print(out)

# %%
# The accuracies it printed
# -------------------------
# One line per aggregation: ``<name>  accuracy <value>[, <elements> ...]``.

lines = re.findall(r"^(.+?)\s+accuracy ([\d.]+)(?:, ([\d,]+) elements)?", out, re.M)
names = [name.strip() for name, _, _ in lines]
accuracy = [float(acc) for _, acc, _ in lines]
sent = [int(n.replace(",", "")) if n else None for _, _, n in lines]
assert len(lines) == 3, out  # the script's output format changed

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
colours = ["C3", "C0", "C2"]
ax1.barh(names, accuracy, color=colours)
for y, acc in enumerate(accuracy):
    ax1.text(acc + 0.01, y, f"{acc:.3f}", va="center")
ax1.set(xlim=(0, 1.15), xlabel="test accuracy after 10 steps",
        title="one rank of four sends -10 x its gradient")
ax1.invert_yaxis()
hooks = [(n, s) for n, s in zip(names, sent, strict=True) if s is not None]
ax2.bar([n.split(", ")[1] for n, _ in hooks], [s for _, s in hooks],
        color=colours[1:])
ax2.set(ylabel="elements sent per step", title="traffic of rank 0, flag hook")
fig.tight_layout()

# %%
# The mean follows the faulty rank and training goes the wrong way; both
# modes of the hook leave the same robust aggregate in every rank's
# ``.grad``. ``"sharded"`` sends about half of what ``"gather"`` sends,
# because each rank reduces one shard of the gradient instead of receiving
# all of it.
