"""The parameter server: send parameters, collect gradients until a deadline, aggregate, step.

:class:`_ServerCore` holds what does not depend on how bytes travel: the
rounds, the checks every gradient passes, the aggregation and step, the
records, checkpoints. :class:`Server` moves them over plain TCP sockets;
:class:`flagagg.distributed._collective.CollectiveServer` over gloo or NCCL.

The TCP server runs one thread, non-blocking sockets and a selector: it
waits on all its workers at once, and no worker can make it wait past the
round's deadline.
A worker that crashes closes its connection (seen at once); one that hangs
or is slow misses the deadline; either is *missing* for the round and the
server steps with the gradients that did arrive. A worker that is still busy
with an earlier round is not waited for: its late gradient is dropped as
stale and it gets the newest parameters next. Gradients are checked before
aggregation (round, size, dtype, finite values); a failed check *excludes*
the worker for the round. A frame that is not valid protocol closes the
connection. Every round is recorded: who was missing or excluded and why,
times, bytes, and the rule's diagnostics.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import os
import selectors
import socket
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from ..training._replica import sgd_step
from ..training._step import aggregate_step, build_rule, rule_columns
from ._protocol import (
    DTYPES,
    FROM_SERVER,
    FROM_WORKER,
    NO_FRAME_TAGS_VARIABLE,
    RESPONSE_BYTES,
    AuthError,
    FrameReader,
    Kind,
    ProtocolError,
    Sealer,
    challenge,
    check_response,
    encode_json,
    encode_tensor,
    frame_tags_enabled,
    load_secret,
    session_key,
)
from ._results import fsync_dir
from ._settings import make_replica

__all__ = ["CHECKPOINT_FORMAT", "Server", "load_checkpoint"]


CHECKPOINT_FORMAT = "flagagg-distributed-checkpoint"
# once a round has its quorum, it waits this fraction of the time the quorum took
QUORUM_GRACE = 0.5


class _Link:
    """One worker connection as every server sees it: whose, and how far it got."""

    def __init__(self, addr):
        self.addr = addr
        self.worker = None       # set once the worker is accepted
        self.sent_round = 0      # newest round whose parameters were sent (or queued)
        self.answered_round = 0  # newest round it sent a gradient for
        self.bytes_sent = 0
        self.bytes_received = 0


class _Peer(_Link):
    """One TCP connection: its socket, where it is in the handshake, its reader and outbox."""

    def __init__(self, sock, addr, now):
        super().__init__(addr)
        self.sock = sock
        self.state = "auth"    # tls -> auth -> hello -> (joined: worker set)
        self.want_write = False
        self.nonce = None
        self.raw = b""         # the handshake response, as it arrives
        self.sealer = None
        self.reader = None
        self.outbox = deque()  # _Outgoing
        self.opened = now
        self.closing = False   # close once the outbox is empty (after a REJECT)

    def queue(self, entry):
        if entry.kind == Kind.PARAMS:
            # a worker that fell behind only needs the newest parameters;
            # a frame already partly on the wire must be finished, though
            self.outbox = deque(e for e in self.outbox if e.kind != Kind.PARAMS or e.started)
        self.outbox.append(entry)


class _ServerCore:
    """What every parameter server does, whatever carries its messages.

    A subclass opens its connections and implements ``_pump(timeout)`` (wait
    up to ``timeout`` seconds for messages and handle them),
    ``_send_params(st, links, params)`` (send round ``st.round``'s parameters,
    stamping ``st.queued``) and ``_stop_workers(timeout)``, and reports a
    closed link through :meth:`_lost`. Its links (one per worker connection)
    are :class:`_Link` objects. Messages the subclass decodes go
    through :meth:`_check_hello`, :meth:`_welcome` and
    :meth:`_accept_gradient`, so that every transport applies the same checks.
    """

    def __init__(self, spec, *, device="cpu", log=print, checkpoint=None, checkpoint_every=0,
                 resume=None, recorder=None):
        self.spec = spec
        self.log = log
        self.device = torch.device(device)
        config = spec.config
        self.config = config
        self.replica = make_replica(spec, self.device)
        rule_spec = config.rule(spec.rule)
        self.rule = build_rule(rule_spec.rule, spec.f, rule_spec.params)
        self.lr = config.lr_of(spec.rule)
        self.n = self.replica.n_params
        # a gradient is n float32 values; anything over 8n bytes (float64) plus
        # slack is refused before it is read
        self.max_gradient_bytes = 8 * self.n + 4096
        self.byzantine = {int(w) for w in self.replica.faulty}
        self.flat = self.replica.initial_parameters()
        self.buf = None
        self.start_round = 1
        if resume is not None:
            self._resume(resume)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.checkpoint_every = int(checkpoint_every)

        self.address = None      # where workers reach the server, for the record
        self.peers = {}          # worker -> link, accepted workers only
        self.gone = {}           # worker -> why its connection ended
        self.info = {}           # worker -> its HELLO (pid, host, ...)
        self.round = 0
        self.state = None        # the round being collected
        self.last_seen = time.monotonic()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.events = []
        self.recorder = recorder
        self.quorum = spec.quorum_size
        self.stop_requested = None  # a signal's name once one asked the server to stop

    def _say(self, text, event=None):
        self.log(text)
        if event is not None:
            self.events.append({"round": self.round, **event, "text": text})

    # ------------------------------------------------- checks every transport shares

    def _admission(self, hello):
        """(why for the log, what the peer is told) if ``hello`` is of another run, else Nones.

        The part of :meth:`_check_hello` that does not depend on a worker index:
        the tcp transport, which assigns slots itself, asks only this.
        """
        if hello.get("fingerprint") != self.spec.fingerprint():
            return (f"it runs a different config, rule, attack, f or seed (fingerprint "
                    f"{hello.get('fingerprint')!s:.16} != {self.spec.fingerprint()})",
                    "this worker runs a different config, rule, attack, f or seed than the "
                    "server: start every process with the same arguments and config file")
        if hello.get("n_params") != self.n:
            return (f"its model has {hello.get('n_params')!s:.20} parameters, the server's "
                    f"{self.n}", "this worker's model differs from the server's")
        return None, None

    def _check_hello(self, hello):
        """Why a worker saying ``hello`` (a dict) cannot join, or (None, None) if it can.

        Returns
        -------
        why : str or None
            For the operator's log: with the fingerprints, sizes and pids.
        told : str or None
            For the peer: what to fix, but nothing about the server's run
            (fingerprint, parameter count, pids) that an outsider could use
            to pass these checks.
        """
        w = hello.get("worker")
        if not isinstance(w, int) or not 0 <= w < self.config.workers:
            return (f"worker index {w!r:.20} is not in 0..{self.config.workers - 1}",
                    "this worker's index is not one of the run's: start every process with "
                    "the same --workers")
        problem = self._admission(hello)
        if problem[0] is not None:
            return problem
        if w in self.peers:
            return (f"worker {w} is already connected (pid {self.info[w].get('pid')})",
                    f"worker {w} is already connected: give every worker its own rank")
        return None, None

    def _refused(self, addr, hello, problem):
        w = hello.get("worker")
        self._say(f"refused a connection from {addr}: {problem}",
                  {"worker": w if isinstance(w, int) else None, "event": "refused",
                   "reason": problem})

    def _welcome(self, link, hello):
        """Accept the worker of a checked ``hello`` on ``link``; return its first round."""
        w = hello["worker"]
        link.worker = w
        info = {k: hello.get(k) for k in ("rank", "pid", "host", "device")}
        again = w in self.info
        self.info[w] = info
        self.peers[w] = link
        self.gone.pop(w, None)
        self.last_seen = time.monotonic()
        next_round = max(self.round + 1, self.start_round)
        self._say(f"worker {w} {'reconnected' if again else 'connected'} (rank {info['rank']}, "
                  f"pid {info['pid']}, host {info['host']}, device {info['device']})",
                  {"worker": w, "event": "reconnected" if again else "connected", **info})
        # parameters it never received count as answered: it is not busy with them
        link.sent_round = link.answered_round = next_round - 1
        return next_round

    def _lost(self, link, reason):
        """Forget a closed link; record and report the loss unless ``reason`` is None."""
        w = link.worker
        if w is None or self.peers.get(w) is not link:
            return
        del self.peers[w]
        if reason is None:
            return
        self.gone[w] = reason
        st = self.state
        if st is not None and w not in st.status:
            st.status[w] = ("missing", f"disconnected ({reason})", None)
        self._say(f"round {self.round:>4}: worker {w} disconnected ({reason}); missing until it "
                  "reconnects", {"worker": w, "event": "disconnected", "reason": reason})

    def _check_round(self, link, rnd):
        """Whether a gradient of round ``rnd`` from ``link`` belongs to the round being collected.

        Raises
        ------
        ProtocolError
            If the worker never got that round's parameters, or answers a
            round twice.
        """
        w = link.worker
        if not 1 <= rnd <= link.sent_round:
            raise ProtocolError(f"a gradient for round {rnd}, whose parameters it never got")
        link.answered_round = max(link.answered_round, rnd)
        self.last_seen = time.monotonic()
        st = self.state
        if st is None or rnd != st.round:
            if st is not None:
                st.stale[w] = st.stale.get(w, 0) + 1
            return False
        if w in st.status:
            raise ProtocolError(f"two gradients for round {rnd}")
        return True

    def _accept_gradient(self, link, dtype, nbytes, values, seconds):
        """Check a complete gradient of the round being collected and record it.

        Parameters
        ----------
        link
            The worker's link (:meth:`_check_round` said yes).
        dtype : numpy.dtype or None
            The dtype the worker declared (None: unknown).
        nbytes : int
            Payload size in bytes.
        values : callable
            Returns the payload as a 1-D float32 array or tensor; called only
            when dtype and size are right.
        seconds : float
            Compute time the worker reported.
        """
        w, st = link.worker, self.state
        seconds = seconds if math.isfinite(seconds) and seconds >= 0 else None
        arrival = time.monotonic() - st.queued.get(w, st.start)
        if dtype != np.dtype("<f4"):
            st.status[w] = ("excluded", f"dtype {dtype}, expected float32", None)
        elif nbytes != 4 * self.n:
            st.status[w] = ("excluded", f"wrong size: {nbytes // 4} values, "
                            f"expected {self.n}", None)
        else:
            row = torch.as_tensor(values())
            if self.spec.drop_nonfinite and not bool(torch.isfinite(row).all()):
                st.status[w] = ("excluded", "non-finite values (NaN or Inf)", None)
            else:
                st.status[w] = ("ok", "", row)
        st.timing[w] = (seconds, arrival)

    # --------------------------------------------------------------- rounds

    def wait_for_workers(self):
        """Accept connections until every worker has joined or the connect timeout passes.

        Returns
        -------
        joined : int
            Number of workers connected.
        """
        p = self.config.workers
        end = time.monotonic() + self.spec.connect_timeout
        while len(self.peers) < p and time.monotonic() < end:
            self._pump(min(0.5, end - time.monotonic()))
        return len(self.peers)

    def _collect(self, t):
        """Send round ``t``'s parameters and collect gradients until done or the deadline."""
        st = _Round(t, time.monotonic())
        self.state = st
        params = self.flat.detach().to("cpu", torch.float32)
        st.start = time.monotonic()
        for w, link in self.peers.items():
            (st.lagging if link.answered_round < link.sent_round else st.expected).add(w)
        self._send_params(st, [self.peers[w] for w in sorted(self.peers)], params)
        deadline = st.start + self.spec.round_timeout
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            if st.expected and all(w in st.status for w in st.expected):
                break
            if not st.expected and st.status:
                break
            if st.quorum_at is None and \
                    sum(1 for s in st.status.values() if s[0] == "ok") >= self.quorum:
                st.quorum_at = now
                # a short grace, in proportion to how long the quorum took, lets
                # gradients arriving together with it count
                deadline = min(deadline, now + QUORUM_GRACE * (now - st.start) + 0.002)
                continue
            self._pump(deadline - now)
        st.wait_s = time.monotonic() - st.start
        self.state = None
        return st

    def _aggregate(self, st):
        """Aggregate the accepted rows; returns (gradient or None, rows, result, problem)."""
        workers = sorted(w for w, s in st.status.items() if s[0] == "ok")
        if not workers:
            return None, workers, None, "no gradient arrived"
        G = torch.stack([st.status[w][2] for w in workers]).to(self.device)
        backend = None if self.config.backend == "auto" else self.config.backend
        # the simulator's step; a failing rule skips this round, not the run
        step = aggregate_step(self.rule, G, array=self.config.array, backend=backend,
                              diagnostics=True)
        st.aggregate_s = step.seconds
        return step.gradient, workers, step.result, step.problem or None

    def run(self):
        """Train: wait for the workers, run every round, stop the workers.

        Returns
        -------
        record : dict
            ``rounds`` (one dict per round), ``workers`` (one per round and
            worker), ``curve`` ((round, accuracy) pairs), ``events``,
            ``diverged_round``, ``seconds``, ``final_accuracy`` and
            ``status`` (the exit status: 0 trained, 1 no workers, 3 stopped
            early by a signal, see ``stop_requested``).
        """
        t_start = time.perf_counter()
        spec, config = self.spec, self.config
        p = config.workers
        joined = self.wait_for_workers()
        record = {"rounds": [], "workers": [], "curve": [], "events": self.events,
                  "diverged_round": None, "status": 0, "start_round": self.start_round}
        known = 0  # events already in the recorder's files
        if self.recorder is not None:
            # a resumed run's records start with the rounds before its checkpoint
            earlier = self.recorder.earlier(self.start_round)
            for key in ("rounds", "workers", "curve"):
                record[key] = list(earlier[key])
            self.events[:0] = earlier["events"]
            known = len(earlier["events"])
        if joined == 0:
            self._say(f"no worker connected within {spec.connect_timeout:g} s: check that the "
                      f"workers were started and can reach {self.address[0]}:{self.address[1]}")
            if self.recorder is not None:
                self.recorder.write_round(None, [], None, self.events[known:], None)
            record["status"] = 1
            return self._finish(record, t_start)
        if joined < p:
            absent = sorted(set(range(p)) - set(self.peers))
            self._say(f"starting with {joined} of {p} workers; not connected: {absent}")
        acc = self.replica.accuracy(self.flat)
        point = (self.start_round - 1, acc)
        if any(t == point[0] for t, _ in record["curve"]):
            point = None  # a resumed run: evaluated there before
        else:
            record["curve"].append(point)
        self._say(f"round {self.start_round - 1:>4}: test accuracy {acc:.3f}")
        events_logged = len(self.events)
        if self.recorder is not None:
            self.recorder.write_round(None, [], None, self.events[known:events_logged], point)
        shown = {}
        window = []
        for t in range(self.start_round, config.rounds + 1):
            if self.stop_requested is not None:
                self._say(f"round {t}: stopping before this round ({self.stop_requested})",
                          {"event": "stopped", "reason": self.stop_requested})
                record["status"] = 3
                break
            self.round = t
            if not self.peers:
                if time.monotonic() - self.last_seen > spec.connect_timeout:
                    self._say(f"round {t}: no worker has been connected for "
                              f"{spec.connect_timeout:g} s; stopping")
                    record["status"] = 1
                    break
            b_sent, b_recv = self.bytes_sent, self.bytes_received
            peer_bytes = {w: (q.bytes_sent, q.bytes_received) for w, q in self.peers.items()}
            t_round = time.perf_counter()
            st = self._collect(t)
            g, rows, result, problem = self._aggregate(st)
            t0 = time.perf_counter()
            stepped = g is not None
            if stepped:
                self.flat, self.buf = sgd_step(self.flat, self.buf, g, lr=self.lr,
                                               momentum=config.momentum,
                                               weight_decay=config.weight_decay)
            step_s = time.perf_counter() - t0
            diverged = stepped and not bool(torch.isfinite(self.flat).all())
            accuracy = None
            eval_s = 0.0
            if not diverged and (t % config.eval_every == 0 or t == config.rounds):
                t0 = time.perf_counter()
                accuracy = self.replica.accuracy(self.flat)
                eval_s = time.perf_counter() - t0
                record["curve"].append((t, accuracy))
            wrows = self._worker_rows(st, rows, result, peer_bytes)
            self._report_changes(t, wrows, shown, problem)
            computes = [r["compute_s"] for r in wrows if r["status"] == "ok"
                        and r["compute_s"] is not None]
            comms = [r["comm_s"] for r in wrows if r["status"] == "ok" and r["comm_s"] is not None]
            row = {
                "round": t, "received": len(rows), "stepped": stepped,
                "missing": [r["worker"] for r in wrows if r["status"] == "missing"],
                "excluded": [r["worker"] for r in wrows if r["status"] == "excluded"],
                "rule_excluded": [r["worker"] for r in wrows if r["rule_excluded"]],
                "stale": int(sum(st.stale.values())),
                "round_s": time.perf_counter() - t_round, "wait_s": st.wait_s,
                "compute_s": max(computes) if computes else None,
                "comm_s": max(comms) if comms else None,
                "aggregate_s": st.aggregate_s, "step_s": step_s, "eval_s": eval_s,
                "bytes_sent": self.bytes_sent - b_sent,
                "bytes_received": self.bytes_received - b_recv,
                "accuracy": accuracy, "problem": problem or "",
            }
            record["rounds"].append(row)
            record["workers"].extend(wrows)
            window.append(row)
            if self.recorder is not None:
                self.recorder.write_round(row, wrows, None, self.events[events_logged:],
                                          None if accuracy is None else (t, accuracy))
                events_logged = len(self.events)
            if diverged:
                record["diverged_round"] = t
                self._say(f"round {t:>4}: the parameters became non-finite (diverged); stopping")
                break
            if accuracy is not None:
                self._say(f"round {t:>4}: test accuracy {accuracy:.3f}  " + _summary(window, p))
                window = []
            if self.checkpoint is not None and self.checkpoint_every and \
                    t % self.checkpoint_every == 0:
                self.save_checkpoint(t)
        if record["diverged_round"] is not None:
            # a model with non-finite parameters predicts nothing (as in the simulator)
            for t in range(record["diverged_round"], config.rounds + 1):
                if t % config.eval_every == 0 or t == config.rounds:
                    record["curve"].append((t, 0.0))
        if self.checkpoint is not None and record["diverged_round"] is None and self.round:
            self.save_checkpoint(self.round)
        if self.recorder is not None:
            self.recorder.write_round(None, [], None, self.events[events_logged:], None)
        return self._finish(record, t_start)

    def _finish(self, record, t_start):
        self._stop_workers()
        record["seconds"] = time.perf_counter() - t_start
        record["final_accuracy"] = record["curve"][-1][1] if record["curve"] else 0.0
        record["parameters"] = self.flat.detach().cpu().numpy().copy()
        record["info"] = dict(self.info)
        record["byzantine"] = sorted(self.byzantine)
        record["address"] = None if self.address is None else list(self.address)
        record["transport"] = self.transport
        return record

    # ------------------------------------------------------------ reporting

    def _worker_rows(self, st, rows, result, peer_bytes):
        columns = rule_columns(result, rows, range(self.config.workers))
        out = []
        for w in range(self.config.workers):
            if w in st.status:
                status, reason, _ = st.status[w]
            elif w in st.lagging and w in self.peers:
                status, reason = "missing", "still busy with an earlier round (slow or hung)"
            elif w in self.peers and w not in st.queued:
                status, reason = "missing", "joined during the round; takes part from the next"
            elif w in self.peers and st.quorum_at is not None:
                status, reason = "missing", \
                    f"no gradient before the round closed on its quorum of {self.quorum}"
            elif w in self.peers:
                status, reason = "missing", \
                    f"no gradient within the {self.spec.round_timeout:g} s deadline"
            else:
                status, reason = "missing", f"not connected ({self.gone.get(w, 'never joined')})"
            seconds, arrival = st.timing.get(w, (None, None))
            peer = self.peers.get(w)
            before = peer_bytes.get(w, (0, 0))
            out.append({
                "round": st.round, "worker": w, "byzantine": w in self.byzantine,
                "status": status, "reason": reason,
                "compute_s": seconds, "latency_s": arrival,
                "comm_s": (arrival - seconds) if seconds is not None and arrival is not None
                else None,
                "stale": st.stale.get(w, 0),
                "bytes_sent": (peer.bytes_sent - before[0]) if peer is not None else 0,
                "bytes_received": (peer.bytes_received - before[1]) if peer is not None else 0,
                **columns[w],
            })
        return out

    def _report_changes(self, t, wrows, shown, problem):
        """Print a worker's status when it changes, not every round it stays the same."""
        for r in wrows:
            w, key = r["worker"], (r["status"], r["reason"])
            before = shown.get(w, ("ok", ""))
            shown[w] = key
            if key == before:
                continue
            if r["status"] == "ok":
                self._say(f"round {t:>4}: worker {w} is back", {"worker": w, "event": "back"})
            elif r["status"] == "missing" and r["reason"].startswith(("not connected",
                                                                       "disconnected")):
                continue  # the disconnection itself was reported
            else:
                self._say(f"round {t:>4}: worker {w} {r['status']}: {r['reason']}",
                          {"worker": w, "event": r["status"], "reason": r["reason"]})
        if problem:
            self._say(f"round {t:>4}: no step: {problem}", {"event": "no step",
                                                            "reason": problem})

    # ----------------------------------------------------------- checkpoint

    def save_checkpoint(self, t):
        """Write the parameters and momentum after round ``t`` (atomically)."""
        state = {
            "format": CHECKPOINT_FORMAT, "version": 1, "round": int(t),
            "fingerprint": self.spec.fingerprint(),
            "parameters": self.flat.detach().cpu().clone(),
            "momentum": None if self.buf is None else self.buf.detach().cpu().clone(),
        }
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.checkpoint)
        fsync_dir(self.checkpoint.parent)
        if self.recorder is not None:
            self.recorder.sync()

    def _resume(self, path):
        state = load_checkpoint(path)
        if state["fingerprint"] != self.spec.fingerprint():
            raise ValueError(
                f"checkpoint {path} is from a different run (config, rule, attack, f or seed); "
                "resume with the arguments it was written with"
            )
        if state["parameters"].shape != (self.n,):
            raise ValueError(f"checkpoint {path} holds {tuple(state['parameters'].shape)} "
                             f"parameters; this model has {self.n}")
        if state["round"] >= self.config.rounds:
            raise ValueError(f"checkpoint {path} is at round {state['round']}: nothing left to "
                             f"train with rounds = {self.config.rounds}; raise --rounds")
        self.flat = state["parameters"].to(self.device, torch.float32)
        mom = state["momentum"]
        self.buf = None if mom is None else mom.to(self.device, torch.float32)
        self.start_round = state["round"] + 1


class Server(_ServerCore):
    """The parameter server of one run, over authenticated TCP connections.

    Every connection first proves that it knows the run's secret (see
    :mod:`flagagg.distributed._protocol`); until it has, the server reads
    nothing from it but the handshake's fixed 74 bytes, keeps it at most
    ``handshake_timeout`` seconds, and holds at most ``max_pending`` such
    connections. A peer that fails is closed without an answer and reported
    to the operator's log (rate-limited). The server, not the peer, decides
    which worker slot an authenticated peer takes: the one of its rank when
    that is free or held by an older connection of the same worker (a
    restarted worker gets its slot back), else a free one.

    Parameters
    ----------
    spec : RunSpec
        The run.
    secret : bytes
        The run's secret, shared with the workers (at least
        ``MIN_SECRET_BYTES`` bytes; see :func:`load_secret`).
    listen : tuple of (str, int), default=("127.0.0.1", 0)
        Address to listen on (port 0: any free port).
    device : str, default="cpu"
        Device of the parameters and the aggregation.
    log : callable, default=print
        Where progress and events go.
    checkpoint : str or path-like, optional
        File to save the parameters and momentum to.
    checkpoint_every : int, default=0
        Save every this many rounds (and after the last); 0 saves only at
        the end when ``checkpoint`` is given.
    resume : str or path-like, optional
        Checkpoint to start from (loaded with ``weights_only=True``).
    handshake_timeout : float, default=5.0
        Seconds a new connection has to authenticate and say HELLO.
    max_pending : int, default=64
        Connections that have not authenticated yet held at once; more are
        closed as they come.
    tls : ssl.SSLContext, optional
        Wrap every connection in TLS (server side) before the handshake.
    recorder : optional
        Gets every round's records as the run goes (see
        :class:`flagagg.distributed._results.RunLog`).
    """

    transport = "tcp"

    def __init__(self, spec, *, secret, listen=("127.0.0.1", 0), device="cpu", log=print,
                 checkpoint=None, checkpoint_every=0, resume=None, handshake_timeout=5.0,
                 max_pending=64, tls=None, recorder=None):
        self.secret = load_secret(secret)
        super().__init__(spec, device=device, log=log, checkpoint=checkpoint,
                         checkpoint_every=checkpoint_every, resume=resume, recorder=recorder)
        self.handshake_timeout = float(handshake_timeout)
        self.max_pending = int(max_pending)
        self.tls = tls
        self.sel = selectors.DefaultSelector()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(listen)
        self.lsock.listen(max(64, 2 * self.config.workers))
        self.lsock.setblocking(False)
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        self.address = self.lsock.getsockname()[:2]
        if not frame_tags_enabled():
            try:
                _untagged_only_on_loopback(self.address[0])
            except RuntimeError:
                self.lsock.close()
                raise
            log(f"server: WARNING: frame tags are OFF ({NO_FRAME_TAGS_VARIABLE}=1): messages "
                "are not authenticated, for measuring what the tags cost only")
        self.unnamed = set()     # connections that have not said HELLO yet
        self.accept_paused_until = None
        self.refusals = _Refusals(log)

    # ------------------------------------------------------------------ I/O

    def _set_events(self, peer):
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.outbox else 0)
        if peer.state == "tls" and peer.want_write:
            mask |= selectors.EVENT_WRITE
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(peer.sock, mask, peer)

    def _pump(self, timeout):
        """Wait up to ``timeout`` seconds for I/O and handle what happened."""
        now = time.monotonic()
        if self.accept_paused_until is not None:
            if now >= self.accept_paused_until:
                self.accept_paused_until = None
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.register(self.lsock, selectors.EVENT_READ, None)
            else:
                timeout = min(timeout, self.accept_paused_until - now)
        if self.unnamed:
            first = min(q.opened for q in self.unnamed) + self.handshake_timeout
            timeout = min(timeout, max(0.0, first - now) + 0.01)
        for key, mask in self.sel.select(max(0.0, timeout)):
            if key.data is None:
                self._accept()
                continue
            peer = key.data
            if peer.sock.fileno() < 0:
                continue
            if peer.state == "tls":
                self._tls_handshake(peer)
                continue
            if mask & selectors.EVENT_READ:
                self._read(peer)
            if mask & selectors.EVENT_WRITE and peer.sock.fileno() >= 0:
                self._flush(peer)
        now = time.monotonic()
        for peer in list(self.unnamed):
            if now - peer.opened > self.handshake_timeout:
                self._drop(peer, None)
                self.refusals.note(peer.addr, f"did not authenticate and say HELLO within "
                                   f"{self.handshake_timeout:g} s")
        self.refusals.flush()

    def _accept(self):
        for _ in range(64):  # a burst of connections is taken in one go
            try:
                sock, addr = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                self._out_of_descriptors(exc)
                return
            if len(self.unnamed) >= self.max_pending:
                sock.close()
                self.refusals.note(addr, f"over the cap of {self.max_pending} connections "
                                   "that have not authenticated yet")
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = _Peer(sock, addr, time.monotonic())
            self.unnamed.add(peer)
            if self.tls is not None:
                try:
                    peer.sock = self.tls.wrap_socket(sock, server_side=True,
                                                     do_handshake_on_connect=False)
                except (OSError, ValueError) as exc:
                    self.unnamed.discard(peer)
                    sock.close()
                    self.refusals.note(addr, f"TLS failed: {exc}")
                    continue
                peer.state = "tls"
                self.sel.register(peer.sock, selectors.EVENT_READ, peer)
                self._tls_handshake(peer)
                continue
            self.sel.register(sock, selectors.EVENT_READ, peer)
            self._start_auth(peer)

    def _out_of_descriptors(self, exc):
        """Out of file descriptors: shed the oldest stranger, or stop accepting a moment."""
        self.refusals.note(None, f"cannot accept a connection: {exc.strerror} "
                           f"(errno {exc.errno}); backing off")
        strangers = sorted((q for q in self.unnamed), key=lambda q: q.opened)
        if strangers:
            self._drop(strangers[0], None)
            return
        # the connection stays in the backlog; without a pause the selector
        # would report it again at once and the server would spin
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(self.lsock)
        self.accept_paused_until = time.monotonic() + 0.5

    def _tls_handshake(self, peer):
        import ssl

        try:
            peer.sock.do_handshake()
        except ssl.SSLWantReadError:
            peer.want_write = False
        except ssl.SSLWantWriteError:
            peer.want_write = True
        except (OSError, ValueError) as exc:
            self._drop(peer, None)
            self.refusals.note(peer.addr, f"TLS handshake failed: {exc}")
            return
        else:
            peer.state = "auth"
            self._start_auth(peer)
            return
        self._set_events(peer)

    def _start_auth(self, peer):
        peer.state = "auth"
        data, peer.nonce = challenge()
        self._send_raw(peer, data)

    def _read(self, peer):
        if peer.state == "auth":
            self._read_response(peer)
            return
        # straight into the frame's buffer, until the socket has nothing more; a
        # budget per call keeps one fast peer from starving the others (but TLS
        # may hold decrypted bytes the selector cannot see: those are read too)
        budget = 8 << 20
        while budget > 0 or (self.tls is not None and peer.sock.pending()):
            try:
                k = peer.sock.recv_into(peer.reader.buffer())
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if _tls_want(exc):
                    return
                self._drop(peer, f"connection error: {exc}")
                if peer.worker is None:
                    self.refusals.note(peer.addr, f"connection error before joining: {exc}")
                return
            if not k:
                self._drop(peer, "connection closed")
                return
            budget -= k
            peer.bytes_received += k
            self.bytes_received += k
            try:
                frame = peer.reader.received(k)
                if frame is None:
                    continue
                if frame.kind == Kind.HELLO:
                    self._hello(peer, frame)
                else:
                    self._gradient(peer, frame)
            except ProtocolError as exc:
                if peer.worker is None:
                    self._drop(peer, None)
                    self.refusals.note(peer.addr, f"protocol error before joining: {exc}")
                else:
                    self._drop(peer, f"protocol error: {exc}")
                return
            if peer.sock.fileno() < 0:
                return

    def _read_response(self, peer):
        # before authentication, read no more than the handshake's response
        try:
            data = peer.sock.recv(RESPONSE_BYTES - len(peer.raw))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if _tls_want(exc):
                return
            self._drop(peer, f"connection error: {exc}")
            self.refusals.note(peer.addr, f"connection error before joining: {exc}")
            return
        if not data:
            self._drop(peer, "connection closed")
            return
        peer.bytes_received += len(data)
        self.bytes_received += len(data)
        peer.raw += data
        if len(peer.raw) == RESPONSE_BYTES:
            self._authenticate(peer)

    def _authenticate(self, peer):
        try:
            proof, worker_nonce = check_response(self.secret, peer.nonce, peer.raw)
        except AuthError as exc:
            # no answer: the peer learns only that the connection closed
            self._drop(peer, None)
            self.refusals.note(peer.addr, str(exc))
            return
        key = session_key(self.secret, peer.nonce, worker_nonce)
        peer.raw = b""
        peer.sealer = Sealer(key, FROM_SERVER)
        peer.reader = FrameReader(self.max_gradient_bytes, kinds={Kind.HELLO, Kind.GRAD},
                                  key=key, direction=FROM_WORKER)
        peer.state = "hello"
        self._send_raw(peer, proof)

    def _flush(self, peer, hold_tags=False):
        """Send what the outbox holds until the socket is full.

        ``hold_tags``: stop at the tag of a tensor frame, so that the caller
        can send the payload to every worker before computing any tag.
        """
        while peer.outbox:
            entry = peer.outbox[0]
            if entry.parts is None:
                entry.start()
            if entry.parts[entry.part] is None:
                # the tag, computed once the payload is out: the peer reads and
                # authenticates the payload meanwhile
                if hold_tags and entry.kind in Kind.TENSOR:
                    break
                entry.parts[entry.part] = memoryview(peer.sealer.tag(entry.head, entry.payload))
            try:
                k = peer.sock.send(entry.parts[entry.part][entry.offset:])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if _tls_want(exc):
                    break
                self._drop(peer, f"connection error: {exc}")
                return
            peer.bytes_sent += k
            self.bytes_sent += k
            if entry.advance(k):
                peer.outbox.popleft()
        if peer.closing and not peer.outbox:
            self._drop(peer, None)
            return
        self._set_events(peer)

    def _send_raw(self, peer, data):
        peer.outbox.append(_Outgoing(None, 0, data, b""))
        self._flush(peer)

    def _send(self, peer, kind, rnd, parts):
        head, view = parts
        peer.queue(_Outgoing(kind, rnd, head, view))
        self._flush(peer)

    def _drop(self, peer, reason):
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(peer.sock)
        with contextlib.suppress(OSError):
            peer.sock.close()
        self.unnamed.discard(peer)
        self._lost(peer, reason)

    # ------------------------------------------------------------ messages

    def _hello(self, peer, frame):
        if peer.worker is not None:
            raise ProtocolError("a second HELLO on one connection")
        hello = frame.json()
        self.unnamed.discard(peer)
        problem, told = self._admission(hello)
        if problem is not None:
            # an authenticated peer is a member of the run: it hears why, but not the
            # server's fingerprint or model size
            self._refused(peer.addr[0], hello, problem)
            peer.closing = True
            self._send(peer, Kind.REJECT, 0, encode_json(Kind.REJECT, {"reason": told}))
            return
        slot = self._slot_for(hello)
        if slot is None:
            self._refused(peer.addr[0], hello, "every worker slot is taken")
            peer.closing = True
            self._send(peer, Kind.REJECT, 0,
                       encode_json(Kind.REJECT, {"reason": "every worker slot is taken"}))
            return
        old = self.peers.get(slot)
        if old is not None:
            self._drop(old, None)
            self._say(f"worker {slot}: a new authenticated connection replaces the old one "
                      f"({old.addr[0]}), e.g. a restarted process",
                      {"worker": slot, "event": "replaced"})
        next_round = self._welcome(peer, {**hello, "worker": slot})
        self._send(peer, Kind.WELCOME, 0,
                   encode_json(Kind.WELCOME, {"round": next_round, "worker": slot}))

    def _slot_for(self, hello):
        """The worker slot the server gives an admitted peer, or None if the run is full."""
        want = hello.get("worker")
        if isinstance(want, int) and not isinstance(want, bool) and \
                0 <= want < self.config.workers:
            return want
        free = [w for w in range(self.config.workers) if w not in self.peers]
        return free[0] if free else None

    def _gradient(self, peer, frame):
        w = peer.worker
        if w is None:
            raise ProtocolError("a gradient before HELLO")
        if frame.worker != w:
            raise ProtocolError(f"worker {w} sent a gradient labelled worker {frame.worker}")
        if self._check_round(peer, frame.round):
            self._accept_gradient(peer, DTYPES.get(frame.dtype), len(frame.payload),
                                  frame.array, frame.seconds)

    def _send_params(self, st, links, params):
        head, view = encode_tensor(Kind.PARAMS, params.numpy(), round=st.round)
        # every connection has its own tag (its own key and sequence): the payload
        # goes out to all workers first, so that they receive it while the tags
        # are computed
        for peer in links:
            # latency counts from here: the send below may be the last thing this
            # process does before the scheduler runs the workers
            st.queued[peer.worker] = time.monotonic()
            peer.queue(_Outgoing(Kind.PARAMS, st.round, head, view))
            peer.sent_round = st.round
            self._flush(peer, hold_tags=True)
        for peer in links:
            if peer.sock.fileno() >= 0:
                self._flush(peer)

    def _stop_workers(self, timeout=5.0):
        """Tell every worker to stop, wait briefly for the messages to leave, close."""
        for peer in list(self.peers.values()):
            self._send(peer, Kind.STOP, self.round, encode_json(Kind.STOP, {"round": self.round}))
            peer.closing = True
            if not peer.outbox:
                self._drop(peer, None)
        end = time.monotonic() + timeout
        while any(q.outbox for q in self.peers.values()) and time.monotonic() < end:
            self._pump(min(0.2, end - time.monotonic()))
        for peer in list(self.peers.values()) + list(self.unnamed):
            self._drop(peer, None)
        self.refusals.flush(force=True)
        self.sel.close()
        self.lsock.close()


def _untagged_only_on_loopback(host):
    """Refuse to serve without frame tags on an address other machines can reach."""
    if not ipaddress.ip_address(host).is_loopback:
        raise RuntimeError(f"{NO_FRAME_TAGS_VARIABLE}=1 turns the frame tags off, for "
                           f"benchmarks on loopback only; this server would listen on {host}: "
                           "unset it")


def _tls_want(exc):
    """Whether ``exc`` is TLS asking to be called again (non-blocking)."""
    import ssl

    return isinstance(exc, (ssl.SSLWantReadError, ssl.SSLWantWriteError))


class _Outgoing:
    """A frame in an outbox.

    Its tag is computed once its payload has gone out (see
    :meth:`Server._flush`), with the sequence number of that moment: frames
    dropped before they started (older parameters) leave no hole in the
    sequence, and no frame starts before the one ahead of it is out.
    """

    def __init__(self, kind, rnd, head, payload):
        self.kind, self.round = kind, rnd
        self.head, self.payload = head, memoryview(payload).cast("B")
        self.parts = None
        self.part = self.offset = 0

    @property
    def started(self):
        return self.parts is not None

    def start(self):
        if self.kind is None:  # handshake bytes: no tag
            self.parts = [memoryview(self.head).cast("B")]
        else:
            # None: the place of the tag
            self.parts = [p for p in (memoryview(self.head).cast("B"), self.payload) if p.nbytes]
            self.parts.append(None)

    def advance(self, k):
        """Count ``k`` bytes sent; whether the whole frame is out."""
        self.offset += k
        while self.part < len(self.parts) and self.parts[self.part] is not None and \
                self.offset >= self.parts[self.part].nbytes:
            self.offset -= self.parts[self.part].nbytes
            self.part += 1
        return self.part >= len(self.parts)


class _Refusals:
    """Refused connections, for the operator: a few lines each window, then a count.

    A flood of strangers must not flood the log, nor grow the server's memory.
    """

    def __init__(self, log, burst=5, window=10.0):
        self.log, self.burst, self.window = log, burst, window
        self.shown = 0
        self.hidden = 0
        self.total = 0
        self.since = time.monotonic()

    def note(self, addr, why):
        self.total += 1
        self.flush()
        if self.shown < self.burst:
            self.shown += 1
            where = f" from {addr[0]}:{addr[1]}" if addr else ""
            self.log(f"server: refused a connection{where}: {why}")
        else:
            self.hidden += 1

    def flush(self, force=False):
        now = time.monotonic()
        if now - self.since < self.window and not force:
            return
        if self.hidden:
            self.log(f"server: refused {self.hidden} more connections in the last "
                     f"{now - self.since:.0f} s (not shown one by one)")
        self.shown = self.hidden = 0
        self.since = now


class _Round:
    """What one round collected."""

    def __init__(self, t, start):
        self.round = t
        self.start = start
        self.expected = set()
        self.lagging = set()
        self.status = {}   # worker -> (status, reason, row or None)
        self.timing = {}   # worker -> (compute seconds, seconds from send to arrival)
        self.queued = {}   # worker -> when its parameters were queued
        self.stale = {}
        self.quorum_at = None  # when the quorum of gradients was in
        self.wait_s = 0.0
        self.aggregate_s = 0.0


def _summary(window, p):
    def mean(key):
        vals = [r[key] for r in window if r[key] is not None]
        return 1e3 * float(np.mean(vals)) if vals else float("nan")

    got = sum(r["received"] for r in window)
    return (f"({len(window)} rounds: {got}/{p * len(window)} gradients used; per round "
            f"compute {mean('compute_s'):.1f} ms, comm {mean('comm_s'):.1f} ms, "
            f"aggregate {mean('aggregate_s'):.1f} ms; "
            f"{sum(r['bytes_sent'] + r['bytes_received'] for r in window) / 1e3:.0f} kB moved)")


def load_checkpoint(path):
    """Read a checkpoint written by the server, without unpickling arbitrary objects.

    Parameters
    ----------
    path : str or path-like
        The file.

    Returns
    -------
    state : dict
        ``round``, ``parameters``, ``momentum`` (or None), ``fingerprint``.

    Raises
    ------
    ValueError
        If the file is not a flagagg distributed checkpoint.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a flagagg distributed checkpoint")
    missing = {"round", "parameters", "momentum", "fingerprint"} - set(state)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {sorted(missing)}")
    return state
