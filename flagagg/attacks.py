"""Byzantine behaviours: what faulty workers send instead of their gradient.

Two kinds of fault are modelled.

* **Gradient attacks** replace the rows of the faulty workers. Each is a pure
  function ``attack(honest, f, *, rng, own=None, **params) -> (f, n) array``.
  ``honest`` holds the honest workers' gradients of the round (omniscient
  attacks read it), ``own`` the gradients the ``f`` faulty workers would have
  sent had they been honest (attacks that distort a worker's own gradient read
  it; without it they distort the honest mean). The rows come back in the
  library, device and float dtype of ``honest``.
* **Data faults** change what a faulty worker trains on; its gradient then
  reaches the aggregator as it is. Each is a pure function
  ``fault(X, y, *, rng, n_classes, **params) -> (X, y)``.

Adaptive attacks search their parameter every round: ``min_max`` and
``min_sum`` from the honest rows alone (omniscient), the ``optimal_*``
variants by calling the rule under test on candidate rows (defence-aware:
``Attack.defence_aware`` is true and :meth:`Attack.with_rule` binds the
rule). Each docstring states its cost per round.

Randomness comes only from ``rng`` (a :class:`numpy.random.Generator`, or an
int seed), drawn in NumPy and then moved to the input's library, so a seed
gives the same rows for NumPy and PyTorch inputs.

``get_attack(name, **params)`` returns an :class:`Attack` with its parameters
bound, ``available_attacks()`` lists the names.
"""

from __future__ import annotations

import inspect
import math
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as _device

from ._validation import check_choice, check_int, check_real
from .rules._contract import Reference

__all__ = [
    "Attack",
    "attack_parameters",
    "available_attacks",
    "distorted_data",
    "fall_of_empires",
    "gaussian",
    "get_attack",
    "label_flip",
    "little_is_enough",
    "little_is_enough_z",
    "mimic",
    "min_max",
    "min_sum",
    "no_attack",
    "non_finite",
    "optimal_fall_of_empires",
    "optimal_little_is_enough",
    "partial_drop",
    "random_gradients",
    "reverse",
]


# --------------------------------------------------------------------------
# helpers


def _check_gradients(honest, f, own=None):
    """Validate the common inputs of a gradient attack and return ``xp``."""
    xp = array_namespace(honest)
    if getattr(honest, "ndim", None) != 2:
        raise ValueError(
            f"honest must be a 2-D array of shape (p_honest, n): got shape "
            f"{tuple(getattr(honest, 'shape', ()))}"
        )
    check_int("f", f, owner="an attack (the number of faulty rows)", low=0)
    if own is not None:
        if array_namespace(own) is not xp:
            raise TypeError("own and honest must come from the same array library")
        if tuple(own.shape) != (int(f), honest.shape[1]):
            raise ValueError(
                f"own must have shape (f, n) = ({f}, {honest.shape[1]}): got {tuple(own.shape)}"
            )
    return xp


def _need_honest(honest, name):
    if honest.shape[0] == 0:
        raise ValueError(f"{name} needs at least one honest row to work from: got none")


def _rng(rng) -> np.random.Generator:
    # default_rng returns a Generator unchanged and seeds one from an int.
    return np.random.default_rng(rng)


def _like(xp, values: np.ndarray, like):
    """Move a NumPy array to ``like``'s library, device and dtype."""
    return xp.asarray(values, dtype=like.dtype, device=_device(like))


def _repeat_row(xp, row, f):
    """Stack ``f`` copies of a 1-D array into an (f, n) array."""
    return xp.broadcast_to(row[None, :], (int(f), row.shape[0])) * 1


def _std0(xp, x):
    """Column standard deviations (``ddof=0``) of a 2-D array, ``xp.std(x, axis=0)``.

    PyTorch's ``std`` over the first axis of a short, wide tensor runs a
    Welford reduction across rows that costs about 20 times the arithmetic on
    a CPU (1.4 ms for the 12 x 5,210 rows of an MNIST-1D round, more than the
    rule itself). For a torch tensor this takes the two-pass formula
    ``sqrt(mean((x - mean(x))**2))`` in float64 instead: exact where a
    one-pass variance would cancel (rows at an offset of 1e8), no overflow
    for float32 rows of 1e30, and rounded once to the input's dtype. Other
    arrays keep their library's ``std``.
    """
    if type(x).__module__.split(".")[0] != "torch" or x.dtype.is_complex:
        return xp.std(x, axis=0)
    import torch

    wide = x.to(torch.float64) if x.dtype != torch.float64 else x
    d = wide - wide.mean(dim=0)
    return torch.sqrt((d * d).mean(dim=0)).to(x.dtype)


def _base(xp, honest, f, own):
    """The gradients a distorting attack starts from: ``own`` or the honest mean."""
    if own is not None:
        return own
    return _repeat_row(xp, xp.mean(honest, axis=0), f)


# --------------------------------------------------------------------------
# the parameters every gradient attack shares, documented once


HONEST = "Gradients of the honest workers."
HONEST_SHAPE = "Gradients of the honest workers; only their shape and dtype are used."
HONEST_OMNISCIENT = "Gradients of the honest workers (omniscient attack)."
RNG_SIGNATURE = "Unused; accepted so that every attack has the same signature."
RNG_SOURCE = "Source of randomness; pass one for repeatable rows."
RNG_DETERMINISTIC = "Unused: the search is deterministic."
OWN = "The faulty workers' own gradients. Without it, the honest mean."
OWN_HONEST = "The faulty workers' own honest gradients. Without it, the honest mean."
UNUSED = "Unused."


# Where the attacks come from, declared once (the docs' attacks table reads them).
FLAG_PAPER = Reference(("Almasi", "Mishra", "Vamanan", "Ravi"),
                       "Flag Aggregator: scalable distributed training under failures and "
                       "augmented losses using convex optimization (experiments)", "ICLR", 2024)
ALIE = Reference(("Baruch", "Baruch", "Goldberg"), "A little is enough: circumventing defenses "
                 "for distributed learning", "NeurIPS", 2019)
FOE = Reference(("Xie", "Koyejo", "Gupta"), "Fall of empires: breaking Byzantine-tolerant SGD "
                "by inner product manipulation", "UAI", 2019)
BUCKETING = Reference(("Karimireddy", "He", "Jaggi"), "Byzantine-robust learning on "
                      "heterogeneous datasets via bucketing", "ICLR", 2022)
MIN_MAX = Reference(("Shejwalkar", "Houmansadr"), "Manipulating the Byzantine: optimizing "
                    "model poisoning attacks and defenses for federated learning", "NDSS", 2021)


def _cites(reference: Reference):
    """Declare the publication an attack comes from (``func.reference``)."""
    def mark(func):
        func.reference = reference
        return func
    return mark


def _entry(name: str, kind: str, text: str) -> str:
    body = textwrap.fill(text, width=88, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return f"{name} : {kind}\n{body}"


def _gradient_doc(*, honest: str, rng: str, own: str):
    """Fill the ``{gradient_parameters}`` and ``{own}`` lines of a gradient attack's docstring.

    Every gradient attack takes ``honest, f, rng`` first and ``own`` last; their
    numpydoc entries are written here once, with the one sentence that differs.
    """
    common = "\n    ".join([
        _entry("honest", "array of shape (p_honest, n)", honest),
        _entry("f", "int", "Number of faulty rows to return."),
        _entry("rng", "numpy.random.Generator or int, optional", rng),
    ])

    def fill(func):
        if func.__doc__:  # None under python -OO
            func.__doc__ = (func.__doc__.replace("{gradient_parameters}", common)
                            .replace("{own}", _entry("own", "array of shape (f, n), optional",
                                                     own)))
        return func

    return fill


# --------------------------------------------------------------------------
# gradient attacks


@_gradient_doc(honest=HONEST, rng=RNG_SIGNATURE, own=OWN_HONEST)
def no_attack(honest, f, *, rng=None, own=None):
    """Faulty workers behave honestly (the "none" baseline).

    Parameters
    ----------
    {gradient_parameters}
    {own}

    Returns
    -------
    rows : array of shape (f, n)
        A copy of ``own``, or ``f`` copies of the honest mean.
    """
    xp = _check_gradients(honest, f, own)
    if own is None:
        _need_honest(honest, "no_attack without own")
    return _base(xp, honest, f, own) * 1


@_gradient_doc(honest=HONEST_SHAPE, rng=RNG_SOURCE, own=UNUSED)
@_cites(FLAG_PAPER)
def random_gradients(honest, f, *, rng=None, scale=1.0, own=None):
    """Uniformly random gradients (the paper's "random" workers).

    Parameters
    ----------
    {gradient_parameters}
    scale : float, default=1.0
        Each coordinate is drawn independently from U(-scale, scale).
    {own}

    Returns
    -------
    rows : array of shape (f, n)
    """
    xp = _check_gradients(honest, f, own)
    check_real("scale", scale, owner="random_gradients", low=0.0)
    values = _rng(rng).uniform(-scale, scale, size=(int(f), honest.shape[1]))
    return _like(xp, values, honest)


@_gradient_doc(honest=HONEST_SHAPE, rng=RNG_SOURCE, own=UNUSED)
def gaussian(honest, f, *, rng=None, loc=0.0, scale=1.0, own=None):
    """Gaussian noise gradients, each coordinate drawn from N(loc, scale^2).

    Parameters
    ----------
    {gradient_parameters}
    loc : float, default=0.0
        Mean of every coordinate.
    scale : float, default=1.0
        Standard deviation of every coordinate.
    {own}

    Returns
    -------
    rows : array of shape (f, n)
    """
    xp = _check_gradients(honest, f, own)
    check_real("loc", loc, owner="gaussian")
    check_real("scale", scale, owner="gaussian", low=0.0)
    values = _rng(rng).normal(loc, scale, size=(int(f), honest.shape[1]))
    return _like(xp, values, honest)


@_gradient_doc(honest=HONEST, rng=UNUSED, own="The faulty workers' own gradients, ``g``. "
               "Without it, ``g`` is the honest mean (an omniscient variant).")
@_cites(FLAG_PAPER)
def reverse(honest, f, *, rng=None, scale=-10.0, own=None):
    """Reversed (sign-flipped and scaled) gradients: ``scale * g``.

    The paper's "reversed" workers send ``-10 g``, where ``g`` is the gradient
    they computed honestly; ``scale=-1`` is the plain sign flip.

    Parameters
    ----------
    {gradient_parameters}
    scale : float, default=-10.0
        Multiplier applied to the gradient.
    {own}

    Returns
    -------
    rows : array of shape (f, n)
        ``scale * own`` (or ``scale`` times the honest mean, repeated).
    """
    xp = _check_gradients(honest, f, own)
    check_real("scale", scale, owner="reverse")
    if own is None:
        _need_honest(honest, "reverse without own")
    return scale * _base(xp, honest, f, own)


@_gradient_doc(honest=HONEST, rng="Chooses the dropped coordinates; pass one for repeatable rows.",
               own=OWN)
def partial_drop(honest, f, *, rng=None, fraction=0.5, own=None):
    """Gradients with a random fraction of their coordinates set to zero.

    Models workers whose messages lose part of their payload. Every row loses
    exactly ``round(fraction * n)`` coordinates, chosen independently per row.

    Parameters
    ----------
    {gradient_parameters}
    fraction : float, default=0.5
        Fraction of coordinates zeroed, in [0, 1].
    {own}

    Returns
    -------
    rows : array of shape (f, n)
    """
    xp = _check_gradients(honest, f, own)
    check_real("fraction", fraction, owner="partial_drop", low=0.0)
    if fraction > 1.0:
        raise ValueError(f"need fraction <= 1 for partial_drop: got fraction={fraction:g}")
    if own is None:
        _need_honest(honest, "partial_drop without own")
    n = honest.shape[1]
    k = int(round(fraction * n))
    gen = _rng(rng)
    drop = np.zeros((int(f), n), dtype=bool)
    for i in range(int(f)):
        drop[i, gen.choice(n, size=k, replace=False)] = True
    base = _base(xp, honest, f, own)
    mask = xp.asarray(drop, device=_device(honest))
    return xp.where(mask, xp.zeros_like(base), base)


def little_is_enough_z(p, f):
    """The perturbation size of "A Little Is Enough" for ``p`` workers, ``f`` faulty.

    Parameters
    ----------
    p : int
        Total number of workers (honest and faulty).
    f : int
        Number of faulty workers.

    Returns
    -------
    z : float

    Notes
    -----
    Baruch et al. (2019) pick the largest ``z`` for which enough honest
    workers still look farther from the mean than the attackers:
    ``s = floor(p / 2 + 1) - f`` and ``z = Phi^{-1}((p - s) / p)``, with
    ``Phi`` the standard normal CDF. When ``s <= 0`` the formula has no
    finite answer and ``z`` must be given.
    """
    s = math.floor(p / 2 + 1) - f
    if s <= 0 or s >= p:
        raise ValueError(
            f"the A Little Is Enough formula needs 0 < floor(p/2 + 1) - f < p: got p={p}, "
            f"f={f} (s={s}); pass z explicitly"
        )
    return NormalDist().inv_cdf((p - s) / p)


@_gradient_doc(honest=HONEST_OMNISCIENT, rng=UNUSED, own=UNUSED)
@_cites(ALIE)
def little_is_enough(honest, f, *, rng=None, z=None, own=None):
    """A Little Is Enough (Baruch et al., 2019): ``mean - z * std`` of the honest rows.

    All faulty workers send the same vector, shifted from the honest
    coordinate-wise mean by ``z`` honest standard deviations, small enough to
    pass as honest for statistics-based rules yet consistently biased.

    Parameters
    ----------
    {gradient_parameters}
    z : float, optional
        Size of the shift in standard deviations. By default it comes from the
        paper's formula with ``p = p_honest + f`` (see
        :func:`little_is_enough_z`).
    {own}

    Returns
    -------
    rows : array of shape (f, n)
        ``f`` copies of ``mean(honest) - z * std(honest)``, the standard
        deviation taken with ``ddof=0``.
    """
    xp = _check_gradients(honest, f, own)
    _need_honest(honest, "little_is_enough")
    check_real("z", z, owner="little_is_enough", none=True)
    if z is None:
        z = little_is_enough_z(honest.shape[0] + int(f), int(f))
    mu = xp.mean(honest, axis=0)
    sigma = _std0(xp, honest)
    return _repeat_row(xp, mu - z * sigma, f)


@_gradient_doc(honest=HONEST_OMNISCIENT, rng=UNUSED, own=UNUSED)
@_cites(FOE)
def fall_of_empires(honest, f, *, rng=None, eps=0.1, own=None):
    """Fall of Empires / inner-product manipulation (Xie et al., 2019): ``-eps * mean``.

    All faulty workers send the honest mean scaled by ``-eps``. A small ``eps``
    hides among the honest rows while pulling the inner product of the
    aggregate with the true gradient towards zero or below.

    Parameters
    ----------
    {gradient_parameters}
    eps : float, default=0.1
        Scale of the reversed mean.
    {own}

    Returns
    -------
    rows : array of shape (f, n)
    """
    xp = _check_gradients(honest, f, own)
    _need_honest(honest, "fall_of_empires")
    check_real("eps", eps, owner="fall_of_empires")
    return _repeat_row(xp, -eps * xp.mean(honest, axis=0), f)


@_gradient_doc(honest=HONEST_OMNISCIENT, rng=UNUSED, own=UNUSED)
@_cites(BUCKETING)
def mimic(honest, f, *, rng=None, target=0, own=None):
    """Mimic: every faulty worker copies one honest worker's gradient.

    Over-weights one worker's data, which hurts when the data are not iid
    (Karimireddy et al., 2022). Keep ``target`` fixed across rounds.

    Parameters
    ----------
    {gradient_parameters}
    target : int, default=0
        Index of the honest row to copy.
    {own}

    Returns
    -------
    rows : array of shape (f, n)
    """
    xp = _check_gradients(honest, f, own)
    p_h = honest.shape[0]
    check_int("target", target, owner="mimic", low=0)
    if target >= p_h:
        raise ValueError(f"target must index an honest row, 0 <= target < {p_h}: got {target}")
    return _repeat_row(xp, honest[target, :], f)


@_gradient_doc(honest=HONEST_SHAPE, rng=UNUSED, own=UNUSED)
def non_finite(honest, f, *, rng=None, value=math.nan, own=None):
    """Rows full of NaN (or Inf): crashed or corrupted workers.

    Parameters
    ----------
    {gradient_parameters}
    value : float, default=nan
        The value of every coordinate, e.g. ``nan``, ``inf`` or ``-inf``.
    {own}

    Returns
    -------
    rows : array of shape (f, n)
    """
    xp = _check_gradients(honest, f, own)
    return xp.full((int(f), honest.shape[1]), value, dtype=honest.dtype, device=_device(honest))


# --------------------------------------------------------------------------
# adaptive attacks
#
# The two Shejwalkar and Houmansadr attacks are omniscient (they read the
# honest rows); the two "optimal" ones are also defence-aware: they call the
# rule under test on candidate rows. Their searches are bounded and take no
# random numbers, so a round's rows depend only on its inputs.

_PERTURBATIONS = ("std", "sign", "unit")


def _perturbation(xp, mu, H, kind):
    """The direction of a Shejwalkar and Houmansadr attack, float64."""
    if kind == "std":
        return -_std0(xp, H)
    if kind == "sign":
        return -xp.sign(mu)
    if kind == "unit":
        norm = float(xp.sqrt(xp.sum(mu * mu)))
        # a zero mean has no direction; the attack then sends the mean
        return -mu / norm if norm > 0 else mu * 0.0
    check_choice("perturbation", kind, _PERTURBATIONS)
    raise AssertionError(kind)  # pragma: no cover - check_choice raised


def _largest_feasible(feasible, steps, doublings):
    """The largest gamma >= 0 with ``feasible(gamma)``, for a feasible set [0, b].

    The upper end is first bracketed by doubling from 1 (at most
    ``doublings`` times), then bisected ``steps`` times; the value returned
    was checked feasible. At most ``doublings + steps + 1`` calls.
    """
    lo, hi = 0.0, 1.0
    for _ in range(doublings):
        if not feasible(hi):
            break
        lo, hi = hi, 2.0 * hi
    else:
        if feasible(hi):
            return hi
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if feasible(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _check_search(steps, doublings):
    check_int("steps", steps, owner="the search", low=0)
    check_int("doublings", doublings, owner="the search", low=0)


def _shejwalkar(honest, f, own, perturbation, steps, doublings, name, objective):
    xp = _check_gradients(honest, f, own)
    _need_honest(honest, name)
    _check_search(steps, doublings)
    H = xp.astype(honest, xp.float64)
    mu = xp.mean(H, axis=0)
    p = _perturbation(xp, mu, H, perturbation)
    value, bound = objective(xp, H)
    gamma = _largest_feasible(lambda g: value(mu + g * p) <= bound, steps, doublings)
    row = xp.astype(mu + gamma * p, honest.dtype)
    return _repeat_row(xp, row, f)


def _sq_dists(xp, x, H):
    d = H - x[None, :]
    return xp.sum(d * d, axis=1)


def _pairwise_sq(xp, H):
    # exact differences, not the Gram identity: rows far from the origin would
    # lose their small distances to cancellation
    return xp.stack([_sq_dists(xp, H[i, :], H) for i in range(H.shape[0])])


@_gradient_doc(honest=HONEST, rng=RNG_DETERMINISTIC, own=UNUSED)
@_cites(MIN_MAX)
def min_max(honest, f, *, rng=None, perturbation="std", steps=30, doublings=40, own=None):
    """Min-Max (Shejwalkar and Houmansadr, 2021): the farthest shift that stays close to all.

    Every faulty worker sends ``mean + gamma * p``, with ``p`` a perturbation
    direction and ``gamma`` the largest value for which the malicious row is
    no farther from any honest row than the two farthest honest rows are from
    each other: ``max_i ||g_m - g_i|| <= max_{i,j} ||g_i - g_j||`` (the
    NDSS 2021 paper's aggregation-agnostic Min-Max).

    Knowledge model: omniscient (reads the honest gradients of the round);
    it does not call the rule.

    Parameters
    ----------
    {gradient_parameters}
    perturbation : {"std", "sign", "unit"}, default="std"
        ``p``: minus the coordinate-wise standard deviation of the honest
        rows, minus the sign of their mean, or minus their mean scaled to
        unit norm (the paper's inverse std, inverse sign and inverse unit
        vector).
    steps : int, default=30
        Bisection steps once ``gamma`` is bracketed; the result is within
        ``upper / 2**steps`` of the largest feasible ``gamma``.
    doublings : int, default=40
        At most this many doublings from ``gamma = 1`` to bracket it; if
        ``2**doublings`` is still feasible (e.g. ``p = 0``) it is used.
    {own}

    Returns
    -------
    rows : array of shape (f, n)
        ``f`` copies of the malicious row. ``gamma = 0`` (the honest mean) is
        always feasible, so the constraint holds for the rows returned (up
        to rounding to the input dtype).

    Notes
    -----
    Cost: one pass over the honest pairs (``p_honest**2 * n``) and at most
    ``doublings + steps + 1`` distance checks (``p_honest * n`` each); no
    rule evaluations. The search runs in float64.
    """
    def objective(xp, H):
        bound = float(xp.max(_pairwise_sq(xp, H)))
        return (lambda x: float(xp.max(_sq_dists(xp, x, H)))), bound

    return _shejwalkar(honest, f, own, perturbation, steps, doublings, "min_max", objective)


@_gradient_doc(honest=HONEST, rng=RNG_DETERMINISTIC, own=UNUSED)
@_cites(MIN_MAX)
def min_sum(honest, f, *, rng=None, perturbation="std", steps=30, doublings=40, own=None):
    """Min-Sum (Shejwalkar and Houmansadr, 2021): a shift whose total squared distance is honest.

    Every faulty worker sends ``mean + gamma * p`` with the largest
    ``gamma`` for which the malicious row's sum of squared distances to the
    honest rows is at most the largest such sum of an honest row:
    ``sum_i ||g_m - g_i||^2 <= max_k sum_i ||g_k - g_i||^2`` (the NDSS 2021
    paper's aggregation-agnostic Min-Sum).

    Knowledge model: omniscient (reads the honest gradients of the round);
    it does not call the rule.

    Parameters
    ----------
    {gradient_parameters}
    perturbation : {"std", "sign", "unit"}, default="std"
        The direction ``p``, as for :func:`min_max`.
    steps : int, default=30
        Bisection steps once ``gamma`` is bracketed.
    doublings : int, default=40
        At most this many doublings from ``gamma = 1`` to bracket it.
    {own}

    Returns
    -------
    rows : array of shape (f, n)
        ``f`` copies of the malicious row; ``gamma = 0`` is always feasible.

    Notes
    -----
    Cost: one pass over the honest pairs and at most ``doublings + steps +
    1`` distance checks; no rule evaluations. The search runs in float64.
    """
    def objective(xp, H):
        bound = float(xp.max(xp.sum(_pairwise_sq(xp, H), axis=1)))
        return (lambda x: float(xp.sum(_sq_dists(xp, x, H)))), bound

    return _shejwalkar(honest, f, own, perturbation, steps, doublings, "min_sum", objective)


def _golden_max(objective, lo, hi, steps):
    """Golden-section search for the largest ``objective`` on [lo, hi]: ``steps`` calls."""
    inv = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - inv * (b - a), a + inv * (b - a)
    fc, fd = objective(c), objective(d)
    best = max((fc, -c, c), (fd, -d, d))
    for _ in range(max(steps - 2, 0)):
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - inv * (b - a)
            fc = objective(c)
            best = max(best, (fc, -c, c))
        else:
            a, c, fc = c, d, fd
            d = a + inv * (b - a)
            fd = objective(d)
            best = max(best, (fd, -d, d))
    return best


def _line_search(objective, grid, refine, log):
    """Maximise ``objective`` over a sorted grid, then refine around the best point.

    Returns ``(value, parameter)``; ties go to the smaller parameter. Calls
    ``objective`` ``len(grid) + refine`` times at most (``refine`` only when
    ``refine >= 2``). With ``log`` the refinement works on log(parameter).
    """
    scores = [objective(x) for x in grid]
    k = max(range(len(grid)), key=lambda i: (scores[i], -grid[i]))
    best = (scores[k], -grid[k], grid[k])
    if refine >= 2 and len(grid) > 1:
        lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
        if log and lo > 0:
            fv, _, y = _golden_max(lambda y: objective(math.exp(y)), math.log(lo),
                                   math.log(hi), refine)
            best = max(best, (fv, -math.exp(y), math.exp(y)))
        else:
            best = max(best, _golden_max(objective, lo, hi, refine))
    return best[0], best[2]


def _check_grid(name, lo, hi, points, refine, positive):
    check_real("min", lo, owner=name)
    check_real("max", hi, owner=name)
    if not (lo < hi and (lo > 0 or not positive)):
        raise ValueError(f"{name} needs finite bounds with {'0 < ' if positive else ''}min < max: "
                         f"got ({lo!r}, {hi!r})")
    check_int("points", points, owner=name, low=2)
    check_int("refine", refine, owner=name, low=0)


def _damage(xp, honest, f, rule, make_row):
    """The objective of the optimal attacks: ``||rule(honest + f candidates) - mean||``."""
    if rule is None:
        raise ValueError(
            "this attack calls the rule under test and none was given: bind one with "
            "attack.with_rule(rule) (flagagg.sim.simulate does this itself) or pass rule=..."
        )
    mu = xp.mean(honest, axis=0)
    mu64 = xp.astype(mu, xp.float64)

    def objective(param):
        rows = xp.concat([honest, _repeat_row(xp, make_row(param), f)], axis=0)
        out = xp.asarray(rule(rows))
        d = xp.astype(out, xp.float64) - mu64
        value = float(xp.sqrt(xp.sum(d * d)))
        # a rule that returns NaN for these rows is not damaged in a measurable way
        return value if math.isfinite(value) else -math.inf

    return objective


@_gradient_doc(honest=HONEST, rng=RNG_DETERMINISTIC, own=UNUSED)
@_cites(ALIE)
def optimal_little_is_enough(honest, f, *, rng=None, rule=None, z_min=0.0, z_max=10.0,
                             points=11, refine=8, own=None):
    """A Little Is Enough with ``z`` chosen each round against the rule (Baruch et al., 2019).

    All faulty workers send ``mean - z * std`` of the honest rows, as in
    :func:`little_is_enough`, but ``z`` maximises
    ``||rule(honest rows + f malicious rows) - mean(honest)||``: a grid of
    ``points`` evenly spaced values on ``[z_min, z_max]``, then a
    golden-section search of ``refine`` evaluations between the best grid
    point's neighbours (a bounded line search like that of ByzFL's optimal
    variant of the attack).

    Knowledge model: omniscient and defence-aware (calls the rule under
    test on candidate rows).

    Parameters
    ----------
    {gradient_parameters}
    rule : callable, optional
        The rule under test, ``(p, n) array -> (n,) array`` in the library of
        ``honest``; required (:meth:`Attack.with_rule` binds it). It is
        called on the honest rows followed by the ``f`` candidate rows.
    z_min, z_max : float, default=0.0, 10.0
        The range searched.
    points : int, default=11
        Grid size.
    refine : int, default=8
        Evaluations of the refinement (0 or 1: none).
    {own}

    Returns
    -------
    rows : array of shape (f, n)
        ``f`` copies of ``mean - z * std`` for the best ``z`` found (ties go
        to the smaller ``z``).

    Notes
    -----
    Cost: at most ``points + refine`` rule evaluations per round (19 by
    default) on ``(p_honest + f, n)`` arrays.
    """
    xp = _check_gradients(honest, f, own)
    _need_honest(honest, "optimal_little_is_enough")
    _check_grid("optimal_little_is_enough", z_min, z_max, points, refine, positive=False)
    mu, sigma = xp.mean(honest, axis=0), _std0(xp, honest)
    if f == 0:
        return _repeat_row(xp, mu, 0)
    objective = _damage(xp, honest, f, rule, lambda z: mu - z * sigma)
    grid = [float(z) for z in np.linspace(z_min, z_max, int(points))]
    _, z = _line_search(objective, grid, int(refine), log=False)
    return _repeat_row(xp, mu - z * sigma, f)


@_gradient_doc(honest=HONEST, rng=RNG_DETERMINISTIC, own=UNUSED)
@_cites(FOE)
def optimal_fall_of_empires(honest, f, *, rng=None, rule=None, eps_min=0.01, eps_max=100.0,
                            points=13, refine=8, own=None):
    """Fall of Empires with ``eps`` chosen each round against the rule (Xie et al., 2019).

    All faulty workers send ``-eps * mean`` of the honest rows, as in
    :func:`fall_of_empires`, but ``eps`` maximises
    ``||rule(honest rows + f malicious rows) - mean(honest)||``: a grid of
    ``points`` geometrically spaced values on ``[eps_min, eps_max]``, then
    a golden-section search of ``refine`` evaluations (in log eps) between
    the best grid point's neighbours (a bounded line search like that of
    ByzFL's optimal variant of the attack).

    Knowledge model: omniscient and defence-aware (calls the rule under
    test on candidate rows).

    Parameters
    ----------
    {gradient_parameters}
    rule : callable, optional
        The rule under test, ``(p, n) array -> (n,) array``; required
        (:meth:`Attack.with_rule` binds it).
    eps_min, eps_max : float, default=0.01, 100.0
        The range searched, ``0 < eps_min < eps_max``.
    points : int, default=13
        Grid size (geometric spacing: every third of a decade by default).
    refine : int, default=8
        Evaluations of the refinement (0 or 1: none).
    {own}

    Returns
    -------
    rows : array of shape (f, n)
        ``f`` copies of ``-eps * mean`` for the best ``eps`` found (ties go to
        the smaller ``eps``).

    Notes
    -----
    Cost: at most ``points + refine`` rule evaluations per round (21 by
    default) on ``(p_honest + f, n)`` arrays.
    """
    xp = _check_gradients(honest, f, own)
    _need_honest(honest, "optimal_fall_of_empires")
    _check_grid("optimal_fall_of_empires", eps_min, eps_max, points, refine, positive=True)
    mu = xp.mean(honest, axis=0)
    if f == 0:
        return _repeat_row(xp, mu, 0)
    objective = _damage(xp, honest, f, rule, lambda eps: -eps * mu)
    grid = [float(e) for e in np.geomspace(eps_min, eps_max, int(points))]
    _, eps = _line_search(objective, grid, int(refine), log=True)
    return _repeat_row(xp, -eps * mu, f)


# --------------------------------------------------------------------------
# data faults


def label_flip(X, y, *, rng=None, n_classes):
    """Label flipping: class ``c`` becomes ``n_classes - 1 - c``.

    Parameters
    ----------
    X : array of shape (m, ...)
        Inputs, returned unchanged.
    y : array of shape (m,)
        Integer class labels in ``[0, n_classes)``.
    rng : numpy.random.Generator or int, optional
        Unused.
    n_classes : int
        Number of classes.

    Returns
    -------
    X : array of shape (m, ...)
    y : array of shape (m,)
        Flipped labels, same dtype as ``y``.
    """
    check_int("n_classes", n_classes, owner="label_flip", low=2)
    return X, (n_classes - 1) - y


@_cites(FLAG_PAPER)
def distorted_data(X, y, *, rng=None, n_classes=None, mode="noise", scale=3.0):
    """Training on distorted data: the paper's "augmented losses" workers.

    These workers are not malicious: they run the honest protocol on inputs
    that went through a too-strong augmentation, so their gradients come from
    a different loss.

    Parameters
    ----------
    X : array of shape (m, ...)
        Inputs; :mod:`flagagg.sim` standardises features, so ``scale`` is in
        units of a feature's standard deviation.
    y : array of shape (m,)
        Labels, returned unchanged.
    rng : numpy.random.Generator or int, optional
        Source of the distortion; pass one for repeatable batches.
    n_classes : int, optional
        Unused.
    mode : {"noise", "scramble"}, default="noise"
        ``"noise"`` adds Gaussian noise of standard deviation ``scale``;
        ``"scramble"`` permutes the features of every sample at random (a warp
        so strong that nothing but the label survives).
    scale : float, default=3.0
        Noise level for ``mode="noise"``.

    Returns
    -------
    X : array of shape (m, ...)
        Distorted inputs, same library and dtype.
    y : array of shape (m,)
    """
    xp = array_namespace(X)
    gen = _rng(rng)
    check_choice("mode", mode, ("noise", "scramble"), owner="distorted_data")
    if mode == "noise":
        check_real("scale", scale, owner="distorted_data", low=0.0)
        return X + _like(xp, gen.normal(0.0, scale, size=tuple(X.shape)), X), y
    if mode == "scramble":
        m = X.shape[0]
        flat = xp.reshape(X, (m, -1))
        order = np.argsort(gen.random(tuple(flat.shape)), axis=1)
        idx = xp.asarray(order, device=_device(X))
        out = xp.take_along_axis(flat, idx, axis=1)
        return xp.reshape(out, tuple(X.shape)), y
    raise ValueError(f"mode must be 'noise' or 'scramble': got {mode!r}")


# --------------------------------------------------------------------------
# registry

_GRADIENT_CALL = ("honest", "f", "rng", "own")
_DATA_CALL = ("X", "y", "rng", "n_classes")


@dataclass(frozen=True)
class Attack:
    """An attack with its parameters bound.

    Attributes
    ----------
    name : str
        Registry name.
    kind : {"none", "gradient", "data"}
        ``"gradient"``: call as ``attack(honest, f, rng=..., own=...)``;
        ``"data"``: call as ``attack(X, y, rng=..., n_classes=...)`` on each
        faulty worker's batch; ``"none"``: faulty workers act honestly.
    omniscient : bool
        Whether the attack reads the honest gradients of the round.
    func : callable
        The underlying function.
    params : dict
        The bound parameters (treat as read-only).
    defence_aware : bool
        Whether the attack calls the rule under test: it then needs the rule,
        bound with :meth:`with_rule` (the simulator does this).
    """

    name: str
    kind: str
    omniscient: bool
    func: Callable[..., Any]
    params: Mapping[str, Any] = field(default_factory=dict)
    defence_aware: bool = False

    def __call__(self, *args, **kwargs):
        """Call the attack with the bound parameters."""
        return self.func(*args, **self.params, **kwargs)

    def with_rule(self, rule):
        """A copy that calls ``rule`` (the rule under test), for defence-aware attacks.

        Parameters
        ----------
        rule : callable
            ``(p, n) array -> (n,) array``, taking arrays of the library the
            attack is called with.

        Returns
        -------
        attack : Attack
        """
        if not self.defence_aware:
            raise TypeError(f"attack {self.name!r} does not call the rule; it takes no rule")
        if not callable(rule):
            raise TypeError(f"rule must be callable: got {type(rule).__name__}")
        return replace(self, params={**self.params, "rule": rule})


# name -> (function, kind, omniscient, parameter defaults overriding the function's)
_REGISTRY: dict[str, tuple[Callable[..., Any], str, bool, dict[str, Any]]] = {
    "none": (no_attack, "none", False, {}),
    "random": (random_gradients, "gradient", False, {}),
    "gaussian": (gaussian, "gradient", False, {}),
    "reverse": (reverse, "gradient", False, {}),
    "sign_flip": (reverse, "gradient", False, {"scale": -1.0}),
    "partial_drop": (partial_drop, "gradient", False, {}),
    "little_is_enough": (little_is_enough, "gradient", True, {}),
    "fall_of_empires": (fall_of_empires, "gradient", True, {}),
    "mimic": (mimic, "gradient", True, {}),
    "min_max": (min_max, "gradient", True, {}),
    "min_sum": (min_sum, "gradient", True, {}),
    "optimal_little_is_enough": (optimal_little_is_enough, "gradient", True, {}),
    "optimal_fall_of_empires": (optimal_fall_of_empires, "gradient", True, {}),
    "nan": (non_finite, "gradient", False, {}),
    "inf": (non_finite, "gradient", False, {"value": math.inf}),
    "label_flip": (label_flip, "data", False, {}),
    "distorted_data": (distorted_data, "data", False, {}),
}


# attacks that call the rule under test (their ``rule`` is a call argument,
# bound by Attack.with_rule, not a tunable parameter)
_DEFENCE_AWARE = frozenset({"optimal_little_is_enough", "optimal_fall_of_empires"})


def available_attacks(kind=None):
    """Names of the registered attacks.

    Parameters
    ----------
    kind : {"none", "gradient", "data"}, optional
        Only the attacks of this kind.

    Returns
    -------
    names : tuple of str
        Sorted names.
    """
    return tuple(sorted(n for n, entry in _REGISTRY.items() if kind is None or entry[1] == kind))


def attack_parameters(name):
    """The tunable parameters of an attack and their defaults.

    Parameters
    ----------
    name : str
        Registry name.

    Returns
    -------
    defaults : dict
        Parameter name -> default value.
    """
    func, kind, _, overrides = _lookup(name)
    call = _DATA_CALL if kind == "data" else _GRADIENT_CALL
    if name in _DEFENCE_AWARE:
        call = (*call, "rule")
    sig = inspect.signature(func)
    defaults = {
        k: v.default
        for k, v in sig.parameters.items()
        if k not in call and v.default is not inspect.Parameter.empty
    }
    defaults.update(overrides)
    return defaults


def _lookup(name):
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown attack {name!r}: choose one of {', '.join(available_attacks())}"
        ) from None


def get_attack(name, **params):
    """Look up an attack by name and bind its parameters.

    Parameters
    ----------
    name : str
        One of :func:`available_attacks`.
    **params
        Parameters of the attack (e.g. ``scale`` for ``"reverse"``, ``z`` for
        ``"little_is_enough"``).

    Returns
    -------
    attack : Attack
        Callable with the parameters bound.

    Examples
    --------
    >>> import numpy as np
    >>> from flagagg.attacks import get_attack
    >>> attack = get_attack("reverse", scale=-10.0)
    >>> honest = np.ones((4, 3))
    >>> attack(honest, 2, rng=0, own=np.ones((2, 3)))
    array([[-10., -10., -10.],
           [-10., -10., -10.]])
    """
    func, kind, omniscient, overrides = _lookup(name)
    allowed = attack_parameters(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise TypeError(
            f"attack {name!r} has no parameter {', '.join(map(repr, unknown))}: "
            f"its parameters are {known}"
        )
    bound = {**overrides, **params}
    return Attack(name, kind, omniscient, func, bound, defence_aware=name in _DEFENCE_AWARE)
