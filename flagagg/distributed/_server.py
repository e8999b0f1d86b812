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
import math
import os
import selectors
import socket
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from ..sim._replica import sgd_step
from ._protocol import (
    DTYPES,
    FrameReader,
    Kind,
    ProtocolError,
    encode_json,
    encode_tensor,
)
from ._settings import make_replica

__all__ = ["CHECKPOINT_FORMAT", "Server", "load_checkpoint"]


CHECKPOINT_FORMAT = "flagagg-distributed-checkpoint"


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
    """One TCP worker connection: its socket, reader and outbox."""

    def __init__(self, sock, addr, max_tensor_bytes, now):
        super().__init__(addr)
        self.sock = sock
        self.reader = FrameReader(max_tensor_bytes, kinds={Kind.HELLO, Kind.GRAD})
        self.outbox = deque()  # [kind, round, memoryview, bytes already sent]
        self.opened = now
        self.closing = False   # close once the outbox is empty (after a REJECT)

    def queue(self, kind, rnd, data):
        if kind == Kind.PARAMS:
            # a worker that fell behind only needs the newest parameters;
            # a frame already partly on the wire must be finished, though
            self.outbox = deque(e for e in self.outbox if e[0] != Kind.PARAMS or e[3] > 0)
        self.outbox.append([kind, rnd, memoryview(data).cast("B"), 0])


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
                 resume=None):
        from ..sim._cluster import build_rule

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

    def _say(self, text, event=None):
        self.log(text)
        if event is not None:
            self.events.append({"round": self.round, **event, "text": text})

    # ------------------------------------------------- checks every transport shares

    def _check_hello(self, hello):
        """Why a worker saying ``hello`` (a dict) cannot join, or None if it can."""
        w = hello.get("worker")
        if not isinstance(w, int) or not 0 <= w < self.config.workers:
            return f"worker index {w!r} is not in 0..{self.config.workers - 1}"
        if hello.get("fingerprint") != self.spec.fingerprint():
            return ("it runs a different config, rule, attack, f or seed than the server "
                    f"(fingerprint {hello.get('fingerprint')} != {self.spec.fingerprint()}): "
                    "start every process with the same arguments and config file")
        if hello.get("n_params") != self.n:
            return f"its model has {hello.get('n_params')} parameters, the server's {self.n}"
        if w in self.peers:
            return (f"worker {w} is already connected (pid {self.info[w].get('pid')}); "
                    "give every worker its own rank")
        return None

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
        if backend is None:
            scope = contextlib.nullcontext()
        else:
            import flagagg

            scope = flagagg.backend(backend)
        t0 = time.perf_counter()
        try:
            # diverging non-robust rules overflow; that is reported as divergence,
            # not as floating-point warnings from inside the rule
            with scope, np.errstate(all="ignore"):
                if self.config.array == "numpy":
                    result = self.rule(G.cpu().numpy(), return_result=True)
                    g = torch.as_tensor(np.asarray(result.aggregate), dtype=torch.float32)
                else:
                    result = self.rule(G, return_result=True)
                    g = result.aggregate.to(torch.float32)
        except Exception as exc:  # noqa: BLE001 - a failing rule skips a step, not the run
            st.aggregate_s = time.perf_counter() - t0
            return None, workers, None, (f"the rule cannot aggregate these {len(workers)} "
                                         f"gradients: {type(exc).__name__}: {exc}")
        st.aggregate_s = time.perf_counter() - t0
        if tuple(g.shape) != (self.n,):
            return None, workers, result, f"the rule returned shape {tuple(g.shape)}"
        return g.to(self.device), workers, result, None

    def run(self):
        """Train: wait for the workers, run every round, stop the workers.

        Returns
        -------
        record : dict
            ``rounds`` (one dict per round), ``workers`` (one per round and
            worker), ``curve`` ((round, accuracy) pairs), ``events``,
            ``diverged_round``, ``seconds``, ``final_accuracy`` and
            ``status`` (the exit status: 0 trained, 1 no workers).
        """
        t_start = time.perf_counter()
        spec, config = self.spec, self.config
        p = config.workers
        joined = self.wait_for_workers()
        record = {"rounds": [], "workers": [], "curve": [], "events": self.events,
                  "diverged_round": None, "status": 0, "start_round": self.start_round}
        if joined == 0:
            self._say(f"no worker connected within {spec.connect_timeout:g} s: check that the "
                      f"workers were started and can reach {self.address[0]}:{self.address[1]}")
            record["status"] = 1
            return self._finish(record, t_start)
        if joined < p:
            absent = sorted(set(range(p)) - set(self.peers))
            self._say(f"starting with {joined} of {p} workers; not connected: {absent}")
        acc = self.replica.accuracy(self.flat)
        record["curve"].append((self.start_round - 1, acc))
        self._say(f"round {self.start_round - 1:>4}: test accuracy {acc:.3f}")
        shown = {}
        window = []
        for t in range(self.start_round, config.rounds + 1):
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
        if self.checkpoint is not None and record["diverged_round"] is None:
            self.save_checkpoint(self.round)
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
        ratios = _field(result, "reconstruction_ratios")
        coefs = _field(result, "coefficients")
        rule_excluded = {}
        for i, why in (getattr(result, "excluded", None) or ()):
            if 0 <= int(i) < len(rows):
                rule_excluded[rows[int(i)]] = str(why)
        out = []
        for w in range(self.config.workers):
            if w in st.status:
                status, reason, _ = st.status[w]
            elif w in st.lagging and w in self.peers:
                status, reason = "missing", "still busy with an earlier round (slow or hung)"
            elif w in self.peers and w not in st.queued:
                status, reason = "missing", "joined during the round; takes part from the next"
            elif w in self.peers:
                status, reason = "missing", \
                    f"no gradient within the {self.spec.round_timeout:g} s deadline"
            else:
                status, reason = "missing", f"not connected ({self.gone.get(w, 'never joined')})"
            seconds, arrival = st.timing.get(w, (None, None))
            i = rows.index(w) if w in rows else None
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
                "reconstruction_ratio": None if ratios is None or i is None else float(ratios[i]),
                "coefficient": None if coefs is None or i is None else float(coefs[i]),
                "rule_excluded": rule_excluded.get(w, ""),
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
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint)

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
    """The parameter server of one run, over plain TCP sockets.

    Parameters
    ----------
    spec : RunSpec
        The run.
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
    """

    transport = "tcp"

    def __init__(self, spec, *, listen=("127.0.0.1", 0), device="cpu", log=print,
                 checkpoint=None, checkpoint_every=0, resume=None):
        super().__init__(spec, device=device, log=log, checkpoint=checkpoint,
                         checkpoint_every=checkpoint_every, resume=resume)
        self.sel = selectors.DefaultSelector()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(listen)
        self.lsock.listen(max(16, 2 * self.config.workers))
        self.lsock.setblocking(False)
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        self.address = self.lsock.getsockname()[:2]
        self.unnamed = set()     # connections that have not said HELLO yet

    # ------------------------------------------------------------------ I/O

    def _set_events(self, peer):
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.outbox else 0)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(peer.sock, mask, peer)

    def _pump(self, timeout):
        """Wait up to ``timeout`` seconds for I/O and handle what happened."""
        for key, mask in self.sel.select(max(0.0, timeout)):
            if key.data is None:
                self._accept()
                continue
            peer = key.data
            if mask & selectors.EVENT_READ:
                self._read(peer)
            if mask & selectors.EVENT_WRITE and peer.sock.fileno() >= 0:
                self._flush(peer)
        now = time.monotonic()
        for peer in list(self.unnamed):
            if now - peer.opened > self.spec.connect_timeout:
                self._drop(peer, "no HELLO")

    def _accept(self):
        try:
            sock, addr = self.lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = _Peer(sock, addr, self.max_gradient_bytes, time.monotonic())
        self.unnamed.add(peer)
        self.sel.register(sock, selectors.EVENT_READ, peer)

    def _read(self, peer):
        try:
            data = peer.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(peer, f"connection error: {exc}")
            return
        if not data:
            self._drop(peer, "connection closed")
            return
        peer.bytes_received += len(data)
        self.bytes_received += len(data)
        try:
            frames = peer.reader.feed(data)
            for frame in frames:
                if frame.kind == Kind.HELLO:
                    self._hello(peer, frame)
                else:
                    self._gradient(peer, frame)
        except ProtocolError as exc:
            self._drop(peer, f"protocol error: {exc}")

    def _flush(self, peer):
        while peer.outbox:
            entry = peer.outbox[0]
            view, sent = entry[2], entry[3]
            try:
                k = peer.sock.send(view[sent:])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._drop(peer, f"connection error: {exc}")
                return
            entry[3] += k
            peer.bytes_sent += k
            self.bytes_sent += k
            if entry[3] >= len(view):
                peer.outbox.popleft()
        if peer.closing and not peer.outbox:
            self._drop(peer, None)
            return
        self._set_events(peer)

    def _send(self, peer, kind, rnd, parts):
        peer.queue(kind, rnd, b"".join(parts))
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
        problem = self._check_hello(hello)
        self.unnamed.discard(peer)
        if problem is not None:
            self._refused(peer.addr[0], hello, problem)
            peer.closing = True
            self._send(peer, Kind.REJECT, 0, encode_json(Kind.REJECT, {"reason": problem}))
            return
        next_round = self._welcome(peer, hello)
        self._send(peer, Kind.WELCOME, 0,
                   encode_json(Kind.WELCOME, {"round": next_round, "n_params": self.n}))

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
        frame = b"".join(encode_tensor(Kind.PARAMS, params.numpy(), round=st.round))
        for peer in links:
            # latency counts from here: the send below may be the last thing this
            # process does before the scheduler runs the workers
            st.queued[peer.worker] = time.monotonic()
            peer.queue(Kind.PARAMS, st.round, frame)
            peer.sent_round = st.round
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
        self.sel.close()
        self.lsock.close()


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
        self.wait_s = 0.0
        self.aggregate_s = 0.0


def _field(result, name):
    value = getattr(result, name, None)
    return None if value is None else np.asarray(value)


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
