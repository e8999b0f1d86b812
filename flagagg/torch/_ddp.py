"""A DistributedDataParallel communication hook that aggregates robustly.

DDP calls a communication hook once per gradient bucket, in bucket order,
and waits on the returned futures only after the last bucket's hook (the
one with ``bucket.is_last()``) has run. The hook therefore keeps every
bucket's buffer and an unfinished future, and once the last bucket is in it
aggregates the whole flat gradient (all buckets, in bucket order, which is
the same on every rank), writes each bucket's part back into its buffer and
completes all the futures. A robust rule sees the whole gradient, never one
bucket alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import flagagg

from .._backend_choice import select_backend
from .._gram import Gram, as_gram, scale_exponents
from ..backends import _host_backend
from ..rules._flag import RANK_RTOL, FlagAggregator, _median
from ..rules._result import diagnose, linear_stats, suspects_of, worker_diagnostics

__all__ = ["MODES", "DDPHookState", "ddp_comm_hook"]

MODES = ("sharded", "gather")


@dataclass
class DDPHookState:
    """The state of :func:`ddp_comm_hook`: the rule, the mode, and reports of each step.

    Attributes
    ----------
    rule : Rule
        The aggregation rule.
    mode : {"sharded", "gather"}
        How gradients travel; see :func:`ddp_comm_hook`.
    process_group : ProcessGroup or None
        The group (None: the default group).
    excluded : tuple of (int, str)
        Ranks left out in the last step, with the reason; the same on every rank.
    coefficients : ndarray of shape (p,) or None
        The last step's coefficients ``c`` (aggregate ``sum_r c_r g_r``) for
        rules that have them.
    influence : ndarray of shape (p,) or None
        The last step's signed share of each rank in the aggregate, as
        :attr:`flagagg.AggregationResult.influence`.
    cosine : ndarray of shape (p,) or None
        The last step's ``cos(g_r, out)`` for each rank (NaN for excluded ranks).
    verdict : tuple of str
        The last step's verdict on each rank, as
        :attr:`flagagg.AggregationResult.verdict`.
    suspects : tuple of int
        The ranks whose verdict is not "trusted" (nor "excluded"), as
        :attr:`flagagg.AggregationResult.suspects`.

        ``influence``, ``cosine``, ``verdict`` and ``suspects`` are computed
        from the step's ``p x p`` Gram matrix and coefficients when first
        read after the step (the same values as computing them in the step),
        so a loop that never reads them does not pay for them.
    steps : int
        Steps aggregated so far.
    elements_sent : int
        Gradient elements this rank has handed to collectives so far (what
        it sends to other ranks, counting a ring all-gather as ``p - 1``
        sends of its part); multiply by the itemsize for bytes.
    bytes_sent : int
        Every byte this rank has handed to collectives for other ranks so far:
        the gradient elements and the hook's own messages (the partial Gram
        matrices, flags and statistics).
    replicate_below : int, default=262144
        Sharded mode, Gram rules: a bucket of ``m`` elements with
        ``m (p - 1)`` below this goes whole to every rank in one all-to-all,
        and every rank computes its part of the Gram matrix and of the
        aggregate itself: one exchange instead of three, which is what small
        buckets pay for, at ``p/2`` times the ring all-reduce's bytes. 0
        shards every bucket. Set it on every rank alike.
    """

    rule: Any
    mode: str
    process_group: Any = None
    excluded: tuple = ()
    coefficients: np.ndarray | None = None
    steps: int = 0
    elements_sent: int = 0
    bytes_sent: int = 0
    replicate_below: int = 1 << 18
    _scratch: dict = field(default_factory=dict, repr=False)
    _early: bool = field(default=False, repr=False)
    _pending: dict = field(default_factory=dict, repr=False)
    _count: int | None = field(default=None, repr=False)
    _checked: int | None = field(default=None, repr=False)
    # The last step's diagnostics: computed when first read (from the step's
    # summed Gram matrix and coefficients, kept in ``_late``), not inside the
    # backward pass, where every rank would pay for them on every step.
    _late: tuple | None = field(default=None, repr=False)
    _influence: np.ndarray | None = field(default=None, repr=False)
    _cosine: np.ndarray | None = field(default=None, repr=False)
    _verdict: tuple = field(default=(), repr=False)

    @property
    def influence(self) -> np.ndarray | None:
        """The last step's signed share of each rank in the aggregate (see the class doc)."""
        _settle(self)
        return self._influence

    @property
    def cosine(self) -> np.ndarray | None:
        """The last step's ``cos(g_r, out)`` for each rank (see the class doc)."""
        _settle(self)
        return self._cosine

    @property
    def verdict(self) -> tuple:
        """The last step's verdict on each rank (see the class doc)."""
        _settle(self)
        return self._verdict

    @property
    def suspects(self) -> tuple[int, ...]:
        """Ranks the last step found suspect, as :attr:`flagagg.AggregationResult.suspects`."""
        return suspects_of(self.verdict)


def _kind(rule: Any) -> str:
    """How the sharded mode computes ``rule``: "gram", "coordinate", or "" (it cannot).

    Read from the rule's declared capability (``rule.space``, its contract's
    ``space`` unless its parameters narrow it).
    """
    space = getattr(rule, "space", None)
    return space if space in ("gram", "coordinate") else ""


def _solve(rule: Any, K: Any) -> tuple[np.ndarray, tuple]:
    """Coefficients of ``rule`` from the float64 Gram matrix ``K``, and the inputs it excluded."""
    if _lean_flag_applies(rule, K):
        rule.check_workers(K.shape[0])  # as solve_gram: fewer ranks left than the rule needs
        return _lean_flag(rule, K), ()
    sol = rule.solve_gram(K)
    return np.asarray(sol.coefficients, dtype=np.float64), tuple(sol.excluded)


# The lean path runs for world sizes up to this (numpy's eigh throughout, as
# flagagg._linalg.top_eigh uses below its partial-spectrum size).
_LEAN_MAX_P = 32


def _lean_flag_applies(rule: Any, K: Any) -> bool:
    """Whether :func:`_lean_flag` gives ``rule.solve_gram(K).coefficients`` for ``K``.

    The Flag Aggregator with ``lam = 0``, variant "paper" and its default
    rescaling, on a plain Gram matrix (no scaled rows) whose rows all have
    norms well inside float64's range (none excluded, none zero).
    """
    if (type(rule) is not FlagAggregator or rule.lam != 0 or rule.variant != "paper"
            or rule.rescale not in ("auto", "median_norm") or not isinstance(K, np.ndarray)):
        return False
    p = K.shape[0]
    if not 2 <= p <= _LEAN_MAX_P or not np.isfinite(K).all():
        return False
    d = K.diagonal()
    return bool(((d >= _SAFE_LO) & (d <= _SAFE_HI)).all())


def _lean_flag(rule: Any, K: np.ndarray) -> np.ndarray:
    """The Flag Aggregator's coefficients from ``K``, where :func:`_lean_flag_applies`.

    The same floating-point operations, in the same order, as
    :func:`flagagg.rules._flag.solve_gram` on that case (bit for bit the
    same coefficients; ``tests/test_ddp_fast.py`` checks it on hostile Gram
    matrices), without what the hook does not use: the solution object, its
    per-input reports, the general Gram's bookkeeping. At ``p = 4`` it takes
    about half the time (about 110 against 195 us on the development
    machine), paid by every rank on every step.
    """
    p = K.shape[0]
    # Gram.row_norms / normalized of a plain Gram (exponents 0)
    norms = np.sqrt(np.maximum(K.diagonal(), 0.0))
    Kn = K / np.outer(norms, norms)
    Kn = np.clip((Kn + Kn.T) / 2, -1.0, 1.0)
    np.fill_diagonal(Kn, 1.0)
    s, V = np.linalg.eigh(Kn)
    s, V = s[::-1], V[:, ::-1]
    k = int(np.count_nonzero(s > s[0] * RANK_RTOL))
    s, V = s[:k], V[:, :k]
    T = V * np.sqrt(s)
    rank = min(math.ceil(p / 2) if rule.r is None else rule.r, k)
    # lam = 0: no pair terms; the majorisation steps of solve_gram
    history: list = []
    U = s_node = w_node = None
    for n_iter in range(1, rule.max_iter + 1):
        if n_iter == 1:
            U_new = np.eye(k, rank)
            P = T[:, :rank]
        else:
            X = T * np.sqrt(w_node)[:, None]
            B = X.T @ X
            _, vecs = np.linalg.eigh((B + B.T) / 2)
            U_new = vecs[:, k - rank:][:, ::-1]
            P = T @ U_new
        v = np.einsum("ij,ij->i", P, P)
        s_new = np.maximum(1.0 - v, 0.0) + rule.eps
        value = float(np.sqrt(s_new).sum() + 0.0 * 0.0)
        if history and value > history[-1]:
            break
        U, s_node = U_new, s_new
        history.append(value)
        w_node = s_node ** -0.5
        if n_iter > 1 and history[-2] - history[-1] <= rule.tol * abs(history[-2]):
            break
    z = U @ (U.T @ T.sum(axis=0)) / rank
    coef = (V @ (z / np.sqrt(s))) / norms
    # rescale "median_norm": Gram.combination_norm with exponents 0
    nz = coef != 0
    if nz.any():
        top = int(np.frexp(coef)[1][nz].max())
        c = np.where(nz, np.ldexp(coef, -top), 0.0)
        Sz = np.where(nz[:, None] & nz[None, :], K, 0.0)
        out_norm = float(np.ldexp(np.sqrt(max(float(c @ Sz @ c), 0.0)), top))
        if out_norm > 0:
            coef *= _median(norms) / out_norm
    return coef


def ddp_comm_hook(rule: Any = "flag", mode: str = "sharded", *, process_group: Any = None,
                  **params: Any) -> tuple[DDPHookState, Any]:
    """A DDP communication hook that replaces the gradient mean by a robust aggregate.

    Use as ``state, hook = ddp_comm_hook("flag"); model.register_comm_hook(state, hook)``
    on every rank; after ``loss.backward()`` every rank holds the same
    aggregate of all ranks' gradients (the whole flat gradient, all buckets).

    Parameters
    ----------
    rule : str or Rule, default="flag"
        A rule name (with ``params``) or a rule object.
    mode : {"sharded", "gather"}, default="sharded"
        ``"sharded"``: each rank sends shard ``j`` of its flat gradient to
        rank ``j`` (all-to-all; for the Gram rules bucket by bucket, started
        as each bucket arrives, so it overlaps the rest of the backward
        pass); rank ``j`` computes the ``p x p`` partial Gram matrix of its
        shard (with per-row power-of-two scales where a row's squared norm
        would overflow or underflow float64, so that a finite row of 1e200
        is kept as on one machine); the partial Gram matrices are exchanged
        (``p^2 + 2p`` floats per rank, with the scales and finiteness flags)
        and summed in rank order, so every rank solves the same coefficients
        and combines its shard; each rank sends its combined shard to every
        rank (point to point, from and into the bucket buffers: no copies).
        About ``2 n (p-1)/p`` gradient elements sent per rank, as a ring
        all-reduce, in three one-hop exchanges. Coordinate-wise rules run shard by shard. Rules
        that are neither (bulyan, composed rules, centered clipping with a
        center) need ``"gather"``. ``"gather"``: every rank all-gathers
        every gradient and aggregates alone (``n (p-1)`` elements sent per
        rank).
    process_group : ProcessGroup, optional
        The group DDP reduces over (default: the default group).
    **params
        Parameters of the rule when ``rule`` is a name (``f``, ``r``...).

    Returns
    -------
    state : DDPHookState
        Pass to ``register_comm_hook``; it reports each step's excluded ranks.
    hook : callable
        ``hook(state, bucket) -> torch.futures.Future``.

    Notes
    -----
    Trust models. Sharded: every rank's aggregation code is trusted (each
    rank computes the aggregate of its shard for all), any rank's gradient
    may be faulty: bugs, bit flips, bad data, an attacker that controls only
    the data. Gather: no rank relies on another's computation; each
    aggregates the raw gradients itself, at ``p/2`` times the traffic.

    In both modes a rank whose gradient holds NaN or Inf is left out of the
    step on every rank (``state.excluded``); when every rank is left out the
    gradient is set to zero rather than NaN. Every rank computes the same
    numbers in the same order (the kernels' results do not depend on the
    thread count), so the replicas stay bit-identical.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    agg = flagagg.get_rule(rule, **params) if isinstance(rule, str) else rule
    if params and not isinstance(rule, str):
        raise TypeError("pass rule parameters only with a rule name")
    if mode == "sharded" and not _kind(agg):
        raise ValueError(
            f"rule {agg.name!r} needs the whole gradients of every rank; use mode='gather' "
            "(sharded mode runs rules that need only the Gram matrix, and coordinate-wise rules)"
        )
    state = DDPHookState(agg, mode, process_group)
    if dist.is_available() and dist.is_initialized():
        # The world size is known: a rule that cannot run on it fails here, in
        # its own words, not at the first backward() inside DDP's reducer.
        _check_world(state)
    return state, _hook


def _check_world(state: DDPHookState) -> int:
    """Check the rule's bound on p against the group's size (once per size)."""
    world = _group(state)[1]
    if state._checked != world:
        try:
            state.rule.check_workers(world)
        except ValueError as exc:
            raise ValueError(f"flagagg DDP hook on {world} ranks: {exc}") from None
        state._checked = world
    return world


def _hook(state: DDPHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Collect ``bucket``; once the last one is in, aggregate them all (see the module doc)."""
    if state._count is None and not state._pending:
        # First bucket of a step: a configuration error is raised here, as a
        # Python exception from the hook, before any future exists. What the
        # step does is settled here once, not per bucket.
        _check_world(state)
        state._early = state.mode == "sharded" and _kind(state.rule) == "gram"
    fut: torch.futures.Future = torch.futures.Future()
    early = state._early
    # The Gram rules' all-to-all starts as each bucket arrives, while backward
    # still computes the next ones (as DDP's all-reduce overlaps it).
    sent = _send_shards(state, bucket.index(), bucket.buffer()) if early else None
    state._pending[bucket.index()] = (bucket.buffer(), fut, sent)
    if bucket.is_last():
        state._count = bucket.index() + 1
    if state._count is not None and len(state._pending) == state._count:
        pending = [state._pending[i] for i in range(state._count)]
        if state._scratch.get("buckets") != state._count:
            _forget_buckets(state, state._count)
        state._pending, state._count = {}, None
        try:
            if early:
                _bucketed_gram_step(state, [b for b, _, _ in pending],
                                    [x for _, _, x in pending])
            else:
                _aggregate_step(state, [b for b, _, _ in pending])
        except Exception as exc:  # noqa: BLE001 - every waiting future must learn of it
            for _, f, _ in pending:
                f.set_exception(exc)
            return fut
        for buffer, f, _ in pending:
            f.set_result(buffer)
    return fut


# torch's register_comm_hook compares these annotations with the objects
# themselves (torch >= 2.x); under ``from __future__ import annotations``
# they would be strings, which it refuses.
_hook.__annotations__ = {"state": DDPHookState, "bucket": dist.GradBucket,
                         "return": torch.futures.Future[torch.Tensor]}

# A partial squared norm outside [_SAFE_LO, _SAFE_HI] (or 0) sends a shard's
# rows to the exact path: their largest magnitude is read and the shard's
# Gram is formed from rows scaled by powers of two (as the local Gram does,
# flagagg._gram.stack_gram). Inside it nothing overflows or underflows.
_SAFE_LO = 2.0 ** -800
_SAFE_HI = 2.0 ** 800
# The exponent sent for a row that is exactly zero in a shard: it takes no
# part in the maximum over shards, and scales that shard's zeros to zero.
_ZERO_ROW = -(2 ** 20)


def _split(n: int, world: int) -> list[int]:
    """Shard lengths of ``n`` elements over ``world`` ranks: as even as possible, no padding."""
    q, r = divmod(n, world)
    return [q + (j < r) for j in range(world)]


def _forget_buckets(state: DDPHookState, count: int) -> None:
    """Drop the plans and buffers of bucket indices from ``count`` on (DDP has fewer now).

    A plan holds views of its bucket's buffer: kept, it would keep a bucket
    that DDP has replaced alive.
    """
    for key in [k for k in state._scratch if isinstance(k, tuple) and len(k) == 2
                and k[0] in ("plan", "whole", "shards", "copies") and k[1] >= count]:
        del state._scratch[key]
    state._scratch["buckets"] = count


def _scratch(state: DDPHookState, key: tuple, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A buffer kept across steps (DDP keeps its buckets): no allocation, no page faults."""
    buf = state._scratch.get(key)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = torch.empty(shape, dtype=like.dtype, device=like.device)
        state._scratch[key] = buf
    return buf


def _sent(state: DDPHookState, elements: int, itemsize: int, gradient: bool = True) -> None:
    if gradient:
        state.elements_sent += elements
    state.bytes_sent += elements * itemsize


class _Plan:
    """How one bucket travels, settled once for its buffer and kept across steps.

    ``lens`` is None for a bucket that goes whole to every rank (``copies``
    holds the ``p`` copies sent); otherwise ``lens`` are the shard lengths,
    ``own`` this rank's shard of the bucket buffer (a view), ``peers`` the
    views the other ranks' combined shards are received into, ``targets`` the
    ranks this rank's combined shard goes to.
    """

    __slots__ = ("key", "recv", "recv_flat", "copies", "copies_flat", "lens", "splits",
                 "own", "own_list", "peers", "targets")


def _group(state: DDPHookState) -> tuple[Any, int, int]:
    """``(process group object, world size, rank in it)``, looked up once per group."""
    cached = state._scratch.get("group")
    if (cached is None or cached[0] is not state.process_group
            or (cached[0] is None and cached[1] is not dist.group.WORLD)):
        group = state.process_group
        pg = group if group is not None else dist.group.WORLD
        cached = (group, pg, dist.get_world_size(group), dist.get_rank(group))
        state._scratch["group"] = cached
    return cached[1:]


def _plan(state: DDPHookState, index: int, flat: torch.Tensor, world: int, rank: int) -> _Plan:
    """The :class:`_Plan` of bucket ``index`` (built again when its buffer or size changes)."""
    n = flat.numel()
    key = (flat.data_ptr(), n, flat.dtype, flat.device, world, rank, state.replicate_below)
    plan = state._scratch.get(("plan", index))
    if plan is not None and plan.key == key:
        return plan
    plan = _Plan()
    plan.key = key
    if n * (world - 1) < state.replicate_below:
        plan.lens = None
        plan.recv = _scratch(state, ("whole", index), (world, n), flat)
        plan.copies = _scratch(state, ("copies", index), (world, n), flat)
        plan.copies_flat = plan.copies.view(-1)
    else:
        lens = _split(n, world)
        m = lens[rank]
        starts = np.concatenate([[0], np.cumsum(lens)]).tolist()
        plan.lens = lens
        plan.splits = [m] * world
        plan.recv = _scratch(state, ("shards", index), (world, m), flat)
        plan.own = flat[starts[rank]:starts[rank] + m]
        plan.own_list = [plan.own]
        plan.targets = [j for j in range(world) if j != rank] if m else []
        plan.peers = [(j, [flat[starts[j]:starts[j + 1]]]) for j in range(world)
                      if j != rank and lens[j]]
    plan.recv_flat = plan.recv.view(-1)
    state._scratch[("plan", index)] = plan
    return plan


def _backend(state: DDPHookState, like: torch.Tensor) -> Any:
    """The torch backend for tensors like ``like`` (looked up once per device type)."""
    key = ("backend", like.device.type)
    impl = state._scratch.get(key)
    if impl is None:
        impl = state._scratch[key] = select_backend(None, like, "torch")
    return impl


def _a2a_options() -> Any:
    opts = dist.AllToAllOptions()
    if hasattr(opts, "asyncOp"):  # torch >= 2.6: the caller waits on the work itself
        opts.asyncOp = True
    return opts


# The process group's own all-to-all: torch.distributed.all_to_all_single
# checks its arguments on every call (about as long as the call itself);
# the hook's are settled in its plans. torch < 2.6 names it alltoall_base.
_ALL_TO_ALL = (getattr(dist.ProcessGroup, "all_to_all_single", None)
               or dist.ProcessGroup.alltoall_base)
_A2A_OPTIONS = _a2a_options()


def _send_shards(state: DDPHookState, index: int, buffer: torch.Tensor) -> tuple:
    """Start the all-to-all of one bucket: rank j will hold shard j of every rank's bucket.

    The bucket buffer is sent as it is (uneven splits, no padded copy) into a
    ``(p, m)`` buffer kept across steps. A small bucket
    (:attr:`DDPHookState.replicate_below`) goes whole to every rank instead
    (``plan.lens`` None).
    """
    pg, world, rank = _group(state)
    flat = buffer.view(-1)
    plan = _plan(state, index, flat, world, rank)
    n = flat.numel()
    if plan.lens is None:
        plan.copies.copy_(flat.expand(world, n))
        work = _ALL_TO_ALL(pg, plan.recv_flat, plan.copies_flat, [], [], _A2A_OPTIONS)
        _sent(state, n * (world - 1), flat.element_size())
    else:
        work = _ALL_TO_ALL(pg, plan.recv_flat, flat, plan.splits, plan.lens, _A2A_OPTIONS)
        _sent(state, n - plan.lens[rank], flat.element_size())
    return plan, work


def _shard_gram(impl: Any, X: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The partial Gram of one shard ``X`` (p x m): ``(S, e, finite)``, ``K = 2^(e_i+e_j) S``.

    The common case is one pass and ``e = 0``. A row whose partial squared
    norm is outside the safe range (NaN, Inf, overflowing, underflowing or
    zero) is read again: whether it is finite, and its largest magnitude.
    If a finite non-zero row is among them, the shard's Gram is formed again
    from every row scaled by ``2^-e_i`` (:func:`flagagg._gram.scale_exponents`),
    so that a row of 1e200 is held exactly instead of overflowing.
    """
    p = X.shape[0]
    K = np.asarray(impl.gram(X), dtype=np.float64) if X.shape[1] else np.zeros((p, p))
    d = K.diagonal()
    with np.errstate(invalid="ignore"):
        ordinary = (d >= _SAFE_LO) & (d <= _SAFE_HI)
    e = np.zeros(p, dtype=np.int64)
    if ordinary.all():
        return K, e, ordinary
    finite = ordinary.copy()
    mag = np.sqrt(np.where(ordinary, d, 0.0))
    for i in np.flatnonzero(~ordinary):
        row = X[i]
        finite[i] = bool(torch.isfinite(row).all())
        mag[i] = float(row.abs().max()) if finite[i] and row.numel() else 0.0
    zero = finite & (mag == 0.0)
    if not (finite & ~ordinary & ~zero).any():
        e[zero] = _ZERO_ROW
        return K, e, finite
    e = scale_exponents(mag, finite)
    S = np.asarray(impl.gram(X, scale=np.ldexp(1.0, -e)), dtype=np.float64)
    e[zero] = _ZERO_ROW
    return S, e, finite


def _combine_grams(parts: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray | None,
                                                       np.ndarray]:
    """Sum the ranks' partial Grams of ``p`` rows (in rank order): ``(S, e or None, finite)``.

    ``parts[j]`` is rank j's message: its scaled partial Gram, exponents and
    finiteness flags (:func:`_shard_gram`). With ``e`` None, ``S`` is the Gram
    itself; otherwise ``K = 2^(e_i + e_j) S`` with ``e_i`` the largest of row
    i's exponents, every partial Gram brought to it exactly (powers of two).
    """
    pp = p * p
    S_parts = parts[:, :pp].reshape(-1, p, p)
    E = parts[:, pp:pp + p].astype(np.int64)
    finite = (parts[:, pp + p:] > 0.5).all(axis=0)
    if not E.any():
        S = S_parts[0].copy()
        for Sj in S_parts[1:]:
            S += Sj
        return S, None, finite
    e = np.where(finite, E.max(axis=0), 0)
    e = np.where(e == _ZERO_ROW, 0, e)
    S = np.zeros((p, p))
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        for Sj, Ej in zip(S_parts, E, strict=True):
            dj = np.where(finite, Ej - e, 0)
            S += np.ldexp(Sj, dj[:, None] + dj[None, :])
    if not e.any():
        return S, None, finite
    return S, e, finite


def _bucketed_gram_step(state: DDPHookState, buffers: list[torch.Tensor], sent: list) -> None:
    """Sharded step of a Gram rule on shards cut bucket by bucket (all-to-alls already sent).

    The Gram matrix is additive over coordinates, so the partial Gram
    matrices of every bucket's shard are summed (in bucket order) on each
    rank and exchanged (with the scale exponents and finiteness flags, one
    small all-to-all) and summed in rank order: every rank solves the same
    coefficients. Each rank combines its shard of every bucket and sends it
    to every rank (point-to-point sends from its part of each bucket buffer
    into the others' buffers).
    """
    pg, world, rank = _group(state)
    impl = None
    # [sharded buckets' partial Gram, whole buckets' Gram]: (S, e, finite) each
    acc: list = [None, None]
    for plan, work in sent:
        work.wait()
        impl = impl or _backend(state, plan.recv)
        part = _shard_gram(impl, plan.recv)
        j = int(plan.lens is None)
        acc[j] = part if acc[j] is None else _add_grams(acc[j], part)
    parts = []
    if acc[0] is not None:
        parts.append(_exchange(state, acc[0], buffers[0], pg, world))
    if acc[1] is not None:  # the same on every rank: added after the ranks' parts
        S1, e1, f1 = acc[1]
        parts.append(np.concatenate([S1.reshape(-1), e1, f1])[None, :])
    S, e, finite = _combine_grams(parts[0] if len(parts) == 1 else np.concatenate(parts),
                                  world)
    coef, K, rule_excluded = None, None, []
    if finite.all():
        keep = _ALL_RANKS.get(world)
        if keep is None:
            keep = np.arange(world)
            keep.flags.writeable = False
            _ALL_RANKS[world] = keep
        excluded = []
    else:
        keep = np.flatnonzero(finite)
        excluded = [(int(r), "non-finite values (NaN or Inf)")
                    for r in range(world) if not finite[r]]
    if keep.size:
        if keep.size == world:
            K = S if e is None else Gram.from_scaled(S, e, finite=finite)
            K_keep = K
        else:
            ix = np.ix_(keep, keep)
            if e is None:
                K, K_keep = S, S[ix]
            else:  # rows beyond float64's squared range, held by their scaled form
                K = Gram.from_scaled(S, e, finite=finite)
                K_keep = Gram.from_scaled(S[ix], e[keep],
                                          finite=np.ones(keep.size, dtype=bool))
        coef_kept, rule_excluded = _solve(state.rule, K_keep)
        if keep.size == world:
            coef = coef_kept
        else:
            coef = np.zeros(world)
            coef[keep] = coef_kept
    # Every receive is posted before this rank combines (the peers send once
    # they have combined theirs): the other ranks' combined shards land in the
    # bucket buffers straight from the socket. Posted after the solve, the
    # one step here that may raise: a failed step leaves no receive behind.
    works = [pg.recv(dst, j, i) for i, (plan, _) in enumerate(sent) if plan.lens is not None
             for j, dst in plan.peers]
    for i, (buf, (plan, _)) in enumerate(zip(buffers, sent, strict=True)):
        if plan.lens is None:  # a whole bucket: this rank computes all of it
            if coef is None:
                buf.zero_()
            else:
                _combine_into(impl, coef, plan.recv, buf.view(-1))
            continue
        own = plan.own
        m = own.numel()
        if coef is None or m == 0:
            own.zero_()
        else:
            _combine_into(impl, coef, plan.recv, own)
        # Point to point, straight from this rank's part of the bucket into
        # the others' (an all-to-all would need the part copied p times).
        # The process group's own send/recv take ranks in the group and skip
        # torch.distributed's per-call argument checks.
        for j in plan.targets:
            works.append(pg.send(plan.own_list, j, i))
        _sent(state, m * (world - 1), buf.element_size())
    # The diagnostics are formed from K when the state is read (_settle).
    _record(state, excluded, rule_excluded, keep, coef, K, world)
    for work in works:
        work.wait()


def _combine_into(impl: Any, coef: np.ndarray, X: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst[:] = sum_r coef[r] X[r]``: on the CPU straight into ``dst`` (no result to copy).

    The host kernel writes float32/float64 CPU buckets in place; other
    dtypes and devices go through the backend's combination and a copy.
    Either way the values are those of ``impl.combine(coef, X)``.
    """
    if (dst.device.type == "cpu" and X.device.type == "cpu" and dst.dtype == X.dtype
            and X.dtype in (torch.float32, torch.float64) and dst.is_contiguous()):
        host = _host_backend()
        if host.name == "numba":
            host.combine(coef, X.detach().numpy(), out=dst.detach().numpy())
            return
    dst.copy_(impl.combine(coef, X))


# np.arange(p), shared by the steps where every rank is finite (read only)
_ALL_RANKS: dict = {}


def _add_grams(a: tuple, b: tuple) -> tuple:
    """The sum of two scaled partial Grams ``(S, e, finite)`` (:func:`_shard_gram`).

    Both are brought to the larger exponent of each row (powers of two: exact).
    """
    (S1, e1, f1), (S2, e2, f2) = a, b
    if not (e1.any() or e2.any()):
        return S1 + S2, e1, f1 & f2
    e = np.maximum(e1, e2)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        d1 = np.where(e1 == _ZERO_ROW, _ZERO_ROW, e1 - e)
        d2 = np.where(e2 == _ZERO_ROW, _ZERO_ROW, e2 - e)
        S = np.ldexp(S1, d1[:, None] + d1[None, :]) + np.ldexp(S2, d2[:, None] + d2[None, :])
    return S, e, f1 & f2


def _exchange(state: DDPHookState, part: tuple, like: torch.Tensor, pg: Any,
              world: int) -> np.ndarray:
    """Every rank's partial Gram ``(S, e, finite)``, as a ``(p, p^2 + 2p)`` array in rank order.

    One one-hop all-to-all of the message repeated ``p`` times, between
    float64 buffers kept across steps on the gradients' device: gloo's ring
    all-gather takes ``p - 1`` hops, and on loaded cores every hop waits for
    a peer to be scheduled.
    """
    S, e, finite = part
    p = S.shape[0]
    size = p * p + 2 * p
    send = _scratch(state, ("gram-send",), (world, size), like.new_empty((), dtype=torch.float64))
    recv = _scratch(state, ("gram-recv",), (world, size), send)
    if send.device.type == "cpu":
        rows = send.numpy()
        rows[:, :p * p] = S.reshape(-1)
        rows[:, p * p:p * p + p] = e
        rows[:, p * p + p:] = finite
    else:
        msg = torch.from_numpy(np.concatenate([S.reshape(-1), e, finite]).astype(np.float64))
        send.copy_(msg.to(send.device).expand(world, size))
    _ALL_TO_ALL(pg, recv.view(-1), send.view(-1), [], [], _A2A_OPTIONS).wait()
    _sent(state, size * (world - 1), 8, gradient=False)
    return recv.cpu().numpy()


def _all_gather_single(out: torch.Tensor, tensor: torch.Tensor, group: Any) -> None:
    # torch 2.13 deprecates all_gather_into_tensor for all_gather_single (same
    # semantics); torch >= 2.2 before it has only the former.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, tensor, group=group)


def _all_gather(tensor: torch.Tensor, group: Any) -> list[torch.Tensor]:
    # Into one tensor: gloo's list form copies through per-rank buffers and
    # took 2.7x as long for 264k floats on 4 ranks (32.8 ms against 12.3).
    world = dist.get_world_size(group)
    flat = tensor.contiguous().reshape(-1)
    out = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
    _all_gather_single(out, flat, group)
    return list(out.view(world, *tensor.shape).unbind(0))


def _aggregate_step(state: DDPHookState, buffers: list[torch.Tensor]) -> None:
    """Aggregate the flat gradient made of ``buffers`` and write it back into them."""
    group = state.process_group
    world = dist.get_world_size(group)
    flat = torch.cat([b.reshape(-1) for b in buffers])
    # Every rank learns which gradients are not finite: p flags. (Gram rules in
    # sharded mode take _bucketed_gram_step, where the flags ride with K.)
    ok = torch.isfinite(flat).all()
    flags = torch.cat(_all_gather(ok.to(torch.int32).reshape(1), group))
    keep = np.flatnonzero(flags.cpu().numpy().astype(bool))
    _sent(state, world - 1, 4, gradient=False)
    if state.mode == "gather":
        out, coef, rule_excluded, stats = _gather_step(state, flat, keep, world)
    else:
        out, coef, rule_excluded, stats = _sharded_step(state, flat, keep, world)
    excluded = [(int(r), "non-finite values (NaN or Inf)")
                for r in sorted(set(range(world)) - set(keep.tolist()))]
    _record(state, excluded, rule_excluded, keep, coef, stats, world)
    start = 0
    for b in buffers:
        b.copy_(out[start:start + b.numel()].view_as(b))
        start += b.numel()


def _inner_stats(rows: torch.Tensor, out: torch.Tensor) -> np.ndarray:
    """``[<g_r, out> for r, ||g_r||^2 for r, ||out||^2]`` in float64, for diagnostics."""
    R = rows.to(torch.float64)
    o = out.to(torch.float64)
    return torch.cat([R @ o, (R * R).sum(dim=1), (o @ o).reshape(1)]).cpu().numpy()


def _split_stats(v: np.ndarray, world: int) -> tuple:
    return v[:world], v[world:2 * world], float(v[2 * world]), None


def _record(state: DDPHookState, excluded: list, rule_excluded: list, keep: np.ndarray,
            coef: np.ndarray | None, stats: Any, world: int) -> None:
    """One step's exclusions and coefficients into ``state``; its diagnostics for later.

    ``stats`` is None when every rank was left out, the rule's result (a dict)
    in gather mode, the summed Gram matrix (a :class:`~flagagg._gram.Gram` or
    a plain array) for a Gram rule in sharded mode, or plain inner products
    (coordinate-wise rules in sharded mode). The per-rank diagnostics are
    formed from them by :func:`_settle` when the state is first read.
    """
    excluded = excluded + [(int(keep[i]), reason) for i, reason in rule_excluded]
    state.excluded = tuple(sorted(excluded))
    state.coefficients = coef
    state._late = (stats, coef, state.excluded, keep, world)
    state.steps += 1


def _settle(state: DDPHookState) -> None:
    """Form the last step's per-rank diagnostics from what :func:`_record` kept (once)."""
    if state._late is None:
        return
    stats, coef, excluded, keep, world = state._late
    state._late = None
    if stats is None:
        influence, cosine = None, np.full(world, np.nan)
        verdict = tuple(f"excluded: {why}" for _, why in excluded)
    elif isinstance(stats, dict):  # gather: the rule's own result, on the kept ranks
        influence, cosine, verdict = _spread(stats, keep, excluded, world)
    elif isinstance(stats, tuple):  # coordinate-wise rule in sharded mode: inner products
        diag = worker_diagnostics(*stats[:3], coef, excluded, stats[3])
        influence, cosine, verdict = diag["influence"], diag["cosine"], diag["verdict"]
    else:  # sharded Gram rule: from the summed (possibly scaled) Gram, as the rules do
        # (an input of 1e200 keeps its share of the output; the plain Gram
        # would read its norm as Inf)
        diag = diagnose(linear_stats(as_gram(stats), coef), coef, excluded)
        influence, cosine, verdict = diag["influence"], diag["cosine"], diag["verdict"]
    state._influence, state._cosine, state._verdict = influence, cosine, tuple(verdict)


def _spread(res: dict, keep: np.ndarray, excluded: tuple, world: int) -> tuple:
    """The kept ranks' diagnostics put at their ranks; excluded ranks say why."""
    reasons = dict(excluded)
    influence = None
    if res["influence"] is not None:
        influence = np.zeros(world)
        influence[keep] = res["influence"]
    cosine = np.full(world, np.nan)
    if res["cosine"] is not None:
        cosine[keep] = res["cosine"]
    verdict = [f"excluded: {reasons.get(r, '')}" for r in range(world)]
    for i, r in enumerate(keep.tolist()):
        verdict[r] = f"excluded: {reasons[r]}" if r in reasons else res["verdict"][i]
    return influence, cosine, tuple(verdict)


def _gather_step(state: DDPHookState, flat: torch.Tensor, keep: np.ndarray,
                 world: int) -> tuple[torch.Tensor, np.ndarray | None, list, tuple | None]:
    parts = _all_gather(flat, state.process_group)
    _sent(state, flat.numel() * (world - 1), flat.element_size())
    if keep.size == 0:
        return torch.zeros_like(flat), None, [], None
    res = state.rule([parts[r] for r in keep.tolist()], return_result=True)
    coef = None
    if res.coefficients is not None:
        coef = np.zeros(world)
        coef[keep] = res.coefficients
    stats = {"influence": res.influence, "cosine": res.cosine, "verdict": res.verdict}
    return res.aggregate.to(flat.dtype), coef, list(res.excluded), stats


def _sharded_step(state: DDPHookState, flat: torch.Tensor, keep: np.ndarray,
                  world: int) -> tuple[torch.Tensor, np.ndarray | None, list, tuple | None]:
    """Sharded step of a coordinate-wise rule: shard by shard (Gram rules: _bucketed_gram_step)."""
    group = state.process_group
    n = flat.numel()
    s = -(-n // world)
    padded = torch.zeros(s * world, dtype=flat.dtype, device=flat.device)
    padded[:n] = flat
    recv = torch.empty_like(padded)
    dist.all_to_all_single(recv, padded, group=group)
    _sent(state, s * (world - 1), flat.element_size())
    X = recv.view(world, s)  # row r: rank r's values of this rank's shard
    coef = None
    rule_excluded: list = []
    stats = None
    if keep.size == 0:
        shard = torch.zeros(s, dtype=flat.dtype, device=flat.device)
    else:
        shard = state.rule(X if keep.size == world else X[torch.as_tensor(keep)])
        # Inner products with the output, shard by shard, summed in rank order
        # on every rank: 2p + 1 numbers per rank.
        part = torch.as_tensor(_inner_stats(X, shard), device=flat.device)
        stats = _split_stats(sum(q.cpu().numpy() for q in _all_gather(part, group)), world)
        _sent(state, part.numel() * (world - 1), part.element_size(), gradient=False)
    gathered = torch.empty(s * world, dtype=flat.dtype, device=flat.device)
    _all_gather_single(gathered, shard.to(flat.dtype).contiguous(), group)
    _sent(state, s * (world - 1), flat.element_size())
    return gathered[:n], coef, rule_excluded, stats
