"""The server's data path after a HELLO: frames read straight into their own buffers.

:class:`FrameProtocol` replaces asyncio's stream reader once a worker has said
HELLO (see asv_bench/tls_cost.py for what it saves). These tests check it
against a stream reader's reading (``_read_frame`` here), the slow and
obviously right reference, on the same bytes cut at random places, on hostile headers, on
bytes a peer sent before its WELCOME, and end to end over mutual TLS and
plaintext loopback connections.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import numpy as np
import pytest

from flagagg import distributed

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from flagagg.distributed._protocol import (  # noqa: E402
    HEADER,
    FrameProtocol,
    Kind,
    ProtocolError,
    check_header,
    encode,
    encode_json,
    encode_tensor,
    recv_frame,
    send_frame,
)
from flagagg.distributed._tls import client_context, server_context  # noqa: E402

from support.distributed import SERVER_PEM, make_spec, serve, worker_pem  # noqa: E402

LIMIT = 1 << 16


def _messages(rng):
    """Gradient frames of several sizes and dtypes, with values a careless copy would spoil."""
    rows = [
        np.arange(5, dtype=np.float32),
        np.array([], dtype=np.float32),
        np.array([np.nan, np.inf, -np.inf, 1e-45, -0.0], dtype=np.float32),
        np.array([1e300, -1e300, np.nan], dtype=np.float64),
        rng.standard_normal(4000).astype(np.float32),
        rng.standard_normal(3000).astype(np.float16),
    ]
    return [encode_tensor(Kind.GRAD, row, worker=i, round=10 + i, seconds=0.5 * i)
            for i, row in enumerate(rows)]


def _wire(messages):
    return b"".join(bytes(h) + bytes(p) for h, p in messages)


async def _read_frame(reader, max_tensor_bytes, kinds):
    """One message from an ``asyncio.StreamReader``: header checked, then its payload."""
    head = check_header(await reader.readexactly(HEADER.size), max_tensor_bytes, kinds)
    payload = bytearray(await reader.readexactly(head[6]) if head[6] else b"")
    _, kind, dtype, _, worker, rnd, _, seconds = head
    return distributed._protocol.Frame(kind, dtype, worker, rnd, seconds, payload)


async def _reference(data, limit=LIMIT):
    """What a stream reader makes of ``data``: (frames, why it stopped)."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    try:
        while True:
            frames.append(await _read_frame(reader, limit, {Kind.GRAD}))
    except asyncio.IncompleteReadError:
        return frames, "connection closed"
    except ProtocolError as exc:
        return frames, f"protocol error: {exc}"


def _feed(proto, data, rng, biggest):
    """Hand ``data`` to ``proto`` as a transport would, in pieces of random sizes."""
    view = memoryview(data)
    i = 0
    while i < len(view):
        buf = proto.get_buffer(-1)
        biggest.append(len(buf))
        k = min(len(buf), int(rng.integers(1, 9000)), len(view) - i)
        buf[:k] = view[i:i + k]
        proto.buffer_updated(k)
        i += k
    proto.eof_received()


def _same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (a.kind, a.dtype, a.worker, a.round, a.seconds) == \
            (b.kind, b.dtype, b.worker, b.round, b.seconds)
        assert bytes(a.payload) == bytes(b.payload)
        # a tensor payload stays writable, as torch wants it
        assert isinstance(a.payload, bytearray)


@pytest.mark.parametrize("seed", range(6))
def test_frames_cut_anywhere_arrive_as_the_stream_reader_reads_them(seed):
    rng = np.random.default_rng(seed)
    data = _wire(_messages(rng))

    async def main():
        got = []
        proto = FrameProtocol(LIMIT, {Kind.GRAD}, got.append)
        biggest = []
        _feed(proto, data, rng, biggest)
        want, why = await _reference(data)
        _same(got, want)
        assert proto.closed.done() and proto.closed.result() == why == "connection closed"
        assert proto.reason == why
        # NaN payloads too: bit for bit
        assert np.isnan(np.frombuffer(got[2].payload, np.float32)[0])

    asyncio.run(main())


@pytest.mark.parametrize("bad", ["oversize", "magic", "kind", "dtype", "half"])
def test_a_hostile_header_ends_the_connection_before_its_payload_is_read(bad):
    rng = np.random.default_rng(1)
    good = _wire(_messages(rng)[:2])
    row = np.ones(100, np.float32)
    if bad == "oversize":
        # announces 10 GB: refused on its header, nothing of that size is allocated
        head = HEADER.pack(b"FLAG", Kind.GRAD, 1, 4, 0, 1, 10 << 30, 0.0)
        tail = head + bytes(4000)
    elif bad == "magic":
        tail = b"JUNK" + _wire([encode_tensor(Kind.GRAD, row)])[4:]
    elif bad == "kind":
        tail = _wire([encode_tensor(Kind.PARAMS, row)])
    elif bad == "dtype":
        tail = _wire([encode(Kind.GRAD, row.tobytes(), dtype=0)])
    else:  # the connection ends in the middle of a payload
        tail = _wire([encode_tensor(Kind.GRAD, row)])[:-7]
    data = good + tail + _wire(_messages(rng)[:1])
    if bad == "half":
        data = good + tail

    async def main():
        got = []
        proto = FrameProtocol(LIMIT, {Kind.GRAD}, got.append)
        biggest = []
        _feed(proto, data, rng, biggest)
        want, why = await _reference(data)
        _same(got, want)
        assert len(got) == 2
        assert proto.closed.result() == why
        assert why.startswith("protocol error" if bad != "half" else "connection closed")
        # never a buffer larger than the largest frame that was let in
        assert max(biggest) <= 400
        # once broken, whatever else comes is dropped, and a sender learns of it
        with pytest.raises(ConnectionError, match=why[:20]):
            await proto.drain()

    asyncio.run(main())


@pytest.mark.parametrize("seed", range(3))
def test_bytes_a_peer_sent_with_its_hello_are_read_in_order_under_the_new_terms(seed):
    """The server's switch after a HELLO: what came with it is read as gradients, in order."""
    rng = np.random.default_rng(seed)
    messages = _messages(rng)
    hello = encode_json(Kind.HELLO, {"worker": 0, "note": "x" * 3000})
    data = _wire([hello]) + _wire(messages)

    async def main():
        got, hellos = [], []

        def on_hello(frame):
            hellos.append((frame, len(got)))
            proto.expect(LIMIT, {Kind.GRAD}, got.append)

        # as the server starts: a HELLO only, no tensor of any size
        proto = FrameProtocol(0, {Kind.HELLO}, on_hello)
        _feed(proto, data, rng, [])
        assert [(f.kind, h) for f, h in hellos] == [(Kind.HELLO, 0)]
        assert hellos[0][0].json()["note"] == "x" * 3000
        _same(got, (await _reference(_wire(messages)))[0])
        assert proto.closed.result() == "connection closed"

    asyncio.run(main())


@pytest.mark.parametrize("first", ["gradient", "params", "huge hello"])
def test_before_its_hello_a_peer_gets_nothing_larger_than_a_hello_read(first):
    row = np.ones(100_000, np.float32)
    if first == "huge hello":
        head = HEADER.pack(b"FLAG", Kind.HELLO, 0, 4, 0, 0, 10 << 30, 0.0)
        data = head + bytes(4000)
    else:
        data = _wire([encode_tensor(Kind.GRAD if first == "gradient" else Kind.PARAMS, row)])

    async def main():
        seen, biggest = [], []
        proto = FrameProtocol(0, {Kind.HELLO}, seen.append)
        _feed(proto, data, np.random.default_rng(0), biggest)
        assert seen == []
        assert proto.closed.result().startswith("protocol error")
        # only the 36-byte header was ever asked for
        assert max(biggest) == HEADER.size

    asyncio.run(main())


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_frames_cross_a_real_connection_both_ways_intact(tls):
    """A worker's blocking socket against the server's loop, as in a run (TLS: buffered reads)."""
    rng = np.random.default_rng(3)
    n = 300_000  # over the TLS and stream buffer sizes, not a multiple of a record
    rows = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    rows[1][[0, 7, n - 1]] = [np.nan, 1e30, -np.inf]
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    seen = []
    holder = {}

    def serve():
        asyncio.set_event_loop(loop)

        def factory():
            def echo(frame):
                seen.append(frame)
                # the server's answer: the row doubled, as PARAMS
                link.write(*encode_tensor(Kind.PARAMS, 2 * np.frombuffer(frame.payload,
                                                                         np.float32),
                                          round=frame.round))
            link = FrameProtocol(8 * n, {Kind.GRAD}, echo)
            return link

        holder["server"] = loop.run_until_complete(loop.create_server(
            factory, "127.0.0.1", 0, ssl=server_context(SERVER_PEM) if tls else None))
        ready.set()
        loop.run_forever()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    assert ready.wait(30)
    sock = socket.create_connection(holder["server"].sockets[0].getsockname()[:2], timeout=30)
    try:
        if tls:
            sock = client_context(worker_pem(0)).wrap_socket(sock)
        for t, row in enumerate(rows):
            send_frame(sock, encode_tensor(Kind.GRAD, row, worker=0, round=t + 1))
            back = recv_frame(sock, 8 * n, {Kind.PARAMS}, 30)
            assert back.round == t + 1
            np.testing.assert_array_equal(back.array(), 2 * row)
        assert [f.round for f in seen] == [1, 2, 3]
        for f, row in zip(seen, rows, strict=True):
            np.testing.assert_array_equal(f.array(), row)
    finally:
        sock.close()
        loop.call_soon_threadsafe(holder["server"].close)
        loop.call_soon_threadsafe(loop.stop)
        th.join(10)
        loop.close()


def _server_and_worker_0():
    """A 2-worker TLS server on a thread, worker 0's connection to it and its HELLO (unsent)."""
    server = distributed.Server(make_spec(workers=2, connect_timeout=3), tls=SERVER_PEM,
                                log=lambda text: None)
    thread, out = serve(server)
    sock = client_context(worker_pem(0)).wrap_socket(
        socket.create_connection(server.address, timeout=20))
    hello = {"worker": 0, "rank": 1, "pid": 0, "host": "test",
             "fingerprint": server.spec.fingerprint(), "n_params": server.n, "device": "cpu"}
    return server, thread, out, sock, hello


def test_a_gradient_sent_with_the_hello_is_seen_by_the_server_and_costs_its_sender():
    """Bytes that came in with the HELLO, before the switch to FrameProtocol, are not lost."""
    server, thread, out, sock, hello = _server_and_worker_0()
    try:
        # HELLO and a gradient for round 1 in one write, before any WELCOME
        sock.sendall(b"".join(bytes(p) for p in encode_json(Kind.HELLO, hello))
                     + b"".join(bytes(p) for p in encode_tensor(
                         Kind.GRAD, np.zeros(server.n, np.float32), worker=0, round=1)))
        # its WELCOME may come first, or be cut off by the closing: never parameters
        with pytest.raises((ConnectionError, OSError)):
            while True:
                recv_frame(sock, 1 << 24, {Kind.WELCOME}, 20)
    finally:
        sock.close()
    thread.join(30)
    assert not thread.is_alive()
    lost = [e for e in out["record"]["events"] if e.get("event") == "disconnected"]
    assert [(e["worker"], e["reason"]) for e in lost] == [
        (0, "protocol error: a gradient (round 1) beyond one per parameters it was sent")]


def test_the_tls_cost_benchmark_measures_each_suite_and_the_threaded_server():
    """tls_cost.py --floor: both TLS 1.3 AES suites really negotiated, both servers run."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "asv_bench" / "tls_cost.py"
    spec = importlib.util.spec_from_file_location("tls_cost", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    got = bench.record_cost(n_bytes=200_000, repeats=2)
    assert set(got) == {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"}
    assert all(0 < t < 1 for pair in got.values() for t in pair)
    for server in ("thread", "loop"):
        cost = bench.message_cost(20_000, repeats=2, rounds=2, server=server)
        assert set(cost) == {"cpu_tls", "cpu_plain", "wall_tls", "wall_plain"}
        assert all(v > 0 for v in cost.values())


def test_the_servers_connections_send_at_once_without_nagle():
    """Each accepted connection has TCP_NODELAY, as asyncio's own accepted sockets have.

    The server accepts by hand (``socket.create_server``: proto 0, so asyncio does
    not set it) and writes a PARAMS header and payload separately; with Nagle on,
    the payload waited for the worker's delayed ACK, 40 ms every round (a demo run
    took 48 ms a round instead of 2.4).
    """
    server, thread, out, sock, hello = _server_and_worker_0()
    try:
        send_frame(sock, encode_json(Kind.HELLO, hello))
        assert recv_frame(sock, 1 << 24, {Kind.WELCOME}, 20).kind == Kind.WELCOME
        theirs = server.peers[0].raw.get_extra_info("socket")
        assert theirs.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()
    thread.join(30)
    assert not thread.is_alive()
