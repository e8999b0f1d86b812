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

__all__ = ["run_worker"]


class _Stopped(Exception):
    """The server ended training while this worker was not answering."""

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


def run_worker(spec, worker, address, *, device="cpu", log=print):
    """Serve one worker of a run until the server says stop.

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
    from ..attacks import get_attack
    from ..sim._data import load_dataset
    from ..sim._replica import Replica

    config = spec.config
    dataset = load_dataset(config.dataset, **config.data_kwargs())
    replica = Replica(dataset, workers=config.workers, f=spec.f, seed=spec.seed,
                      model=config.model,
                      model_params={"hidden": config.hidden, "channels": config.channels},
                      partition_method=config.partition, alpha=config.alpha, device=device)
    attack_spec = config.attack(spec.attack)
    attack = get_attack(attack_spec.attack, **attack_spec.params)
    faults = spec.faults_of(worker)
    # compute one gradient before joining (without touching the random streams),
    # so that round 1 is not slower than the rest
    replica.gradients(replica.initial_parameters(),
                      np.zeros((config.workers, config.batch_size), np.int64),
                      get_attack("none"), [worker])

    sock = _connect(address, spec.connect_timeout)
    reader = FrameReader(4 * replica.n_params + 1024,
                         kinds={Kind.WELCOME, Kind.REJECT, Kind.PARAMS, Kind.STOP})
    pending = []
    hello = {"worker": worker, "rank": worker + 1, "pid": os.getpid(),
             "host": socket.gethostname(), "fingerprint": spec.fingerprint(),
             "n_params": replica.n_params, "device": str(device)}
    # rounds whose minibatches have been drawn from the batch stream; a worker that
    # joins late (or a resumed run) replays the earlier rounds' draws first
    drawn = 0
    try:
        send_frame(sock, encode_json(Kind.HELLO, hello, worker=worker))
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
            flat = torch.from_numpy(frame.array().astype(np.float32)).to(replica.device)
            # a worker that missed rounds still draws their minibatches, so that
            # its stream stays in step with the other workers' and the simulator's
            while drawn < t - 1:
                replica.draw_batches(config.batch_size)
                drawn += 1
            idx = replica.draw_batches(config.batch_size)
            drawn = t
            t0 = time.perf_counter()
            row = replica.gradients(flat, idx, attack, [worker])[0]
            payload = row.detach().to("cpu", torch.float32).numpy()
            seconds = time.perf_counter() - t0
            parts = encode_tensor(Kind.GRAD, payload, worker=worker, round=t, seconds=seconds)
            for fault in faults:
                if fault.active(t):
                    parts = _inject(fault, parts, payload, sock, reader, pending, log, worker, t)
            send_frame(sock, parts)
    except _Stopped:
        return 0
    except (ConnectionError, TimeoutError, OSError) as exc:
        log(f"worker {worker}: lost the server ({exc}); exiting")
        return 1
    finally:
        sock.close()


def _inject(fault, parts, payload, sock, reader, pending, log, worker, t):
    """Apply an injected fault to the frame about to be sent; may not return."""
    kind = fault.kind
    if kind == "crash":
        log(f"worker {worker}: injected crash at round {t}")
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
        time.sleep(60)  # SIGKILL is not immediate on every platform
    if kind == "hang":
        log(f"worker {worker}: injected hang from round {t}: not answering any more")
        # read and drop messages until the server stops, so that an injected
        # hang ends with the run instead of outliving it
        while True:
            frame = recv_frame(sock, reader, pending, IDLE_TIMEOUT)
            if frame.kind == Kind.STOP:
                raise _Stopped
    if kind == "slow":
        time.sleep(fault.value)
        return parts
    if kind == "nan":
        return encode_tensor(Kind.GRAD, np.full_like(payload, np.nan), worker=worker, round=t)
    if kind == "wrong_size":
        bigger = np.concatenate([payload, np.zeros(7, payload.dtype)])
        return encode_tensor(Kind.GRAD, bigger, worker=worker, round=t)
    if kind == "bad_frame":
        return (b"JUNK" + bytes(HEADER.size - 4),)
    return parts
