"""The parameter server's test kit: certificates, a run spec, a hand-written peer, a torchrun env.

Used by tests/test_distributed.py and tests/test_distributed_security.py.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
import threading
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from flagagg import distributed, sim  # noqa: E402
from flagagg.distributed._protocol import (  # noqa: E402
    Kind,
    encode_json,
    encode_tensor,
    recv_frame,
    send_frame,
)
from flagagg.distributed._tls import client_context, file_of, issue  # noqa: E402

__all__ = ["CERTS", "RUN_TIMEOUT", "SERVER_KINDS", "SERVER_PEM", "Peer", "alive", "make_spec",
           "serve", "torchrun_worker_env", "worker_pem"]

RUN_TIMEOUT = 150  # seconds any one multi-process run may take on a busy machine
# one CA and certificates for the in-process servers and peers of these tests
CERTS = Path(tempfile.mkdtemp(prefix="flagagg-test-certs-"))
issue(CERTS, 16)
SERVER_PEM = file_of(CERTS, 0)
SERVER_KINDS = {Kind.WELCOME, Kind.REJECT, Kind.PARAMS, Kind.STOP}


def worker_pem(w):
    """The test run's certificate file of worker ``w``."""
    return file_of(CERTS, w + 1)


def make_spec(**kw):
    """A small run of the demo config (mean, no attack, 4 workers, 5 rounds) with ``kw``."""
    options = dict(rule="mean", attack="none", f=0, workers=4, rounds=5, eval_every=5,
                   round_timeout=1.5, connect_timeout=20)
    options.update(kw)
    return distributed.make_spec(sim.load_config("demo"), **options)


def torchrun_worker_env(monkeypatch, server_entry):
    """Rank 1 of 5 under torchrun, with a store whose server-address key says ``server_entry``.

    Returns the store (the caller keeps it open while the worker runs).
    """
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=10))
    store.set("flagagg/server/0", json.dumps(server_entry))
    for k, v in {"RANK": "1", "WORLD_SIZE": "5", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(store.port), "FLAGAGG_CERTS": str(CERTS)}.items():
        monkeypatch.setenv(k, v)
    for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE",
              "TORCHELASTIC_RESTART_COUNT", "FLAGAGG_SERVER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    return store


class Peer:
    """A worker written by hand, to send exactly what a test needs.

    It holds the certificate of worker ``cert`` (``worker`` by default) and
    its HELLO asks for ``worker``.
    """

    def __init__(self, server, worker, fingerprint=None, cert=None, timeout=20):
        raw = socket.create_connection(server.address, timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = client_context(worker_pem(worker if cert is None else cert))
        self.sock = ctx.wrap_socket(raw)
        self.worker = worker
        hello = {"worker": worker, "rank": worker + 1, "pid": 0, "host": "test",
                 "fingerprint": fingerprint or server.spec.fingerprint(),
                 "n_params": server.n, "device": "cpu"}
        send_frame(self.sock, encode_json(Kind.HELLO, hello))
        self.answer = self.recv()

    def recv(self):
        return recv_frame(self.sock, 1 << 24, SERVER_KINDS, 20)

    @staticmethod
    def frame(parts):
        """The bytes of a message."""
        return b"".join(bytes(p) for p in parts)

    def params(self, t):
        frame = self.recv()
        assert (frame.kind, frame.round) == (Kind.PARAMS, t)
        return frame.array()

    def send(self, t, row):
        send_frame(self.sock, encode_tensor(Kind.GRAD, row, worker=self.worker, round=t,
                                            seconds=0.001))


def serve(server):
    """Run ``server`` on a thread; (thread, dict that gets ``record`` when it ends)."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("record", server.run()), daemon=True)
    thread.start()
    return thread, out


def alive(pid):
    """Whether process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
