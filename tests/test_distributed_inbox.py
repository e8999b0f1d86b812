"""A member that sends gradients faster than the rounds take them: the server's inbox stays bounded.

Frames read after a worker's HELLO go to the rounds' thread through a queue
(the server's inbox). Nothing used to cap how many of one connection's frames
that queue held, so a member with a valid certificate could grow the server's
memory by a full gradient per frame while the rounds were busy (aggregating,
evaluating). Here the test itself is the rounds' thread: it stops taking
messages, and a hand-written member (:class:`support.distributed.Peer`)
sends.

What holds now: a member may answer each PARAMS written to it with one
gradient; a gradient beyond that ends its connection at the header, before a
buffer is allocated for it. And however many it may send, at most
``MAX_QUEUED`` of its gradients wait for the rounds; reading from it pauses
until they take one, so the rest wait in TCP, not in the server.
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from flagagg import distributed  # noqa: E402
from flagagg.distributed._protocol import Kind, encode_tensor  # noqa: E402
from flagagg.distributed._server import _Round  # noqa: E402

from support.distributed import SERVER_PEM, Peer, serve  # noqa: E402
from support.distributed import make_spec as _spec  # noqa: E402

# a connection's gradients that may wait for the rounds at once (the server's MAX_QUEUED)
MAX_QUEUED = 2


def _server(**kw):
    lines = []
    server = distributed.Server(_spec(**kw), tls=SERVER_PEM, log=lines.append)
    server.lines = lines
    return server


def _join(server, worker):
    """A member that has its WELCOME; the test pumps the server's messages meanwhile."""
    got = {}
    thread = threading.Thread(target=lambda: got.setdefault("peer", Peer(server, worker)),
                              daemon=True)
    thread.start()
    end = time.monotonic() + 60
    while thread.is_alive() and time.monotonic() < end:
        server._pump(0.05)
    thread.join(1)
    peer = got["peer"]
    assert peer.answer.kind == Kind.WELCOME, server.lines
    return peer, server.peers[worker]


def _send_params(server, t):
    """What a round does first: the parameters of round ``t`` to every member."""
    st = _Round(t, time.monotonic())
    server._send_params(st, list(server.peers.values()),
                        server.flat.detach().to("cpu", torch.float32))


def _inbox(server):
    """The messages waiting for the rounds' thread, by kind; they are put back in order."""
    items = []
    while not server.inbox.empty():
        items.append(server.inbox.get_nowait())
    for item in items:
        server.inbox.put(item)
    kinds = [what for what, _, _ in items]
    return {k: kinds.count(k) for k in ("hello", "grad", "lost")}, items


def _settled(server, done, quiet=1.0, limit=60):
    """The inbox once ``done`` is set and no ``what`` has been added for ``quiet`` s."""
    end = time.monotonic() + limit
    last, since = None, time.monotonic()
    while time.monotonic() < end:
        counts, items = _inbox(server)
        if counts != last:
            last, since = counts, time.monotonic()
        elif done.is_set() and time.monotonic() - since > quiet:
            break
        time.sleep(0.05)
    return last, items


def _flood(peer, t, count, done):
    """Send ``count`` gradients of round ``t`` as fast as the socket takes them."""
    frame = b"".join(bytes(x) for x in encode_tensor(
        Kind.GRAD, np.ones(peer.n, np.float32), worker=peer.worker, round=t, seconds=0.001))

    def run():
        with contextlib.suppress(OSError):
            for _ in range(count):
                peer.sock.sendall(frame)
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_member_flooding_gradients_costs_its_connection_not_the_servers_memory():
    """The attack: after its WELCOME a member sends 200 gradients it was never asked for
    while the rounds' thread is busy. Before, all 200 (4n bytes each) waited in the
    server's inbox; now the first is refused at its header and the connection ends."""
    server = _server(workers=2, rounds=5)
    try:
        peer, conn = _join(server, 1)
        honest, _ = _join(server, 0)
        peer.n = server.n
        done = threading.Event()
        thread = _flood(peer, 1, 200, done)
        counts, _ = _settled(server, done)
        thread.join(60)
        size = 4 * server.n
        print(f"gradient {size} bytes; inbox after 200 unasked gradients: {counts}, "
              f"{counts['grad'] * size} bytes queued")
        assert counts["grad"] == 0, f"{counts['grad']} frames ({counts['grad'] * size} bytes) " \
                                    "of one member queued in the server"
        assert counts["lost"] == 1
        server._pump(0.1)
        assert 1 not in server.peers and 0 in server.peers
        assert "beyond one per parameters it was sent" in server.gone[1]
        assert any(e.get("event") == "disconnected" and e.get("worker") == 1 and
                   "beyond one per parameters" in e.get("reason", "") for e in server.events)
        # the other member is unaffected: its round goes on
        _send_params(server, 1)
        honest.params(1)
        honest.send(1, np.zeros(server.n, np.float32))
        counts, _ = _settled(server, threading.Event(), limit=2)
        assert counts["grad"] == 1
    finally:
        server._stop_workers(timeout=1)


def test_one_gradient_per_parameters_a_second_for_the_same_round_costs_the_connection():
    """A member answers round 1's parameters with 200 gradients: one is read, the
    connection ends at the second, and no more than that one waits for the rounds."""
    server = _server(workers=2, rounds=5)
    try:
        peer, conn = _join(server, 0)
        peer.n = server.n
        _send_params(server, 1)
        peer.params(1)
        done = threading.Event()
        thread = _flood(peer, 1, 200, done)
        counts, _ = _settled(server, done)
        thread.join(60)
        assert counts["grad"] == 1 and counts["lost"] == 1, counts
    finally:
        server._stop_workers(timeout=1)


def test_gradients_it_may_send_wait_in_tcp_not_in_the_server():
    """A member reads 40 rounds' parameters and answers none, then all 40 at once
    while the rounds are busy: it is owed them, so it is not cut, but no more than
    MAX_QUEUED of them wait in the server at a time; the rest arrive as the rounds take
    them (reading from it paused, then resumed)."""
    server = _server(workers=2, rounds=50)
    try:
        peer, conn = _join(server, 0)
        peer.n = server.n
        for t in range(1, 41):
            _send_params(server, t)
            peer.params(t)
        # the last PARAMS is written before the peer could read it; the loop counts it
        done = threading.Event()
        thread = _flood(peer, 40, 40, done)
        counts, _ = _settled(server, done, quiet=1.5, limit=20)
        assert counts["grad"] <= MAX_QUEUED and counts["lost"] == 0, counts
        # the rounds take them: every one arrives, and the member stays in
        taken = []
        gradient = server._gradient
        server._gradient = lambda c, frame: (taken.append(frame.round), gradient(c, frame))
        end = time.monotonic() + 60
        while len(taken) < 40 and time.monotonic() < end:
            counts, _ = _inbox(server)
            assert counts["grad"] <= MAX_QUEUED and counts["lost"] == 0, counts
            server._pump(0.05)
        thread.join(60)
        assert taken == [40] * 40 and server.peers[0] is conn and conn.open, server.lines
    finally:
        server._stop_workers(timeout=1)


def test_an_honest_worker_answering_late_rounds_is_never_cut():
    """Honest but slow: the rounds send 3 rounds' parameters before it answers; it
    answers each (two of them stale by then), and a whole run with real workers
    trains on every gradient."""
    server = _server(workers=2, rounds=5)
    try:
        peer, conn = _join(server, 0)
        for t in (1, 2, 3):
            _send_params(server, t)
            # written before the next is queued (a newer PARAMS replaces one not yet
            # written): the worker gets all three while it is busy
            end = time.monotonic() + 30
            while conn.owed < t and time.monotonic() < end:
                time.sleep(0.01)
        for t in (1, 2, 3):
            peer.params(t)
            peer.send(t, np.zeros(server.n, np.float32))
        end = time.monotonic() + 30
        while server.bytes_received < 3 * 4 * server.n and time.monotonic() < end:
            server._pump(0.05)
        server._pump(0.2)
        assert server.peers.get(0) is conn and conn.open and not server.gone, server.lines
        assert conn.answered_round == 3
    finally:
        server._stop_workers(timeout=1)

    spec = _spec(workers=3, rounds=4, round_timeout=20, quorum=3)
    server = distributed.Server(spec, tls=SERVER_PEM, log=print)
    thread, out = serve(server)
    from support.distributed import worker_pem

    workers = [threading.Thread(target=distributed.run_worker,
                                args=(spec, w, server.address),
                                kwargs={"tls": worker_pem(w), "log": print}, daemon=True)
               for w in range(3)]
    for t in workers:
        t.start()
    thread.join(150)
    assert not thread.is_alive()
    record = out["record"]
    assert record["status"] == 0 and [r["received"] for r in record["rounds"]] == [3, 3, 3, 3]
    assert not any(e.get("event") == "disconnected" for e in record["events"])
