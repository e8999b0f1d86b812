"""Parameters and gradients over gloo (CPU) or NCCL (GPU), without trusting the workers.

torch.distributed's point-to-point messages are not built to survive a
hostile or failing peer, so this transport never gives a worker the chance
to stop the server:

* **One two-rank process group per worker connection** (rank 0 the server,
  rank 1 the worker), built on the run's TCP store under a prefix of its
  own. A peer that dies or stalls breaks only its own group; the server
  throws that group away, and the worker is missing until it joins again
  with a new one. (One group over all ranks would not do: a timed-out wait
  closes every connection of its group.)
* **Announce, then send.** Before a worker sends a gradient it pushes a small
  JSON announcement (round, dtype, size in bytes, compute seconds) onto the
  server's queue in the store. The server checks it and only then posts a
  receive of exactly that size. A receive is therefore only posted for data
  that is already waiting, so its (bounded) wait is short. gloo aborts the
  receiving process when a message is longer than the posted buffer
  (measured with PyTorch 2.13), so the size check must come first: a worker
  announcing more than ``8 n + 4096`` bytes is cut off before anything is
  received.
* **A trailer.** A gradient is followed by the four bytes ``FLAG``. The last
  four bytes of the receive buffer start zeroed; a worker that sends fewer
  bytes than announced leaves them so, and is cut off instead of having a
  partly filled buffer aggregated.

What this transport cannot do: a process that announces one size and then
deliberately sends a longer message aborts the server inside gloo. Workers
that may attack the protocol itself, not only the gradients' values, belong
on ``--transport tcp``, whose framing checks every byte count first.

The server polls its queue without blocking (a blocking ``queue_pop`` that
times out leaves the store client out of step with the store), backing off
from 0.1 to 1 ms while it is empty. A gloo pair notices by itself when its
peer's connection closes, and a send on it then fails at once; so while a
round waits, the server pings the workers that have not answered every
``PING_EVERY`` seconds, and sees a crash within that time rather than at the
deadline.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import re
import secrets
import time

import numpy as np
import torch

from ._protocol import ProtocolError, decode_json
from ._server import _Link, _ServerCore
from ._worker import IDLE_TIMEOUT, GradientSource

__all__ = ["MARK", "TRANSPORTS", "CollectiveServer", "check_transport", "run_collective_worker"]

TRANSPORTS = ("gloo", "nccl")
MARK = b"FLAG"
# a message from the server is one uint8 buffer: a header of four int64
# (kind, round, number of float32 values, 0), then for PARAMS the values; one
# message, not two, because each gloo message costs a handshake
_PARAMS, _STOP, _PING = 1, 2, 3
_HEAD_BYTES = 32
_TAG_SERVER, _TAG_GRAD = 1, 3
_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
# while a round waits, a worker that has not answered is pinged this often: a
# send on a gloo pair whose peer has gone fails at once, so a crash is seen
# within this time instead of at the deadline
PING_EVERY = 0.25
_MAX_PINGS = 16              # unread pings kept per worker (a hung one reads none)


def _td(seconds):
    return datetime.timedelta(seconds=float(seconds))


def check_transport(transport, device="cpu"):
    """Raise a RuntimeError saying what is missing if ``transport`` cannot run here.

    Parameters
    ----------
    transport : {"gloo", "nccl"}
        The transport.
    device : str, default="cpu"
        The device the process computes on.
    """
    import torch.distributed as dist

    if transport not in TRANSPORTS:
        raise ValueError(f"transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed: use --transport tcp")
    if not hasattr(dist.Store, "queue_pop") or not hasattr(dist, "QueueEmptyError"):
        raise RuntimeError(
            f"--transport {transport} needs the store queues of newer PyTorch releases "
            f"(torch {torch.__version__} lacks Store.queue_pop): upgrade torch or use "
            "--transport tcp"
        )
    if transport == "gloo" and not dist.is_gloo_available():
        raise RuntimeError("this torch build has no gloo backend: use --transport tcp")
    if transport == "nccl":
        if not dist.is_nccl_available():
            raise RuntimeError("this torch build has no NCCL backend (NCCL needs a CUDA build "
                               "of torch): use --transport gloo or tcp")
        if not str(device).startswith("cuda"):
            raise RuntimeError("--transport nccl moves CUDA tensors: run with --device cuda, "
                               "or use --transport gloo on CPU")


def _pair_group(transport, store, prefix, rank, timeout, device):
    """The two-rank process group of one worker connection (rank 0 server, 1 worker)."""
    import torch.distributed as dist

    sub = dist.PrefixStore(prefix, store)
    if transport == "gloo":
        return dist.ProcessGroupGloo(sub, rank, 2, _td(timeout))
    # a failed NCCL group is aborted, not the whole process torn down (PyTorch's
    # default): a worker's failure must not end the server; read at construction
    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = _td(timeout)
    torch.cuda.set_device(torch.device(device))
    return dist.ProcessGroupNCCL(sub, rank, 2, options)


def _wait(transport, work, seconds):
    """Wait for ``work`` at most ``seconds``; raise TimeoutError or RuntimeError if it fails."""
    if transport == "gloo":
        work.wait(_td(seconds))
        return
    # an NCCL work's wait() orders CUDA streams and returns at once; poll instead
    end = time.monotonic() + seconds
    while not work.is_completed():
        if time.monotonic() > end:
            raise TimeoutError(f"no data within {seconds:.3g} s")
        time.sleep(1e-4)
    work.wait()


def _buffer_device(transport, device):
    # gloo moves host memory; NCCL moves device memory
    return torch.device(device) if transport == "nccl" else torch.device("cpu")


def _server_message(kind, rnd, values=None, *, device):
    """One message of the server: the header, then ``values`` (float32) if given."""
    head = torch.tensor([kind, rnd, 0 if values is None else values.numel(), 0],
                        dtype=torch.int64)
    parts = [head.view(torch.uint8)]
    if values is not None:
        parts.append(values.detach().to("cpu", torch.float32).reshape(-1).view(torch.uint8))
    return torch.cat(parts).to(device)


def _first_line(exc):
    """The gist of a gloo/NCCL/store error: its first sentence, without the source location."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0])
    return text.split(". ")[0][:160]


class _PairLink(_Link):
    """One worker connection: its process group and what is in flight on it."""

    def __init__(self, token, pg, addr):
        super().__init__(addr)
        self.token = token
        self.pg = pg
        # round -> sends not known to be complete, with their tensors; a send is
        # complete once the worker answers that round
        self.sends = {}
        self.pings = []          # (sent_round when pinged, work) not known to be read
        self.stop_work = None


class CollectiveServer(_ServerCore):
    """The parameter server of one run, over gloo or NCCL process groups.

    Parameters
    ----------
    spec : RunSpec
        The run.
    store : torch.distributed.Store
        The run's store (the TCP store every process reaches).
    transport : {"gloo", "nccl"}, default="gloo"
        The backend of the per-worker process groups.
    prefix : str, default="flagagg/0/"
        Prefix of this run's keys in the store.
    device : str, default="cpu"
        Device of the parameters and the aggregation.
    log : callable, default=print
        Where progress and events go.
    checkpoint, checkpoint_every, resume
        See :class:`flagagg.distributed.Server`.
    join_timeout : float, default=10.0
        Seconds the server waits for a worker it accepted to build their
        process group (about 0.3 s on loopback); the server does nothing
        else meanwhile.
    """

    def __init__(self, spec, store, *, transport="gloo", prefix="flagagg/0/", device="cpu",
                 log=print, checkpoint=None, checkpoint_every=0, resume=None,
                 join_timeout=10.0):
        check_transport(transport, device)
        super().__init__(spec, device=device, log=log, checkpoint=checkpoint,
                         checkpoint_every=checkpoint_every, resume=resume)
        self.transport = transport
        self.store = store
        self.prefix = prefix
        self.inbox = prefix + "inbox"
        self.join_timeout = min(float(join_timeout), spec.connect_timeout)
        self.links = {}          # token -> _PairLink, accepted links only
        self.stopping = False
        self.bufdev = _buffer_device(transport, self.device)
        self._ping = _server_message(_PING, 0, device=self.bufdev)
        self._pinged = 0.0
        host, port = getattr(store, "host", None), getattr(store, "port", None)
        self.address = (host, port) if host is not None else None

    # ------------------------------------------------------------------ I/O

    def _pump(self, timeout):
        """Wait up to ``timeout`` seconds for messages; handle those that came."""
        import torch.distributed as dist

        end = time.monotonic() + max(0.0, timeout)
        delay = 1e-4
        while True:
            raws = []
            while len(raws) < 4 * self.config.workers + 8:
                try:
                    raws.append(self.store.queue_pop(self.inbox, block=False))
                except dist.QueueEmptyError:
                    break
            if raws:
                self._handle(raws)
                return
            left = end - time.monotonic()
            if left <= 0:
                return
            if self.transport == "gloo" and self.state is not None and \
                    time.monotonic() - self._pinged > PING_EVERY:
                self._pinged = time.monotonic()
                waiting = [q for q in self.peers.values() if q.answered_round < self.state.round]
                if not all([self._probe(q) for q in waiting]):
                    return  # a worker is gone: the round may be complete without it
            time.sleep(min(delay, left))
            delay = min(1.5 * delay, 1e-3)

    def _handle(self, raws):
        receiving = []
        for raw in raws:
            msg = self._decode(raw)
            if msg is None:
                continue
            if msg.get("kind") == "hello":
                self._hello(msg, len(raw))
                continue
            link = self.links.get(msg.get("token"))
            if link is None:
                continue  # from a connection already closed; its group is gone
            link.bytes_received += len(raw)
            self.bytes_received += len(raw)
            try:
                posted = self._post_receive(link, msg)
            except ProtocolError as exc:
                self._drop(link, f"protocol error: {exc}")
                continue
            except RuntimeError as exc:  # the group broke (the worker is gone)
                self._drop(link, f"connection error: {_first_line(exc)}")
                continue
            receiving.append(posted)
        # all receives are posted before any is waited on, so transfers overlap
        for link, msg, current, work, buf in receiving:
            self._complete_receive(link, msg, current, work, buf)

    def _decode(self, raw):
        # the same size- and depth-limited parser as the tcp transport's control messages
        try:
            msg = decode_json(raw, "a store message")
        except ProtocolError as exc:
            self._say(f"ignored a control message: {exc}; not a flagagg worker's")
            return None
        if not isinstance(msg.get("token"), str):
            self._say("ignored a control message that is not a flagagg worker's")
            return None
        return msg

    def _post_receive(self, link, msg):
        """Check a gradient's announcement and post the receive of its bytes."""
        rnd, nbytes, dtype = msg.get("round"), msg.get("nbytes"), msg.get("dtype")
        if msg.get("worker") != link.worker:
            raise ProtocolError(f"worker {link.worker} announced a gradient labelled worker "
                                f"{msg.get('worker')!r}")
        if not isinstance(rnd, int) or not isinstance(nbytes, int) or nbytes < 0:
            raise ProtocolError(f"a gradient announcement without a valid round and size: {msg}")
        if nbytes > self.max_gradient_bytes:
            raise ProtocolError(f"announced a gradient of {nbytes} bytes, over the "
                                f"{self.max_gradient_bytes}-byte limit")
        if dtype not in _DTYPES:
            raise ProtocolError(f"announced a gradient of unknown dtype {dtype!r}")
        current = self._check_round(link, rnd)
        self._retire_sends(link)
        buf = torch.zeros(nbytes + len(MARK), dtype=torch.uint8, device=self.bufdev)
        work = link.pg.recv([buf], 1, _TAG_GRAD)
        return link, msg, current, work, buf

    def _complete_receive(self, link, msg, current, work, buf):
        if link.token not in self.links:
            return  # dropped while its receive was pending
        st = self.state
        end = st.start + self.spec.round_timeout if st is not None else time.monotonic() + 2.0
        try:
            _wait(self.transport, work, max(0.5, end - time.monotonic()))
        except (RuntimeError, TimeoutError) as exc:
            self._drop(link, f"announced a gradient and did not deliver it ({_first_line(exc)})")
            return
        link.bytes_received += buf.numel()
        self.bytes_received += buf.numel()
        if bytes(buf[-len(MARK):].cpu().numpy()) != MARK:
            self._drop(link, "protocol error: sent fewer bytes than it announced")
            return
        if current and st is not None:
            data = buf[:-len(MARK)]
            seconds = msg.get("seconds")
            seconds = float(seconds) if isinstance(seconds, (int, float)) else float("nan")
            self._accept_gradient(link, _DTYPES[msg["dtype"]], data.numel(),
                                  lambda: data.view(torch.float32), seconds)

    @staticmethod
    def _retire_sends(link):
        # the worker answered these rounds, so it received their parameters, and
        # every ping sent before them (it reads the server's messages in order)
        for rnd in [r for r in link.sends if r <= link.answered_round]:
            del link.sends[rnd]
        link.pings = [(r, work) for r, work in link.pings if r >= link.answered_round]

    def _probe(self, link):
        """Ping a worker's group; drop the link if the worker is gone. Return whether it is."""
        if len(link.pings) >= _MAX_PINGS:
            return True
        try:
            link.pings.append((link.sent_round, link.pg.send([self._ping], 1, _TAG_SERVER)))
        except RuntimeError as exc:
            self._drop(link, f"connection error: {_first_line(exc)}")
            return False
        return True

    def _send_params(self, st, links, params):
        message = _server_message(_PARAMS, st.round, params, device=self.bufdev)
        for link in links:
            if link.sent_round > link.answered_round + 1:
                continue  # newer parameters already wait for this lagging worker
            st.queued[link.worker] = time.monotonic()
            try:
                work = link.pg.send([message], 1, _TAG_SERVER)
            except RuntimeError as exc:
                self._drop(link, f"connection error: {_first_line(exc)}")
                continue
            link.sends[st.round] = (work, message)
            link.sent_round = st.round
            k = message.numel()
            link.bytes_sent += k
            self.bytes_sent += k

    def _close_link(self, link):
        self.links.pop(link.token, None)
        # a gloo group closes its connections once nothing refers to it any more
        # (its abort() does not); a worker blocked on it then gets an error
        # instead of waiting forever. An NCCL communicator must be aborted.
        if self.transport == "nccl" and link.pg is not None:
            with contextlib.suppress(RuntimeError):
                link.pg.abort()
        link.sends.clear()  # pending works hold the group too
        link.pings.clear()
        link.stop_work = None
        link.pg = None
        gc.collect()

    def _drop(self, link, reason):
        self._close_link(link)
        self._lost(link, reason)

    # ------------------------------------------------------------ messages

    def _hello(self, msg, size):
        token = msg["token"]
        answer = f"{self.prefix}answer/{token}"
        if not (token.isalnum() and len(token) <= 64):
            self._say("ignored a hello with a malformed token")
            return
        old = self.peers.get(msg.get("worker"))
        if old is not None and self.transport == "gloo":
            # a worker restarted after a crash finds its old link not yet noticed gone
            self._probe(old)
        problem, told = (("training is over",) * 2 if self.stopping else self._check_hello(msg))
        host = msg.get("host")
        if problem is not None:
            self._refused(host, msg, problem)
            # the answer lands in the store, which anyone who reaches it can read:
            # the details (fingerprints, sizes, pids) go to the operator's log only
            self.store.set(answer, json.dumps({"ok": False, "reason": told}))
            return
        next_round = max(self.round + 1, self.start_round)
        self.store.set(answer, json.dumps({"ok": True, "round": next_round}))
        try:
            pg = _pair_group(self.transport, self.store, f"{self.prefix}pair/{token}/", 0,
                             self.join_timeout, self.device)
        except RuntimeError as exc:
            self._say(f"worker {msg.get('worker')} (host {host}) was accepted but its "
                      f"{self.transport} group did not form within {self.join_timeout:g} s "
                      f"({_first_line(exc)})", {"worker": msg.get("worker"), "event": "refused",
                                                 "reason": "process group did not form"})
            return
        link = _PairLink(token, pg, host)
        link.bytes_received += size
        self.links[token] = link
        self._welcome(link, msg)

    # -------------------------------------------------------------- the end

    def _stop_workers(self, timeout=5.0):
        """Tell every worker to stop; drain gradients still on their way; close."""
        self.stopping = True
        end = time.monotonic() + timeout
        stop = _server_message(_STOP, self.round, device=self.bufdev)
        for link in list(self.peers.values()):
            try:
                link.stop_work = link.pg.send([stop], 1, _TAG_SERVER)
            except RuntimeError:
                link.stop_work = None
        # a worker still busy with the last round sends its gradient first:
        # receive it, so that it gets to read the stop (a hung worker, which
        # never got the last round, is not waited for)
        while any(q.sent_round == self.round > q.answered_round for q in self.peers.values()) \
                and time.monotonic() < end:
            self._pump(min(0.2, end - time.monotonic()))
        for link in list(self.peers.values()):
            if link.stop_work is not None and link.answered_round >= link.sent_round:
                with contextlib.suppress(RuntimeError, TimeoutError):
                    _wait(self.transport, link.stop_work, max(0.1, end - time.monotonic()))
        for link in list(self.links.values()):
            self._close_link(link)
        self.peers.clear()


def run_collective_worker(spec, worker, store, *, transport="gloo", prefix="flagagg/0/",
                          device="cpu", log=print, checkpoint=None, checkpoint_every=0,
                          resume=None):
    """Serve one worker of a run over gloo or NCCL until the server says stop.

    Parameters
    ----------
    spec : RunSpec
        The run; every process of the run holds the same one.
    worker : int
        This worker's index, 0-based (rank ``worker + 1``).
    store : torch.distributed.Store
        The run's store.
    transport : {"gloo", "nccl"}, default="gloo"
        The server's transport.
    prefix : str, default="flagagg/0/"
        Prefix of the run's keys in the store.
    device : str, default="cpu"
        Device of the model and the gradient computation.
    log : callable, default=print
        Where messages go.
    checkpoint, checkpoint_every, resume : optional
        As for :func:`flagagg.distributed.run_worker` (worker momenta beside
        the checkpoint).

    Returns
    -------
    status : int
        0 when the server ended training, 1 when the server went away,
        2 when it refused this worker.
    """
    check_transport(transport, device)
    source = GradientSource(spec, worker, device, checkpoint=checkpoint,
                            checkpoint_every=checkpoint_every, resume=resume)
    bufdev = _buffer_device(transport, device)
    inbox = prefix + "inbox"
    token = secrets.token_hex(8)
    try:
        store.queue_push(inbox, json.dumps({"kind": "hello", "token": token,
                                            **source.hello()}))
        answer = json.loads(store.get(f"{prefix}answer/{token}").decode("utf-8"))
    except (RuntimeError, ValueError) as exc:  # the store raises DistError (a RuntimeError)
        log(f"worker {worker}: the server did not answer within {spec.connect_timeout:g} s "
            f"({_first_line(exc)}); exiting")
        return 1
    if not answer.get("ok"):
        log(f"worker {worker}: the server refused this worker: {answer.get('reason')}")
        return 2
    # every message of the server fits (gloo accepts a shorter one)
    message = torch.zeros(_HEAD_BYTES + 4 * source.n_params, dtype=torch.uint8, device=bufdev)
    header = message[:_HEAD_BYTES].view(torch.int64)
    params = message[_HEAD_BYTES:].view(torch.float32)
    hanging = False
    try:
        pg = _pair_group(transport, store, f"{prefix}pair/{token}/", 1, IDLE_TIMEOUT, device)
        while True:
            pg.recv([message], 0, _TAG_SERVER).wait(_td(IDLE_TIMEOUT))
            kind, t, numel, _ = (int(x) for x in header.tolist())
            if kind == _STOP:
                return 0
            if kind == _PING:
                continue  # the server checking that this worker is alive
            if kind != _PARAMS or numel != source.n_params:
                log(f"worker {worker}: unexpected message from the server {header.tolist()}")
                return 1
            if hanging:
                continue  # an injected hang reads on, so that it ends with the run
            payload, seconds = source.compute(t, params)
            payload, action = source.inject(t, payload, log)
            if action == "hang":
                hanging = True
                continue
            data = np.frombuffer(np.ascontiguousarray(payload).tobytes() + MARK, np.uint8)
            nbytes = payload.nbytes
            if action == "bad_frame":
                data = data[: len(data) // 2]  # announce it all, send half
            store.queue_push(inbox, json.dumps({
                "kind": "grad", "token": token, "worker": worker, "round": t,
                "dtype": payload.dtype.name, "nbytes": nbytes, "seconds": seconds,
            }))
            tensor = torch.from_numpy(data.copy()).to(bufdev)
            pg.send([tensor], 0, _TAG_GRAD).wait(_td(IDLE_TIMEOUT))
    except RuntimeError as exc:  # gloo, NCCL and the store raise RuntimeError subclasses
        log(f"worker {worker}: lost the server ({_first_line(exc)}); exiting")
        return 1
