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

Randomness comes only from ``rng`` (a :class:`numpy.random.Generator`, or an
int seed), drawn in NumPy and then moved to the input's library, so a seed
gives the same rows for NumPy and PyTorch inputs.

``get_attack(name, **params)`` returns an :class:`Attack` with its parameters
bound, ``available_attacks()`` lists the names.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as _device

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
    "no_attack",
    "non_finite",
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
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 0:
        raise ValueError(f"f must be a non-negative int (number of faulty rows): got {f!r}")
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


def _base(xp, honest, f, own):
    """The gradients a distorting attack starts from: ``own`` or the honest mean."""
    if own is not None:
        return own
    return _repeat_row(xp, xp.mean(honest, axis=0), f)


# --------------------------------------------------------------------------
# gradient attacks


def no_attack(honest, f, *, rng=None, own=None):
    """Faulty workers behave honestly (the "none" baseline).

    Parameters
    ----------
    honest : array of shape (p_honest, n)
        Gradients of the honest workers.
    f : int
        Number of faulty rows to return.
    rng : numpy.random.Generator or int, optional
        Unused; accepted so that every attack has the same signature.
    own : array of shape (f, n), optional
        The faulty workers' own honest gradients. Without it, the honest mean.

    Returns
    -------
    rows : array of shape (f, n)
        A copy of ``own``, or ``f`` copies of the honest mean.
    """
    xp = _check_gradients(honest, f, own)
    if own is None:
        _need_honest(honest, "no_attack without own")
    return _base(xp, honest, f, own) * 1


def random_gradients(honest, f, *, rng=None, scale=1.0, own=None):
    """Uniformly random gradients (the paper's "random" workers).

    Parameters
    ----------
    honest : array of shape (p_honest, n)
        Gradients of the honest workers; only their shape and dtype are used.
    f : int
        Number of faulty rows to return.
    rng : numpy.random.Generator or int, optional
        Source of randomness; pass one for repeatable rows.
    scale : float, default=1.0
        Each coordinate is drawn independently from U(-scale, scale).
    own : array of shape (f, n), optional
        Unused.

    Returns
    -------
    rows : array of shape (f, n)
    """
    xp = _check_gradients(honest, f, own)
    if not scale >= 0:
        raise ValueError(f"scale must be >= 0: got {scale!r}")
    values = _rng(rng).uniform(-scale, scale, size=(int(f), honest.shape[1]))
    return _like(xp, values, honest)


def gaussian(honest, f, *, rng=None, loc=0.0, scale=1.0, own=None):
    """Gaussian noise gradients, each coordinate drawn from N(loc, scale^2).

    Parameters
    ----------
    honest : array of shape (p_honest, n)
        Gradients of the honest workers; only their shape and dtype are used.
    f : int
        Number of faulty rows to return.
    rng : numpy.random.Generator or int, optional
        Source of randomness; pass one for repeatable rows.
    loc : float, default=0.0
        Mean of every coordinate.
    scale : float, default=1.0
        Standard deviation of every coordinate.
    own : array of shape (f, n), optional
        Unused.

    Returns
    -------
    rows : array of shape (f, n)
    """
    xp = _check_gradients(honest, f, own)
    if not scale >= 0:
        raise ValueError(f"scale must be >= 0: got {scale!r}")
    values = _rng(rng).normal(loc, scale, size=(int(f), honest.shape[1]))
    return _like(xp, values, honest)


def reverse(honest, f, *, rng=None, scale=-10.0, own=None):
    """Reversed (sign-flipped and scaled) gradients: ``scale * g``.

    The paper's "reversed" workers send ``-10 g``, where ``g`` is the gradient
    they computed honestly; ``scale=-1`` is the plain sign flip.

    Parameters
    ----------
    honest : array of shape (p_honest, n)
        Gradients of the honest workers.
    f : int
        Number of faulty rows to return.
    rng : numpy.random.Generator or int, optional
        Unused.
    scale : float, default=-10.0
        Multiplier applied to the gradient.
    own : array of shape (f, n), optional
        The faulty workers' own gradients, ``g``. Without it, ``g`` is the honest
        mean (an omniscient variant).

    Returns
    -------
    rows : array of shape (f, n)
        ``scale * own`` (or ``scale`` times the honest mean, repeated).
    """
    xp = _check_gradients(honest, f, own)
    if own is None:
        _need_honest(honest, "reverse without own")
    return scale * _base(xp, honest, f, own)


def partial_drop(honest, f, *, rng=None, fraction=0.5, own=None):
    """Gradients with a random fraction of their coordinates set to zero.

    Models workers whose messages lose part of their payload. Every row loses
    exactly ``round(fraction * n)`` coordinates, chosen independently per row.

    Parameters
    ----------
    honest : array of shape (p_honest, n)
        Gradients of the honest workers.
    f : int
        Number of faulty rows to return.
    rng : numpy.random.Generator or int, optional
        Chooses the dropped coordinates; pass one for repeatable rows.
    fraction : float, default=0.5
        Fraction of coordinates zeroed, in [0, 1].
    own : array of shape (f, n), optional
        The faulty workers' own gradients. Without it, the honest mean.

    Returns
    -------
    rows : array of shape (f, n)
    """
    xp = _check_gradients(honest, f, own)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1]: got {fraction!r}")
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


def little_is_enough(honest, f, *, rng=None, z=None, own=None):
    """A Little Is Enough (Baruch et al., 2019): ``mean - z * std`` of the honest rows.

    All faulty workers send the same vector, shifted from the honest
    coordinate-wise mean by ``z`` honest standard deviations, small enough to
    pass as honest for statistics-based rules yet consistently biased.

    Parameters
    ----------
    honest : array of shape (p_honest, n)
        Gradients of the honest workers (omniscient attack).
    f : int
        Number of faulty rows to return.
    rng : numpy.random.Generator or int, optional
        Unused.
    z : float, optional
        Size of the shift in standard deviations. By default it comes from the
        paper's formula with ``p = p_honest + f`` (see
        :func:`little_is_enough_z`).
    own : array of shape (f, n), optional
        Unused.

    Returns
    -------
    rows : array of shape (f, n)
        ``f`` copies of ``mean(honest) - z * std(honest)``, the standard
        deviation taken with ``ddof=0``.
    """
    xp = _check_gradients(honest, f, own)
    _need_honest(honest, "little_is_enough")
    if z is None:
        z = little_is_enough_z(honest.shape[0] + int(f), int(f))
    mu = xp.mean(honest, axis=0)
    sigma = xp.std(honest, axis=0)
    return _repeat_row(xp, mu - z * sigma, f)


def fall_of_empires(honest, f, *, rng=None, eps=0.1, own=None):
    """Fall of Empires / inner-product manipulation (Xie et al., 2019): ``-eps * mean``.

    All faulty workers send the honest mean scaled by ``-eps``. A small ``eps``
    hides among the honest rows while pulling the inner product of the
    aggregate with the true gradient towards zero or below.

    Parameters
    ----------
    honest : array of shape (p_honest, n)
        Gradients of the honest workers (omniscient attack).
    f : int
        Number of faulty rows to return.
    rng : numpy.random.Generator or int, optional
        Unused.
    eps : float, default=0.1
        Scale of the reversed mean.
    own : array of shape (f, n), optional
        Unused.

    Returns
    -------
    rows : array of shape (f, n)
    """
    xp = _check_gradients(honest, f, own)
    _need_honest(honest, "fall_of_empires")
    return _repeat_row(xp, -eps * xp.mean(honest, axis=0), f)


def mimic(honest, f, *, rng=None, target=0, own=None):
    """Mimic: every faulty worker copies one honest worker's gradient.

    Over-weights one worker's data, which hurts when the data are not iid
    (Karimireddy et al., 2022). Keep ``target`` fixed across rounds.

    Parameters
    ----------
    honest : array of shape (p_honest, n)
        Gradients of the honest workers (omniscient attack).
    f : int
        Number of faulty rows to return.
    rng : numpy.random.Generator or int, optional
        Unused.
    target : int, default=0
        Index of the honest row to copy.
    own : array of shape (f, n), optional
        Unused.

    Returns
    -------
    rows : array of shape (f, n)
    """
    xp = _check_gradients(honest, f, own)
    p_h = honest.shape[0]
    if not 0 <= target < p_h:
        raise ValueError(f"target must index an honest row, 0 <= target < {p_h}: got {target}")
    return _repeat_row(xp, honest[target, :], f)


def non_finite(honest, f, *, rng=None, value=math.nan, own=None):
    """Rows full of NaN (or Inf): crashed or corrupted workers.

    Parameters
    ----------
    honest : array of shape (p_honest, n)
        Gradients of the honest workers; only their shape and dtype are used.
    f : int
        Number of faulty rows to return.
    rng : numpy.random.Generator or int, optional
        Unused.
    value : float, default=nan
        The value of every coordinate, e.g. ``nan``, ``inf`` or ``-inf``.
    own : array of shape (f, n), optional
        Unused.

    Returns
    -------
    rows : array of shape (f, n)
    """
    xp = _check_gradients(honest, f, own)
    return xp.full((int(f), honest.shape[1]), value, dtype=honest.dtype, device=_device(honest))


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
    if n_classes < 2:
        raise ValueError(f"label_flip needs n_classes >= 2: got {n_classes}")
    return X, (n_classes - 1) - y


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
    if mode == "noise":
        if not scale >= 0:
            raise ValueError(f"scale must be >= 0: got {scale!r}")
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
    """

    name: str
    kind: str
    omniscient: bool
    func: Callable[..., Any]
    params: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, *args, **kwargs):
        """Call the attack with the bound parameters."""
        return self.func(*args, **self.params, **kwargs)


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
    "nan": (non_finite, "gradient", False, {}),
    "inf": (non_finite, "gradient", False, {"value": math.inf}),
    "label_flip": (label_flip, "data", False, {}),
    "distorted_data": (distorted_data, "data", False, {}),
}


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
    return Attack(name, kind, omniscient, func, bound)
