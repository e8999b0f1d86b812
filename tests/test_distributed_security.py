"""The tcp transport against outsiders and members: each attack first, then what holds.

Every test plays the attacker on loopback against a real :class:`Server`
(in this process, or in a subprocess where the attack needs one: a file
descriptor limit, a kill): a peer without a certificate of the run, a member
that asks for another worker's slot, a flipped bit on the path, a garbage, an
oversized or a deeply nested message, messages before HELLO, a flood of idle
connections, a reconnect storm, no file descriptors left, a peer that answers
just before the deadline, a fake server, a kill of the server during a run
and during result writing, SIGTERM to the launcher. Each is bounded in time
and count and stops by itself; deadlines are generous wherever correctness
does not depend on them, so that a loaded machine slows the tests without
failing them.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import select
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from support.procs import note_pid, watch

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from flagagg import distributed  # noqa: E402
from flagagg.distributed import _worker  # noqa: E402
from flagagg.distributed._protocol import (  # noqa: E402
    HEADER,
    PROTOCOL_VERSION,
    Kind,
    encode,
    encode_json,
    encode_tensor,
    recv_frame,
    send_frame,
)
from flagagg.distributed._tls import client_context, file_of, issue, server_context  # noqa: E402

from support.distributed import (  # noqa: E402
    RUN_TIMEOUT,
    SERVER_PEM,
    Peer,
    torchrun_worker_env,
    worker_pem,
)
from support.distributed import alive as _alive  # noqa: E402
from support.distributed import make_spec as _spec  # noqa: E402
from support.distributed import serve as _serve  # noqa: E402

# a CA and certificates of another run: valid certificates, the wrong run
OTHER = Path(tempfile.mkdtemp(prefix="flagagg-test-other-certs-"))
issue(OTHER, 4)


def _closed_without_answer(sock, timeout=20):
    """Whether the server closes ``sock`` without sending anything (more)."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(1 << 16)
    except (ConnectionResetError, ssl.SSLError):
        return True
    return data == b""


def _tls_refused(server, ctx):
    """Whether a TLS handshake with ``ctx`` fails or is closed without an answer."""
    try:
        sock = ctx.wrap_socket(socket.create_connection(server.address, timeout=20))
    except (ssl.SSLError, OSError):
        return True
    with sock:
        try:
            # TLS 1.3: the server checks the client's certificate after the client
            # finished; a refusal shows on the first read
            send_frame(sock, encode_json(Kind.HELLO, {"worker": 0}))
        except (ssl.SSLError, OSError):
            return True
        return _closed_without_answer(sock)


def _no_cert_context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _in_threads(spec, *, attack=None, attack_ready=None, worker_options=None, addresses=None,
                **server_options):
    """A whole run in this process (server and real workers on threads), with ``attack``
    running beside it; returns (record, server).

    With ``attack_ready`` (an event the attack sets), the workers start only once the
    attack is in place, so that what the attack did before training does not depend on
    how fast the machine is. ``addresses`` maps a worker to the address it connects to
    (a proxy), the server's by default.
    """
    lines = []
    server = distributed.Server(spec, tls=SERVER_PEM, log=lines.append, **server_options)
    server.lines = lines
    thread, out = _serve(server)
    stop = threading.Event()
    attacker = None
    if attack is not None:
        attacker = threading.Thread(target=attack, args=(server, stop), daemon=True)
        attacker.start()
    if attack_ready is not None:
        assert attack_ready.wait(RUN_TIMEOUT), "the attack never got in place"
    statuses = {}

    def work(w):
        statuses[w] = distributed.run_worker(
            spec, w, (addresses or {}).get(w, server.address), tls=worker_pem(w),
            log=lines.append, **(worker_options or {}))

    workers = [threading.Thread(target=work, args=(w,), daemon=True)
               for w in range(spec.workers)]
    for t in workers:
        t.start()
    for t in [thread, *workers]:
        t.join(RUN_TIMEOUT)
        assert not t.is_alive(), "\n".join(lines)
    stop.set()
    if attacker is not None:
        attacker.join(30)
    server.worker_statuses = statuses
    return out["record"], server


# --------------------------------------------------------------------------
# membership


def test_an_outsider_without_a_certificate_gets_nothing_and_changes_nothing():
    answers = []
    other = client_context(file_of(OTHER, 1))

    def outsider(server, stop):
        # plain TCP speaking the protocol; TLS without a certificate; TLS with a
        # valid certificate of another run
        try:
            while not stop.is_set():
                with socket.create_connection(server.address, timeout=20) as sock:
                    sock.sendall(b"".join(bytes(x) for x in encode_json(
                        Kind.HELLO, {"worker": 0, "fingerprint": server.spec.fingerprint()})))
                    answers.append(_closed_without_answer(sock))
                answers.append(_tls_refused(server, _no_cert_context()))
                answers.append(_tls_refused(server, other))
                time.sleep(0.01)
        except OSError:
            return  # the server has finished and closed its port

    spec = _spec(rule="flag", attack="reverse", f=1, workers=3, rounds=6, round_timeout=20,
                 quorum=3)
    attacked, server = _in_threads(spec, attack=outsider)
    clean, _ = _in_threads(spec)
    # training is unaffected: bit for bit the clean run's
    np.testing.assert_array_equal(attacked["parameters"], clean["parameters"])
    assert all(r["received"] == 3 for r in attacked["rounds"])
    assert server.refusals.total >= 3 and len(answers) >= 3 and all(answers), answers
    shown = [x for x in server.lines if "refused" in x]
    # the plain-TCP HELLO is reset at its first byte, which cannot begin a TLS handshake
    assert shown and all("SSL" in x or "certificate" in x or "more connections" in x
                         or "HELLO" in x or "TLS handshake" in x for x in shown), shown
    # refusals are for the operator, and rate-limited: a few lines, then a count
    assert len(shown) <= 20, shown


def test_a_member_cannot_take_another_workers_slot_or_push_out_its_own():
    """The issue's takeover: one secret holder asked for slots 1, 0, 2, 3 and got each.

    Worker 3 is Byzantine and holds its own certificate; beside the real worker 3
    it connects again and again, asking for every slot. Every try is refused,
    no honest worker loses its connection, and every round has all four.
    """
    tries = []

    def takeover(server, stop):
        # once the honest workers are in, as the issue's attacker did
        while len(server.peers) < 4 and not stop.is_set():
            time.sleep(0.01)
        while not stop.is_set() and len(tries) < 40:
            for slot in (1, 0, 2, 3):
                try:
                    thief = Peer(server, slot, cert=3)
                except OSError:
                    return  # the run is over
                tries.append((slot, thief.answer.kind, thief.answer.json()))
                thief.sock.close()
            time.sleep(0.05)

    spec = _spec(rule="median", attack="reverse", f=1, workers=4, rounds=8, eval_every=8,
                 round_timeout=20, quorum=4)
    record, server = _in_threads(spec, attack=takeover)
    assert record["status"] == 0
    assert len(tries) >= 4 and all(kind == Kind.REJECT for _, kind, _ in tries), tries
    reasons = {slot: doc["reason"] for slot, _, doc in tries}
    assert reasons[0] == "this process holds worker 3's certificate and can only be worker 3"
    assert reasons[3] in ("worker 3 is already connected",
                          "this process holds worker 3's certificate and can only be worker 3")
    assert [r["received"] for r in record["rounds"]] == [4] * 8
    lost = [e for e in record["events"] if e["event"] in ("disconnected", "replaced")]
    assert not lost, lost
    assert any("its certificate is worker 3's" in x for x in server.lines)


def test_a_restarted_worker_gets_its_slot_back_once_the_old_connection_is_gone_or_silent():
    # three workers: training starts when worker 2 joins, after the rest is staged
    spec = _spec(workers=3, rounds=2, round_timeout=1.0, connect_timeout=60)
    server = distributed.Server(spec, tls=SERVER_PEM)
    thread, out = _serve(server)
    real = Peer(server, 0)
    assert real.answer.kind == Kind.WELCOME
    # a second connection of worker 0 while the first is alive and heard from: refused,
    # and told to try again (the first may be about to go)
    second = Peer(server, 0)
    assert second.answer.kind == Kind.REJECT and second.answer.json()["retry"] is True
    # once the first has been silent for the round deadline, a new one replaces it
    time.sleep(1.3)
    again = Peer(server, 0)
    assert again.answer.kind == Kind.WELCOME and again.answer.json()["worker"] == 0
    assert _closed_without_answer(real.sock)
    # a worker whose connection closed gets its slot back at once
    other = Peer(server, 1)
    other.sock.close()
    time.sleep(0.3)
    other = Peer(server, 1)
    assert other.answer.kind == Kind.WELCOME
    last = Peer(server, 2)
    for t in (1, 2):
        for p in (again, other, last):
            p.params(t)
            p.send(t, np.zeros(server.n, np.float32))
    thread.join(60)
    assert not thread.is_alive()
    record = out["record"]
    assert [r["received"] for r in record["rounds"]] == [3, 3]
    assert record["info"][0]["host"] == "test"
    assert any(e["event"] == "replaced" for e in record["events"])


def _fake_server(pem):
    """A TLS server presenting the certificate of ``pem``; returns (socket, what it got)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    got = []
    ctx = server_context(pem)
    ctx.verify_mode = ssl.CERT_NONE

    def serve():
        conn, _ = lsock.accept()
        with conn:
            try:
                tls = ctx.wrap_socket(conn, server_side=True)
                tls.settimeout(20)
                got.append(tls.recv(1 << 16))
            except (ssl.SSLError, OSError) as exc:
                got.append(exc)

    threading.Thread(target=serve, daemon=True).start()
    return lsock, got


@pytest.mark.parametrize("pem, says", [
    (file_of(OTHER, 0), "self-signed certificate in certificate chain"),  # another run's
    (worker_pem(2), "unsuitable certificate purpose"),  # a member posing as the server
])
def test_a_fake_server_is_detected_by_the_worker(pem, says):
    """Whatever an outsider writes into an address: no server certificate, no HELLO."""
    lsock, got = _fake_server(pem)
    lines = []
    status = distributed.run_worker(_spec(workers=4, connect_timeout=20), 0,
                                    lsock.getsockname(), tls=worker_pem(0), log=lines.append)
    lsock.close()
    assert status == 2
    assert "is not this run's server" in lines[-1] and says in lines[-1], lines
    time.sleep(0.2)
    # not even a HELLO (fingerprint, pid) reached the fake server
    assert not got or not isinstance(got[0], bytes) or got[0] == b"", got


def test_a_multi_node_process_refuses_to_start_without_its_certificate(monkeypatch, capsys,
                                                                       tmp_path):
    from flagagg.distributed._node import run_node

    for k, v in {"RANK": "0", "WORLD_SIZE": "5", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("FLAGAGG_CERTS", "FLAGAGG_SERVER_ADDR", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    threads = torch.get_num_threads()
    try:
        assert run_node(_spec()) == 2
        assert "no certificates for this run" in capsys.readouterr().out
        monkeypatch.setenv("FLAGAGG_CERTS", str(tmp_path))
        assert run_node(_spec()) == 2
        assert "server.pem does not exist" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="needs the server's TLS certificate"):
        distributed.Server(_spec(), tls=None)
    # a key others can read is refused
    (tmp_path / "server.pem").write_bytes(SERVER_PEM.read_bytes())
    (tmp_path / "server.pem").chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        distributed.Server(_spec(), tls=tmp_path / "server.pem")


def test_certs_are_private_and_name_their_rank(tmp_path):
    from cryptography import x509

    from flagagg.cli import main

    assert main(["certs", "--workers", "3", "--out", str(tmp_path / "c")]) == 0
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["server.pem", "worker-0.pem", "worker-1.pem", "worker-2.pem"]
    for p in (tmp_path / "c").iterdir():
        assert p.stat().st_mode & 0o777 == 0o600
        text = p.read_bytes()
        assert text.count(b"BEGIN CERTIFICATE") == 2 and b"PRIVATE KEY" in text
    cert = x509.load_pem_x509_certificate((tmp_path / "c" / "worker-2.pem").read_bytes())
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [u.value for u in uris] == ["flagagg://worker/2"]
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o700
    # never over an earlier run's files
    assert main(["certs", "--workers", "3", "--out", str(tmp_path / "c")]) == 2


# --------------------------------------------------------------------------
# messages


class FlipProxy:
    """A man in the middle on loopback: relays connections, flipping one bit on the way.

    From each connection's worker-to-server stream it flips the lowest bit of
    byte ``at`` (counted from the connection's start, TLS records included);
    the rest it relays unchanged. ``flipped`` counts the flips.
    """

    def __init__(self, target, at):
        self.target, self.at = target, at
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.address = self.lsock.getsockname()
        self.flipped = 0
        self.open = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.lsock.accept()
                upstream = socket.create_connection(self.target, timeout=20)
            except OSError:
                return
            self.open += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False),
                             daemon=True).start()

    def _pipe(self, src, dst, flip):
        seen = 0
        try:
            while True:
                data = bytearray(src.recv(1 << 16))
                if not data:
                    break
                if flip and seen <= self.at < seen + len(data):
                    data[self.at - seen] ^= 1
                    self.flipped += 1
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self):
        self.lsock.close()
        for s in self.open:
            s.close()


def test_a_flipped_bit_costs_its_connection_and_the_worker_rejoins():
    """TLS authenticates every record: a changed byte never reaches the rule.

    Worker 1's connections pass through a proxy that flips one bit of each,
    after the handshake and HELLO, inside its first gradient. Every such
    gradient is refused with its connection; the worker reconnects (with
    backoff), gets its slot back and is flipped again; the other workers
    train on.
    """
    spec = _spec(rule="mean", attack="none", f=0, workers=3, rounds=4, eval_every=4,
                 round_timeout=3, quorum=3, connect_timeout=30)
    proxy = []

    def start_proxy(server, stop):
        proxy.append(FlipProxy(server.address, at=3000))

    ready = threading.Event()
    lines = []
    server = distributed.Server(spec, tls=SERVER_PEM, log=lines.append)
    thread, out = _serve(server)
    start_proxy(server, None)
    ready.set()
    statuses = {}

    def work(w, address):
        statuses[w] = distributed.run_worker(spec, w, address, tls=worker_pem(w),
                                             log=lines.append)

    threads = [threading.Thread(target=work, args=(w, proxy[0].address if w == 1
                                                   else server.address), daemon=True)
               for w in range(3)]
    for t in threads:
        t.start()
    thread.join(RUN_TIMEOUT)
    for t in threads:
        t.join(RUN_TIMEOUT)
    proxy[0].close()
    record = out["record"]
    assert record["status"] == 0, lines
    status = {(r["round"], r["worker"]): (r["status"], r["reason"]) for r in record["workers"]}
    assert proxy[0].flipped >= 1
    assert all(status[t, w] == ("ok", "") for t in range(1, 5) for w in (0, 2))
    assert all(status[t, 1][0] == "missing" for t in range(1, 5)), status
    assert [r["received"] for r in record["rounds"]] == [2] * 4
    events = [(e.get("worker"), e["event"]) for e in record["events"]]
    assert (1, "disconnected") in events and (1, "reconnected") in events
    assert any("reconnected; the server resumes" in x for x in lines), lines


def test_garbage_and_oversized_headers_before_and_after_authentication():
    spec = _spec(workers=2, rounds=1, round_timeout=20)
    server = distributed.Server(spec, tls=SERVER_PEM)
    thread, out = _serve(server)
    big = HEADER.pack(b"FLAG", Kind.GRAD, 1, PROTOCOL_VERSION, 0, 1, 10**12, 0.0)
    # before TLS: 4 MB of garbage, and an oversized header; the handshake fails on
    # the first bytes and the connection is closed
    for data in (os.urandom(1 << 22), big + bytes(1 << 16)):
        with socket.create_connection(server.address, timeout=20) as sock:
            with pytest.raises(OSError):  # reset once the server has closed it
                for _ in range(64):
                    sock.sendall(data)
                    time.sleep(0.01)
    assert server.bytes_received == 0
    # after the handshake and HELLO: an oversized header is refused before its
    # payload, garbage closes the connection
    for data in (big, b"JUNK" + os.urandom(200)):
        p = Peer(server, 0)
        assert p.answer.kind == Kind.WELCOME
        start = server.bytes_received
        p.sock.sendall(data)
        assert _closed_without_answer(p.sock)
        assert server.bytes_received == start
        time.sleep(0.2)  # the server notices the old connection is gone
    good = [Peer(server, w) for w in range(2)]
    for p in good:
        p.params(1)
        p.send(1, np.zeros(server.n, np.float32))
    thread.join(60)
    assert not thread.is_alive()
    assert out["record"]["rounds"][0]["received"] == 2


def _member(server, worker):
    """A TLS connection with worker ``worker``'s certificate, before its HELLO."""
    raw = socket.create_connection(server.address, timeout=20)
    return client_context(worker_pem(worker)).wrap_socket(raw)


def test_a_nested_hello_costs_only_its_sender():
    """The issue's crash: a member's HELLO of 60,000 ``[`` raised RecursionError in the server.

    Now a HELLO over 4096 bytes is refused at its header, one that nests
    deeper than two levels before the parser sees it; the run trains.
    """
    closed = []

    def nested(server, stop):
        try:
            for payload in (b"[" * 60_000, b"[" * 4000,
                            b'{"worker": 0, "x": ' + b"[" * 3000 + b"}"):
                with _member(server, 0) as sock:
                    try:
                        sock.sendall(b"".join(bytes(x) for x in encode(Kind.HELLO, payload)))
                    except (ssl.SSLError, OSError):
                        # the server refused at the header and closed while the rest
                        # was still on its way (a loaded machine): closed all the same
                        closed.append(True)
                        continue
                    closed.append(_closed_without_answer(sock))
        finally:
            ready.set()  # a failed attack shows in the asserts below, not as a long wait

    ready = threading.Event()
    spec = _spec(workers=2, rounds=3, round_timeout=20, quorum=2)
    record, server = _in_threads(spec, attack=nested, attack_ready=ready)
    assert closed == [True, True, True]
    assert record["status"] == 0 and [r["received"] for r in record["rounds"]] == [2, 2, 2]
    shown = "\n".join(server.lines)
    assert "over the 4096-byte limit" in shown and "nests deeper than 2 levels" in shown


def test_before_its_hello_a_member_gets_no_more_than_a_hello_read():
    """The issue's pre-HELLO memory: 64 unnamed members each had a full gradient read.

    Now 64 members each announce a gradient before HELLO and send it: each is
    closed at the header, and the run trains beside them.
    """
    results = []

    def hog(server, stop):
        n = server.n
        frame = b"".join(bytes(x) for x in encode_tensor(Kind.GRAD, np.ones(n, np.float32),
                                                          worker=0, round=1))
        socks = []
        for w in range(64):
            # each sends at once: a member's handshake time is not what is tested, and
            # 64 handshakes in a row on a loaded machine outlast the first one's deadline
            socks.append(_member(server, w % 4))
            with contextlib.suppress(OSError):
                socks[-1].sendall(frame)
        results.extend(_closed_without_answer(sock) for sock in socks)
        for sock in socks:
            sock.close()
        ready.set()

    ready = threading.Event()
    spec = _spec(workers=4, rounds=3, round_timeout=20, quorum=4)
    record, server = _in_threads(spec, attack=hog, attack_ready=ready)
    assert len(results) == 64 and all(results)
    assert record["status"] == 0 and [r["received"] for r in record["rounds"]] == [4, 4, 4]
    assert any("unexpected message kind GRAD" in x for x in server.lines), server.lines


# --------------------------------------------------------------------------
# resources


def test_500_idle_connections_do_not_stall_training():
    held, shed, ready = [], [0], threading.Event()

    def flood(server, stop):
        # 500 connections that say nothing, all open before the workers start and
        # held while training runs
        while not stop.is_set():
            poll = select.poll()  # not select(): the descriptors may pass 1024
            for s in held:
                poll.register(s, select.POLLIN)
            readable = {fd for fd, _ in poll.poll(0)}
            for s in [s for s in held if s.fileno() in readable]:
                # the server sends nothing before a TLS hello; closed means shed
                if _at_end(s):
                    s.close()
                    held.remove(s)
                    shed[0] += 1
            while len(held) + shed[0] < 500 and not stop.is_set():
                try:
                    held.append(socket.create_connection(server.address, timeout=5))
                except OSError:
                    break
            # in place once the server has shed all beyond its cap
            if shed[0] >= 500 - 64:
                ready.set()
            time.sleep(0.2)
        for s in held:
            s.close()

    spec = _spec(workers=3, rounds=12, eval_every=12, round_timeout=20)
    record, server = _in_threads(spec, attack=flood, attack_ready=ready,
                                 handshake_timeout=2.0, max_pending=64)
    assert [r["received"] for r in record["rounds"]] == [3] * 12
    # a round waits for its three gradients, not for strangers: well under the
    # deadline even on a loaded machine
    assert max(r["wait_s"] for r in record["rounds"]) < 10.0, record["rounds"]
    # before training began the server had closed the 436 beyond its cap of 64, and
    # the rest after the handshake deadline; it says so to the operator, a few lines
    # and then a count
    assert server.refusals.total >= 500 - 64 and shed[0] >= 500 - 64, (server.refusals.total,
                                                                      shed[0])
    assert sum("refused" in x for x in server.lines) <= 40


def _at_end(sock):
    """Whether the peer has closed ``sock`` (after whatever it sent was read)."""
    try:
        while True:
            data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def _until(condition, timeout=30):
    """Wait until ``condition()`` holds (state, not time); whether it did."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_strangers_that_send_nothing_make_room_for_a_worker_at_any_age():
    """A worker's first byte is its TLS ClientHello; a connection that has sent nothing
    is closed (reset) for any newer one, however young. Before, with the cap full of
    connections younger than half a second, the worker's connection was closed
    instead, and a storm refilled the cap faster than the worker could retry.
    """
    spec = _spec(workers=2, rounds=1, round_timeout=20)
    server = distributed.Server(spec, tls=SERVER_PEM, log=lambda text: None, max_pending=8,
                                max_pending_per_source=8)
    thread, out = _serve(server)
    strangers = [socket.create_connection(server.address, timeout=20) for _ in range(8)]
    try:
        assert _until(lambda: len(server.silent) == 8)
        p = Peer(server, 0)  # at once: every stranger is younger than half a second
        assert p.answer.kind == Kind.WELCOME
        # the oldest stranger made room, with a reset; the newest is still held
        assert _closed_without_answer(strangers[0], 10)
        strangers[-1].setblocking(False)
        with pytest.raises(BlockingIOError):
            strangers[-1].recv(1)
        for q in (p, Peer(server, 1)):
            q.params(1)
            q.send(1, np.zeros(server.n, np.float32))
        thread.join(60)
        assert out["record"]["rounds"][0]["received"] == 2
    finally:
        for s in strangers:
            s.close()


def test_a_member_past_its_handshake_is_not_closed_for_strangers_in_theirs():
    """Strangers that begin a TLS handshake and stall cycle the places of the cap; a
    member whose certificate has been checked has left the cap, and its HELLO is
    answered however many strangers came after it. A member holds one connection
    before its HELLO: a newer one of the same certificate closes the older.
    """
    spec = _spec(workers=2, rounds=1, round_timeout=20)
    server = distributed.Server(spec, tls=SERVER_PEM, log=lambda text: None, max_pending=4,
                                max_pending_per_source=4, handshake_timeout=30)
    thread, out = _serve(server)
    first = _member(server, 0)
    assert _until(lambda: 0 in server.greeting)
    member = _member(server, 0)   # the same worker again, before either said HELLO
    assert _closed_without_answer(first, 10)   # long before the handshake deadline
    strangers = []
    try:
        for _ in range(40):
            with contextlib.suppress(OSError):  # reset at once: no place for it
                strangers.append(socket.create_connection(server.address, timeout=20))
                strangers[-1].sendall(b"\x16")  # a TLS record begins; nothing more comes
            time.sleep(0.04)
        # they cycled the places: more than the cap were closed or turned away
        assert server.refusals.total >= 20, server.refusals.total
        hello = {"worker": 0, "rank": 1, "pid": 0, "host": "test",
                 "fingerprint": spec.fingerprint(), "n_params": server.n, "device": "cpu"}
        send_frame(member, encode_json(Kind.HELLO, hello))
        answer = recv_frame(member, 1 << 24, {Kind.WELCOME, Kind.REJECT}, 20)
        assert answer.kind == Kind.WELCOME
        for s in strangers:
            s.close()
        assert _until(lambda: not server.shaking)  # their places are free again
        other = Peer(server, 1)
        frame = recv_frame(member, 1 << 24, {Kind.PARAMS}, 20)
        send_frame(member, encode_tensor(Kind.GRAD, np.zeros(server.n, np.float32), worker=0,
                                         round=frame.round, seconds=0.001))
        other.params(1)
        other.send(1, np.zeros(server.n, np.float32))
        thread.join(60)
        assert out["record"]["rounds"][0]["received"] == 2
    finally:
        for s in strangers:
            s.close()
        member.close()
        first.close()


_EMFILE_SERVER = textwrap.dedent("""
    import json, os, resource, sys
    from flagagg import distributed, sim
    spec = distributed.make_spec(sim.load_config("demo"), rule="mean", attack="none", f=0,
                                 workers=2, rounds=4, eval_every=4, round_timeout=30,
                                 connect_timeout=60)
    server = distributed.Server(spec, tls=sys.argv[1], handshake_timeout=2.0,
                                log=lambda x: print(x, flush=True))
    used = len(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + 6, hard))
    print("PORT", server.address[1], flush=True)
    record = server.run()
    print("RESULT", json.dumps([r["received"] for r in record["rounds"]]), flush=True)
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")
def test_a_server_out_of_file_descriptors_backs_off_and_keeps_serving():
    flood, workers, text = [], [], []

    def on_line(line, proc):
        if not line.startswith("PORT"):
            return
        port = int(line.split()[1])
        # far more connections than the server has descriptors for
        flood.extend(socket.create_connection(("127.0.0.1", port), timeout=5)
                     for _ in range(40))
        spec = _spec(workers=2, rounds=4, eval_every=4, round_timeout=30, connect_timeout=60)
        workers.extend(threading.Thread(target=distributed.run_worker, daemon=True,
                                        args=(spec, w, ("127.0.0.1", port)),
                                        kwargs={"tls": worker_pem(w), "log": text.append})
                       for w in range(2))
        for t in workers:
            t.start()

    try:
        status, output = watch([sys.executable, "-c", _EMFILE_SERVER, str(SERVER_PEM)], None,
                               on_line, RUN_TIMEOUT)
        for t in workers:
            t.join(RUN_TIMEOUT)
    finally:
        for sock in flood:
            sock.close()
    output += "".join(text)
    assert status == 0, output
    assert "RESULT [2, 2, 2, 2]" in output, output
    assert "Too many open files" in output, output


def test_a_slow_loris_peer_does_not_stretch_rounds_with_a_quorum():
    spec = _spec(workers=4, rounds=4, round_timeout=6, quorum=3)
    server = distributed.Server(spec, tls=SERVER_PEM)
    thread, out = _serve(server)
    peers = [Peer(server, w) for w in range(4)]
    row = np.full(server.n, 1e-3, np.float32)

    def honest(p):
        for t in range(1, 5):
            p.params(t)
            p.send(t, row)

    def loris(p):
        # answers every round's parameters just before the deadline
        try:
            while True:
                frame = p.recv()
                if frame.kind == Kind.STOP:
                    return
                time.sleep(spec.round_timeout - 1.0)
                p.send(frame.round, row)
        except OSError:
            return  # the run ended without it

    threads = [threading.Thread(target=honest, args=(p,), daemon=True) for p in peers[:3]]
    threads.append(threading.Thread(target=loris, args=(peers[3],), daemon=True))
    for t in threads:
        t.start()
    thread.join(60)
    assert not thread.is_alive()
    record = out["record"]
    rounds = record["rounds"]
    assert [r["received"] for r in rounds] == [3, 3, 3, 3]
    # the loris would hold every round ~5 s; the quorum closes them at once
    assert all(r["wait_s"] < 3.0 for r in rounds), [r["wait_s"] for r in rounds]
    status = {(r["round"], r["worker"]): (r["status"], r["reason"]) for r in record["workers"]}
    assert status[1, 3] == ("missing", "no gradient before the round closed on its quorum of 3")
    for t in threads:
        t.join(30)


# --------------------------------------------------------------------------
# nothing lost


def _train_cmd(out, *extra, rounds=8):
    return [sys.executable, "-m", "flagagg", "train", "--config", "demo", "--rule", "median",
            "--attack", "none", "--f", "0", "--workers", "3", "--rounds", str(rounds),
            "--eval-every", "2", "--round-timeout", "20", "--output", str(out),
            "--checkpoint-every", "4", *extra]


def _watch(cmd, cwd, on_line):
    return watch(cmd, cwd, on_line, RUN_TIMEOUT)


def test_a_killed_server_resumes_and_the_records_cover_every_round(tmp_path):
    out = tmp_path / "out"
    pids = {}

    def kill_at_round_6(line, proc):
        note_pid(line, pids)
        if line.startswith("round    6: test accuracy"):
            os.kill(pids["server"], signal.SIGKILL)

    status, text = _watch(_train_cmd(out), tmp_path, kill_at_round_6)
    assert status != 0 and not (out / "train.json").exists(), text
    with open(out / "rounds.csv", newline="") as fh:
        done = [int(r["round"]) for r in csv.DictReader(fh)]
    assert done[:6] == list(range(1, 7)), done  # appended as the run went
    status, text = _watch(_train_cmd(out, "--resume", str(out / "checkpoint.pt")), tmp_path,
                          lambda line, proc: None)
    assert status == 0, text
    assert "round    4: test accuracy" in text  # resumed from round 4's checkpoint
    with open(out / "rounds.csv", newline="") as fh:
        rounds = [int(r["round"]) for r in csv.DictReader(fh)]
    assert rounds == list(range(1, 9))
    doc = json.loads((out / "train.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == list(range(1, 9))
    with open(out / "curves.csv", newline="") as fh:
        assert [int(r["round"]) for r in csv.DictReader(fh)] == list(range(0, 9, 2))
    for who, pid in pids.items():
        assert not _alive(pid), f"{who} (pid {pid}) outlived the run"


def test_an_older_run_in_the_folder_is_moved_aside(tmp_path):
    from flagagg.distributed._results import RunLog

    out = tmp_path / "out"
    out.mkdir()
    (out / "train.json").write_text("{}")
    spec = _spec()
    log = RunLog(out, spec, 0.1, log=lambda x: None)
    log.earlier(1)
    log.close()
    assert (tmp_path / "out.previous-1" / "train.json").read_text() == "{}"
    assert not (out / "train.json").exists() and (out / "run.json").exists()


_WRITER = textwrap.dedent("""
    import sys
    from flagagg import distributed, sim
    from flagagg.distributed._results import write_results
    spec = distributed.make_spec(sim.load_config("demo"), rule="mean", attack="none", f=0,
                                 workers=2, rounds=3)
    print("READY", flush=True)
    k = 0
    while True:
        k += 1
        rounds = [{"round": t, "received": k} for t in range(1, 400)]
        record = {"final_accuracy": 0.5, "diverged_round": None, "seconds": float(k),
                  "curve": [(t, 0.5) for t in range(400)], "rounds": rounds,
                  "workers": [{"round": t, "worker": 0, "status": "ok"} for t in range(1, 400)],
                  "status": 0, "start_round": 1, "address": None, "transport": "tcp",
                  "byzantine": [], "info": {}, "events": []}
        write_results(sys.argv[1], spec, record, 0.1)
""")


def test_a_kill_during_result_writing_leaves_old_or_new_results_never_a_mix(tmp_path):
    rng = random.Random(0)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        for _ in range(6):
            time.sleep(rng.uniform(0.05, 0.4))
            proc.send_signal(signal.SIGSTOP)  # freeze it where it is, look, go on
            _check_consistent(out)
            proc.send_signal(signal.SIGCONT)
        time.sleep(rng.uniform(0.05, 0.3))
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _check_consistent(out)


def _check_consistent(out):
    """With train.json: every final file whole and of the same version as train.json."""
    if not (out / "train.json").exists():
        return
    doc = json.loads((out / "train.json").read_text())
    version = doc["run"]["seconds"]
    with open(out / "runs.csv", newline="") as fh:
        runs = list(csv.DictReader(fh))
    assert [float(r["seconds"]) for r in runs] == [version]
    with open(out / "rounds.csv", newline="") as fh:
        rounds = list(csv.DictReader(fh))
    assert len(rounds) == 399 and {int(r["received"]) for r in rounds} == {int(version)}
    with open(out / "curves.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 400
    assert json.loads((out / "results.json").read_text())


def test_sigterm_to_the_launcher_stops_every_process_and_keeps_the_results(tmp_path):
    out = tmp_path / "out"
    pids = {}

    def term_at_round_4(line, proc):
        note_pid(line, pids)
        if line.startswith("round    4: test accuracy"):
            os.kill(proc.pid, signal.SIGTERM)

    status, text = _watch(_train_cmd(out, rounds=200), tmp_path, term_at_round_4)
    assert status == 128 + signal.SIGTERM, text
    assert len(pids) == 4, text
    for who, pid in pids.items():
        assert not _alive(pid), f"{who} (pid {pid}) outlived the launcher"
    doc = json.loads((out / "train.json").read_text())
    assert doc["status"] == 3 and 4 <= len(doc["rounds"]) < 200
    # the final accuracy is the model it reached, evaluated where it stopped (before:
    # the round-0 evaluation)
    last = len(doc["rounds"])
    with open(out / "curves.csv", newline="") as fh:
        curve = [(int(r["round"]), float(r["accuracy"])) for r in csv.DictReader(fh)]
    assert curve[-1][0] == last and doc["run"]["final_accuracy"] == curve[-1][1]
    assert last > 0 and len(curve) >= 2
    with open(out / "rounds.csv", newline="") as fh:
        assert [int(r["round"]) for r in csv.DictReader(fh)] == \
            list(range(1, len(doc["rounds"]) + 1))
    assert (out / "checkpoint.pt").exists()


# --------------------------------------------------------------------------
# a floor on honesty, a grace for the slightly slower


def test_bit_flips_that_leave_only_the_byzantine_worker_stop_the_run_instead_of_training():
    """The issue's end state: on-path bit flips cut the honest workers off, and the
    server trained 1,358 rounds on the Byzantine gradient alone, exit 0.

    Now every honest worker's connection passes through a proxy that flips a
    bit of its first gradient; they are cut off and rejoin, again and again.
    The rounds have one gradient, below the median's floor of 2f + 1 = 3: no
    round steps, and after ``connect_timeout`` seconds the run stops with exit
    status 4 and says why.
    """
    spec = _spec(rule="median", attack="reverse", f=1, workers=4, rounds=80, eval_every=80,
                 round_timeout=1.0, connect_timeout=15.0)
    lines = []
    server = distributed.Server(spec, tls=SERVER_PEM, log=lines.append)
    assert server.floor == 3 and server.quorum == 3
    proxy = FlipProxy(server.address, at=3000)
    thread, out = _serve(server)
    byzantine = min(server.byzantine)
    workers = [threading.Thread(target=distributed.run_worker, daemon=True, kwargs={
        "spec": spec, "worker": w, "tls": worker_pem(w), "log": lines.append,
        "address": server.address if w == byzantine else proxy.address}) for w in range(4)]
    for t in workers:
        t.start()
    thread.join(RUN_TIMEOUT)
    assert not thread.is_alive()
    for t in workers:
        t.join(RUN_TIMEOUT)
    proxy.close()
    record = out["record"]
    assert record["status"] == 4, "\n".join(lines)
    assert proxy.flipped >= 3
    # not one step on fewer than three gradients
    assert all(r["received"] >= 3 for r in record["rounds"] if r["stepped"])
    assert not any(r["stepped"] for r in record["rounds"]), record["rounds"]
    assert any("below the floor of 3" in r["problem"] for r in record["rounds"])
    assert any("STOPPED: no step for 15 s" in x for x in lines), lines
    # the run stopped after about connect_timeout (rounds of 1 s), not after 80 rounds
    assert len(record["rounds"]) < 40


def test_the_quorum_waits_for_a_slightly_slower_worker():
    """The issue: with the default quorum a worker 10 ms slower was dropped in 5,997 of
    6,000 rounds. Now the round waits a grace after its quorum (as long as the median
    round, at least 50 ms), and the worker takes part in nearly every round.
    """
    spec = _spec(rule="mean", attack="none", f=1, workers=4, rounds=20, eval_every=20,
                 round_timeout=10)
    server = distributed.Server(spec, tls=SERVER_PEM)
    assert server.quorum == 3
    thread, out = _serve(server)
    peers = [Peer(server, w) for w in range(4)]
    row = np.full(server.n, 1e-3, np.float32)

    def answer(p, delay):
        # every round's parameters it gets (one that fell behind gets only the newest)
        while True:
            frame = p.recv()
            if frame.kind == Kind.STOP:
                return
            time.sleep(delay)
            p.send(frame.round, row)

    threads = [threading.Thread(target=answer, args=(p, 0.010 if p.worker == 3 else 0.0),
                                daemon=True) for p in peers]
    for t in threads:
        t.start()
    thread.join(RUN_TIMEOUT)
    assert not thread.is_alive()
    record = out["record"]
    left = record["left_out_by_quorum"]
    rows = [r for r in record["workers"] if r["worker"] == 3 and r["status"] == "missing"]
    assert left[3] == len(rows)
    assert left[3] <= 5, left   # before: all 20
    assert sum(r["received"] for r in record["rounds"]) >= 75


def test_a_reconnect_storm_delays_a_joining_worker_by_seconds_at_most():
    """The issue: a storm of about 2,000 connections per second from one process kept
    every joining worker out until it stopped.

    A separate process opens 2,000 connections a second (keeping the newest
    300 open, closing the oldest) until the workers are in, for at most 40 s;
    meanwhile three workers join one after the other, each timed from its
    first connection attempt to its WELCOME. Each joins as a real worker does
    (``_worker._connect``: an attempt gives up on the TCP connection after
    2 s, and a failed one is retried after 0.2 s, doubling up to 5 s).
    """
    spec = _spec(workers=3, rounds=1, round_timeout=20, connect_timeout=60)
    server = distributed.Server(spec, tls=SERVER_PEM, log=lambda text: None)
    thread, out = _serve(server)
    contexts = [client_context(worker_pem(w)) for w in range(3)]
    storm = subprocess.Popen([sys.executable, "-c", _STORM, str(server.address[1]), "2000", "40"],
                             stdout=subprocess.PIPE, text=True)
    try:
        # the storm is under way once it holds its 300 (it says so), however long its
        # interpreter took to start on a loaded machine
        assert storm.stdout.readline().startswith("GO")
        joins, socks = [], []
        for w in range(3):
            t0 = time.monotonic()
            sock, welcome = _worker._connect(server.address, contexts[w], _Hello(server, w),
                                             t0 + 30)
            joins.append(time.monotonic() - t0)
            assert welcome["worker"] == w
            socks.append(sock)
        during = storm.poll() is None
        storm.terminate()  # it prints how many it opened in how long, and stops
        _, opened, seconds = storm.communicate(timeout=30)[0].split()
        opened, seconds = int(opened), float(seconds)
    finally:
        if storm.poll() is None:
            storm.kill()
            storm.wait()
    assert during, "the storm ended before the workers joined: the test measured nothing"
    assert opened >= 2000 * seconds * 0.5, (opened, seconds)   # it did storm
    assert max(joins) < 5.0, joins
    for w, sock in enumerate(socks):
        frame = recv_frame(sock, 1 << 24, {Kind.PARAMS}, 20)
        assert frame.round == 1
        send_frame(sock, encode_tensor(Kind.GRAD, np.zeros(server.n, np.float32), worker=w,
                                       round=1, seconds=0.001))
    thread.join(60)
    for sock in socks:
        sock.close()
    assert out["record"]["rounds"][0]["received"] == 3
    print(f"join times under a {opened / seconds:.0f}/s storm: {[round(x, 3) for x in joins]} s")


class _Hello:
    """What ``_worker._connect`` needs of a worker: its HELLO."""

    def __init__(self, server, worker):
        self.doc = {"worker": worker, "rank": worker + 1, "pid": 0, "host": "test",
                    "fingerprint": server.spec.fingerprint(), "n_params": server.n,
                    "device": "cpu"}

    def hello(self):
        return self.doc


_STORM = textwrap.dedent("""
    import collections, signal, socket, sys, time
    port, rate, duration = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    held, n, t0 = collections.deque(), 0, time.monotonic()
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    while time.monotonic() - t0 < duration and not stop:
        due = int((time.monotonic() - t0) * rate)
        while n < due:
            n += 1
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                continue
            held.append(s)
            if len(held) > 300:
                held.popleft().close()
            if n == 300:
                print("GO", flush=True)
        time.sleep(0.001)
    print("OPENED", n, time.monotonic() - t0, flush=True)
""")


def test_a_tampered_server_address_in_the_torchrun_store_leads_nowhere(monkeypatch, capsys):
    """The issue: an outsider rewriting the store's server-address key kept a tcp run
    from starting, and the workers blamed the secret. The address is still read
    from the store, but the worker checks what answers there against the run's CA
    and says what is wrong."""
    from flagagg.distributed._node import run_node

    lsock, got = _fake_server(file_of(OTHER, 0))
    store = torchrun_worker_env(  # noqa: F841 - kept open while the worker runs
        monkeypatch, {"transport": "tcp", "host": "127.0.0.1", "port": lsock.getsockname()[1]})
    threads = torch.get_num_threads()
    try:
        status = run_node(_spec(transport="tcp", connect_timeout=10))
    finally:
        torch.set_num_threads(threads)
        lsock.close()
    assert status == 2
    err = capsys.readouterr().err
    assert "is not this run's server" in err and "secret" not in err, err
    assert not got or not isinstance(got[0], bytes) or got[0] == b""


def _listening_addresses(port):
    """Local addresses of the sockets listening on TCP ``port`` (from /proc/net/tcp*)."""
    found = []
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/net/{name}") as fh:
            for line in list(fh)[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, p = local.split(":")
                if state == "0A" and int(p, 16) == port:
                    found.append(addr)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_the_store_rank_0_hosts_listens_on_the_master_address_only():
    """The issue: under torchrun the store listened on all interfaces. The store
    that flagagg's rank 0 hosts listens on MASTER_ADDR only (a TCPStore of torch's
    own, made the usual way, listens on every interface: the check can fail)."""
    from flagagg.distributed._node import _store

    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    store = _store(0, 2, "127.0.0.1", port, 10)
    client = _store(1, 2, "127.0.0.1", port, 10)
    client.set("k", "v")
    assert store.get("k") == b"v"
    # 0100007F is 127.0.0.1 as /proc writes it; 00000000 (or :: in tcp6) is every interface
    assert _listening_addresses(port) == ["0100007F"]
    import datetime

    import torch.distributed as dist

    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    plain = dist.TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=10))
    assert "0100007F" not in _listening_addresses(port), "the check cannot tell the difference"
    del plain, store, client
