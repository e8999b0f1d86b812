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

The result is a :class:`Gram`: the float64 ``p x p`` values of ``K``
(saturating to ``inf`` where not representable) composed with their exact
scaled form, and the one decision on which inputs the rules use
(:attr:`Gram.usable`, made when the Gram is built). Its methods are the
geometry the rules need (norms, distances, cosines, mixtures), each with one
code path for inputs of any magnitude. A plain matrix (an all-reduced Gram
from a distributed run, say) becomes one with :func:`as_gram`, which reads
finiteness off the diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Gram", "as_gram", "choose_reference", "scale_exponents", "stack_gram"]

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

# Why an input is not used (see Gram.usable).
NONFINITE_VALUES = "non-finite values (NaN or Inf)"
NOT_REPRESENTED = ("finite values, but a squared norm beyond float64 and no scaled form to "
                   "hold it (build the Gram with scale_exponents)")
NONFINITE_UNKNOWN = ("non-finite values (NaN or Inf), or a squared norm beyond float64 (a Gram "
                     "matrix without its data cannot tell them apart)")


@dataclass(frozen=True, eq=False)
class Gram:
    """A float64 Gram matrix with its exact scaled form and the inputs the rules use.

    ``K_ij = y_i . y_j`` with ``y_i = g_i - g_ref`` (``g_i`` when ``ref`` is
    None). Build one with :func:`stack_gram` (from the data),
    :meth:`from_scaled` (from pieces summed across ranks) or :func:`as_gram`
    (from a plain matrix).

    Attributes
    ----------
    values : ndarray of shape (p, p)
        ``K``, saturating to ``inf`` where not representable (read-only).
    usable : ndarray of bool, shape (p,)
        The one decision on which inputs the rules use: finite values whose
        inner products this Gram represents, whatever their magnitude.
    excluded : tuple of (int, str)
        The other inputs, with the reason.
    exponents : ndarray of int, shape (p,)
        ``K_ij = 2^(e_i + e_j) scaled_ij`` exactly (all 0 when ``values`` is
        itself exact).
    scaled : ndarray of shape (p, p)
        The Gram of ``2^-e_i y_i``, representable for every usable input
        (``values`` itself when every exponent is 0).
    ref : int or None
        Index of the input subtracted from every input, or None.
    unshifted : Gram or None
        With ``ref``: the Gram of the inputs themselves, for inner products
        with the inputs (per-input diagnostics). None when ``ref`` is None.
    """

    values: np.ndarray
    usable: np.ndarray
    excluded: tuple[tuple[int, str], ...]
    exponents: np.ndarray
    scaled: np.ndarray
    ref: int | None = None
    unshifted: Gram | None = None

    @classmethod
    def from_data(cls, values: np.ndarray, *, finite: np.ndarray, ref: int | None = None,
                  exponents: np.ndarray | None = None, scaled: np.ndarray | None = None,
                  unshifted: Gram | None = None) -> Gram:
        """A Gram whose inputs' finiteness was read from the data.

        Without ``scaled``, ``values`` is the exact form; a finite input whose
        squared norm overflowed there is then not held, and not used.
        """
        values = np.asarray(values, dtype=np.float64)
        finite = np.asarray(finite, dtype=bool)
        if scaled is None:
            held = np.isfinite(values.diagonal())
            usable = finite & held
            if usable.all():
                excluded = ()
            else:
                why = {int(i): NONFINITE_VALUES for i in np.flatnonzero(~finite)}
                why.update((int(i), NOT_REPRESENTED) for i in np.flatnonzero(finite & ~held))
                excluded = tuple(sorted(why.items()))
            return cls(values, usable, excluded, np.zeros(values.shape[0], dtype=np.int64),
                       values, ref, unshifted)
        excluded = tuple((int(i), NONFINITE_VALUES) for i in np.flatnonzero(~finite))
        return cls(values, finite, excluded, np.asarray(exponents, dtype=np.int64),
                   np.asarray(scaled, dtype=np.float64), ref, unshifted)

    @classmethod
    def from_scaled(cls, scaled: np.ndarray, exponents: np.ndarray, *, finite: np.ndarray,
                    ref: int | None = None) -> Gram:
        """The exact Gram ``K_ij = 2^(e_i + e_j) scaled_ij`` from its scaled form.

        For a producer that has the rows only in pieces (shards on several
        ranks): with ``exponents`` from :func:`scale_exponents` of the rows'
        largest magnitudes (``p`` numbers to exchange), the Gram of the scaled
        pieces ``2^-e_i g_i`` summed over pieces is ``scaled``, representable
        whatever the rows' magnitudes; the rules then decide about every row
        as on one machine.
        """
        S = np.asarray(scaled, dtype=np.float64)
        e = np.asarray(exponents, dtype=np.int64)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            values = np.ldexp(S, e[:, None] + e[None, :])
        return cls.from_data(values, finite=finite, ref=ref, exponents=e, scaled=S)

    @property
    def p(self) -> int:
        """Number of inputs."""
        return self.values.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(p, p)``."""
        return self.values.shape

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        # Read-only access to K for NumPy functions (np.asarray(K)).
        return self.values if dtype is None else self.values.astype(dtype)

    @property
    def inputs(self) -> Gram:
        """The Gram of the inputs themselves: :attr:`unshifted` if shifted, else this one."""
        return self if self.unshifted is None else self.unshifted

    # ------------------------------------------------------------------
    # geometry, exact for inputs of any magnitude (one code path each)

    def masked(self) -> np.ndarray:
        """The scaled form with the rows and columns of unused inputs set to 0.

        Products with coefficient vectors that are zero on those inputs then
        stay finite (``0 * nan`` would not). When every input is used this is
        :attr:`scaled` itself, not a copy: read it, do not write to it.
        """
        u = self.usable
        if u.all():
            return self.scaled
        return np.where(u[:, None] & u[None, :], self.scaled, 0.0)

    def row_norms(self) -> np.ndarray:
        """Norms ``||y_i||`` without overflow or underflow on the way; NaN for unused inputs.

        (For a shifted Gram these are the norms of the shifted rows: callers
        that need the inputs' norms use :attr:`inputs`.)
        """
        with np.errstate(invalid="ignore", over="ignore"):
            n = np.sqrt(np.maximum(np.diag(self.scaled), 0.0))
            if self.scaled is not self.values:  # exponents not all 0
                n = np.ldexp(n, self.exponents)
        return n if self.usable.all() else np.where(self.usable, n, np.nan)

    def normalized(self, idx: np.ndarray) -> np.ndarray:
        """``K_ij / (||y_i|| ||y_j||)`` for the inputs ``idx`` (usable, non-zero), symmetric."""
        # idx is increasing: all p of them is the whole matrix, no copy to gather
        S = self.scaled if idx.size == self.p else self.scaled[np.ix_(idx, idx)]
        n = np.sqrt(np.diag(S))
        Kn = S / np.outer(n, n)
        return (Kn + Kn.T) / 2

    def distance_exponent(self) -> int:
        """A power of two ``E`` that puts the inputs' distances in range: ``D2 / 4^E``.

        The median exponent of the usable inputs (a minority of huge or tiny
        inputs cannot move it); 0 when the values are exact.
        """
        e = np.sort(self.exponents[self.usable])
        if e.size == 0:
            return 0
        # np.median's value, truncated as int() does (np.median itself costs more than
        # a small rule: this runs on every call).
        return int((e[(e.size - 1) // 2] + e[e.size // 2]) / 2)

    def unit(self, E: int) -> np.ndarray:
        """The Gram in units of ``2^E``: ``K / 4^E`` (``inf`` where that overflows)."""
        e = self.exponents - E
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            return np.ldexp(self.scaled, e[:, None] + e[None, :])

    def _pair_terms(self) -> tuple[np.ndarray, np.ndarray]:
        """``(t, top)`` with ``||y_i - y_j||^2 = 4^top t_ij``, ``t`` always representable.

        Each pair is formed at the scale ``2^top`` of its larger input.
        """
        e = self.exponents
        S = self.scaled
        ds = np.diag(S)
        with np.errstate(invalid="ignore", over="ignore", under="ignore"):
            if e.min() == e.max():
                # Every row at one scale (the usual case, all 0): the pair scale is that
                # one and each row's relative scale is 1, so the factors below drop out.
                t = ds[:, None] + ds[None, :] - 2.0 * S
                return np.maximum(t, 0.0, out=t), np.full(S.shape, e[0] if e.size else 0)
            top = np.maximum(e[:, None], e[None, :])  # pair scale 2^top
            # Each row's scale relative to the pair's, <= 1.
            si = np.ldexp(1.0, e[:, None] - top)
            sj = np.ldexp(1.0, e[None, :] - top)
            t = si * si * ds[:, None] + sj * sj * ds[None, :] - 2.0 * si * sj * S
            return np.maximum(t, 0.0), top

    def _mark_unused(self, D: np.ndarray) -> np.ndarray:
        u = self.usable
        if not u.all():
            D[~u, :] = np.inf
            D[:, ~u] = np.inf
        np.fill_diagonal(D, 0.0)
        return D

    def sq_distances(self, exponent: int = 0) -> np.ndarray:
        """Squared distances ``||g_i - g_j||^2`` in units of ``2^exponent``.

        Round-off can make ``K_ii + K_jj - 2 K_ij`` slightly negative; it is
        clipped at 0. Pairs involving an unused input are ``+inf`` (such an
        input is farther from everything than any usable one) and the
        diagonal is 0. Each pair is formed at the scale of its larger input
        and saturates to ``+inf`` only when the distance itself overflows (in
        units of ``2^exponent``; see :meth:`distance_exponent`). Distances
        are exact for a shifted Gram: the shift cancels.
        """
        t, top = self._pair_terms()
        with np.errstate(over="ignore", under="ignore"):
            return self._mark_unused(np.ldexp(t, 2 * (top - exponent)))

    def distances(self, exponent: int = 0) -> np.ndarray:
        """Distances ``||g_i - g_j||`` in units of ``2^exponent``, as :meth:`sq_distances`.

        The square root is taken at the pair's own scale, so a distance
        saturates to ``+inf`` only when it is itself beyond float64: 1e300
        apart is 1e300.
        """
        t, top = self._pair_terms()
        with np.errstate(over="ignore", under="ignore"):
            return self._mark_unused(np.ldexp(np.sqrt(t), top - exponent))

    def distance_ranks(self) -> np.ndarray:
        """The order of the distances, as dense ranks (equal distances, equal ranks).

        For rules that only compare distances: each distance is ordered by its
        binary exponent, then its mantissa, at the pair's own scale, so no
        comparison is lost to overflow or underflow. Pairs with an unused
        input are ``+inf``; the diagonal has the lowest rank (distance 0).
        """
        t, top = self._pair_terms()
        m, ex = np.frexp(np.sqrt(t))
        ex = ex + top
        ex = np.where(m == 0, np.iinfo(np.int64).min, ex)  # 0 below every positive distance
        order = np.lexsort((m.ravel(), ex.ravel()))
        km, ke = m.ravel()[order], ex.ravel()[order]
        new = np.ones(order.size, dtype=np.int64)
        new[1:] = (km[1:] != km[:-1]) | (ke[1:] != ke[:-1])
        new[0] = 0
        R = np.empty(order.size)
        R[order] = np.cumsum(new)
        return self._mark_unused(R.reshape(t.shape))

    def relative_unit(self, idx: np.ndarray,
                      r: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Lengths and unit Gram of the inputs ``idx`` relative to one of them, without overflow.

        For ``y_i = g_i - g_r`` (``i`` in ``idx``, ``r`` a position in
        ``idx``; ``y_i = g_i`` for ``r=None``, which needs an unshifted Gram):
        ``||y_i|| = 2^t_i n_i`` and ``U_ij = y_i . y_j / (||y_i|| ||y_j||)``.
        Each ``y_i`` is formed at the scale ``2^t_i`` of the larger of ``g_i``
        and ``g_r``, so inputs of any magnitude give exact directions and
        lengths; rows and columns of zero-length ``y_i`` are 0 in ``U`` (with
        1 on the diagonal).

        Returns
        -------
        n : ndarray of shape (q,)
        t : ndarray of int, shape (q,)
        U : ndarray of shape (q, q)
        """
        idx = np.asarray(idx)
        whole = idx.size == self.p  # idx is every input (the usual case): no copy
        S = self.scaled if whole else self.scaled[np.ix_(idx, idx)]
        e = self.exponents[idx]
        if r is None:
            t, V = e, S
        else:
            t = np.maximum(e, e[r])
            with np.errstate(under="ignore"):
                a = np.ldexp(1.0, e - t)  # g_i's scale relative to y_i's, <= 1
                b = np.ldexp(1.0, e[r] - t)  # g_r's
            aSr = a * S[:, r]
            # (a_i x_i - b_i x_r) . (a_j x_j - b_j x_r), x the scaled rows.
            V = np.outer(a, a) * S
            V -= np.outer(aSr, b)
            V -= np.outer(b, aSr)
            V += S[r, r] * np.outer(b, b)
        n = np.sqrt(np.maximum(np.diag(V), 0.0))
        with np.errstate(divide="ignore"):
            inv = np.where(n > 0, 1.0 / n, 0.0)
        # Round-off may put an entry a little outside [-1, 1]; the distances formed from
        # U clip at 0, so that is harmless. Rows of zero length are 0, 1 on the diagonal.
        U = V * inv[:, None]
        U *= inv[None, :]
        np.fill_diagonal(U, 1.0)
        return n, t, U

    def combination_norm(self, coef: np.ndarray) -> float:
        """``||sum_i c_i y_i||`` without overflow (0 for an empty combination)."""
        nz = coef != 0
        if not nz.any():
            return 0.0
        e = self.exponents + np.frexp(coef)[1]
        top = int(e[nz].max())
        c = np.ldexp(coef, self.exponents - top)
        if nz.all():
            Sz = self.scaled  # the usual case: nothing to mask, no copies
        else:
            # Inputs with a zero coefficient may be unused: 0 * nan must not count.
            c = np.where(nz, c, 0.0)
            Sz = np.where(nz[:, None] & nz[None, :], self.scaled, 0.0)
        return float(np.ldexp(np.sqrt(max(float(c @ Sz @ c), 0.0)), top))

    def transform(self, M: np.ndarray) -> Gram:
        """The Gram of the mixed inputs ``M G``: ``M K M^T``, exact at any magnitude.

        A mixed input that includes an unused input (``M_ji != 0``) is unused
        (non-finite values). The shift, if any, carries over when the rows of
        ``M`` sum to 1.
        """
        u = self.usable
        bad = (M[:, ~u] != 0).any(axis=1)
        # All used (the usual case): no masked copy of M.
        Mf = M if u.all() else np.where(u[None, :], M, 0.0)
        # Mixed row j at its scale 2^f_j: A_ji = M_ji 2^(e_i - f_j), |A| <= 1, so the
        # scaled Gram A S A^T is representable.
        e = self.exponents
        if e.min() == e.max() and np.abs(Mf).max(initial=0.0) <= 1.0:
            # One scale for every input and weights of at most 1 (averages, clipping: the
            # usual case): f_j = that scale and A = M, without the per-entry exponents.
            f = np.full(Mf.shape[0], e[0] if e.size else 0)
            A = Mf
        else:
            nz = Mf != 0
            with np.errstate(divide="ignore"):
                e_ji = np.where(nz, np.frexp(Mf)[1] + e[None, :], np.iinfo(np.int64).min)
            f = np.where(nz.any(axis=1), e_ji.max(axis=1), 0)
            A = np.ldexp(Mf, e[None, :] - f[:, None])
        S2 = A @ self.masked() @ A.T
        S2[bad, bad] = np.nan
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            values = np.ldexp(S2, f[:, None] + f[None, :]) if f.any() else S2
        return Gram.from_data(values, finite=~bad, ref=self.ref, exponents=f, scaled=S2)


def as_gram(K: Any) -> Gram:
    """``K`` as a :class:`Gram`: itself if it is one, else a plain matrix read off its diagonal.

    A matrix without the data cannot tell a NaN or Inf value from a finite
    row whose squared norm overflows (both show as a non-finite diagonal):
    such a row is not used, and the reason says that the two cannot be told
    apart there.
    """
    if isinstance(K, Gram):
        return K
    values = np.asarray(K, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"a Gram matrix must be square: got shape {values.shape}")
    usable = np.isfinite(values.diagonal())
    excluded = tuple((int(i), NONFINITE_UNKNOWN) for i in np.flatnonzero(~usable))
    return Gram(values, usable, excluded, np.zeros(values.shape[0], dtype=np.int64), values)


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
            return Gram.from_data(K, finite=ordinary)
        return Gram.from_data(stack.raw_gram(backend, ref=ref), finite=ordinary, ref=ref,
                              unshifted=Gram.from_data(K, finite=ordinary))
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
        return Gram.from_data(K, finite=finite)
    scale = exponents = None
    if need_scale:
        if ref is not None:
            # The shifted row g_i - g_ref is at most |g_i| + |g_ref| in each coordinate.
            mag = np.maximum(mag, mag[ref])
        exponents = scale_exponents(mag, finite)
        scale = np.ldexp(1.0, -exponents)
    Kt = stack.raw_gram(backend, ref=ref, scale=scale)
    # The unshifted first pass serves inner products with the inputs; without a
    # scaled form of it, a row whose squared norm overflowed there is not held.
    unshifted = None if ref is None else Gram.from_data(K, finite=finite)
    if exponents is None:
        return Gram.from_data(Kt, finite=finite, ref=ref, unshifted=unshifted)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        values = np.ldexp(Kt, exponents[:, None] + exponents[None, :])
    return Gram.from_data(values, finite=finite, ref=ref, exponents=exponents, scaled=Kt,
                          unshifted=unshifted)


