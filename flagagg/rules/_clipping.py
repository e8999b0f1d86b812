"""Centered clipping (Karimireddy, He and Jaggi, ICML 2021)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._array import Leaf, Stack, as_stack
from ..backends import Backend
from ._base import (
    GramRule,
    RuleResult,
    check_f,
    distance_exponent,
    finite_gram,
    finite_rows,
    unit_gram,
    validate_f,
)

__all__ = ["CenteredClipping", "centered_clipping_gram"]


def centered_clipping_gram(KA: np.ndarray, finite: np.ndarray, tau: float, n_iter: int,
                           has_center: bool) -> tuple[np.ndarray, float]:
    """Centered clipping on the augmented Gram matrix of ``[g_1, ..., g_p, v_0]``.

    Parameters
    ----------
    KA : ndarray of shape (p + 1, p + 1) or (p, p)
        Gram matrix of the inputs, with the starting center as a last row and
        column when ``has_center``. Rows of non-finite inputs are ignored.
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
    """
    p = finite.size
    KA = finite_gram(KA, np.append(finite, True) if has_center else finite)
    dA = np.diag(KA)
    # e = (c, a): the current center v = sum_i c_i g_i + a v_0.
    e = np.zeros(KA.shape[0])
    if has_center:
        e[p] = 1.0
    for _ in range(n_iter):
        t = KA @ e
        # ||g_i - v||^2 = K_ii - 2 (K e)_i + e^T K e
        d = np.sqrt(np.maximum(dA[:p] - 2.0 * t[:p] + e @ t, 0.0))
        with np.errstate(divide="ignore"):
            w = np.where(d > tau, tau / d, 1.0)
        # A non-finite input contributes nothing: it counts as an input
        # equal to the current center.
        w[~finite] = 0.0
        # v <- v + (1/p) sum_i w_i (g_i - v)
        e *= 1.0 - w.sum() / p
        e[:p] += w / p
    return e[:p], float(e[p]) if has_center else 0.0


class CenteredClipping(GramRule):
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
        ``p >= 2f + 1`` is checked.

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

    def __init__(self, tau: float = 1.0, n_iter: int = 1, center: Any = None,
                 f: int | None = None) -> None:
        if not np.isfinite(tau) or tau <= 0:
            raise ValueError(f"tau must be a finite number > 0 for {self.name}: got tau={tau}")
        if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
            raise ValueError(f"n_iter must be an integer >= 1 for {self.name}: got {n_iter!r}")
        if isinstance(center, str) and center != "previous":
            raise ValueError(
                f"center must be None, 'previous' or an array for {self.name}: got {center!r}"
            )
        self.tau = float(tau)
        self.n_iter = int(n_iter)
        self.center = center
        self.f = validate_f(self.name, f, required=False)

    def _start(self) -> Any:
        if isinstance(self.center, str):
            prev = getattr(self, "result_", None)
            return None if prev is None else prev.aggregate
        return self.center

    def _gram_only(self) -> bool:
        return self._start() is None

    def _check(self, p: int) -> None:
        if self.f is not None:
            check_f(self.name, self.f, p, 2 * self.f + 1, "p >= 2f + 1")

    def _coefficients(self, K: np.ndarray) -> tuple[np.ndarray, dict]:
        # The zero start: only the inputs' Gram matrix is needed.
        self._check(K.shape[0])
        finite, excluded = finite_rows(K)
        # In units of 2^E (E = 0 unless the inputs are huge or tiny), tau with them.
        E = distance_exponent(K)
        coef, _ = centered_clipping_gram(unit_gram(K, E), finite, float(np.ldexp(self.tau, -E)),
                                         self.n_iter, has_center=False)
        return coef, {"excluded": excluded, "n_iter": self.n_iter}

    def _aggregate(self, stack: Stack, backend: Backend) -> RuleResult:
        v0 = self._start()
        if v0 is None:
            return super()._aggregate(stack, backend)
        p = stack.p
        self._check(p)
        aug = _append_input(stack, v0, self.name)
        # Every iterate is an affine combination of the inputs and the center,
        # so the Gram of all of them shifted by a central one serves (exact
        # distances when they share a large common part).
        KA = aug.gram(backend, shift=True)
        finite_all, _ = finite_rows(KA)
        if not finite_all[p]:
            raise ValueError(f"{self.name}: the center holds NaN or Inf values")
        finite = finite_all[:p]
        excluded = tuple((int(i), why) for i, why in finite_rows(KA)[1] if i < p)
        E = distance_exponent(KA)
        coef, a = centered_clipping_gram(unit_gram(KA, E), finite, float(np.ldexp(self.tau, -E)),
                                         self.n_iter, has_center=True)
        out = aug.combine(backend, np.append(coef, a))
        return RuleResult(aggregate=out, rule=self.name, backend=backend.name, coefficients=coef,
                          excluded=excluded, n_iter=self.n_iter,
                          details={"center_weight": a})


def _append_input(stack: Stack, extra: Any, rule: str) -> Stack:
    """``stack`` with one more input, ``extra``, shaped like one input (array or pytree).

    The leaves become lists of rows (views, no copy of the inputs); the
    kernels then read them a cache-sized chunk at a time.
    """
    try:
        one = as_stack([extra])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{rule}: the center must be shaped like one input: {exc}") from None
    if one.library != stack.library:
        raise TypeError(
            f"{rule}: the center is a {one.library} array but the inputs are {stack.library}; "
            "nothing is converted silently"
        )
    if [leaf.shape for leaf in one.leaves] != [leaf.shape for leaf in stack.leaves]:
        raise ValueError(
            f"{rule}: the center must be shaped like one input: got leaves of shapes "
            f"{[leaf.shape for leaf in one.leaves]}, inputs have "
            f"{[leaf.shape for leaf in stack.leaves]}"
        )
    xp = stack.xp
    leaves = []
    for leaf, cleaf in zip(stack.leaves, one.leaves, strict=True):
        rows = ([leaf.block[i] for i in range(stack.p)] if leaf.block is not None
                else list(leaf.rows))
        extra_row = cleaf.block[0] if cleaf.block is not None else cleaf.rows[0]
        if extra_row.dtype != rows[0].dtype:
            extra_row = xp.astype(extra_row, rows[0].dtype)
        leaves.append(Leaf(leaf.shape, leaf.dtype_name, rows=rows + [extra_row]))
    return Stack(stack.p + 1, leaves, xp, stack.library, stack.device, stack.sample,
                 stack.unflatten)
