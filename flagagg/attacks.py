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
from array_api_compat import device as _device

from ._namespace import array_namespace
from ._validation import check_choice, check_int, check_real
from .rules import Reference

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

    # one float64 array, worked in place: each pass over a fresh one costs
    # as much as the arithmetic
    d = x.to(torch.float64, copy=True)
    d -= d.mean(dim=0)
    d *= d
    return d.mean(dim=0).sqrt_().to(x.dtype)


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
OWN_REQUIRED = "The faulty workers' own honest gradients; required."
RNG_EPS = "Draws the offsets of rows 2..f when ``eps > 0``."
RULE = ("The rule under test, ``(p, n) array -> (n,) array``; required "
        "(:meth:`Attack.with_rule` binds it).")


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
FANG = Reference(("Fang", "Cao", "Jia", "Gong"), "Local model poisoning attacks to "
                 "Byzantine-robust federated learning", "USENIX Security", 2020)
HIDDEN_VULNERABILITY = Reference(("El Mhamdi", "Guerraoui", "Rouault"), "The hidden "
                                 "vulnerability of distributed learning in Byzantium", "ICML", 2018)
MIN_MAX = Reference(("Shejwalkar", "Houmansadr"), "Manipulating the Byzantine: optimizing "
                    "model poisoning attacks and defenses for federated learning", "NDSS", 2021)


def _cites(reference: Reference, where: str | None = None):
    """Declare the publication an attack comes from (``func.reference``).

    A ``{reference}`` line in the docstring (its numpydoc References section)
    becomes the full citation, followed by ``where`` (a section) if given.
    """
    def mark(func):
        func.reference = reference
        if func.__doc__:  # None under python -OO
            text = reference.full() + (f", {where}." if where else ".")
            func.__doc__ = func.__doc__.replace(
                "{reference}", textwrap.fill(text, width=80, subsequent_indent=" " * 4))
        return func
    return mark


def _entry(name: str, kind: str, text: str) -> str:
    body = textwrap.fill(text, width=88, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return f"{name} : {kind}\n{body}"


def _gradient_doc(*, honest: str, rng: str, own: str, own_required: bool = False,
                  rule: str | None = None):
    """Fill the ``{gradient_parameters}``, ``{own}`` and ``{rule}`` lines of an attack's docstring.

    Every gradient attack takes ``honest, f, rng`` first and ``own`` last; their
    numpydoc entries are written here once, with the one sentence that differs.
    ``own_required`` drops the "optional" of ``own`` (partial-knowledge attacks);
    ``rule`` is the entry of a defence-aware attack's ``rule`` (see ``RULE``).
    """
    common = "\n    ".join([
        _entry("honest", "array of shape (p_honest, n)", honest),
        _entry("f", "int", "Number of faulty rows to return."),
        _entry("rng", "numpy.random.Generator or int, optional", rng),
    ])
    own_kind = "array of shape (f, n)" + ("" if own_required else ", optional")

    def fill(func):
        # what Attack.reads_own reports: an attack whose own is "Unused." never
        # reads the faulty workers' honest gradients, so a simulator need not
        # compute them (tests check that own changes nothing for these)
        func._reads_own = own is not UNUSED
        if func.__doc__:  # None under python -OO
            doc = (func.__doc__.replace("{gradient_parameters}", common)
                   .replace("{own}", _entry("own", own_kind, own)))
            if rule is not None:
                doc = doc.replace("{rule}", _entry("rule", "callable, optional", rule))
            func.__doc__ = doc
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


def _need_rule(rule, name):
    """Refuse a defence-aware attack that was given no rule to call."""
    if rule is None:
        raise ValueError(
            f"{name} calls the rule under test and none was given: bind one with "
            "attack.with_rule(rule) (flagagg.sim.simulate does this itself) or pass rule=..."
        )


def _damage(xp, honest, f, rule, make_row):
    """The objective of the optimal attacks: ``||rule(honest + f candidates) - mean||``."""
    _need_rule(rule, "this attack")
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

    @property
    def reads_own(self):
        """Whether the faulty workers' own gradients are needed to make their rows.

        False for the gradient attacks that never read ``own`` and build
        their rows from the honest rows alone (omniscient ones such as A
        Little Is Enough) or from nothing (random, NaN): a simulator may
        then skip computing the faulty workers' gradients. True for the
        gradient attacks that read ``own`` (reverse, partial knowledge),
        for data attacks and ``"none"`` (the faulty workers send their own,
        poisoned or honest, gradients) and for any function whose use of
        ``own`` is not declared.
        """
        return self.kind != "gradient" or getattr(self.func, "_reads_own", True)

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


# --------------------------------------------------------------------------
# the peers' attacks (issue 24) and the attack built against the Flag
# Aggregator (issue 27). Appended here, registered at the end of the file.


def _host64(xp, x):
    """A NumPy float64 copy of a (small) array of any library and device."""
    if type(x).__module__.split(".")[0] == "torch":
        return x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def _need_own(own, name):
    if own is None:
        raise ValueError(
            f"{name} is a partial-knowledge attack: it needs own, the faulty workers' own honest "
            "gradients of the round (the simulator passes them)"
        )


def _fang_trim_rows(lo_edge, hi_edge, direction, b, gen, f):
    """Fang et al.'s trimmed-mean values, drawn per faulty row (NumPy float64).

    Where ``direction`` is +1 every row draws beyond ``lo_edge`` (downwards),
    where it is -1 beyond ``hi_edge`` (upwards), uniformly over a range whose
    far end is ``b`` times (or ``1 / b`` times, for an edge of the other sign)
    the edge; where it is 0 the row takes ``lo_edge``.
    """
    u = gen.random((int(f), lo_edge.size))
    # below lo: [lo / b, lo] when lo > 0, [b lo, lo] when lo <= 0
    lo_far = np.where(lo_edge > 0, lo_edge / b, lo_edge * b)
    # above hi: [hi, b hi] when hi > 0, [hi, hi / b] when hi <= 0
    hi_far = np.where(hi_edge > 0, hi_edge * b, hi_edge / b)
    down = lo_edge + u * (lo_far - lo_edge)
    up = hi_edge + u * (hi_far - hi_edge)
    return np.where(direction > 0, down, np.where(direction < 0, up, lo_edge))


@_gradient_doc(honest=HONEST, rng="Draws the values within their ranges; pass one for "
               "repeatable rows.", own=UNUSED)
@_cites(FANG, where="section 3")
def fang_trimmed_mean(honest, f, *, rng=None, b=2.0, own=None):
    """Fang et al.'s full-knowledge attack on the trimmed mean (USENIX Security 2020).

    In every coordinate ``j`` the faulty rows pull against the direction the
    honest mean takes: where ``mean_j > 0`` each faulty row sends a value
    below the smallest honest value ``min_j`` (drawn uniformly from
    ``[min_j / b, min_j]`` when ``min_j > 0``, from ``[b min_j, min_j]``
    otherwise); where ``mean_j < 0``, a value above the largest ``max_j``
    (from ``[max_j, b max_j]`` when ``max_j > 0``, ``[max_j / b, max_j]``
    otherwise); where ``mean_j = 0``, ``min_j``. The paper writes it for
    local models; this is the same attack on the gradients (a model moves by
    ``-lr`` times its gradient), as Blades and FLPoison ship it. It targets
    coordinate-wise rules (trimmed mean, median).

    Knowledge model: full knowledge (omniscient): reads the honest rows of
    the round; does not call the rule.

    Parameters
    ----------
    {gradient_parameters}
    b : float, default=2.0
        How far beyond the honest extremes the values reach (``b > 1``).
    {own}

    Returns
    -------
    rows : array of shape (f, n)
        In the library, device and dtype of ``honest``; every row drawn
        independently.

    Notes
    -----
    Cost: ``O(p_honest n)`` (a mean, a min and a max per coordinate).

    References
    ----------
    {reference}
    """
    xp = _check_gradients(honest, f, own)
    _need_honest(honest, "fang_trimmed_mean")
    check_real("b", b, owner="fang_trimmed_mean", low=1.0, strict=True)
    H = _host64(xp, honest)
    mean, lo, hi = H.mean(axis=0), H.min(axis=0), H.max(axis=0)
    rows = _fang_trim_rows(lo, hi, np.sign(mean), float(b), _rng(rng), f)
    return _like(xp, rows, honest)


@_gradient_doc(honest=HONEST_SHAPE, rng="Draws the values within their ranges; pass one "
               "for repeatable rows.", own=OWN_REQUIRED, own_required=True)
@_cites(FANG, where="section 3")
def fang_trimmed_mean_partial(honest, f, *, rng=None, own=None):
    """Fang et al.'s partial-knowledge attack on the trimmed mean (USENIX Security 2020).

    The attacker sees only the gradients its ``f`` workers computed
    honestly (``own``) and estimates the honest distribution from them:
    ``mu_j`` and ``sigma_j`` (``ddof=0``) per coordinate. Where ``mu_j > 0``
    every faulty row sends a value drawn uniformly from
    ``[mu_j - 4 sigma_j, mu_j - 3 sigma_j]``, where ``mu_j < 0`` from
    ``[mu_j + 3 sigma_j, mu_j + 4 sigma_j]`` (against the direction of the
    estimated mean, on the gradients, as in :func:`fang_trimmed_mean`),
    where ``mu_j = 0`` the value ``mu_j``.

    Knowledge model: partial knowledge: the faulty workers' own honest
    gradients only; neither the other workers' gradients nor the rule.

    Parameters
    ----------
    {gradient_parameters}
    {own}

    Returns
    -------
    rows : array of shape (f, n)
        In the library, device and dtype of ``honest``.

    Notes
    -----
    With ``f = 1`` the estimated spread is 0 and the row is the worker's own
    gradient: the estimate needs two faulty workers or more. Cost:
    ``O(f n)``.

    References
    ----------
    {reference}
    """
    xp = _check_gradients(honest, f, own)
    _need_own(own, "fang_trimmed_mean_partial")
    if f == 0:
        return own * 1
    own64 = _host64(xp, own)
    mu, sigma = own64.mean(axis=0), own64.std(axis=0)
    u = _rng(rng).uniform(3.0, 4.0, size=(int(f), own64.shape[1]))
    s = np.sign(mu)
    rows = mu - s * u * sigma
    return _like(xp, rows, honest)


def _krum_picks_crafted(D2h, dh, f, n_neighbours):
    """Whether Krum picks one of ``f`` identical crafted rows.

    ``D2h``: squared distances among the reference rows (``q x q``); ``dh``:
    their squared distances to the crafted row (``q``). Krum's score of a row is
    the sum of its ``n_neighbours`` smallest squared distances to the others.
    """
    q = D2h.shape[0]
    m = q + f
    D2 = np.zeros((m, m))
    D2[:q, :q] = D2h
    D2[:q, q:] = dh[:, None]
    D2[q:, :q] = dh[None, :]
    np.fill_diagonal(D2, np.inf)
    k = max(1, min(n_neighbours, m - 1))
    scores = np.sort(D2, axis=1)[:, :k].sum(axis=1)
    # ties go to the lowest index, as flagagg's Krum breaks them: honest first
    return int(np.argmin(scores)) >= q


def _check_fang_krum(name, threshold, eps):
    check_real("threshold", threshold, owner=name, low=0.0, strict=True)
    check_real("eps", eps, owner=name, low=0.0)


def _fang_krum(ref, f, p, n_neighbours, threshold):
    """Fang et al.'s search for the crafted row ``-lam * s`` Krum picks (NumPy float64).

    ``ref`` stands for the honest rows (all of them with full knowledge,
    the faulty workers' own with partial knowledge). Returns the row.
    """
    q, n = ref.shape
    c = ref.mean(axis=0)
    s = np.sign(c)
    # distances from the rows centred on their mean: exact under a common offset
    Gc = ref - c
    K = Gc @ Gc.T
    sqc = np.diag(K).copy()
    D2h = np.maximum(sqc[:, None] + sqc[None, :] - 2.0 * K, 0.0)
    sq = np.einsum("ij,ij->i", ref, ref)
    # lambda's upper bound, the paper's equation (in gradient space the
    # before-attack reference is the zero update)
    k = min(max(p - f - 2, 0), q - 1)
    if k > 0:
        near = np.sort(D2h + np.diag(np.full(q, np.inf)), axis=1)[:, :k]
        spread = float(np.sqrt(near).sum(axis=1).min()) / (max(p - 2 * f - 1, 1) * math.sqrt(n))
    else:
        spread = 0.0
    lam = spread + float(np.sqrt(sq).max()) / math.sqrt(n)
    # rows too large to square (1e200) or not finite: start the halving from the largest
    # float, so that it ends; a NaN lam (NaN rows) ends it at once (below)
    lam = min(lam, float(np.finfo(np.float64).max))
    gs, gc = Gc @ s, Gc @ c
    s_sq, cs, cc = float(s @ s), float(c @ s), float(c @ c)
    while True:
        # ||g_i - x||^2 for x = -lam s, from the centred rows:
        # ||g_i - c||^2 - 2 <g_i - c, x - c> + ||x - c||^2
        xc_sq = lam * lam * s_sq + 2.0 * lam * cs + cc
        dh = np.maximum(sqc + 2.0 * (lam * gs + gc) + xc_sq, 0.0)
        if not lam >= threshold or _krum_picks_crafted(D2h, dh, f, n_neighbours):
            break
        lam /= 2.0
    return -lam * s


@_gradient_doc(honest=HONEST, rng=RNG_EPS, own=UNUSED)
@_cites(FANG, where="section 3")
def fang_krum(honest, f, *, rng=None, threshold=1e-5, eps=0.0, own=None):
    """Fang et al.'s full-knowledge attack on Krum (USENIX Security 2020).

    The faulty rows are ``-lam * s`` with ``s = sign(mean of the honest
    rows)`` (the crafted update goes against the honest direction in every
    coordinate), and ``lam`` is the largest of ``lam_0, lam_0 / 2, ...``
    (down to ``threshold``) for which Krum, fed the honest rows and the
    ``f`` crafted ones, picks a crafted one. ``lam_0`` is the paper's upper
    bound: ``min_i sum_{l in N_i} ||g_l - g_i|| / ((p - 2f - 1) sqrt(n)) +
    max_i ||g_i|| / sqrt(n)`` over the honest rows, ``N_i`` the ``p - f - 2``
    honest rows nearest to ``g_i``. On gradients the before-attack
    reference of the paper (the current model) is the zero update. Rows
    2..f are copies of the first (``eps = 0``) or lie within ``eps`` of it.

    Knowledge model: full knowledge (omniscient) and rule-aware: reads the
    honest rows of the round and runs Krum itself (flagagg's Krum:
    ``p - f - 2`` neighbours, ties to the lowest index) on candidates.

    Parameters
    ----------
    {gradient_parameters}
    threshold : float, default=1e-5
        Smallest ``lam`` tried; the rows use it when Krum picks no crafted row
        before it.
    eps : float, default=0.0
        Radius of the ball (Euclidean) rows 2..f are drawn in around row 1.
    {own}

    Returns
    -------
    rows : array of shape (f, n)
        In the library, device and dtype of ``honest``.

    Notes
    -----
    Cost: one ``p_honest x p_honest`` Gram matrix (``O(p_honest^2 n)``) and
    ``O(p^2 log p)`` per halving of ``lam``; no call of the rule.

    References
    ----------
    {reference}
    """
    xp = _check_gradients(honest, f, own)
    _need_honest(honest, "fang_krum")
    _check_fang_krum("fang_krum", threshold, eps)
    p = honest.shape[0] + int(f)
    if f == 0:
        return _repeat_row(xp, xp.mean(honest, axis=0), 0)
    row = _fang_krum(_host64(xp, honest), int(f), p, p - int(f) - 2, threshold)
    return _like(xp, _fang_copies(row, f, eps, rng), honest)


def _fang_copies(row, f, eps, rng):
    rows = np.repeat(row[None, :], int(f), axis=0)
    if eps > 0 and f > 1:
        d = _rng(rng).normal(size=(int(f) - 1, row.size))
        d *= (eps * _rng(rng).random((int(f) - 1, 1)) ** (1.0 / row.size)
              / np.linalg.norm(d, axis=1, keepdims=True))
        rows[1:] += d
    return rows


@_gradient_doc(honest=HONEST_SHAPE, rng=RNG_EPS, own=OWN_REQUIRED, own_required=True)
@_cites(FANG, where="section 3")
def fang_krum_partial(honest, f, *, rng=None, threshold=1e-5, eps=0.0, own=None):
    """Fang et al.'s partial-knowledge attack on Krum (USENIX Security 2020).

    :func:`fang_krum` with the faulty workers' own honest gradients standing
    in for the honest rows: ``s`` is the sign of their mean, ``lam_0`` comes
    from them, and the attacker runs Krum on its own gradients plus the
    ``f`` crafted rows. That stack has ``2f`` rows, fewer than Krum's
    ``p - f - 2`` neighbours need when ``p > 3f + 2``: every row then counts
    all the others (``min(p - f - 2, 2f - 1)`` neighbours), flagagg's reading
    of the paper's "treat the before-attack models as the benign ones".

    Knowledge model: partial knowledge and rule-aware: the faulty workers'
    own honest gradients, and that the rule is Krum; not the other workers'
    gradients.

    Parameters
    ----------
    {gradient_parameters}
    threshold : float, default=1e-5
        Smallest ``lam`` tried.
    eps : float, default=0.0
        Radius of the ball rows 2..f are drawn in around row 1.
    {own}

    Returns
    -------
    rows : array of shape (f, n)
        In the library, device and dtype of ``honest``.

    Notes
    -----
    With ``f = 1`` the attacker's stack is its own gradient and one crafted
    row, equally far from each other: Krum's tie goes to the own gradient at
    every ``lam``, which ends at ``threshold`` (a row of about zero). The
    attack needs ``f >= 2``, as FLPoison's asserts. Cost: ``O(f^2 n)`` and
    ``O(f^2 log f)`` per halving of ``lam``.

    References
    ----------
    {reference}
    """
    xp = _check_gradients(honest, f, own)
    _need_own(own, "fang_krum_partial")
    _check_fang_krum("fang_krum_partial", threshold, eps)
    if f == 0:
        return own * 1
    p = honest.shape[0] + int(f)
    k = min(p - int(f) - 2, 2 * int(f) - 1)
    row = _fang_krum(_host64(xp, own), int(f), p, k, threshold)
    return _like(xp, _fang_copies(row, f, eps, rng), honest)


@_gradient_doc(honest=HONEST, rng=UNUSED, own=UNUSED)
def full_gradient_negation(honest, f, *, rng=None, kappa=100.0, own=None):
    """Full-gradient negation: every faulty row is ``-kappa`` times the full gradient.

    As the ``krum`` package defines it (``FullGradientNegationAttack``):
    the attacker knows the gradient over the whole data set and sends it
    negated and scaled, unbounded. The simulator has no full-data gradient
    at hand; the honest workers' mean of the round, its unbiased estimate,
    stands in for it (so this is :func:`reverse` of the honest mean with
    ``scale = -kappa``, kept under its peers' name and default).

    Knowledge model: omniscient (the full gradient; here the honest rows of
    the round). Does not call the rule.

    Parameters
    ----------
    {gradient_parameters}
    kappa : float, default=100.0
        Scale of the negated gradient, ``>= 0``.
    {own}

    Returns
    -------
    rows : array of shape (f, n)

    Notes
    -----
    Cost: ``O(p_honest n)``.
    """
    xp = _check_gradients(honest, f, own)
    _need_honest(honest, "full_gradient_negation")
    check_real("kappa", kappa, owner="full_gradient_negation", low=0.0)
    return _repeat_row(xp, -float(kappa) * xp.mean(honest, axis=0), f)


@_gradient_doc(honest=HONEST, rng=RNG_DETERMINISTIC, own=UNUSED, rule=RULE)
@_cites(HIDDEN_VULNERABILITY)
def small_perturbation(honest, f, *, rng=None, rule=None, norm="l2", threshold=0.5,
                       doublings=30, steps=20, own=None):
    """Small perturbation (El Mhamdi, Guerraoui and Rouault), as the ``krum`` package defines it.

    All faulty rows send ``B(gamma) = mean(honest) + gamma * sigma * E``:
    with ``norm="l2"``, ``E`` is the unit vector of the coordinate with the
    largest honest standard deviation ``sigma`` (one coordinate moved by
    ``O(sqrt(n))`` hides in the ``l2`` spread of the honest rows); with
    ``norm="linf"``, ``E`` is all ones and ``sigma`` the mean of the honest
    standard deviations. ``gamma`` is the largest value for which the rule
    still "selects" ``B(gamma)``: its output moves along ``E`` by at least
    ``threshold`` times what a plain mean's would (``f gamma sigma / p``).
    (``krum`` tests selection by Krum's chosen subset, and for other rules
    by a relative change of the output; this test is one criterion for every
    rule: for Krum, picking ``B`` moves the output by ``gamma sigma``.)
    ``gamma`` is bracketed by doubling from 1 and then bisected.

    Knowledge model: omniscient and defence-aware: reads the honest rows
    and calls the rule under test on candidates.

    Parameters
    ----------
    {gradient_parameters}
    {rule}
    norm : {"l2", "linf"}, default="l2"
        The norm the attack hides in (chooses ``E``).
    threshold : float, default=0.5
        Share of a mean's move along ``E`` that counts as selected, in (0, 1].
    doublings : int, default=30
        At most this many doublings of ``gamma`` (from 1) to bracket it.
    steps : int, default=20
        Bisection steps once bracketed.
    {own}

    Returns
    -------
    rows : array of shape (f, n)
        ``f`` copies of ``B(gamma)``; ``gamma = 0`` (the honest mean) when
        the rule selects no ``B(gamma)`` with ``gamma >= 2^-steps``.

    Notes
    -----
    Cost: at most ``1 + doublings + steps`` rule evaluations per round.

    References
    ----------
    {reference}
    """
    xp = _check_gradients(honest, f, own)
    _need_honest(honest, "small_perturbation")
    check_choice("norm", norm, ("l2", "linf"), owner="small_perturbation")
    check_real("threshold", threshold, owner="small_perturbation", low=0.0, strict=True, high=1.0)
    check_int("doublings", doublings, owner="small_perturbation", low=0)
    check_int("steps", steps, owner="small_perturbation", low=0)
    mu = xp.mean(honest, axis=0)
    if f == 0:
        return _repeat_row(xp, mu, 0)
    _need_rule(rule, "small_perturbation")
    sd = _host64(xp, _std0(xp, honest))
    n = sd.size
    if norm == "l2":
        e = np.zeros(n)
        e[int(np.argmax(sd))] = 1.0
        sigma = float(sd.max())
    else:
        e = np.ones(n)
        sigma = float(sd.mean())
    p = honest.shape[0] + int(f)
    E = _like(xp, e * sigma, honest)
    base = xp.concat([honest, _repeat_row(xp, mu, f)], axis=0)
    out0 = _host64(xp, xp.asarray(rule(base))) @ e / float(e @ e)

    def selected(gamma):
        rows = xp.concat([honest, _repeat_row(xp, mu + gamma * E, f)], axis=0)
        moved = _host64(xp, xp.asarray(rule(rows))) @ e / float(e @ e) - out0
        return bool(np.isfinite(moved)) and moved >= threshold * f * gamma * sigma / p

    if sigma == 0 or not math.isfinite(sigma):
        return _repeat_row(xp, mu, f)
    lo, hi = 0.0, 1.0
    for _ in range(int(doublings)):
        if not selected(hi):
            break
        lo, hi = hi, 2.0 * hi
    else:
        lo = hi
    if lo < hi:
        for _ in range(int(steps)):
            mid = 0.5 * (lo + hi)
            if selected(mid):
                lo = mid
            else:
                hi = mid
    return _repeat_row(xp, mu + lo * E, f)


def _tilt_axes(xp, honest):
    """The honest mean's unit direction ``m`` and the two tilt axes (NumPy float64).

    ``"spread"``: the direction orthogonal to ``m`` along which the honest
    unit rows spread most (their top principal axis once ``m`` is removed),
    signed to agree with the sum of the honest unit rows. ``"outside"``: the
    sign vector of the honest mean with the span of the honest rows removed
    (None when the honest rows span every coordinate). Both come from the
    ``p_honest x p_honest`` Gram matrix: ``O(p_honest^2 n)``. Also returns
    the median honest norm.
    """
    H = _host64(xp, honest)
    norms = np.linalg.norm(H, axis=1)
    keep = np.isfinite(norms) & (norms > 0)
    mu = H[keep].mean(axis=0) if keep.any() else np.zeros(H.shape[1])
    mnorm = float(np.linalg.norm(mu))
    if not keep.any() or mnorm == 0 or not math.isfinite(mnorm):
        raise ValueError("flag_tilt needs finite honest rows with a nonzero mean")
    U = H[keep] / norms[keep, None]
    m = mu / mnorm
    R = U - np.outer(U @ m, m)
    vals, vecs = np.linalg.eigh(R @ R.T)
    spread = R.T @ vecs[:, -1]
    if vals[-1] <= 1e-24 or np.linalg.norm(spread) == 0:
        # the honest rows are all parallel to m: any orthogonal axis is as good
        spread = np.zeros_like(m)
        spread[int(np.argmin(np.abs(m)))] = 1.0
        spread -= (spread @ m) * m
    spread /= np.linalg.norm(spread)
    if U.sum(axis=0) @ spread < 0:
        spread = -spread
    # an orthonormal basis of the honest span from the Gram of the unit rows
    ev, V = np.linalg.eigh(U @ U.T)
    big = ev > RANK_RTOL_ATTACK * ev.max()
    Q = U.T @ (V[:, big] / np.sqrt(ev[big]))
    sgn = np.sign(m)
    outside = sgn - Q @ (Q.T @ sgn)
    on = float(np.linalg.norm(outside))
    outside = outside / on if on > 1e-6 * math.sqrt(m.size) else None
    return m, {"spread": spread, "outside": outside}, float(np.median(norms[keep]))


# eigenvalues of the honest unit rows' Gram below this share of the largest are round-off
RANK_RTOL_ATTACK = 1e-10
_TILT_AXES = ("outside", "spread")


def _tilt_row(m, axes, axis, theta):
    w = axes[axis]
    if w is None:
        # the honest rows span every coordinate: no direction lies outside them
        w = axes["spread"]
    return -math.cos(theta) * m + math.sin(theta) * w


@_gradient_doc(honest=HONEST, rng=UNUSED, own=UNUSED)
def flag_tilt(honest, f, *, rng=None, theta=math.pi / 4, axis="outside", scale=1.0, own=None):
    """Subspace tilt: an attack built against the Flag Aggregator's sign-blind subspace fit.

    All faulty rows send ``scale * med * (-cos(theta) m + sin(theta) w)``,
    with ``m`` the honest mean's unit direction, ``med`` the median honest
    norm and ``w`` a unit axis orthogonal to ``m``: with ``axis="outside"``
    the sign vector of the honest mean with the span of the honest rows
    removed, with ``axis="spread"`` the axis orthogonal to ``m`` along
    which the honest unit rows spread most (signed to agree with their sum).

    Why it hurts FA: FA fits an ``r``-dimensional subspace to the unit rows
    (blind to their sign: ``h`` and ``-h`` fit alike) and returns the
    projection of ``sum_i h_i`` on it, rescaled to the median input norm.
    The ``f`` identical faulty rows are one direction that the fit keeps
    exactly (reconstruction ratio 1, the most honest-looking value there is,
    and the IRLS then gives them its largest weight), so each adds a whole
    unit vector to the output's sum: ``-cos(theta)`` of it against the honest
    mean (all that Fall of Empires can do to FA, which discards its ``eps``)
    and ``sin(theta)`` across it. Once FA rescales its output, the part
    across the mean is what turns the output away from the descent
    direction; ``theta = pi / 4`` balances the two. On a synthetic stack
    (p = 15, f = 3) it turns FA's output further from the honest mean than A
    Little Is Enough, Fall of Empires or their optimal variants do (see
    ``docs/robustness-study.rst``). Its norm is the median honest norm, so
    norm filters see an ordinary row.

    Knowledge model: omniscient (the honest rows of the round) and knows
    that the rule is a sign-blind subspace fit; does not call the rule
    (:func:`optimal_flag_tilt` searches ``theta`` and the axis against the
    rule).

    Parameters
    ----------
    {gradient_parameters}
    theta : float, default=pi/4
        Tilt away from the reversed mean, in radians, in ``[0, pi]``
        (0: the reversed mean, ``pi / 2``: ``w`` alone).
    axis : {"outside", "spread"}, default="outside"
        The axis ``w``. "outside" needs ``n > p_honest``; when the honest rows
        span every coordinate it is "spread".
    scale : float, default=1.0
        Norm of the rows in units of the median honest norm, ``> 0``.
    {own}

    Returns
    -------
    rows : array of shape (f, n)
        ``f`` identical rows in the library, device and dtype of ``honest``.

    Notes
    -----
    Cost: one ``p_honest x p_honest`` Gram matrix and two eigendecompositions
    of that size, ``O(p_honest^2 n)``.
    """
    xp = _check_gradients(honest, f, own)
    _need_honest(honest, "flag_tilt")
    check_real("theta", theta, owner="flag_tilt", low=0.0, high=math.pi)
    check_choice("axis", axis, _TILT_AXES, owner="flag_tilt")
    check_real("scale", scale, owner="flag_tilt", low=0.0, strict=True)
    if f == 0:
        return _repeat_row(xp, xp.mean(honest, axis=0), 0)
    m, axes, med = _tilt_axes(xp, honest)
    row = scale * med * _tilt_row(m, axes, axis, theta)
    return _like(xp, np.repeat(row[None, :], int(f), axis=0), honest)


@_gradient_doc(honest=HONEST, rng=RNG_DETERMINISTIC, own=UNUSED, rule=RULE)
def optimal_flag_tilt(honest, f, *, rng=None, rule=None, scale=1.0, points=9, refine=6,
                      own=None):
    """The subspace tilt with ``theta`` and the axis chosen each round against the rule.

    The rows of :func:`flag_tilt`; for each of its two axes, ``theta`` in
    ``[0, pi]`` minimises the cosine between ``rule(honest rows + f faulty
    rows)`` and the honest mean (the rule's output turned away from the
    descent direction; the cosine, not a distance, because FA rescales its
    output to the median input norm, so that only its direction can be
    attacked): a grid of ``points`` evenly spaced values, then a
    golden-section search of ``refine`` evaluations between the best grid
    point's neighbours. The better axis wins.

    Knowledge model: omniscient and defence-aware (calls the rule under
    test on candidate rows; built against the Flag Aggregator, run against
    every rule).

    Parameters
    ----------
    {gradient_parameters}
    {rule}
    scale : float, default=1.0
        Norm of the rows in units of the median honest norm.
    points : int, default=9
        Grid size over ``[0, pi]``.
    refine : int, default=6
        Evaluations of the refinement (0 or 1: none).
    {own}

    Returns
    -------
    rows : array of shape (f, n)
        ``f`` copies of the best row found (ties go to the "outside" axis and
        the smaller ``theta``).

    Notes
    -----
    Cost: at most ``2 (points + refine)`` rule evaluations per round (30 by
    default) and the ``O(p_honest^2 n)`` of :func:`flag_tilt`.
    """
    xp = _check_gradients(honest, f, own)
    _need_honest(honest, "optimal_flag_tilt")
    _check_grid("optimal_flag_tilt", 0.0, math.pi, points, refine, positive=False)
    check_real("scale", scale, owner="optimal_flag_tilt", low=0.0, strict=True)
    if f == 0:
        return _repeat_row(xp, xp.mean(honest, axis=0), 0)
    _need_rule(rule, "optimal_flag_tilt")
    m, axes, med = _tilt_axes(xp, honest)
    mu = _host64(xp, xp.mean(honest, axis=0))
    mu_n = float(np.linalg.norm(mu))

    def make(axis, theta):
        return _like(xp, scale * med * _tilt_row(m, axes, axis, theta), honest)

    def objective(axis, theta):
        rows = xp.concat([honest, _repeat_row(xp, make(axis, theta), f)], axis=0)
        out = _host64(xp, xp.asarray(rule(rows)))
        norm = float(np.linalg.norm(out))
        if not (math.isfinite(norm) and norm > 0):
            # a rule that returns NaN or zero here is not turned in a measurable way
            return -math.inf
        return -float(out @ mu) / (norm * mu_n)

    grid = [float(t) for t in np.linspace(0.0, math.pi, int(points))]
    best = None
    for axis in _TILT_AXES if axes["outside"] is not None else ("spread",):
        value, theta = _line_search(lambda t, a=axis: objective(a, t), grid, int(refine),
                                    log=False)
        if best is None or value > best[0]:
            best = (value, axis, theta)
    return _repeat_row(xp, make(best[1], best[2]), f)


__all__ += [
    "fang_krum",
    "fang_krum_partial",
    "fang_trimmed_mean",
    "fang_trimmed_mean_partial",
    "flag_tilt",
    "full_gradient_negation",
    "optimal_flag_tilt",
    "small_perturbation",
]

_REGISTRY.update({
    "fang_trimmed_mean": (fang_trimmed_mean, "gradient", True, {}),
    "fang_trimmed_mean_partial": (fang_trimmed_mean_partial, "gradient", False, {}),
    "fang_krum": (fang_krum, "gradient", True, {}),
    "fang_krum_partial": (fang_krum_partial, "gradient", False, {}),
    "full_gradient_negation": (full_gradient_negation, "gradient", True, {}),
    "small_perturbation": (small_perturbation, "gradient", True, {}),
    "flag_tilt": (flag_tilt, "gradient", True, {}),
    "optimal_flag_tilt": (optimal_flag_tilt, "gradient", True, {}),
})

_DEFENCE_AWARE = _DEFENCE_AWARE | {"small_perturbation", "optimal_flag_tilt"}
