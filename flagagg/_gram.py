"""The Gram matrix of a stack, exact under large common offsets and extreme magnitudes.

Two numerical hazards of ``K = G G^T`` and the way out of each:

* **Cancellation.** Distances ``||g_i - g_j||^2 = K_ii + K_jj - 2 K_ij`` lose
  about ``2 log10(offset / spread)`` digits when the inputs share a large
  common part (model weights, late-training gradients). The Gram of the
  inputs shifted by one of them, ``(g_i - g_k) . (g_j - g_k)``, gives the
  same distances without that loss, and every rule whose coefficients sum to
  1 and do not change under translation gets the same coefficients from it.
  :func:`stack_gram` reads off the first Gram whether the inputs are
  ill-conditioned (the nearest-neighbour distances tiny against the norms)
  and only then makes one more pass, shifted by a central input.
* **Overflow and underflow.** A finite row above ``~1e154`` has a squared
  norm that overflows; one below ``~1e-154`` has one that underflows. Such
  rows are found from the diagonal, their largest magnitude is read (which
  also tells a finite row from one holding NaN or Inf), and the Gram is
  recomputed with every row scaled by a power of two, as LAPACK's ``nrm2``
  scales by the largest magnitude. The result keeps both the scaled matrix
  and the exponents, so norms, normalised inner products and distances are
  exact even when ``K`` itself is not representable.

The result is a :class:`Gram`: a float64 ``p x p`` ndarray (``K`` itself,
saturating to ``inf`` where it is not representable) that also carries what
the helpers of :mod:`flagagg.rules._base` need. Any plain ndarray works
with those helpers too (an all-reduced Gram from a distributed run, say):
they then read finiteness and norms off the diagonal.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Gram", "choose_reference", "scale_exponents", "stack_gram", "unshifted",
           "usable_rows"]

# A squared norm outside [SAFE_LO, SAFE_HI] (or exactly 0, which may be an
# underflow) sends the row to the exact path. Inside it the products, the
# distances and the sums the rules form of them stay far from the limits of
# float64, and underflowed products are below 2^-230 of the row's norm.
SAFE_LO = 2.0 ** -800
SAFE_HI = 2.0 ** 800
# Shift when the median over inputs of (distance to the nearest neighbour)^2
# / (sum of the two squared norms) is below this: the Gram formula then has
# lost more than 3 of its 16 digits for most inputs. Well-spread gradients
# (ratio ~0.1 and up) never pay the extra pass.
SHIFT_BELOW = 1e-3

# Why an input is not used (see usable_rows).
NONFINITE_VALUES = "non-finite values (NaN or Inf)"
NOT_REPRESENTED = ("finite values, but a squared norm beyond float64 and no scaled form to "
                   "hold it (build the Gram with scale_exponents)")
NONFINITE_UNKNOWN = ("non-finite values (NaN or Inf), or a squared norm beyond float64 (a Gram "
                     "matrix without its data cannot tell them apart)")


class Gram(np.ndarray):
    """A float64 Gram matrix that knows which rows are finite, and its exact scaled form.

    The array values are ``K`` (``K_ij = y_i . y_j`` with ``y_i = g_i -
    g_ref``, or ``g_i`` when ``ref`` is None), saturating to ``inf`` where
    not representable. Arithmetic on it, slices and copies give plain
    ndarrays (without the attributes): they are no longer this Gram.

    Attributes
    ----------
    ref : int or None
        Index of the input subtracted from every input, or None.
    finite : ndarray of bool, shape (p,)
        Whether each input holds only finite values (read from the data, not
        from the diagonal: a finite row with an overflowing norm is finite).
    exponents : ndarray of int, shape (p,), or None
        With ``scaled``: ``K_ij = 2^(e_i + e_j) scaled_ij`` exactly.
    scaled : ndarray of shape (p, p), or None
        The Gram of ``2^-e_i y_i``, every entry representable; None when
        ``K`` itself is.
    unshifted : ndarray of shape (p, p), or None
        With ``ref``: the Gram of the inputs themselves (the first pass),
        for what needs inner products with the inputs rather than
        distances (per-worker diagnostics). None when ``ref`` is None.
    """

    ref: int | None
    finite: np.ndarray | None
    exponents: np.ndarray | None
    scaled: np.ndarray | None
    unshifted: np.ndarray | None

    def __new__(cls, K: np.ndarray, *, finite: np.ndarray, ref: int | None = None,
                exponents: np.ndarray | None = None, scaled: np.ndarray | None = None,
                unshifted: np.ndarray | None = None) -> Gram:
        obj = np.asarray(K, dtype=np.float64).view(cls)
        obj.ref = ref
        obj.finite = np.asarray(finite, dtype=bool)
        obj.exponents = None if exponents is None else np.asarray(exponents, dtype=np.int64)
        obj.scaled = scaled
        obj.unshifted = unshifted
        return obj

    @classmethod
    def from_scaled(cls, scaled: np.ndarray, exponents: np.ndarray, *, finite: np.ndarray,
                    ref: int | None = None) -> Gram:
        """The exact Gram ``K_ij = 2^(e_i + e_j) scaled_ij`` from its scaled form.

        For a producer that has the rows only in pieces (shards on several
        ranks): with ``exponents`` from :func:`scale_exponents` of the rows'
        largest magnitudes (``p`` numbers to exchange), the Gram of the scaled
        pieces ``2^-e_i g_i`` summed over pieces is ``scaled``, representable
        whatever the rows' magnitudes; the rules then decide about every row
        as on one machine (:func:`usable_rows`).
        """
        S = np.asarray(scaled, dtype=np.float64)
        e = np.asarray(exponents, dtype=np.int64)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            values = np.ldexp(S, e[:, None] + e[None, :])
        return cls(values, finite=finite, ref=ref, exponents=e, scaled=S)

    def __array_finalize__(self, obj: Any) -> None:
        self.ref = None
        self.finite = None
        self.exponents = None
        self.scaled = None
        self.unshifted = None

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        inputs = tuple(_plain(x) for x in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(_plain(x) for x in kwargs["out"])
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        return func(*_plain(args), **_plain(kwargs))

    def __getitem__(self, key: Any) -> Any:
        return self.view(np.ndarray)[key]

    def __reduce__(self) -> Any:
        # Pickles (results sent between processes) hold the plain matrix.
        return self.view(np.ndarray).__reduce__()


def scale_exponents(absmax: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """Exponents ``e_i`` with ``|2^-e_i g_i| < 1`` in every coordinate (0 for non-finite rows).

    Parameters
    ----------
    absmax : ndarray of shape (p,)
        Largest magnitude of each row (any value for a non-finite row).
    finite : ndarray of bool, shape (p,)

    Returns
    -------
    exponents : ndarray of int64, shape (p,)
        The scale of the rows in the scaled form of a :class:`Gram`: the scaled
        rows have norms below ``sqrt(n)``, so their Gram is representable.
    """
    amax = np.where(finite, np.asarray(absmax, dtype=np.float64), 0.0)
    e = np.frexp(amax)[1].astype(np.int64)
    e[~np.asarray(finite, dtype=bool)] = 0
    return e


def usable_rows(K: np.ndarray) -> tuple[np.ndarray, tuple[tuple[int, str], ...]]:
    """The one decision on which inputs of a Gram matrix the rules use.

    An input is used when its values are finite and the matrix represents its
    inner products, whatever its magnitude. A :class:`Gram` built from the data
    (:func:`stack_gram`, or :meth:`Gram.from_scaled` from pieces) knows both:
    its finite rows are all used, a row of 1e300 included (the scaled form
    holds it exactly). A matrix without the data (a plain ndarray) is read off
    its diagonal, where a NaN or Inf value and a finite row whose squared norm
    overflows both show as non-finite: such a row is not used, and the reason
    says that the two cannot be told apart there.

    Returns
    -------
    usable : ndarray of bool, shape (p,)
    excluded : tuple of (int, str)
        The other inputs, with the reason.
    """
    if isinstance(K, Gram) and K.finite is not None:
        usable = K.finite.copy()
        if K.scaled is not None:
            return usable, tuple((int(i), NONFINITE_VALUES) for i in np.flatnonzero(~usable))
        # Finite rows but no scaled form: a row whose diagonal overflowed is not held.
        held = np.isfinite(K.diagonal())
        why = {int(i): NONFINITE_VALUES for i in np.flatnonzero(~usable)}
        why.update((int(i), NOT_REPRESENTED) for i in np.flatnonzero(usable & ~held))
        usable &= held
        return usable, tuple(sorted(why.items()))
    usable = np.isfinite(np.diag(np.asarray(K)))
    return usable, tuple((int(i), NONFINITE_UNKNOWN) for i in np.flatnonzero(~usable))


def _plain(x: Any) -> Any:
    if isinstance(x, Gram):
        return x.view(np.ndarray)
    if isinstance(x, tuple):
        return tuple(_plain(v) for v in x)
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def choose_reference(K: np.ndarray, ok: np.ndarray) -> int | None:
    """The input to shift by, or None when the Gram ``K`` is well conditioned.

    Parameters
    ----------
    K : ndarray of shape (p, p)
        The unshifted Gram matrix.
    ok : ndarray of bool, shape (p,)
        Inputs that may serve (finite, of ordinary magnitude).

    Returns
    -------
    ref : int or None
        When most inputs' nearest-neighbour distance is tiny against their
        norms (:data:`SHIFT_BELOW`), the input of smallest median distance to
        the others: a central one, so that a far-off (Byzantine) input cannot
        make the shifted rows large. Otherwise None.
    """
    idx = np.flatnonzero(ok)
    q = idx.size
    if q < 2:
        return None
    K = np.asarray(K)
    Ko = K if q == K.shape[0] else K[np.ix_(idx, idx)]
    # Few, whole-matrix operations: this runs on every call of a shifting
    # rule, where at small p numpy's per-call overhead is the whole cost.
    d = Ko.diagonal()
    norms2 = d[:, None] + d[None, :]  # > 0: the inputs that may serve have d >= SAFE_LO
    D2 = np.maximum(norms2 - 2.0 * Ko, 0.0)
    ratio = D2 / norms2
    ratio.flat[:: q + 1] = np.inf
    nearest = np.sort(ratio.min(axis=1))
    if nearest[(q - 1) // 2] + nearest[q // 2] >= 2.0 * SHIFT_BELOW:  # the median
        return None
    D2.flat[:: q + 1] = np.nan
    return int(idx[np.argmin(np.nanmedian(D2, axis=1))])


def stack_gram(stack: Any, backend: Any, *, shift: bool = False) -> Gram:
    """The :class:`Gram` of a :class:`flagagg._array.Stack`, exact as described above.

    Parameters
    ----------
    stack : Stack
    backend : Backend
    shift : bool, default=False
        Allow the Gram of the inputs shifted by a central input when the
        inputs are ill-conditioned. Only for callers whose result does not
        change under a common translation of the inputs (distance-based
        selection, affine combinations); norms need ``shift=False``.

    Returns
    -------
    K : Gram
        One pass over the data in the common case; one more when shifting
        or scaling is needed (plus a pass over the rows of extreme
        magnitude, to read their largest value).
    """
    K = stack.raw_gram(backend)
    d = K.diagonal()
    with np.errstate(invalid="ignore"):
        ordinary = (d >= SAFE_LO) & (d <= SAFE_HI)  # False for NaN, +-inf
    if ordinary.all():
        # The common case, kept to a handful of small operations.
        ref = choose_reference(K, ordinary) if shift else None
        if ref is None:
            return Gram(K, finite=ordinary)
        return Gram(stack.raw_gram(backend, ref=ref), finite=ordinary, ref=ref, unshifted=K)
    finite = ordinary.copy()
    mag = np.where(ordinary, np.sqrt(np.where(ordinary, d, 0.0)), 0.0)
    extreme = np.flatnonzero(~ordinary)
    if extreme.size:
        amax, fin = stack.row_absmax(extreme)
        finite[extreme] = fin
        mag[extreme] = np.where(fin, amax, 0.0)
    ref = choose_reference(K, ordinary) if shift else None
    need_scale = bool((finite & ~ordinary).any())
    if ref is None and not need_scale:
        return Gram(K, finite=finite)
    scale = exponents = None
    if need_scale:
        if ref is not None:
            # The shifted row g_i - g_ref is at most |g_i| + |g_ref| in each coordinate.
            mag = np.maximum(mag, mag[ref])
        exponents = scale_exponents(mag, finite)
        scale = np.ldexp(1.0, -exponents)
    Kt = stack.raw_gram(backend, ref=ref, scale=scale)
    unshifted = None if ref is None else K
    if exponents is None:
        return Gram(Kt, finite=finite, ref=ref, unshifted=unshifted)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        values = np.ldexp(Kt, exponents[:, None] + exponents[None, :])
    return Gram(values, finite=finite, ref=ref, exponents=exponents, scaled=Kt,
                unshifted=unshifted)


def unshifted(K: np.ndarray) -> np.ndarray:
    """The Gram of the inputs themselves: ``K.unshifted`` if ``K`` is shifted, else ``K``."""
    if isinstance(K, Gram) and K.unshifted is not None:
        return K.unshifted
    return K
