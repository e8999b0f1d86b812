"""
What the Flag Aggregator sees
=============================

The Flag Aggregator (FA) normalises every worker's gradient to a unit
direction ``h_i``, finds the ``r``-dimensional subspace that explains those
directions best in the robust, square-root sense, and combines the workers
according to how well the subspace explains each of them
(:doc:`/flag-aggregator`). In two and three dimensions all of that can be
drawn.
"""

# %%
# Seven workers in the plane, two of them faulty
# ----------------------------------------------
# Five honest gradients point roughly the same way; worker 5 sends a large
# reversed gradient and worker 6 an unrelated one. With ``r=1`` the
# subspace is a line through the origin. ``return_result=True`` gives the
# diagnostics: the reconstruction ratio ``v_i`` (how much of ``h_i`` lies on
# the line, 1 for a reversed vector too), the coefficients ``c_i`` of the
# output ``sum_i c_i g_i`` and the verdict per worker.

import matplotlib.pyplot as plt
import numpy as np

import flagagg

rng = np.random.default_rng(3)
angle = np.deg2rad(30 + rng.normal(0, 8, 5))
honest = np.c_[np.cos(angle), np.sin(angle)] * rng.uniform(0.8, 1.2, (5, 1))
G = np.vstack([honest, [[-3.0, -1.5]], [[-0.4, 1.1]]])  # 5: reversed x3, 6: off

res = flagagg.flag_aggregate(G, r=1, return_result=True)
print(res.summary())

# The basis of the subspace, as combinations of the inputs (see FlagResult).
Y = G.T @ res.basis_coefficients           # (2, 1), orthonormal
print("Y^T Y =", (Y.T @ Y).round(6).ravel(), "| direction", Y.ravel().round(3))

# %%
# The picture: each arrow is a worker's gradient, coloured by its
# reconstruction ratio; the grey line is the subspace, the black arrow FA's
# output and the dashed one the plain mean, which the reversed worker drags
# backwards.

fig, (ax, bars) = plt.subplots(1, 2, figsize=(9, 4),
                               gridspec_kw={"width_ratios": [1.2, 1]})
line = np.outer([-3.5, 3.5], Y[:, 0])
ax.plot(line[:, 0], line[:, 1], color="0.75", lw=6, zorder=0,
        label="FA subspace (r = 1)")
cmap = plt.get_cmap("viridis")
for i, g in enumerate(G):
    ax.annotate("", g, (0, 0), arrowprops={"arrowstyle": "->", "lw": 2,
                                           "color": cmap(res.reconstruction_ratios[i])})
    ax.text(*(g * 1.08), str(i), ha="center", va="center", fontsize=9)
out, mean = res.aggregate, G.mean(axis=0)
ax.annotate("", out, (0, 0), arrowprops={"arrowstyle": "-|>", "lw": 2.5, "color": "k"})
ax.annotate("", mean, (0, 0),
            arrowprops={"arrowstyle": "-|>", "lw": 2, "color": "C3", "ls": "--"})
ax.plot([], [], "k-", lw=2.5, label="FA output")
ax.plot([], [], "C3--", lw=2, label="mean")
ax.set(xlim=(-3.5, 1.8), ylim=(-2, 1.8), aspect="equal",
       title="gradients, coloured by ratio v_i")
ax.legend(loc="lower right", fontsize=8)
fig.colorbar(plt.cm.ScalarMappable(cmap=cmap), ax=ax, shrink=0.8, label="v_i")

x = np.arange(len(G))
bars.bar(x - 0.2, res.reconstruction_ratios, 0.4, label="ratio v_i")
bars.bar(x + 0.2, res.coefficients / np.abs(res.coefficients).max(), 0.4,
         label="c_i (scaled to max 1)")
bars.axhline(0, color="k", lw=0.8)
bars.set(xticks=x, xlabel="worker", title="what each worker counts for")
bars.legend(fontsize=8)
fig.tight_layout()

# %%
# Worker 6, nearly orthogonal to the line, has a ratio near 0 and counts
# for almost nothing. Worker 5 lies on the line (ratio 1: FA looks at
# directions, not signs), so FA keeps it, with a *negative* coefficient:
# ``c_5 g_5`` points the honest way, and the verdict ``pulls against`` says
# that the raw gradient opposes the output. The mean is dragged off the
# honest direction and shortened; FA's output is not.
#
# Nine workers in space, a plane for a subspace
# ---------------------------------------------
# In three dimensions with ``r=2`` the subspace is a plane. Seven honest
# gradients lie near a plane, fanned out within it (minibatch gradients
# disagree); two faulty ones stick out of it. The angle between two planes
# is their largest principal angle, from the singular values of
# ``B^T Y`` for orthonormal bases ``B`` and ``Y``.

rng = np.random.default_rng(0)
basis = np.linalg.qr(rng.normal(size=(3, 2)))[0]          # the honest plane
fan = np.deg2rad(np.linspace(-70, 70, 7) + rng.normal(0, 5, 7))
honest = ((np.c_[np.cos(fan), np.sin(fan)] * rng.uniform(0.8, 1.2, (7, 1)))
          @ basis.T + rng.normal(0, 0.05, size=(7, 3)))
normal = np.cross(basis[:, 0], basis[:, 1])
faulty = np.vstack([1.3 * normal + 0.3 * basis[:, 1],
                    -1.1 * normal + 0.5 * basis[:, 0]])
G3 = np.vstack([honest, faulty])


def angle_to_honest(result):
    """Largest principal angle (degrees) between the result's plane and B."""
    Y = G3.T @ result.basis_coefficients
    cos = np.linalg.svd(basis.T @ Y, compute_uv=False).min()
    return np.degrees(np.arccos(min(cos, 1.0)))


res3 = flagagg.flag_aggregate(G3, r=2, return_result=True)
pca = flagagg.flag_aggregate(G3, r=2, max_iter=1, return_result=True)
Y3 = G3.T @ res3.basis_coefficients
print(f"FA's plane is {angle_to_honest(res3):.1f} degrees from the honest one;"
      f" PCA's (max_iter=1) {angle_to_honest(pca):.1f}")
print("ratios v_i:", res3.reconstruction_ratios.round(2))
print("verdicts of the faulty workers 7, 8:", res3.verdict[7:])

fig = plt.figure(figsize=(6.5, 5.5))
ax = fig.add_subplot(projection="3d")
s, t = np.meshgrid(np.linspace(-1.5, 1.5, 2), np.linspace(-1.5, 1.5, 2))
plane = Y3[:, 0, None, None] * s + Y3[:, 1, None, None] * t
ax.plot_surface(*plane, alpha=0.2, color="C0")
colors = cmap(res3.reconstruction_ratios)
ax.quiver(0, 0, 0, *G3.T, color=colors, arrow_length_ratio=0.08, lw=2)
ax.quiver(0, 0, 0, *res3.aggregate, color="k", arrow_length_ratio=0.1, lw=3)
for i, g in enumerate(G3):
    ax.text(*(g * 1.1), str(i), fontsize=8)
ax.set(xlim=(-1.5, 1.5), ylim=(-1.5, 1.5), zlim=(-1.5, 1.5),
       title="FA's plane (blue), gradients by ratio, output in black")
ax.view_init(elev=18, azim=-60)
fig.tight_layout()

# %%
# FA's plane is the honest one to within a few degrees, and the two faulty
# workers, far from it, have small ratios; PCA of the same directions (one
# step, uniform weights) tilts several times further towards them. FA's
# one reweighting step is what makes the difference.
