"""The worker loop: receive parameters, compute this worker's gradient, send it back."""

from __future__ import annotations

import os
import signal
import socket
import time

import numpy as np
import torch

from ._protocol import (
    HEADER,
    FrameReader,
    Kind,
    encode_json,
    encode_tensor,
    recv_frame,
    send_frame,
)

__all__ = ["GradientSource", "run_worker"]


# how long a worker waits for the next message before deciding the server is gone;
# the server sends one every round, and a dead server closes the connection at once
IDLE_TIMEOUT = 600.0


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


def run_worker(spec, worker, address, *, device="cpu", log=print):
    """Serve one worker of a run over TCP until the server says stop.

    Parameters
    ----------
    spec : RunSpec
        The run; every process of the run holds the same one.
    worker : int
        This worker's index, 0-based (rank ``worker + 1``).
    address : tuple of (str, int)
        The server's host and port.
    device : str, default="cpu"
        Device of the model and the gradient computation.
    log : callable, default=print
        Where messages go.

    Returns
    -------
    status : int
        0 when the server ended training, 1 when the server went away,
        2 when it refused this worker.
    """
    source = GradientSource(spec, worker, device)
    sock = _connect(address, spec.connect_timeout)
    reader = FrameReader(4 * source.n_params + 1024,
                         kinds={Kind.WELCOME, Kind.REJECT, Kind.PARAMS, Kind.STOP})
    pending = []
    try:
        send_frame(sock, encode_json(Kind.HELLO, source.hello(), worker=worker))
        answer = recv_frame(sock, reader, pending, spec.connect_timeout)
        if answer.kind == Kind.REJECT:
            log(f"worker {worker}: the server refused this worker: {answer.json().get('reason')}")
            return 2
        while True:
            frame = recv_frame(sock, reader, pending, IDLE_TIMEOUT)
            if frame.kind == Kind.STOP:
                return 0
            if frame.kind != Kind.PARAMS:
                continue
            t = frame.round
            payload, seconds = source.compute(t, frame.array().astype(np.float32))
            payload, action = source.inject(t, payload, log)
            if action == "hang":
                # read and drop messages until the server stops, so that an injected
                # hang ends with the run instead of outliving it
                while recv_frame(sock, reader, pending, IDLE_TIMEOUT).kind != Kind.STOP:
                    pass
                return 0
            if action == "bad_frame":
                send_frame(sock, (b"JUNK" + bytes(HEADER.size - 4),))
                continue
            send_frame(sock, encode_tensor(Kind.GRAD, payload, worker=worker, round=t,
                                           seconds=seconds))
    except (ConnectionError, TimeoutError, OSError) as exc:
        log(f"worker {worker}: lost the server ({exc}); exiting")
        return 1
    finally:
        sock.close()
