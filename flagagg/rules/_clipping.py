"""Centered clipping (Karimireddy, He and Jaggi, ICML 2021)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._array import Stack
from .._gram import Gram
from .._validation import Anything, Int, Real, check_choice
from ..backends import Backend
from ._base import NothingLeftError, Rule, append_input, in_unit, unit_distances
from ._contract import F_OPTIONAL, Contract, Outcome, Reference, Solution, Space, WorkerStats
from ._result import linear_stats

__all__ = ["CenteredClipping", "centered_clipping_gram"]


def centered_clipping_gram(KA: Gram, finite: np.ndarray, tau: float, n_iter: int,
                           has_center: bool) -> tuple[np.ndarray, float]:
    """Centered clipping on the augmented Gram matrix of ``[g_1, ..., g_p, v_0]``.

    Parameters
    ----------
    KA : Gram of shape (p + 1, p + 1) or (p, p)
        Gram matrix of the inputs, with the starting center as a last row and column when
        ``has_center`` (then it may be shifted; otherwise it must not be).
        Rows of non-finite inputs are ignored.
    finite : ndarray of bool, shape (p,)
    tau, n_iter
        As in :class:`CenteredClipping`.
    has_center : bool
        Whether ``KA`` has the center row; otherwise ``v_0 = 0``.

    Returns
    -------
    coef : ndarray of shape (p,)
        The result is ``a v_0 + sum_i coef_i g_i``...
    a : float
        ...with this weight on the starting center.

    Notes
    -----
    The iterates are written ``v = v_0 + sum_i b_i u_i`` with ``u_i`` the
    direction of ``g_i - v_0`` and lengths in units of ``tau``: each clipped
    difference is then at most 1 long whatever ``||g_i||`` is (no squared
    norm is formed), so an input at 1e300 is clipped like one at 10.
    """
    p = finite.size
    idx = np.flatnonzero(finite)
    if has_center:
        n, t, U = KA.relative_unit(np.append(idx, p), r=idx.size)
        n, t, U = n[:-1], t[:-1], U[:-1, :-1]
    else:
        n, t, U = KA.relative_unit(idx, r=None)
    s = in_unit(n, t, tau)  # ||g_i - v_0|| / tau, +inf beyond float64
    far = np.isinf(s)
    b = np.zeros(idx.size)
    for _ in range(n_iter):
        d = unit_distances(s, U, b)
        # (g_i - v) min(1, tau / ||g_i - v||) in units of tau is (s_i u_i - v) w_i with
        # w_i = min(1, 1 / d_i); a point too far for float64 gives u_i - 0 v (its limit).
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(d > 1.0, 1.0 / d, 1.0)
            pull = np.where(far, 1.0, np.where(d > 1.0, s / d, s))
        w[far] = 0.0
        # v <- v + (1/p) sum_i w_i (g_i - v); a non-finite input counts as one equal
        # to the current center (it contributes nothing, the 1/p keeps counting it).
        b = b * (1.0 - w.sum() / p) + pull / p
    with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
        c = np.where((n > 0) & ~far, b / s, 0.0)
    coef = np.zeros(p)
    coef[idx] = c
    return coef, float(1.0 - c.sum()) if has_center else 0.0


class CenteredClipping(Rule):
    r"""Centered clipping: move a center by the mean of the clipped differences to it.

    Parameters
    ----------
    tau : float, default=1.0
        Clipping radius (``> 0``), in the units of the inputs. Tune it to
        the spread of honest inputs.
    n_iter : int, default=1
        Clipping iterations ``L`` (the paper shows one suffices when the
        center is the previous round's aggregate).
    center : None, "previous", or array or pytree, default=None
        Starting center ``v_0``: ``None`` is the zero vector; ``"previous"``
        is this rule's output of the previous call (zero on the first call);
        an array (or pytree) shaped like one input, e.g. the previous round's
        aggregate or momentum.
    f : int, optional
        Byzantine inputs tolerated; the rule does not use it. When given,
        ``p >= 2f + 1`` is checked (and :func:`flagagg.get_rule` passes it
        to pre-aggregation steps).

    Notes
    -----
    Karimireddy, He and Jaggi, "Learning from history for Byzantine robust
    optimization", ICML 2021:

    .. math::

        v_{l+1} = v_l + \frac{1}{p} \sum_i (g_i - v_l)
                  \min\left(1, \frac{\tau}{\|g_i - v_l\|}\right).

    Every ``v_l`` is a combination of the inputs and ``v_0``, and the
    distances are quadratic forms in the Gram matrix of the inputs and
    ``v_0`` (one pass over the data; with ``v_0`` an array, it joins the
    inputs in that pass), then one combination pass.

    NaN policy: inputs holding NaN or Inf are excluded (listed in
    ``result.excluded``); each counts as an input equal to the current
    center, i.e. it contributes nothing to a step, and the ``1 / p`` keeps
    counting it. A non-finite array ``center`` is a ValueError.

    State: with ``center="previous"`` (and only then) the rule is stateful
    by definition: ``previous_`` holds the last output, the next call's
    start. Such a rule object belongs to one training run and one thread;
    ``reset()`` forgets the previous output. Every other configuration is
    stateless.

    Examples
    --------
    >>> import numpy as np, flagagg
    >>> G = np.array([[1.0, 0.0], [1.2, 0.0], [0.8, 0.0], [100.0, 0.0]])
    >>> cc = flagagg.get_rule("centered_clipping", tau=0.5, n_iter=20,
    ...                       center=np.array([1.0, 0.0]))
    >>> np.round(cc(G, backend="numpy"), 4)
    array([1.1667, 0.    ])
    """

    name = "centered_clipping"
    contract = Contract(
        params={"tau": Real(low=0.0, strict=True), "n_iter": Int(low=1),
                "center": Anything('None, "previous", or an array or pytree shaped like one '
                                   "input"),
                "f": F_OPTIONAL},
        nan_policy="inputs holding NaN or Inf are excluded (listed in result.excluded); each "
        "counts as an input equal to the current center (it contributes nothing to a step, "
        "the 1/p keeps counting it). A non-finite array center is a ValueError",
        cost="one pass for the Gram matrix of the inputs (and an array center), O(p²) per "
        "clipping iteration, one combination pass",
        reference=Reference(("Karimireddy", "He", "Jaggi"),
                            "Learning from history for Byzantine robust optimization",
                            "ICML", 2021),
        space="gram",
    )

    def __init__(self, tau: float = 1.0, n_iter: int = 1, center: Any = None,
                 f: int | None = None) -> None:
        if isinstance(center, str):
            check_choice("center", center, ("previous",), owner=self.name)
        self._store(tau=tau, n_iter=n_iter, center=center, f=f)

    @property
    def space(self) -> Space:
        """``"gram"`` from the zero center; ``"vector"`` when the center is data."""
        return "gram" if self._start() is None else "vector"

    def _start(self) -> Any:
        if isinstance(self.center, str):
            return getattr(self, "previous_", None)
        return self.center

    def _remember(self, out: Any) -> None:
        if isinstance(self.center, str):
            self.previous_ = out

    def reset(self) -> None:
        """Forget the previous output (``center="previous"`` starts from zero again)."""
        self.__dict__.pop("previous_", None)

    def _solve_gram(self, K: Gram) -> Solution:
        # The zero start: only the inputs' Gram matrix is needed.
        self.usable(K)
        coef, _ = centered_clipping_gram(K, K.usable, self.tau, self.n_iter, has_center=False)
        return Solution(coefficients=coef, excluded=K.excluded, n_iter=self.n_iter)

    def _solve_stack(self, stack: Stack, backend: Backend) -> Outcome:
        v0 = self._start()
        if v0 is None:
            return super()._solve_stack(stack, backend)
        p = stack.p
        aug = append_input(stack, v0, self.name)
        # Every iterate is an affine combination of the inputs and the center,
        # so the Gram of all of them shifted by a central one serves (exact
        # distances when they share a large common part).
        KA = aug.gram(backend, shift=True)
        if not KA.usable[p]:
            raise ValueError(f"{self.name}: the center holds NaN or Inf values")
        finite = KA.usable[:p]
        excluded = tuple((i, why) for i, why in KA.excluded if i < p)
        if not finite.any():
            raise NothingLeftError(self.name, p, excluded)
        coef, a = centered_clipping_gram(KA, finite, self.tau, self.n_iter, has_center=True)
        e = np.append(coef, a)
        out = aug.combine(backend, e)
        # Each input against the output from the augmented (unshifted) Gram: no extra pass.
        st = linear_stats(KA.inputs, e)
        stats = WorkerStats(st.cosine[:p], st.share[:p], st.norms[:p], st.out_ok)
        return Outcome(out, Solution(coefficients=coef, excluded=excluded, n_iter=self.n_iter,
                                     details={"center_weight": a}), stats=stats)
