"""The worker loop: receive parameters, compute this worker's gradient, send it back."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import signal
import socket
import time

import numpy as np
import torch

from ..attacks import get_attack
from ..training._step import build_rule, rule_for_attack
from ._protocol import (
    HEADER,
    Kind,
    ProtocolError,
    encode_json,
    encode_tensor,
    recv_frame,
    send_frame,
)
from ._settings import make_replica
from ._tls import client_context, identity

__all__ = ["GradientSource", "NotTheServer", "run_worker"]


# how long a worker waits for the next message before deciding the server is gone;
# the server sends one every round, and a dead server closes the connection at once
IDLE_TIMEOUT = 600.0
# how long a worker waits for each step of the handshake
HANDSHAKE_TIMEOUT = 10.0
# how long one attempt waits for the TCP connection to be accepted
CONNECT_ATTEMPT = 2.0
# the pause after a failed attempt: the first, doubling up to the last, each drawn
# between half and one and a half times that
RETRY_FIRST = 0.2
RETRY_MAX = 5.0


class GradientSource:
    """What a worker computes, whatever carries its messages.

    Builds the worker's replica of the model and data (the simulator's), its
    attack and its injected faults, and computes the gradient of a round's
    minibatch from that round's parameters.

    Parameters
    ----------
    spec : RunSpec
        The run.
    worker : int
        This worker's index, 0-based.
    device : str
        Device of the model.
    checkpoint, checkpoint_every, resume : optional
        The run's checkpoint options (see :class:`flagagg.distributed.Server`).
        With worker momentum on, the worker keeps its momenta next to the
        checkpoint (:class:`MomentumFiles`) and a resumed run reads them
        back, so that it continues exactly as the interrupted one would have.
    """

    def __init__(self, spec, worker, device, *, checkpoint=None, checkpoint_every=0,
                 resume=None):
        self.spec = spec
        self.worker = worker
        self.device = device
        config = spec.config
        self.replica = make_replica(spec, device)
        attack_spec = config.attack(spec.attack)
        self.attack = get_attack(attack_spec.attack, **attack_spec.params)
        if self.attack.defence_aware:
            # A defence-aware worker calls the run's rule, as the server runs it
            # (the simulator binds it the same way).
            rule_spec = config.rule(spec.rule)
            rule = build_rule(rule_spec.rule, spec.f, rule_spec.params)
            backend = None if config.backend == "auto" else config.backend
            self.attack = self.attack.with_rule(rule_for_attack(rule, config.array, backend))
        self.faults = spec.faults_of(worker)
        self.n_params = self.replica.n_params
        # compute one gradient before joining (without touching the random streams),
        # so that round 1 is not slower than the rest
        self.replica.gradients(self.replica.initial_parameters(),
                               np.zeros((config.workers, config.batch_size), np.int64),
                               get_attack("none"), [worker])
        self.replica.reset_momentum()  # the warm-up is not a round
        self.momenta = None
        if config.worker_momentum > 0 and (checkpoint is not None or resume is not None):
            self.momenta = MomentumFiles(checkpoint, checkpoint_every, resume)
        # rounds whose minibatches have been drawn from the batch stream; a worker
        # that joins late (or a resumed run) replays the earlier rounds' draws first
        self.drawn = 0

    def assign(self, worker):
        """Compute as worker ``worker`` from now on (the slot the server gave)."""
        self.worker = worker
        self.faults = self.spec.faults_of(worker)

    def hello(self):
        """Who this worker is, for the server's checks."""
        return {"worker": self.worker, "rank": self.worker + 1, "pid": os.getpid(),
                "host": socket.gethostname(), "fingerprint": self.spec.fingerprint(),
                "n_params": self.n_params, "device": str(self.device)}

    def compute(self, t, flat):
        """The gradient of round ``t`` at parameters ``flat``.

        Returns
        -------
        payload : ndarray of float32
            The (possibly Byzantine) gradient, flat.
        seconds : float
            Time spent computing it.
        """
        config = self.spec.config
        flat = torch.as_tensor(flat, dtype=torch.float32).to(self.replica.device)
        # a worker that missed rounds still draws their minibatches, so that
        # its stream stays in step with the other workers' and the simulator's
        while self.drawn < t - 1:
            self.replica.draw_batches(config.batch_size)
            self.drawn += 1
        idx = self.replica.draw_batches(config.batch_size)
        self.drawn = t
        t0 = time.perf_counter()
        if self.momenta is not None:
            self.momenta.restore(self.replica, self.worker, t)
        row = self.replica.gradients(flat, idx, self.attack, [self.worker])[0]
        payload = row.detach().to("cpu", torch.float32).numpy()
        if self.momenta is not None:
            self.momenta.save(self.replica, self.worker, t)
        return payload, time.perf_counter() - t0

    def inject(self, t, payload, log):
        """Apply this round's injected faults to ``payload``; may not return (crash).

        Returns
        -------
        payload : ndarray
            What to send (NaN, 7 values too many, or unchanged).
        action : str or None
            ``"hang"`` (stop answering), ``"bad_frame"`` (send something
            that breaks the protocol), or None.
        """
        action = None
        for fault in self.faults:
            if not fault.active(t):
                continue
            kind = fault.kind
            if kind == "crash":
                log(f"worker {self.worker}: injected crash at round {t}")
                os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
                time.sleep(60)  # SIGKILL is not immediate on every platform
            elif kind == "hang":
                log(f"worker {self.worker}: injected hang from round {t}: not answering any more")
                action = "hang"
            elif kind == "slow":
                time.sleep(fault.value)
            elif kind == "nan":
                payload = np.full_like(payload, np.nan)
            elif kind == "wrong_size":
                payload = np.concatenate([payload, np.zeros(7, payload.dtype)])
            elif kind == "bad_frame":
                action = "bad_frame"
        return payload, action


class MomentumFiles:
    """A worker's momenta after each round, kept beside the server's checkpoint.

    The server's checkpoint holds the parameters and the server's momentum;
    the workers' momenta live in the workers (a faulty worker with an
    omniscient attack keeps every worker's). So each worker writes its
    momenta after every round to ``CHECKPOINT.momenta/worker-W-round-T.pt``
    (atomically, on the machine it runs on) and keeps the latest round and
    the last two multiples of ``checkpoint_every`` (the rounds the server's
    checkpoint can be at, also when the server died between a worker's file
    and its own). A resumed worker reads the file of the round before the
    first round it computes.

    Parameters
    ----------
    checkpoint : str or path-like or None
        The server's checkpoint file; None writes nothing.
    checkpoint_every : int
        The server's checkpoint interval (0: only at the end).
    resume : str or path-like or None
        The checkpoint the run resumes from; None starts from zero momenta.
    """

    def __init__(self, checkpoint, checkpoint_every, resume):
        from pathlib import Path

        self.folder = None if checkpoint is None else Path(f"{checkpoint}.momenta")
        self.every = int(checkpoint_every)
        self.source = None if resume is None else Path(f"{resume}.momenta")
        self.written = []  # rounds this worker wrote, oldest first
        self.started = False

    @staticmethod
    def name(worker, t):
        return f"worker-{int(worker)}-round-{int(t)}.pt"

    def restore(self, replica, worker, t):
        """Before the first round ``t`` this worker computes: read round ``t - 1``'s momenta."""
        if self.started:
            return
        self.started = True
        if self.source is None or t <= 1:
            return
        path = self.source / self.name(worker, t - 1)
        try:
            # tensors and plain values only: nothing in the file is unpickled as code
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(
                f"worker {worker}: resuming at round {t} with worker momentum needs this "
                f"worker's momenta after round {t - 1}, {path}, written by the interrupted "
                "run's worker on this machine; it is not there"
            ) from None
        if not isinstance(state, dict) or state.get("format") != "flagagg-worker-momenta" \
                or {"round", "worker", "workers", "momenta"} - set(state):
            raise ValueError(f"{path} is not a flagagg worker momentum file")
        if int(state["round"]) != t - 1 or int(state["worker"]) != int(worker):
            raise ValueError(f"{path} holds worker {state['worker']}'s momenta after round "
                             f"{state['round']}, not worker {worker}'s after round {t - 1}")
        replica.load_momentum_state(state)

    def save(self, replica, worker, t):
        """Write the momenta after round ``t``; drop the files no checkpoint can need."""
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"format": "flagagg-worker-momenta", "round": int(t), "worker": int(worker),
                 **replica.momentum_state()}
        path = self.folder / self.name(worker, t)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        if t not in self.written:
            self.written.append(t)
        marks = [r for r in self.written if self.every and r % self.every == 0][-2:]
        for r in list(self.written):
            if r != t and r not in marks:
                with contextlib.suppress(OSError):
                    (self.folder / self.name(worker, r)).unlink()
                self.written.remove(r)


class _Rejected(Exception):
    """The server refused this worker (the reason is the message)."""

    def __init__(self, reason, retry=False):
        super().__init__(reason)
        self.retry = retry


class NotTheServer(ConnectionError):
    """What answered is not this run's server: its certificate is not the run's server's."""


def _join(address, tls, source, deadline):
    """Connect, do the TLS handshake, check the server's identity, say HELLO.

    Returns
    -------
    sock, welcome

    Raises
    ------
    NotTheServer
        If what answered holds no certificate of this run's server.
    _Rejected
        If the server refused this worker.
    ConnectionError, TimeoutError, OSError
        If the connection or the handshake failed.
    """
    import ssl

    # a short wait for the TCP handshake: a SYN dropped by a server flooded with
    # connections is retried sooner by a new attempt than by the kernel's backoff
    sock = socket.create_connection(
        address, timeout=max(0.5, min(CONNECT_ATTEMPT, deadline - time.monotonic())))
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            try:
                sock = tls.wrap_socket(sock)
            except ssl.SSLCertVerificationError as exc:
                raise NotTheServer(
                    f"what answers at {address[0]}:{address[1]} is not this run's server: its "
                    f"TLS certificate does not verify as the server's of this run's CA "
                    f"({exc.verify_message})"
                ) from None
            if identity(sock.getpeercert()) != "server":
                raise NotTheServer(
                    f"what answers at {address[0]}:{address[1]} holds a certificate of this "
                    "run that is not the server's; not sending it anything")
        send_frame(sock, encode_json(Kind.HELLO, source.hello()))
        answer = recv_frame(sock, 0, {Kind.WELCOME, Kind.REJECT}, HANDSHAKE_TIMEOUT)
        if answer.kind == Kind.REJECT:
            doc = answer.json()
            raise _Rejected(str(doc.get("reason"))[:500], bool(doc.get("retry")))
        return sock, answer.json()
    except BaseException:
        sock.close()
        raise


class _GaveUp(Exception):
    """The server stayed unreachable, or kept refusing, until the deadline."""


def _connect(address, tls, source, deadline):
    """Join the server, trying again after each failure until ``deadline``.

    An attempt that fails (no TCP connection within ``CONNECT_ATTEMPT``
    seconds, a connection closed or reset during the handshake, a refusal
    that says to retry) is followed by a pause of ``RETRY_FIRST`` seconds,
    doubling up to ``RETRY_MAX``, each drawn between half and one and a half
    times that so that workers cut together do not come back together.

    Returns
    -------
    sock, welcome

    Raises
    ------
    NotTheServer
        If what answered is not the run's server.
    _Rejected
        If the server refused this worker for good.
    _GaveUp
        If no attempt succeeded before ``deadline`` (the last failure is its cause).
    """
    delay = RETRY_FIRST
    while True:
        try:
            return _join(address, tls, source, deadline)
        except NotTheServer:
            raise
        except (_Rejected, ConnectionError, TimeoutError, OSError) as exc:
            if isinstance(exc, _Rejected) and not exc.retry:
                raise
            if time.monotonic() + delay >= deadline:
                raise _GaveUp("refused" if isinstance(exc, _Rejected) else "unreachable") \
                    from exc
            time.sleep(delay * (0.5 + random.random()))
            delay = min(RETRY_MAX, 2 * delay)


def run_worker(spec, worker, address, *, tls, device="cpu", log=print, checkpoint=None,
               checkpoint_every=0, resume=None, _plaintext_benchmark=False):
    """Serve one worker of a run over mutual TLS until the server says stop.

    A connection that drops is made again, with backoff (0.2 s doubling to
    5 s, see :func:`_connect`), for up to ``spec.connect_timeout`` seconds;
    the server gives the worker its slot back (its certificate names it).

    Parameters
    ----------
    spec : RunSpec
        The run; every process of the run holds the same one.
    worker : int
        This worker's index, 0-based (rank ``worker + 1``); its certificate
        must name it.
    address : tuple of (str, int)
        The server's host and port.
    tls : str, path-like or ssl.SSLContext
        This worker's PEM file (``worker-W.pem`` from ``flagagg certs``), or a
        context made from it.
    device : str, default="cpu"
        Device of the model and the gradient computation.
    log : callable, default=print
        Where messages go.
    checkpoint, checkpoint_every, resume : optional
        The server's checkpoint options: with worker momentum on, the worker
        keeps its momenta beside the checkpoint and reads them back on resume
        (see :class:`MomentumFiles`).

    Returns
    -------
    status : int
        0 when the server ended training, 1 when the server stayed away,
        2 when it refused this worker or is not the run's server.
    """
    import ssl

    if _plaintext_benchmark:
        # for measuring what TLS costs (asv_bench/tls_cost.py); no CLI reaches it
        if tls is not None or not ipaddress.ip_address(address[0]).is_loopback:
            raise RuntimeError("the plaintext benchmark mode is for loopback only")
    elif tls is None:
        raise ValueError("the tcp transport needs this worker's TLS certificate file "
                         "(worker-W.pem from `flagagg certs`)")
    elif not isinstance(tls, ssl.SSLContext):
        tls = client_context(tls)
    source = GradientSource(spec, worker, device, checkpoint=checkpoint,
                            checkpoint_every=checkpoint_every, resume=resume)
    max_bytes = 4 * source.n_params + 1024
    joined_once = False
    lost_at = time.monotonic()
    while True:
        try:
            sock, welcome = _connect(address, tls, source, lost_at + spec.connect_timeout)
        except NotTheServer as exc:
            log(f"worker {worker}: {exc}")
            return 2
        except _Rejected as exc:
            log(f"worker {worker}: the server refused this worker: {exc}")
            return 2
        except _GaveUp as exc:
            log(f"worker {worker}: the server stayed {exc} for {spec.connect_timeout:g} s "
                f"(last: {exc.__cause__}); exiting")
            return 1
        if joined_once:
            log(f"worker {worker}: reconnected; the server resumes this worker at round "
                f"{welcome.get('round')}")
        joined_once = True
        try:
            status = _serve(sock, source, max_bytes, log)
        except (ConnectionError, TimeoutError, OSError, ProtocolError) as exc:
            log(f"worker {worker}: lost the server ({exc}); reconnecting")
            lost_at = time.monotonic()
            continue
        finally:
            sock.close()
        return status


def _serve(sock, source, max_bytes, log):
    """Answer the server's rounds on a joined connection; 0 when it says stop."""
    kinds = {Kind.PARAMS, Kind.STOP}
    while True:
        frame = recv_frame(sock, max_bytes, kinds, IDLE_TIMEOUT)
        if frame.kind == Kind.STOP:
            return 0
        t = frame.round
        # the frame's own buffer, not a copy (recv_frame gives each frame a new one)
        payload, seconds = source.compute(t, frame.array().astype(np.float32, copy=False))
        payload, action = source.inject(t, payload, log)
        if action == "hang":
            # read and drop messages until the server stops, so that an injected
            # hang ends with the run instead of outliving it
            while recv_frame(sock, max_bytes, kinds, IDLE_TIMEOUT).kind != Kind.STOP:
                pass
            return 0
        if action == "bad_frame":
            sock.sendall(b"JUNK" + bytes(HEADER.size - 4))
            continue
        send_frame(sock, encode_tensor(Kind.GRAD, payload, worker=source.worker, round=t,
                                       seconds=seconds))
