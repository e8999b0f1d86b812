"""The worker loop: receive parameters, compute this worker's gradient, send it back."""

from __future__ import annotations

import os
import signal
import socket
import time

import numpy as np
import torch

from ._protocol import (
    CHALLENGE_BYTES,
    DTYPES,
    FROM_SERVER,
    FROM_WORKER,
    HEADER,
    NO_FRAME_TAGS_VARIABLE,
    PROOF_BYTES,
    AuthError,
    FrameReader,
    Kind,
    ProtocolError,
    Sealer,
    check_proof,
    encode_json,
    encode_tensor,
    frame_tags_enabled,
    load_secret,
    recv_exactly,
    recv_frame,
    respond,
    send_frame,
    session_key,
)

__all__ = ["GradientSource", "run_worker"]


# how long a worker waits for the next message before deciding the server is gone;
# the server sends one every round, and a dead server closes the connection at once
IDLE_TIMEOUT = 600.0
# how long a worker waits for each step of the handshake
HANDSHAKE_TIMEOUT = 10.0


def _connect(address, timeout):
    """Connect to the server, retrying while it is not listening yet."""
    host, port = address
    end = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(1.0, end - time.monotonic()))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except (ConnectionRefusedError, OSError):
            if time.monotonic() >= end:
                raise
            time.sleep(0.2)


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
    """

    def __init__(self, spec, worker, device):
        from ..attacks import get_attack
        from ._settings import make_replica

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
            from ..training._step import build_rule, rule_for_attack

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
        row = self.replica.gradients(flat, idx, self.attack, [self.worker])[0]
        payload = row.detach().to("cpu", torch.float32).numpy()
        return payload, time.perf_counter() - t0

    def compute_early(self, frame):
        """The gradient of a PARAMS frame whose tag is still in flight, or None.

        The server tags its parameters once they have gone out to every
        worker, so the tag arrives a little after them: computing meanwhile
        takes the tag's latency off the round. Nothing computed here leaves
        the worker before the tag has checked (a frame that fails its check
        ends the connection). Only parameters of the right size for the very
        next round are worked on: the header is not authenticated yet either,
        and a forged round far ahead would make :meth:`compute` draw every
        minibatch up to it. Any other frame waits for its check.
        """
        if frame.kind != Kind.PARAMS or DTYPES.get(frame.dtype) != np.float32 or \
                len(frame.payload) != 4 * self.n_params or frame.round != self.drawn + 1:
            return None
        return self.compute(frame.round, frame.array().astype(np.float32))

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


class _Rejected(Exception):
    """The server refused this worker (the reason is the message)."""


def _join(address, secret, source, deadline, tls=None):
    """Connect, authenticate both ways and say HELLO; retry while the server sheds us.

    Returns
    -------
    sock, sealer, reader, pending, welcome

    Raises
    ------
    AuthError
        If what answered cannot prove that it knows the secret.
    _Rejected
        If the server refused this worker.
    ConnectionError, TimeoutError, OSError
        If no authenticated connection came about before ``deadline``.
    """
    while True:
        sock = _connect(address, max(1.0, deadline - time.monotonic()))
        try:
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=address[0])
            response, ns, nc = respond(secret, recv_exactly(sock, CHALLENGE_BYTES,
                                                            HANDSHAKE_TIMEOUT))
            sock.sendall(response)
            check_proof(secret, ns, nc, recv_exactly(sock, PROOF_BYTES, HANDSHAKE_TIMEOUT))
            key = session_key(secret, ns, nc)
            sealer = Sealer(key, FROM_WORKER)
            reader = FrameReader(4 * source.n_params + 1024,
                                 kinds={Kind.WELCOME, Kind.REJECT, Kind.PARAMS, Kind.STOP},
                                 key=key, direction=FROM_SERVER)
            pending = []
            send_frame(sock, encode_json(Kind.HELLO, source.hello()), sealer)
            answer = recv_frame(sock, reader, pending, HANDSHAKE_TIMEOUT)
            if answer.kind == Kind.REJECT:
                raise _Rejected(str(answer.json().get("reason"))[:500])
            if answer.kind != Kind.WELCOME:
                raise ConnectionError(f"the server answered HELLO with "
                                      f"{Kind.NAMES.get(answer.kind)}")
            return sock, sealer, reader, pending, answer.json()
        except (ConnectionError, TimeoutError) as exc:
            # the server closes connections it cannot take now (too many strangers,
            # no file descriptors): try again until the connect deadline
            sock.close()
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"no authenticated connection to the server before the deadline (last: "
                    f"{exc}); a server that closes the connection during the handshake "
                    "refused the secret: give every process the same one"
                ) from None
            time.sleep(0.5)
        except BaseException:
            sock.close()
            raise


def run_worker(spec, worker, address, *, secret, device="cpu", log=print, tls=None):
    """Serve one worker of a run over authenticated TCP until the server says stop.

    Parameters
    ----------
    spec : RunSpec
        The run; every process of the run holds the same one.
    worker : int
        The worker slot this process asks for, 0-based (rank ``worker + 1``);
        the server may give another one.
    address : tuple of (str, int)
        The server's host and port.
    secret : bytes or str
        The run's secret.
    device : str, default="cpu"
        Device of the model and the gradient computation.
    log : callable, default=print
        Where messages go.
    tls : ssl.SSLContext, optional
        Client-side TLS context, when the server uses TLS.

    Returns
    -------
    status : int
        0 when the server ended training, 1 when the server went away,
        2 when it refused this worker or could not prove that it knows the
        secret.
    """
    secret = load_secret(secret)
    if not frame_tags_enabled():
        log(f"worker {worker}: WARNING: frame tags are OFF ({NO_FRAME_TAGS_VARIABLE}=1), for "
            "measuring what they cost only")
    source = GradientSource(spec, worker, device)
    try:
        sock, sealer, reader, pending, welcome = _join(
            address, secret, source, time.monotonic() + spec.connect_timeout, tls)
    except AuthError as exc:
        log(f"worker {worker}: {exc}; not sending it anything")
        return 2
    except _Rejected as exc:
        log(f"worker {worker}: the server refused this worker: {exc}")
        return 2
    except (ConnectionError, TimeoutError, OSError) as exc:
        log(f"worker {worker}: {exc}")
        return 1
    slot = welcome.get("worker")
    if isinstance(slot, int) and slot != worker:
        log(f"worker {worker}: the server gave this process worker slot {slot}")
        source.assign(slot)
        worker = slot
    try:
        while True:
            frame, early = recv_frame(sock, reader, pending, IDLE_TIMEOUT,
                                      early=source.compute_early)
            if frame.kind == Kind.STOP:
                return 0
            if frame.kind != Kind.PARAMS:
                continue
            t = frame.round
            if early is not None:
                payload, seconds = early
            else:
                payload, seconds = source.compute(t, frame.array().astype(np.float32))
            payload, action = source.inject(t, payload, log)
            if action == "hang":
                # read and drop messages until the server stops, so that an injected
                # hang ends with the run instead of outliving it
                while recv_frame(sock, reader, pending, IDLE_TIMEOUT).kind != Kind.STOP:
                    pass
                return 0
            if action == "bad_frame":
                sock.sendall(b"JUNK" + bytes(HEADER.size - 4))
                continue
            send_frame(sock, encode_tensor(Kind.GRAD, payload, worker=worker, round=t,
                                           seconds=seconds), sealer)
    except (ConnectionError, TimeoutError, OSError) as exc:
        log(f"worker {worker}: lost the server ({exc}); exiting")
        return 1
    except ProtocolError as exc:
        log(f"worker {worker}: the server's messages fail their checks ({exc}); exiting")
        return 1
    finally:
        sock.close()
