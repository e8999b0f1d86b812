"""Robust aggregation as Flower strategies (Flower's Message API).

:class:`RobustStrategy` is a :class:`flwr.serverapp.strategy.FedAvg` whose
training aggregation is any flagagg rule. Sampling, evaluation, metrics
aggregation and ``start()`` are Flower's own.

Each round it aggregates the clients' *updates*, ``reply arrays - global
arrays the round started from``, one pytree of per-layer NumPy arrays per
client (no concatenated copy, dtypes kept), and adds the aggregate to the
global model. Replies that are malformed are left out with the reason; a
round that cannot be aggregated is skipped with a warning and the global
model stays as it was. Per-client diagnostics go into the round's
:class:`~flwr.app.MetricRecord` and the log.

Trust model: the ServerApp (and so this strategy) is trusted; every client
reply may be arbitrary: wrong keys, shapes, dtypes or bytes, NaN and Inf,
crafted updates, any claimed ``num-examples``.

Needs the ``flower`` extra (``pip install "flagagg[flower]"``);
``import flagagg`` does not import Flower, ``import flagagg.flower`` does.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "flagagg.flower needs Flower's Message API (flwr >= 1.22): "
        'pip install "flagagg[flower]"'
    ) from exc

from .rules import get_rule

__all__ = ["RobustStrategy", "RoundDiagnostics"]

# A child of Flower's logger: its lines appear in Flower's log, and
# logging.getLogger("flwr.flagagg") tunes them alone.
logger = logging.getLogger("flwr.flagagg")

_NUMPY_STYPE = "numpy.ndarray"
_PREFIX = "flagagg."


class _Malformed(Exception):
    """A client reply that cannot be used; the message is the reason."""


@dataclass(frozen=True)
class RoundDiagnostics:
    """What the strategy did with the replies of one training round.

    Every mapping is keyed by the node id of the client (Flower's, random
    per run); :attr:`clients` maps it to the id the client states (its
    partition id), and :meth:`label` names a client by both.

    Attributes
    ----------
    server_round : int
        The round, from 1.
    rule : str
        Name of the rule that aggregated (e.g. ``"nnm+flag"``).
    replies : int
        Replies received, with errors and malformed ones.
    aggregated : tuple of int
        Node ids whose updates went into the rule, in the order given to it.
    rejected : dict of int to str
        Replies left out before the rule (error replies, missing or extra
        arrays, wrong shapes or dtypes, undecodable bytes, NaN or Inf, bad
        ``num-examples`` when weighting), with the reason.
    excluded : dict of int to str
        Updates the rule itself left out (its ``result.excluded``), with the
        reason.
    selected : tuple of int
        Updates the rule selected (Krum family without pre-aggregation),
        else empty.
    influence : dict of int to float
        Signed share of each aggregated update in the aggregate, as
        :attr:`flagagg.AggregationResult.influence`: ``|c_i| <u_i, out> /
        ||out||^2`` for rules that return a linear combination ``out = sum_i
        c_i u_i``, an equivalent for coordinate-wise rules. Its sign is the
        cosine's: negative means the update pulls against the aggregate.
    cosine : dict of int to float
        Cosine between each aggregated update and the aggregate (NaN for a
        zero update or a zero aggregate).
    verdict : dict of int to str
        The rule's verdict on each aggregated update
        (:attr:`flagagg.AggregationResult.verdict`).
    suspects : tuple of int
        Node ids whose reply was rejected or whose update the rule found
        suspect (excluded, outsized or pulling against), ascending.
    clients : dict of int to int or str
        The id each client states in its reply's MetricRecord under the
        strategy's ``client_id_key`` (``"partition-id"`` by default), where it
        states one. It is a label the client chooses, not an authenticated
        identity: a Byzantine client can claim any id (two replies claiming
        one id are both labelled with it); the node id stays the key.
    ratios : dict of int to float
        The Flag Aggregator's reconstruction ratios ``v_i`` in [0, 1]; empty
        for other rules and after pre-aggregation (the ratios then belong to
        the mixed inputs, not to clients).
    skipped : str or None
        Why the round was not aggregated (the global model was kept), else
        ``None``.
    seconds : float
        Wall time of the server-side aggregation (validation, rule,
        diagnostics, new global arrays).
    """

    server_round: int
    rule: str
    replies: int
    aggregated: tuple[int, ...] = ()
    rejected: dict[int, str] = field(default_factory=dict)
    excluded: dict[int, str] = field(default_factory=dict)
    selected: tuple[int, ...] = ()
    influence: dict[int, float] = field(default_factory=dict)
    cosine: dict[int, float] = field(default_factory=dict)
    ratios: dict[int, float] = field(default_factory=dict)
    verdict: dict[int, str] = field(default_factory=dict)
    suspects: tuple[int, ...] = ()
    clients: dict[int, int | str] = field(default_factory=dict)
    skipped: str | None = None
    seconds: float = 0.0

    def label(self, node_id: int) -> str:
        """``"partition 3 (node 8412...)"``, or ``"node 8412..."`` when the client stated no id."""
        if node_id in self.clients:
            return f"partition {self.clients[node_id]} (node {node_id})"
        return f"node {node_id}"

    def metrics(self) -> dict[str, int | float]:
        """The diagnostics as MetricRecord entries, ``"flagagg.<what>.<node id>"``.

        Returns
        -------
        entries : dict of str to int or float
            ``flagagg.replies``, ``flagagg.aggregated``, ``flagagg.rejected``
            and ``flagagg.skipped`` (counts, 1/0), ``flagagg.seconds``, and per
            node ``flagagg.excluded.<id>`` (1 when rejected or excluded by the
            rule, else 0), ``flagagg.influence.<id>``,
            ``flagagg.cosine.<id>``, ``flagagg.ratio.<id>`` and
            ``flagagg.selected.<id>`` where the rule has them,
            ``flagagg.suspect.<id>`` (1/0) and ``flagagg.client.<id>`` (the
            stated partition id, where it is a number).
        """
        out: dict[str, int | float] = {
            f"{_PREFIX}replies": self.replies,
            f"{_PREFIX}aggregated": len(self.aggregated),
            f"{_PREFIX}rejected": len(self.rejected),
            f"{_PREFIX}skipped": int(self.skipped is not None),
            f"{_PREFIX}seconds": float(self.seconds),
        }
        for nid in (*self.rejected, *self.aggregated):
            out[f"{_PREFIX}excluded.{nid}"] = int(nid in self.rejected or nid in self.excluded)
        for name, values in (("influence", self.influence), ("cosine", self.cosine),
                             ("ratio", self.ratios)):
            for nid, v in values.items():
                out[f"{_PREFIX}{name}.{nid}"] = float(v)
        if self.selected:
            for nid in self.aggregated:
                out[f"{_PREFIX}selected.{nid}"] = int(nid in self.selected)
        for nid in (*self.rejected, *self.aggregated):
            out[f"{_PREFIX}suspect.{nid}"] = int(nid in self.suspects)
        for nid, cid in self.clients.items():
            if isinstance(cid, int):
                out[f"{_PREFIX}client.{nid}"] = cid
        return out


class RobustStrategy(FedAvg):
    """Flower's FedAvg with a flagagg rule in place of the weighted average.

    Parameters
    ----------
    rule : str or callable, default="flag"
        A name from :func:`flagagg.available_rules`, or a rule object built
        with :func:`flagagg.get_rule` (then give ``f``, ``pre`` and the
        rule's parameters to ``get_rule``, not here).
    f : int, optional
        Number of Byzantine clients tolerated per round. Passed to the rule
        and to the pre-aggregation steps that take it.
    pre : list, optional
        Pre-aggregation steps, e.g. ``["nnm"]`` (see :func:`flagagg.get_rule`).
    weight_by_num_examples : bool, default=False
        Scale each update by ``p * n_i / sum_j n_j`` before the rule, with
        ``n_i`` the ``num-examples`` (``weighted_by_key``) a client reports.
        With ``rule="mean"`` this is exactly FedAvg. Off by default because
        a Byzantine client can claim any number: with weighting on, one
        client claiming ``1e9`` examples multiplies its update by almost
        ``p`` and scales every honest update towards 0, which a robust rule
        only partly undoes. Replies whose count is not a finite number
        ``> 0`` are rejected when it is on.
    fraction_train, fraction_evaluate : float, optional
        Flower's sampling, as in ``flwr.serverapp.strategy.FedAvg``.
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int, optional
        Flower's sampling, as in FedAvg. Flower sizes a round's sample from
        the nodes connected when the round starts, before it waits for
        ``min_available_nodes``: a first round that starts while clients are
        still registering can sample as few as ``min_train_nodes``. A robust
        rule's ``f`` counts replies, so set ``min_train_nodes`` to the number
        of clients a round must hear.
    weighted_by_key, arrayrecord_key, configrecord_key : str, optional
        Record keys, as in FedAvg.
    client_id_key : str or None, default="partition-id"
        Key of the id a client states in its reply's MetricRecord (e.g.
        ``MetricRecord({"num-examples": n, "partition-id": pid})``, with
        ``pid = context.node_config["partition-id"]``); the diagnostics name
        clients by it beside Flower's node id. None: node ids only.
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn : callable, optional
        Aggregation of the clients' own MetricRecords, as in FedAvg (by
        default Flower's average weighted by ``weighted_by_key``; only
        replies whose MetricRecord has a finite weight ``> 0`` and the keys
        most replies have take part, so a crafted MetricRecord cannot stop
        the round).
    reference_fn : callable, optional
        For rules that need a reference update held by the server
        (``"fltrust"``): ``reference_fn(server_round, global_arrays)`` returns
        the server's own update on its clean root dataset this round, as a
        dict with the floating-point arrays' keys, shapes and dtypes
        (``w_server - w``, the same convention as the clients' updates).
        Required for ``"fltrust"``; the server is trusted, so a reference of
        the wrong form stops the ServerApp (TypeError or ValueError) rather
        than skipping the round.
    **rule_params
        Parameters of the rule, e.g. ``r`` for ``"flag"`` or ``m`` for
        ``"multi_krum"``. ``"flag"``'s default output is on the updates' own
        scale (median norm), so the global model moves by about a client
        update's length, not by the published normalised output's.

    Attributes
    ----------
    rule_ : callable
        The flagagg rule.
    diagnostics_ : dict of int to RoundDiagnostics
        Per training round, what was aggregated, rejected and why.

    Notes
    -----
    Each round aggregates the updates ``u_i = w_i - w`` of the arrays
    ``w_i`` a client sends back minus the global arrays ``w`` sent to it, and
    the new global arrays are ``w + rule(u_1, ..., u_p)``. Aggregating
    updates rather than weights lets the rules see gradient-like vectors:
    the weights' large common part does not dominate their distances and
    norms (and nothing cancels in float32).

    Floating-point arrays are aggregated by the rule, each in its own dtype.
    Integer and boolean arrays (counters such as BatchNorm's
    ``num_batches_tracked``) take the lower median of the accepted replies'
    values. A reply must hold one ArrayRecord (the one under
    ``arrayrecord_key`` if it has several) with exactly the global arrays'
    keys, shapes and dtypes, serialised by NumPy, with finite values.

    A round is skipped, with a warning and ``flagagg.skipped = 1`` in its
    MetricRecord, when no reply is usable, when the rule refuses the
    number of updates left (e.g. ``need p >= 2f + 3 for krum``), or when its
    aggregate is not finite; the ServerApp goes on with the global model
    unchanged.

    Examples
    --------
    In a ServerApp's ``main(grid, context)``::

        from flagagg.flower import RobustStrategy

        strategy = RobustStrategy("flag", f=3, pre=["nnm"], fraction_evaluate=0.0)
        result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=10)
    """

    def __init__(
        self,
        rule: str | Callable[..., Any] = "flag",
        f: int | None = None,
        *,
        pre: Any = None,
        weight_by_num_examples: bool = False,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        client_id_key: str | None = "partition-id",
        reference_fn: Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
        **rule_params: Any,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.rule_ = _make_rule(rule, f, pre, rule_params)
        self.f = f
        self.weight_by_num_examples = bool(weight_by_num_examples)
        self.client_id_key = client_id_key
        self.diagnostics_: dict[int, RoundDiagnostics] = {}
        self.reference_fn = _check_reference_fn(self.rule_, reference_fn)
        # Per-client indices of the rule's selected/ratios refer to the mixed
        # inputs after pre-aggregation, so they are reported only without it.
        self._per_input = not getattr(self.rule_, "pre", None)
        self._round: tuple[int, dict[str, np.ndarray]] | None = None

    @property
    def rule_name(self) -> str:
        """Name of the flagagg rule (``"nnm+flag"`` with pre-aggregation)."""
        return str(getattr(self.rule_, "name", type(self.rule_).__name__))

    def summary(self) -> None:
        """Log the strategy's configuration (Flower calls it at start)."""
        logger.info("\t├──> flagagg rule: %r", self.rule_)
        logger.info("\t│\t└── weighted by num-examples: %s", self.weight_by_num_examples)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Any) -> Iterable[Message]:
        """Remember the global arrays of this round, then sample as FedAvg does."""
        self._round = (server_round, _read_global(arrays))
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the clients' updates with the rule and add the result to the global model.

        Parameters
        ----------
        server_round : int
            The round, from 1.
        replies : iterable of Message
            The clients' replies to :meth:`configure_train`'s messages.

        Returns
        -------
        arrays : ArrayRecord or None
            The new global arrays; ``None`` when the round was skipped.
        metrics : MetricRecord
            The clients' aggregated metrics and the strategy's diagnostics
            (:meth:`RoundDiagnostics.metrics`).

        Raises
        ------
        RuntimeError
            If :meth:`configure_train` was not called for this round (the
            strategy needs the global arrays the round started from).
        """
        t0 = time.perf_counter()
        glob = self._round_arrays(server_round)
        replies = list(replies)
        got = self._read_replies(server_round, replies, glob)
        base = dict(server_round=server_round, rule=self.rule_name, replies=len(replies),
                    rejected=got.rejected, clients=got.clients)

        def skip(reason: str) -> tuple[None, MetricRecord]:
            diag = RoundDiagnostics(**base, aggregated=tuple(got.nodes), skipped=reason,
                                    seconds=time.perf_counter() - t0)
            logger.warning("round %d skipped, global model kept: %s", server_round, reason)
            return None, self._metrics(diag, got.contents)

        if not got.nodes:
            return skip(f"no usable reply ({len(replies)} received, "
                        f"{len(got.rejected)} rejected)")
        if self.weight_by_num_examples:
            _scale_by_examples(got.updates, got.weights)
        agg, result, problem = self._aggregate_updates(got.updates, len(got.nodes),
                                                       server_round, glob)
        if problem:
            return skip(problem)
        new = _apply_update(glob, agg, got.fixed)

        per_client = _client_diagnostics(got.nodes, result, self._per_input)
        per_client["suspects"] = tuple(sorted({*got.rejected,
                                               *per_client.get("suspects", ())}))
        diag = RoundDiagnostics(**base, aggregated=tuple(got.nodes), **per_client,
                                seconds=time.perf_counter() - t0)
        self._log(diag)
        arrays = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in new.items()})
        return arrays, self._metrics(diag, got.contents)

    # -- the pieces of aggregate_train ----------------------------------------

    def _round_arrays(self, server_round: int) -> dict[str, np.ndarray]:
        """The global arrays this round started from (remembered by configure_train)."""
        if self._round is None or self._round[0] != server_round:
            raise RuntimeError(
                f"aggregate_train(server_round={server_round}) without configure_train for "
                "that round: the strategy needs the global arrays the round started from "
                "(Strategy.start calls configure_train first)"
            )
        return self._round[1]

    def _read_replies(self, server_round: int, replies: list[Message],
                      glob: dict[str, np.ndarray]) -> _Replies:
        """The usable updates of a round's replies, and why the others were rejected."""
        got = _Replies([], [], [], [], [], {}, {})
        # A node that answers one message twice is not trusted with either reply.
        per_node = Counter(int(msg.metadata.src_node_id) for msg in replies)
        for msg in replies:
            nid = int(msg.metadata.src_node_id)
            cid = _client_id(msg, self.client_id_key)
            if cid is not None:
                got.clients[nid] = cid
            try:
                if per_node[nid] > 1:
                    if nid in got.rejected:
                        continue
                    raise _Malformed(f"{per_node[nid]} replies from the same node")
                tree, ints, _ = _read_update(msg, glob, self.arrayrecord_key)
                if self.weight_by_num_examples:
                    got.weights.append(_num_examples(msg, self.weighted_by_key))
            except _Malformed as why:
                got.rejected[nid] = str(why)
                logger.warning("round %d: reply of node %d rejected: %s", server_round, nid, why)
                continue
            got.nodes.append(nid)
            got.updates.append(tree)
            got.fixed.append(ints)
            got.contents.append(msg.content)
        return got

    def _aggregate_updates(self, updates: list[dict[str, np.ndarray]], n_nodes: int,
                           server_round: int, glob: dict[str, np.ndarray]):
        """The rule's aggregate of the float updates: (aggregate, result, problem).

        A rule that takes the server's reference (FLTrust) gets this round's
        ``reference_fn(server_round, glob)``.

        ``problem`` is ``""``, or why the round is skipped (the rule refused,
        or returned non-finite values).
        """
        if not updates[0]:
            return {}, None, ""
        extra = {} if self.reference_fn is None else {
            "reference": _reference(self.reference_fn, server_round, glob, updates[0])}
        try:
            result = self.rule_(updates, return_result=True, **extra)
        except ValueError as exc:
            return {}, None, (f"{self.rule_name} cannot aggregate the {n_nodes} usable "
                              f"updates: {exc}")
        agg = result.aggregate
        bad = [k for k, a in agg.items() if not np.isfinite(a).all()]
        if bad:
            return agg, result, f"{self.rule_name} returned non-finite values in {bad[:4]}"
        return agg, result, ""

    # -- helpers ------------------------------------------------------------

    def _metrics(self, diag: RoundDiagnostics, contents: list[RecordDict]) -> MetricRecord:
        self.diagnostics_[diag.server_round] = diag
        metrics = MetricRecord()
        usable = _consistent_metric_replies(contents, self.weighted_by_key)
        if usable:
            for k, v in self.train_metrics_aggr_fn(usable, self.weighted_by_key).items():
                metrics[k] = v
        for k, v in diag.metrics().items():
            metrics[k] = v
        return metrics

    def _log(self, d: RoundDiagnostics) -> None:
        logger.info("round %d: %s aggregated %d of %d replies in %.3f s", d.server_round,
                    d.rule, len(d.aggregated), d.replies, d.seconds)
        for nid in d.aggregated:
            parts = []
            if nid in d.excluded:
                parts.append(f"excluded by the rule: {d.excluded[nid]}")
            if d.selected:
                parts.append("selected" if nid in d.selected else "not selected")
            for name, values in (("influence", d.influence), ("cosine", d.cosine),
                                 ("ratio", d.ratios)):
                if nid in values:
                    v = values[nid]
                    parts.append(f"{name} {v:+.3e}" if math.isfinite(v) and abs(v) >= 1e4
                                 else f"{name} {v:+.3f}")
            if nid in d.verdict:
                parts.append(d.verdict[nid] + (" <<" if nid in d.suspects else ""))
            logger.info("\t%s: %s", d.label(nid), ", ".join(parts))


# --------------------------------------------------------------------------
# building the rule


def _make_rule(rule: Any, f: int | None, pre: Any, params: dict[str, Any]) -> Any:
    """The flagagg rule for ``RobustStrategy(rule, f, pre=..., **params)``."""
    if not isinstance(rule, str):
        if not callable(rule):
            raise TypeError(f"rule must be a rule name or a flagagg rule object: got {rule!r}")
        if f is not None or pre or params:
            raise TypeError(
                "pass f, pre and the rule's parameters to flagagg.get_rule when giving a "
                f"rule object: got f={f!r}, pre={pre!r}, {sorted(params)}"
            )
        return rule
    # Every rule takes f (flag's default output is on the updates' own scale,
    # so a model update moves the model by about a client update's length).
    kwargs = dict(params)
    if pre:
        kwargs["pre"] = pre
    if f is not None:
        kwargs["f"] = f
    return get_rule(rule, **kwargs)


def _check_reference_fn(rule: Any, reference_fn: Any) -> Any:
    """``reference_fn``, checked against the rule: given exactly when the rule needs one."""
    # Read from the rule's contract (contract.call_inputs): FLTrust declares "reference".
    needs = "reference" in getattr(rule, "call_inputs", {})
    if reference_fn is not None and not callable(reference_fn):
        raise TypeError(f"reference_fn must be callable: got {type(reference_fn).__name__}")
    if needs and reference_fn is None and "reference" in rule.missing_inputs():
        raise TypeError(f"rule {rule.name!r} needs the server's reference update every round: "
                        "pass reference_fn=lambda server_round, arrays: {...} (the server's own "
                        "update on its root dataset)")
    if reference_fn is not None and not needs:
        raise TypeError(f"reference_fn is for rules that take a reference (fltrust), not "
                        f"{getattr(rule, 'name', rule)!r}")
    return reference_fn


def _reference(fn: Any, server_round: int, glob: dict[str, np.ndarray],
               like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The server's reference update of this round, checked to be shaped like an update."""
    ref = fn(server_round, {k: v.copy() for k, v in glob.items()})
    if not isinstance(ref, dict) or sorted(ref) != sorted(like):
        got = sorted(ref) if isinstance(ref, dict) else type(ref).__name__
        raise TypeError(f"reference_fn must return a dict of the floating-point arrays "
                        f"{sorted(like)[:6]}: got {got}")
    out = {}
    for k, u in like.items():
        r = np.asarray(ref[k])
        if r.shape != u.shape or r.dtype != u.dtype:
            raise ValueError(f"reference_fn: array {k!r} must have shape {u.shape} and dtype "
                             f"{u.dtype}: got {r.shape} {r.dtype}")
        out[k] = r
    return out


# --------------------------------------------------------------------------
# reading the arrays


def _read_global(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """The global arrays as NumPy arrays; they come from the trusted ServerApp."""
    glob = {}
    for key, arr in arrays.items():
        x = np.asarray(arr.numpy(), order="C")  # ascontiguousarray would make 0-d 1-d
        if x.dtype.kind not in "fiub":
            raise TypeError(
                f"global array {key!r} has dtype {x.dtype}: RobustStrategy aggregates real "
                "floating-point arrays (and keeps integer and boolean ones by median)"
            )
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise ValueError(f"global array {key!r} holds NaN or Inf")
        glob[key] = x
    if not glob:
        raise ValueError("the global ArrayRecord holds no arrays")
    return glob


def _reply_record(msg: Message, key: str) -> ArrayRecord:
    if msg.has_error():
        raise _Malformed(f"error reply: {msg.error.reason}")
    records = msg.content.array_records
    if key in records:
        return records[key]
    if len(records) == 1:
        return next(iter(records.values()))
    raise _Malformed(
        f"expected one ArrayRecord (or one under {key!r}): got {len(records)}"
        + (f" under {sorted(records)[:4]}" if records else "")
    )


def _read_update(msg: Message, glob: dict[str, np.ndarray],
                 key: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """One reply's float updates ``reply - global``, its integer arrays and ``||update||^2``.

    Raises _Malformed with the reason when the reply cannot be used.
    """
    record = _reply_record(msg, key)
    missing = [k for k in glob if k not in record]
    extra = [k for k in record if k not in glob]
    if missing:
        raise _Malformed(f"missing arrays {missing[:4]}")
    if extra:
        raise _Malformed(f"unexpected arrays {extra[:4]}")
    tree, ints, sq = {}, {}, 0.0
    for k, g in glob.items():
        x = _decode(record[k], g, k)
        if g.dtype.kind != "f":
            ints[k] = x
            continue
        u = np.subtract(x, g)
        # One pass finds NaN and Inf (they make the squared norm non-finite)
        # and gives the norm the diagnostics need.
        layer_sq = _dot(u, u)
        if not math.isfinite(layer_sq):
            if not np.isfinite(x).all():
                raise _Malformed(f"NaN or Inf in array {k!r}")
            raise _Malformed(f"the update of array {k!r} overflows {g.dtype}")
        tree[k] = u
        sq += layer_sq
    return tree, ints, sq


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    """``<x, y>`` of two arrays of one shape (BLAS; half precision is widened first)."""
    x, y = x.ravel(), y.ravel()
    if x.dtype.itemsize < 4:
        x, y = x.astype(np.float32), y.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.dot(x, y))


def _decode(arr: Any, like: np.ndarray, key: str) -> np.ndarray:
    """A read-only view of a reply's Array, after checking its .npy header against ``like``.

    The header is read first so that a reply claiming a huge shape or a
    different dtype is refused before anything is allocated, and the data
    are viewed in place rather than copied (``Array.numpy`` copies).
    """
    if not isinstance(arr, Array) or not isinstance(arr.data, bytes):
        raise _Malformed(f"array {key!r} is not a Flower Array")
    if arr.stype != _NUMPY_STYPE:
        raise _Malformed(f"array {key!r} has serialisation {arr.stype!r}, expected "
                         f"{_NUMPY_STYPE!r}")
    buf = io.BytesIO(arr.data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, EOFError, SyntaxError, TypeError) as exc:
        raise _Malformed(f"array {key!r} is not a valid .npy buffer: {exc}") from None
    if dtype != like.dtype:
        raise _Malformed(f"array {key!r} has dtype {dtype}, expected {like.dtype}")
    if tuple(shape) != like.shape:
        raise _Malformed(f"array {key!r} has shape {tuple(shape)}, expected {like.shape}")
    if tuple(arr.shape) != like.shape or str(arr.dtype) != str(like.dtype):
        raise _Malformed(f"array {key!r}: its metadata (shape {tuple(arr.shape)}, dtype "
                         f"{arr.dtype}) disagree with its data")
    offset = buf.tell()
    if len(arr.data) - offset != like.nbytes:
        raise _Malformed(f"array {key!r} holds {len(arr.data) - offset} bytes of data, "
                         f"expected {like.nbytes}")
    x = np.frombuffer(arr.data, dtype=dtype, count=like.size, offset=offset)
    return x.reshape(like.shape, order="F" if fortran else "C")


def _client_id(msg: Message, key: str | None) -> int | str | None:
    """The id a reply states under ``key`` in a MetricRecord (an integer), else None."""
    if key is None or not msg.has_content():
        return None
    for record in msg.content.metric_records.values():
        value = record.get(key)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
    return None


def _num_examples(msg: Message, key: str) -> float:
    records = list(msg.content.metric_records.values())
    if len(records) != 1 or key not in records[0]:
        raise _Malformed(f"weighting by {key!r} needs one MetricRecord holding it")
    value = records[0][key]
    if isinstance(value, (list, bool)) or not math.isfinite(value) or value <= 0:
        raise _Malformed(f"{key!r} must be a finite number > 0: got {value!r}")
    return float(value)


def _consistent_metric_replies(contents: list[RecordDict], key: str) -> list[RecordDict]:
    """The replies whose single MetricRecord has a usable weight and the commonest layout.

    Flower's metric averaging raises on a missing weight, divides by a zero
    total and zips lists strictly; a crafted MetricRecord must not stop the
    round, so such replies are left out of the clients' metrics (their
    arrays are judged separately).
    """
    def layout(content: RecordDict) -> tuple | None:
        records = list(content.metric_records.values())
        if len(records) != 1:
            return None
        w = records[0].get(key)
        if isinstance(w, (list, bool)) or w is None or not math.isfinite(w) or w <= 0:
            return None
        return tuple(sorted((k, len(v) if isinstance(v, list) else -1)
                            for k, v in records[0].items()))

    layouts = [layout(c) for c in contents]
    counts = Counter(lay for lay in layouts if lay is not None)
    if not counts:
        return []
    common = counts.most_common(1)[0][0]
    return [c for c, lay in zip(contents, layouts, strict=True) if lay == common]


class _Replies(NamedTuple):
    """A round's replies as :meth:`RobustStrategy.aggregate_train` reads them."""

    nodes: list
    updates: list
    fixed: list
    weights: list
    contents: list
    rejected: dict
    clients: dict


def _scale_by_examples(updates, weights):
    """Scale each update in place by its share of the examples (mean weight 1)."""
    scale = np.asarray(weights) * (len(weights) / math.fsum(weights))
    for tree, s in zip(updates, scale, strict=True):
        for u in tree.values():
            u *= u.dtype.type(s)


def _apply_update(glob, agg, fixed):
    """New global arrays: float ones plus the aggregate, integer ones the lower median."""
    new = {}
    for key, g in glob.items():
        if key in agg:
            new[key] = (g + agg[key]).astype(g.dtype, copy=False)
        else:
            new[key] = _lower_median([ints[key] for ints in fixed])
    return new


def _lower_median(values: list[np.ndarray]) -> np.ndarray:
    """Coordinate-wise lower median (a value some reply sent), in the arrays' dtype."""
    stacked = np.sort(np.stack(values), axis=0)
    return stacked[(len(values) - 1) // 2]


# --------------------------------------------------------------------------
# per-client diagnostics


def _client_diagnostics(nodes: list[int], result: Any, per_input: bool) -> dict[str, Any]:
    """Per-client influence, cosine, exclusions, selection and FA ratios, keyed by node id.

    Read off the rule's result: influence ``|c_i| <u_i, out> / ||out||^2`` (an
    equivalent for coordinate-wise rules) and cosine ``<u_i, out> / (||u_i||
    ||out||)``, see :class:`flagagg.AggregationResult`.
    """
    if result is None:
        return {}
    diag: dict[str, Any] = {}
    if result.cosine is not None:
        diag["cosine"] = dict(zip(nodes, np.asarray(result.cosine).tolist(), strict=True))
    if result.influence is not None:
        diag["influence"] = dict(zip(nodes, np.asarray(result.influence).tolist(), strict=True))
    diag["excluded"] = {nodes[i]: reason for i, reason in result.excluded}
    if result.verdict:
        diag["verdict"] = dict(zip(nodes, result.verdict, strict=True))
        diag["suspects"] = tuple(nodes[i] for i in result.suspects)
    if per_input:
        diag["selected"] = tuple(nodes[i] for i in result.selected)
        ratios = getattr(result, "reconstruction_ratios", None)
        if ratios is not None:
            diag["ratios"] = dict(zip(nodes, np.asarray(ratios).tolist(), strict=True))
    return diag
