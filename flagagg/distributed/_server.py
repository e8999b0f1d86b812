"""The parameter server: send parameters, collect gradients until a deadline, aggregate, step.

:class:`_ServerCore` holds what does not depend on how bytes travel: the
rounds, the checks every gradient passes, the aggregation and step, the
records, checkpoints. :class:`Server` moves them over mutual-TLS connections;
:class:`flagagg.distributed._collective.CollectiveServer` over gloo or NCCL.

The TCP server (:class:`Server`) serves its connections with asyncio on a
thread of its own and runs the rounds on the caller's; no worker can make a
round wait past its deadline.
A worker that crashes closes its connection (seen at once); one that hangs
or is slow misses the deadline; either is *missing* for the round and the
server steps with the gradients that did arrive. A worker that is still busy
with an earlier round is not waited for: its late gradient is dropped as
stale and it gets the newest parameters next. Gradients are checked before
aggregation (round, size, dtype, finite values); a failed check *excludes*
the worker for the round. A frame that is not valid protocol closes the
connection, and so does a gradient beyond one per parameters the worker was
sent (refused at its header); at most ``MAX_QUEUED`` of a connection's
gradients wait for the rounds, reading from it pauses beyond. Every round
is recorded: who was missing or excluded and why, times, bytes, and the
rule's diagnostics.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import ipaddress
import math
import os
import queue
import socket
import struct
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from ..training._replica import sgd_step
from ..training._step import aggregate_step, build_rule, rule_columns
from ._protocol import (
    DTYPES,
    HEADER,
    FrameProtocol,
    Kind,
    ProtocolError,
    encode_json,
    encode_tensor,
)
from ._results import fsync_dir
from ._settings import make_replica
from ._tls import identity, server_context

__all__ = ["CHECKPOINT_FORMAT", "Server", "load_checkpoint"]


CHECKPOINT_FORMAT = "flagagg-distributed-checkpoint"
# once a round has its quorum, it waits as long again as the median round (or as the
# quorum took, if longer), and at least MIN_GRACE seconds, so that workers only
# slightly slower than the others are not left out round after round
QUORUM_GRACE = 1.0
MIN_GRACE = 0.05
# a connection in its handshake is not closed for a newer one before this many seconds
# (one that has sent nothing at all is closed for a newer one at any age)
MIN_HANDSHAKE = 0.5
# the kernel's accept queue (capped by net.core.somaxconn): 2 s of a 2,000/s storm, so
# that a server starved of CPU for a moment does not drop a worker's connection there
ACCEPT_BACKLOG = 4096
# at most this many connections taken from the kernel's accept queue per wakeup of the
# loop, so that the workers' traffic is served between batches
ACCEPT_BATCH = 64
# how often connections that have sent nothing are checked for their deadline
SWEEP_EVERY = 0.25
# SO_LINGER on, 0 s: close() sends a reset and leaves nothing behind (no TIME_WAIT)
_RESET = struct.pack("ii", 1, 0)
# the first byte of every TLS connection from a client: a handshake record (RFC 8446, 5.1)
_TLS_HANDSHAKE = b"\x16"
# exit status of a run stopped because too few gradients arrived for too long
STARVED = 4
# a connection's gradients waiting for the rounds' thread: at this many, reading from
# it pauses (its sends wait in TCP) until the rounds have taken one
MAX_QUEUED = 2


def rule_floor(rule, f, workers):
    """The fewest gradients ``rule`` aggregates with ``f`` (probed), at least 2f+1 if f > 0.

    Returns ``workers + 1`` when the rule refuses every count up to ``workers``.
    """
    rng = np.random.default_rng(0)
    need = workers + 1
    for k in range(1, workers + 1):
        try:
            rule(rng.standard_normal((k, 4)).astype(np.float32))
        except ValueError:
            continue
        need = k
        break
    return max(need, 2 * f + 1 if f else 1)


class _Link:
    """One worker connection as every server sees it: whose, and how far it got."""

    def __init__(self, addr):
        self.addr = addr
        self.worker = None       # set once the worker is accepted
        self.sent_round = 0      # newest round whose parameters were sent (or queued)
        self.answered_round = 0  # newest round it sent a gradient for
        self.bytes_sent = 0
        self.bytes_received = 0




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
        self.floor = spec.min_gradients or rule_floor(self.rule, spec.f, config.workers)
        self.quorum = max(spec.quorum_size, min(self.floor, config.workers))
        self.recent = deque(maxlen=20)   # durations of the latest rounds, for the grace
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
            # bytes and values both: a payload that is not whole values says so
            values_text = f"{nbytes // 4}" if nbytes % 4 == 0 else f"{nbytes / 4:g}"
            st.status[w] = ("excluded", f"wrong size: {nbytes} bytes = {values_text} float32 "
                            f"values, expected {4 * self.n} bytes = {self.n} values", None)
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
            ok = sum(1 for s in st.status.values() if s[0] == "ok")
            # below the floor a round waits for its deadline: workers that are
            # reconnecting may be back for the next one
            answered = bool(st.expected) and all(w in st.status for w in st.expected)
            if ok >= self.floor and answered and all(w in st.status for w in st.lagging):
                break
            if ok >= self.floor and not st.expected and st.status:
                break
            # a worker still busy with the round before is not waited for, but it gets
            # the grace, as a quorum does: its late gradient may be only just late
            if st.quorum_at is None and (ok >= self.quorum or (ok >= self.floor and answered)):
                st.quorum_at = now
                typical = float(np.median(self.recent)) if self.recent else 0.0
                grace = max(MIN_GRACE, QUORUM_GRACE * max(typical, now - st.start))
                deadline = min(deadline, now + grace)
                continue
            self._pump(deadline - now)
        st.wait_s = time.monotonic() - st.start
        self.state = None
        return st

    def _aggregate(self, st):
        """Aggregate the accepted rows; returns (gradient or None, rows, result, problem).

        Fewer rows than the floor give no step and no problem: the run counts
        how long it has been starved.
        """
        workers = sorted(w for w, s in st.status.items() if s[0] == "ok")
        if len(workers) < self.floor:
            st.starved = (f"{len(workers)} gradients, below the floor of {self.floor} "
                          f"(rule {self.spec.rule} with f = {self.spec.f})")
            return None, workers, None, None
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
                self.recorder.write_round(None, [], self.events[known:], None)
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
            self.recorder.write_round(None, [], self.events[known:events_logged], point)
        shown = {}
        window = []
        starved_since = None  # when the rounds began to have too few gradients to step
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
            if g is not None or problem:
                starved_since = None
            elif starved_since is None:
                starved_since = time.monotonic()
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
            self._report_changes(t, wrows, shown, problem or st.starved)
            self.recent.append(time.perf_counter() - t_round)
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
                "accuracy": accuracy, "problem": problem or st.starved or "",
            }
            record["rounds"].append(row)
            record["workers"].extend(wrows)
            window.append(row)
            if self.recorder is not None:
                self.recorder.write_round(row, wrows, self.events[events_logged:],
                                          None if accuracy is None else (t, accuracy))
                events_logged = len(self.events)
            if starved_since is not None and \
                    time.monotonic() - starved_since > spec.connect_timeout:
                self._say(f"round {t:>4}: STOPPED: no step for {spec.connect_timeout:g} s, "
                          f"every round had fewer gradients than the floor of {self.floor} "
                          f"(last: {st.starved}); the run cannot train robustly with the "
                          "workers it has: check the missing and excluded workers above",
                          {"event": "starved", "reason": st.starved})
                record["status"] = STARVED
                break
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
        last = record["rounds"][-1]["round"] if record["rounds"] else None
        if record["diverged_round"] is None and last is not None and \
                (not record["curve"] or record["curve"][-1][0] < last):
            # a run stopped early: its result is the model it reached, evaluated now
            accuracy = self.replica.accuracy(self.flat)
            record["curve"].append((last, accuracy))
            self._say(f"round {last:>4}: test accuracy {accuracy:.3f} (where the run stopped)")
            if self.recorder is not None:
                self.recorder.write_round(None, [], [], (last, accuracy))
        if self.checkpoint is not None and record["diverged_round"] is None and self.round:
            self.save_checkpoint(self.round)
        if self.recorder is not None:
            self.recorder.write_round(None, [], self.events[events_logged:], None)
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
        record["floor"] = self.floor
        left = {w: 0 for w in range(self.config.workers)}
        for r in record["workers"]:
            if r["reason"].startswith("no gradient before the round closed on its quorum"):
                left[r["worker"]] += 1
        record["left_out_by_quorum"] = left
        return record

    # ------------------------------------------------------------ reporting

    def _worker_rows(self, st, rows, result, peer_bytes):
        columns = rule_columns(result, rows, range(self.config.workers))
        diagnostics = _diagnostics(result, rows)
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
                **diagnostics.get(w, _NO_DIAGNOSTICS),
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
    """The parameter server of one run, over mutual-TLS connections, one per worker.

    The connections are served by an asyncio event loop on a thread of its
    own (connections accepted by the loop's reader on the listening socket,
    TLS by ``connect_accepted_socket``, ``readexactly`` under deadlines up
    to the HELLO; after it, a
    :class:`~flagagg.distributed._protocol.FrameProtocol` that reads each
    message straight into its own buffer); the rounds run on the calling
    thread, which gets what the loop read through a queue. Every connection first
    completes a TLS 1.3 handshake with a certificate of the run's CA
    (:func:`flagagg.distributed.issue_certificates`) within ``handshake_timeout`` seconds,
    then says HELLO (at most ``MAX_JSON_BYTES``; nothing larger is read
    before it). The certificate, not the HELLO, says which worker it is: a
    worker can only ever be its own rank, and a second connection of the same
    worker replaces the first only once that one is gone or has been silent
    for ``round_timeout`` seconds.

    Connections that have not said HELLO yet are capped (``max_pending`` in
    all, ``max_pending_per_source`` per remote address). Until it sends its
    first byte a connection is only a socket the server holds: when the cap
    is full, the oldest connection that has sent nothing (of the same source
    first) is closed with a reset for the new one, at any age; a connection
    whose first byte cannot begin a TLS handshake is reset at once. Only
    when every held connection is in its handshake is the oldest of those
    closed, once it has had half a second (before that, the new one is
    closed). A member whose certificate has been checked leaves the cap (it
    holds one connection before its HELLO, its newest). The accept queue is
    drained on every wakeup of the loop, so that a storm of connections from
    one process, at any rate the loop can accept, neither fills the kernel's
    queue (where a worker's connection would be dropped) nor touches a
    worker's handshake.

    Parameters
    ----------
    spec : RunSpec
        The run.
    tls : str, path-like or ssl.SSLContext
        The server's PEM file from :func:`flagagg.distributed.issue_certificates`
        (``server.pem``), or a context made from it.
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
        Seconds a new connection has for its TLS handshake and its HELLO.
    max_pending : int, default=256
        Connections without a HELLO yet held at once.
    max_pending_per_source : int, default=128
        Of those, from one remote address.
    recorder : optional
        Gets every round's records as the run goes (see
        :class:`flagagg.distributed._results.RunLog`).
    """

    transport = "tcp"

    def __init__(self, spec, *, tls, listen=("127.0.0.1", 0), device="cpu", log=print,
                 checkpoint=None, checkpoint_every=0, resume=None, handshake_timeout=5.0,
                 max_pending=256, max_pending_per_source=128, recorder=None,
                 _plaintext_benchmark=False):
        import ssl

        if _plaintext_benchmark:
            # for measuring what TLS costs (asv_bench), on loopback only; no CLI reaches it
            if tls is not None or not ipaddress.ip_address(listen[0]).is_loopback:
                raise RuntimeError("the plaintext benchmark mode is for loopback only, without "
                                   "TLS certificates")
        elif tls is None:
            raise ValueError("the tcp transport needs the server's TLS certificate file "
                             "(server.pem from `flagagg certs`)")
        elif not isinstance(tls, ssl.SSLContext):
            tls = server_context(tls)
        super().__init__(spec, device=device, log=log, checkpoint=checkpoint,
                         checkpoint_every=checkpoint_every, resume=resume, recorder=recorder)
        self.tls = tls
        self.handshake_timeout = float(handshake_timeout)
        self.max_pending = int(max_pending)
        self.max_pending_per_source = int(max_pending_per_source)
        self.refusals = _Refusals(log)
        self.inbox = queue.SimpleQueue()   # (what, conn, data) from the loop's thread
        # connections without a HELLO (_Pending -> None), oldest first: those that have
        # sent nothing yet, and those in their TLS handshake
        self.silent = {}
        self.shaking = {}
        self.by_source = {}                # source -> (its silent, its shaking)
        self.greeting = {}                 # worker -> its member's transport before HELLO
        self.loop = asyncio.new_event_loop()
        ready = concurrent.futures.Future()
        self.thread = threading.Thread(target=self._io, args=(listen, ready), daemon=True,
                                       name="flagagg-server-io")
        self.thread.start()
        self.address = ready.result(30)

    # ------------------------------------------------------------ the loop's thread

    def _io(self, listen, ready):
        asyncio.set_event_loop(self.loop)
        try:
            family, _, _, _, where = socket.getaddrinfo(
                listen[0], listen[1], type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            self.listener = socket.create_server(
                where, family=family, backlog=max(ACCEPT_BACKLOG, 2 * self.config.workers))
            self.listener.setblocking(False)
            # accepted by hand, not by loop.create_server: a connection is only a socket
            # and a dict entry until it sends its first byte (see _accept)
            self.loop.add_reader(self.listener.fileno(), self._accept)
            self.loop.call_later(SWEEP_EVERY, self._sweep)
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor
            ready.set_exception(exc)
            self.loop.close()
            return
        ready.set_result(self.listener.getsockname()[:2])
        self.loop.run_forever()
        self.loop.close()

    def _accept(self):
        """Take every connection the kernel has queued, and sort each at once.

        This is all a connection costs until it sends something: an accept, a
        peek at its first byte, a dict entry. One that has already sent its
        first byte (a worker's TLS ClientHello) starts its handshake; one that
        has sent nothing waits, registered with the loop, among the *silent*
        ones; one whose first byte cannot begin a TLS handshake is reset.
        Draining the whole queue on each wakeup keeps the kernel's accept
        queue from filling under a storm, so that a worker's connection is
        never dropped there (its retry would wait 1 s, then 2, 4, ...).
        """
        now = time.monotonic()
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    continue  # that connection is gone already (ECONNABORTED and the like)
                if self.silent:
                    # out of descriptors: the oldest connection that has sent nothing
                    # makes room for whatever waits in the queue
                    self._shed(next(iter(self.silent)))
                    self.refusals.note(None, f"out of file descriptors ({exc}): closed the "
                                       "oldest connection that had sent nothing")
                    continue
                self.refusals.note(None, f"cannot accept connections ({exc}); accepting "
                                   "again in 1 s")
                self.loop.remove_reader(self.listener.fileno())
                self.loop.call_later(1.0, self._accept_again)
                return
            self._arrived(sock, addr, now)

    def _accept_again(self):
        if self.listener.fileno() >= 0:
            self.loop.add_reader(self.listener.fileno(), self._accept)

    def _arrived(self, sock, addr, now):
        try:
            sock.setblocking(False)
            # asyncio sets this on the sockets it accepts itself, not on ours (their
            # proto is 0): without it, Nagle holds a PARAMS payload written after its
            # header until the worker's delayed ACK, 40 ms a round
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            first = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            first = None
        except OSError:
            first = b""
        if first == b"":  # gone already
            sock.close()
            return
        if first is not None and not self._may_begin(first):
            _reset(sock)
            self.refusals.note(addr, f"not TLS: its first byte {first!r} cannot begin a TLS "
                               "handshake")
            return
        entry = _Pending(sock, addr, now)
        if not self._admit(entry, silent=first is None):
            return
        if first is None:
            self.loop.add_reader(sock.fileno(), self._spoke, entry)
        else:
            entry.task = self.loop.create_task(self._connection(entry))

    def _may_begin(self, first):
        return self.tls is None or first == _TLS_HANDSHAKE

    def _spoke(self, entry):
        """A silent connection has something to read: its first byte, or its end."""
        try:
            first = entry.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            first = b""
        self.loop.remove_reader(entry.sock.fileno())
        if first == b"" or not self._may_begin(first):
            self._forget(entry)
            if first:
                _reset(entry.sock)
                self.refusals.note(entry.addr, f"not TLS: its first byte {first!r} cannot "
                                   "begin a TLS handshake")
            else:
                entry.sock.close()
            return
        # it joins those in their handshake, with a handshake's time from now
        self._forget(entry)
        entry.since = time.monotonic()
        self._hold(entry, silent=False)
        entry.task = self.loop.create_task(self._connection(entry))

    def _admit(self, entry, silent):
        """Make room for a new connection under the caps; whether it is let in.

        When the cap (of all, or of this source) is full, the oldest
        connection that has sent nothing is closed for the new one, at any
        age: it has cost nothing but a descriptor, and a worker sends its TLS
        ClientHello as soon as its TCP connection is up. When every held
        connection is in its handshake, the oldest of them is closed for the
        new one, but only once it has had ``MIN_HANDSHAKE`` seconds; before
        that the new one is closed instead. A storm of silent connections
        then never touches a worker's handshake, whatever its rate, and a
        storm of handshakes cycles the places at most ``cap / MIN_HANDSHAKE``
        times a second.
        """
        mine = self.by_source.get(entry.source)
        if mine is not None and len(mine[0]) + len(mine[1]) >= self.max_pending_per_source:
            full = mine
        elif len(self.silent) + len(self.shaking) >= self.max_pending:
            full = (self.silent, self.shaking)
        else:
            full = None
        if full is not None:
            if full[0]:
                self._shed(next(iter(full[0])))
                self.refusals.note(entry.addr, "closed the oldest connection that had sent "
                                   f"nothing to make room (cap {self.max_pending}, "
                                   f"{self.max_pending_per_source} per source)")
            else:
                victim = next(iter(full[1]))
                if entry.since - victim.since < MIN_HANDSHAKE:
                    _reset(entry.sock)
                    self.refusals.note(entry.addr, "no place for a new connection: those in "
                                       f"their handshake are younger than {MIN_HANDSHAKE:g} s "
                                       f"(cap {self.max_pending}, "
                                       f"{self.max_pending_per_source} per source)")
                    return False
                self._shed(victim)
                self.refusals.note(entry.addr, "closed the oldest connection in its handshake "
                                   f"to make room (cap {self.max_pending}, "
                                   f"{self.max_pending_per_source} per source)")
        self._hold(entry, silent)
        return True

    def _hold(self, entry, silent):
        entry.silent = silent
        (self.silent if silent else self.shaking)[entry] = None
        mine = self.by_source.get(entry.source)
        if mine is None:
            mine = self.by_source[entry.source] = ({}, {})
        mine[0 if silent else 1][entry] = None

    def _forget(self, entry):
        """``entry`` no longer counts against the caps (it is closed, or a member)."""
        if entry.silent is None:
            return
        (self.silent if entry.silent else self.shaking).pop(entry, None)
        mine = self.by_source.get(entry.source)
        if mine is not None:
            mine[0 if entry.silent else 1].pop(entry, None)
            if not mine[0] and not mine[1]:
                del self.by_source[entry.source]
        entry.silent = None

    def _shed(self, entry):
        """Close a connection without a HELLO, at once and with a reset where it can."""
        self._forget(entry)
        entry.shed = True
        if entry.transport is not None:
            entry.transport.abort()
        elif entry.task is not None and entry.started:
            entry.task.cancel()  # asyncio closes what it made of the socket
        else:
            if entry.task is not None:
                entry.task.cancel()  # never ran: the socket is still ours
            else:
                self.loop.remove_reader(entry.sock.fileno())
            _reset(entry.sock)

    def _sweep(self):
        """Close the connections that have sent nothing within ``handshake_timeout``."""
        end = time.monotonic() - self.handshake_timeout
        while self.silent:
            entry = next(iter(self.silent))
            if entry.since > end:
                break
            self._shed(entry)
            self.refusals.note(entry.addr, f"sent nothing within {self.handshake_timeout:g} s")
        self.loop.call_later(SWEEP_EVERY, self._sweep)

    def _stop_accepting(self):
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        for entry in [*self.silent, *self.shaking]:
            self._shed(entry)
        for transport in list(self.greeting.values()):
            transport.abort()

    async def _connection(self, entry):
        entry.started = True
        addr = entry.addr
        raw = None
        who = None
        said = self.loop.create_future()

        def on_hello(frame):
            # nothing more is read until the rounds know of this worker
            link.pause()
            if not said.done():
                said.set_result(frame)

        # before its HELLO, a peer gets no more than a HELLO's bytes read (a tensor
        # header is refused at once: the limit is 0 bytes)
        link = FrameProtocol(0, {Kind.HELLO}, on_hello)
        try:
            end = self.loop.time() + self.handshake_timeout
            tls = {} if self.tls is None else {
                "ssl": self.tls, "ssl_handshake_timeout": self.handshake_timeout}
            # aborting this transport ends the connection whatever TLS does in it
            raw, _ = await self.loop.connect_accepted_socket(lambda: link, entry.sock, **tls)
            entry.transport = raw
            if self.tls is not None:
                named = identity(raw.get_extra_info("peercert"))
                if not isinstance(named, int) or not 0 <= named < self.config.workers:
                    raise ProtocolError(f"its certificate names {named!r}, not a worker of "
                                        "this run")
                who = named
                # a member: a storm of strangers no longer closes it; a member holds one
                # connection before its HELLO, its newest
                self._forget(entry)
                older = self.greeting.get(who)
                if older is not None:
                    older.abort()
                self.greeting[who] = raw
            await asyncio.wait((said, link.closed), timeout=max(0.0, end - self.loop.time()),
                               return_when=asyncio.FIRST_COMPLETED)
            if not said.done():
                if not link.closed.done():
                    raise asyncio.TimeoutError
                why = link.closed.result()
                raise ProtocolError("closed before its HELLO" if why == "connection closed"
                                    else why)
            frame = said.result()
            hello = frame.json()
        except (ProtocolError, OSError, EOFError, asyncio.TimeoutError, ValueError) as exc:
            why = str(exc) or type(exc).__name__
            if isinstance(exc, asyncio.TimeoutError):
                why = f"no TLS handshake and HELLO within {self.handshake_timeout:g} s"
            if not entry.shed:
                self.refusals.note(addr, why)
            if raw is not None:
                raw.abort()
            return
        finally:
            self._forget(entry)
            if who is not None and self.greeting.get(who) is raw:
                del self.greeting[who]
        conn = _Conn(addr, raw, who)
        conn.bytes_received = HEADER.size + len(frame.payload)
        conn.link = link
        self.inbox.put(("hello", conn, hello))  # first: what is read next comes after it
        # from here on the same protocol reads this worker's gradients, each straight
        # into its own buffer
        link.expect(self.max_gradient_bytes, {Kind.GRAD},
                    lambda frame: self._received(conn, frame),
                    lambda head: self._announced(conn, head))
        link.resume()
        sender = asyncio.ensure_future(self._sender(conn))
        try:
            reason = await link.closed
        except asyncio.CancelledError as exc:
            reason = f"connection error: {exc or type(exc).__name__}"
        sender.cancel()
        raw.abort()
        self.inbox.put(("lost", conn, reason))

    def _announced(self, conn, head):
        """A gradient's checked header from ``conn``, on the loop's thread, before its payload.

        A worker answers each PARAMS it was sent with one gradient, so a
        gradient beyond the PARAMS written to it is refused here, before a
        buffer for it is allocated: that member's connection ends (a
        :class:`ProtocolError`), and nothing it sends can pile up in the server.
        """
        if conn.owed <= 0:
            raise ProtocolError(f"a gradient (round {head[5]}) beyond one per parameters it "
                                "was sent")
        conn.owed -= 1

    def _received(self, conn, frame):
        """A complete gradient frame from ``conn``, on the loop's thread: to the rounds."""
        conn.bytes_received += HEADER.size + len(frame.payload)
        self.bytes_received += HEADER.size + len(frame.payload)
        conn.last_heard = time.monotonic()
        conn.queued += 1
        if conn.queued >= MAX_QUEUED:
            # the rounds are busy: what else it sends waits in TCP, not in the server
            conn.link.pause()
        self.inbox.put(("grad", conn, frame))

    def _taken(self, conn):
        """The rounds took one of ``conn``'s gradients; on the loop's thread."""
        conn.queued -= 1
        if conn.queued < MAX_QUEUED:
            conn.link.resume()

    async def _sender(self, conn):
        try:
            while True:
                while not conn.outbox:
                    conn.wake.clear()
                    await conn.wake.wait()
                entry = conn.outbox.popleft()
                if entry is None:  # close once everything before has gone
                    await conn.link.drain()
                    conn.link.transport.close()
                    return
                kind, head, payload = entry
                conn.link.write(head, payload)
                if kind == Kind.PARAMS:
                    conn.owed += 1  # written: the worker may answer it
                conn.bytes_sent += len(head) + len(payload)
                self.bytes_sent += len(head) + len(payload)
                await conn.link.drain()
        except (OSError, RuntimeError):
            conn.raw.abort()

    def _push(self, conn, entry):
        """Queue a message (or None: close) on ``conn``; runs on the loop's thread."""
        if entry is not None and entry[0] == Kind.PARAMS:
            # a worker that fell behind needs only the newest parameters
            conn.outbox = deque(e for e in conn.outbox if e is None or e[0] != Kind.PARAMS)
        conn.outbox.append(entry)
        conn.wake.set()

    def _send(self, conn, parts):
        """Queue a message from :func:`encode_json` (or None: close) from the rounds' thread."""
        entry = None if parts is None else (0, bytes(parts[0]), bytes(parts[1]))
        with contextlib.suppress(RuntimeError):  # the loop has already stopped
            self.loop.call_soon_threadsafe(self._push, conn, entry)

    # ------------------------------------------------------------ the rounds' thread

    def _pump(self, timeout):
        """Wait up to ``timeout`` seconds for messages and handle them all."""
        try:
            items = [self.inbox.get(timeout=max(0.0, timeout))]
        except queue.Empty:
            items = []
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for what, conn, data in items:
            if what == "hello":
                self._hello(conn, data)
            elif what == "grad":
                self._gradient(conn, data)
                with contextlib.suppress(RuntimeError):  # the loop has already stopped
                    self.loop.call_soon_threadsafe(self._taken, conn)
            else:
                conn.open = False
                self._lost(conn, data)
        self.refusals.flush()

    def _hello(self, conn, hello):
        why, told = self._admission(hello)
        problem = None if why is None else (why, told)
        w = conn.identity
        asked = hello.get("worker")
        if problem is None and w is not None and asked != w:
            problem = (f"its HELLO asks for worker {asked!r:.20}, its certificate is worker {w}'s",
                       f"this process holds worker {w}'s certificate and can only be worker {w}")
        if problem is None and w is None:  # plaintext benchmark
            w = asked if isinstance(asked, int) and 0 <= asked < self.config.workers else None
            if w is None:
                problem = (f"worker {asked!r:.20} is not one of the run's", "no such worker")
        retry = False
        old = self.peers.get(w) if problem is None else None
        if old is not None:
            silent = time.monotonic() - old.last_heard
            if silent <= self.spec.round_timeout:
                problem = (f"worker {w} is already connected ({old.addr[0]}, heard from "
                           f"{silent:.1f} s ago); a second connection replaces it only once "
                           "it is gone or silent", f"worker {w} is already connected")
                retry = True
        if problem is not None:
            self._refused(conn.addr[0], hello, problem[0])
            self._send(conn, encode_json(Kind.REJECT, {"reason": problem[1], "retry": retry}))
            self._send(conn, None)
            return
        if old is not None:
            self._close(old)
            self._lost(old, None)
            self._say(f"worker {w}: a new connection with its certificate replaces the old one "
                      f"({old.addr[0]}), silent for {time.monotonic() - old.last_heard:.1f} s",
                      {"worker": w, "event": "replaced"})
        next_round = self._welcome(conn, {**hello, "worker": w})
        self._send(conn, encode_json(Kind.WELCOME, {"round": next_round, "worker": w}))

    def _close(self, conn):
        conn.open = False
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(conn.raw.abort)

    def _gradient(self, conn, frame):
        if not conn.open or self.peers.get(conn.worker) is not conn:
            return
        w = conn.worker
        try:
            if frame.worker != w:
                raise ProtocolError(f"worker {w} sent a gradient labelled worker {frame.worker}")
            if self._check_round(conn, frame.round):
                self._accept_gradient(conn, DTYPES.get(frame.dtype), len(frame.payload),
                                      frame.array, frame.seconds)
        except ProtocolError as exc:
            self._close(conn)
            self._lost(conn, f"protocol error: {exc}")

    def _send_params(self, st, links, params):
        # one copy of the parameters for every connection: the next step must not
        # change bytes still waiting to be encrypted
        head, view = encode_tensor(Kind.PARAMS, params.numpy(), round=st.round)
        payload = bytes(view)
        for conn in links:
            st.queued[conn.worker] = time.monotonic()
            conn.sent_round = st.round
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._push, conn, (Kind.PARAMS, head, payload))

    def _stop_workers(self, timeout=5.0):
        """Tell every worker to stop, wait briefly for the messages to leave, close."""
        links = list(self.peers.values())
        for conn in links:
            self._send(conn, encode_json(Kind.STOP, {"round": self.round}))
            self._send(conn, None)
        end = time.monotonic() + timeout
        while time.monotonic() < end and any(
                not c.raw.is_closing() for c in links):
            time.sleep(0.01)

        async def shut():
            self._stop_accepting()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.refusals.flush(force=True)


class _Conn(_Link):
    """One worker's connection as the rounds see it, and its outbox on the loop's thread."""

    def __init__(self, addr, transport, identity):
        super().__init__(addr)
        self.raw = transport  # its TLS transport: abort() drops the TCP connection too
        self.identity = identity   # the worker its certificate names
        self.link = None           # its FrameProtocol, once its HELLO has been read
        self.outbox = deque()      # (kind, head, payload), or None: close
        self.wake = asyncio.Event()
        self.open = True
        self.last_heard = time.monotonic()
        # on the loop's thread: PARAMS written to it and not yet answered by a gradient,
        # and its gradients in the inbox that the rounds have not taken yet
        self.owed = 0
        self.queued = 0


class _Pending:
    """A connection without a HELLO yet, as the caps see it."""

    __slots__ = ("sock", "addr", "source", "since", "silent", "task", "started", "transport",
                 "shed")

    def __init__(self, sock, addr, now):
        self.sock, self.addr, self.source, self.since = sock, addr, addr[0], now
        self.silent = None       # True: has sent nothing; False: in its handshake; None: neither
        self.task = None         # the task running its handshake and HELLO
        self.started = False     # whether that task has begun (and owns the socket)
        self.transport = None    # once its handshake is done
        self.shed = False        # closed by the caps


def _reset(sock):
    """Close ``sock`` with a reset: the peer learns at once, nothing stays behind."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    sock.close()


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


_NO_DIAGNOSTICS = {"influence": None, "cosine": None, "verdict": "", "suspect": False}


def _diagnostics(result, rows):
    """Worker -> the rule result's ``influence``, ``cosine``, ``verdict`` and ``suspect``."""
    if result is None:
        return {}
    influence = getattr(result, "influence", None)
    cosine = getattr(result, "cosine", None)
    verdict = tuple(getattr(result, "verdict", ()) or ())
    suspects = set(getattr(result, "suspects", ()) or ())
    out = {}
    for i, w in enumerate(rows):
        out[w] = {
            "influence": None if influence is None else float(influence[i]),
            "cosine": None if cosine is None else float(cosine[i]),
            "verdict": verdict[i] if i < len(verdict) else "",
            "suspect": i in suspects,
        }
    return out


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
        self.starved = None    # why the round could not step (too few gradients)
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
