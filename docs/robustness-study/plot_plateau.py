"""Draw docs/_static/robustness_study_plateau.png from the plateau_*.json files.

They are written by `python -m flagagg.sim._study plateau`.
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

here = Path(__file__).parent
fig, ax = plt.subplots(figsize=(6.5, 3.8))
for name, label in (("study_iid_wm", "worker momentum 0.9, lr 0.5"),
                    ("study_iid_nowm", "server momentum 0.9, lr 0.05")):
    path = here / f"plateau_{name}.json"
    if not path.exists():
        continue
    d = json.loads(path.read_text())
    r, m, s = np.array(d["rounds"]), 100 * np.array(d["mean"]), 100 * np.array(d["std"])
    line, = ax.plot(r, m, label=f"{label}: plateau {100 * d['plateau_level']:.1f} % "
                               f"from round {d['plateau_round']}")
    ax.fill_between(r, m - s, m + s, alpha=0.2, color=line.get_color())
    ax.axvline(d["plateau_round"], color=line.get_color(), ls=":", lw=1)
ax.set_xlabel("round")
ax.set_ylabel("validation accuracy (%)")
ax.set_ylim(0, 100)
ax.set_title("MNIST-1D, cnn1d, p = 15, iid, mean, no attack (4 validation seeds)", fontsize=9)
ax.legend(fontsize=7, loc="lower right")
fig.tight_layout()
fig.savefig(here.parent / "_static" / "robustness_study_plateau.png", dpi=110)
