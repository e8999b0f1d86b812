"""Parameter-server training: wire format, the server against hostile peers, real runs.

The first tests drive an in-process server with hand-written peers, over
loopback sockets (TCP transport) and over gloo process groups (the default
transport), so every failure mode (NaN, wrong size, wrong dtype, silence, a
half-sent message, an oversized announcement, a reconnection, impostors) is
exercised deterministically and fast; a whole run on threads checks that
resuming from a checkpoint continues the same run. The real runs (one server
and four worker processes each, over gloo and over TCP) check Byzantine
training that matches the simulator (to float tolerance: a worker computes
its gradient alone where the simulator batches all rows, which can move the
last bits), a worker killed and another one frozen mid-run, workers sending
NaN and wrong-sized gradients, and launches by torchrun (over tcp and gloo). Every run is
bounded by a timeout and leaves no process behind.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import gc
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from support.procs import note_pid, watch

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from flagagg import distributed, sim  # noqa: E402
from flagagg.distributed._protocol import (  # noqa: E402
    HEADER,
    MAX_JSON_BYTES,
    PROTOCOL_VERSION,
    Kind,
    ProtocolError,
    check_header,
    decode_json,
    encode_json,
    encode_tensor,
    recv_frame,
)
from flagagg.sim import ConfigError  # noqa: E402

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

# --------------------------------------------------------------------------
# wire format


def test_messages_arrive_whole_from_any_split_and_match_the_layout():
    row = np.arange(5, dtype=np.float32)
    data = b"".join(bytes(x) for x in encode_tensor(Kind.GRAD, row, worker=3, round=7,
                                                    seconds=0.25))
    data += b"".join(bytes(x) for x in encode_json(Kind.HELLO, {"worker": 1}))
    # the layout, written out independently of HEADER
    assert data[:4] == b"FLAG" and data[4] == Kind.GRAD and data[5] == 1
    assert int.from_bytes(data[6:8], "little") == PROTOCOL_VERSION
    assert int.from_bytes(data[20:28], "little") == 20 and data[36:56] == row.tobytes()
    a, b = socket.socketpair()
    try:
        sender = threading.Thread(target=lambda: [a.sendall(data[i:i + 1])
                                                  for i in range(len(data))])
        sender.start()
        grad = recv_frame(b, 1 << 16, {Kind.GRAD}, 20)
        hello = recv_frame(b, 0, {Kind.HELLO}, 20)
        sender.join()
    finally:
        a.close()
        b.close()
    assert (grad.kind, grad.worker, grad.round, grad.seconds) == (Kind.GRAD, 3, 7, 0.25)
    np.testing.assert_array_equal(grad.array(), row)
    assert hello.json() == {"worker": 1}


@pytest.mark.parametrize("bad, match", [
    (b"JUNK" + bytes(HEADER.size - 4), "bad magic"),
    (HEADER.pack(b"FLAG", Kind.GRAD, 1, PROTOCOL_VERSION, 0, 1, 10**12, 0.0), "over the"),
    (HEADER.pack(b"FLAG", Kind.PARAMS, 1, PROTOCOL_VERSION, 0, 1, 4, 0.0), "unexpected"),
    (HEADER.pack(b"FLAG", Kind.GRAD, 1, 99, 0, 1, 4, 0.0), "protocol version"),
    (HEADER.pack(b"FLAG", Kind.GRAD, 77, PROTOCOL_VERSION, 0, 1, 4, 0.0), "dtype"),
    (HEADER.pack(b"FLAG", Kind.HELLO, 1, PROTOCOL_VERSION, 0, 0, 4, 0.0), "dtype"),
    (HEADER.pack(b"FLAG", Kind.HELLO, 0, PROTOCOL_VERSION, 0, 0, MAX_JSON_BYTES + 1, 0.0),
     "over the 4096-byte limit"),
])
def test_bad_headers_are_refused_before_their_payload(bad, match):
    with pytest.raises(ProtocolError, match=match):
        check_header(bad, 1 << 16, {Kind.GRAD, Kind.HELLO})


@pytest.mark.parametrize("payload, match", [
    (b"[" * 60_000, "over the 4096-byte limit"),
    (b"[" * 4000, "nests deeper"),
    (b'{"a": {"b": [1]}}', "nests deeper"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"a": 1', "not JSON"),
])
def test_control_messages_refuse_deep_large_and_broken_json(payload, match):
    with pytest.raises(ProtocolError, match=match):
        decode_json(payload)
    # brackets inside strings are text, not nesting
    assert decode_json(b'{"host": "[[[{{{", "n": [1, 2]}') == {"host": "[[[{{{", "n": [1, 2]}


def test_fault_and_spec_errors_say_what_to_do():
    assert distributed.parse_fault("2:slow=1.5@3-4") == distributed.Fault(2, "slow", 1.5, 3, 4)
    assert distributed.parse_fault("0:crash@5") == distributed.Fault(0, "crash", 0.0, 5, 5)
    assert distributed.parse_fault("3:nan@6-").active(99)
    assert distributed.parse_fault("3:nan").active(1)
    for text, match in (("2:explode", "unknown fault kind"), ("x", "WORKER:KIND"),
                        ("1:slow", "needs =VALUE"), ("1:nan@5-2", "FIRST <= LAST")):
        with pytest.raises(ValueError, match=match):
            distributed.parse_fault(text)
    with pytest.raises(ConfigError, match="choose one of"):
        _spec(rule="no_such_rule")
    with pytest.raises(ConfigError, match="workers are 0..3"):
        _spec(faults=(distributed.Fault(4, "nan"),))


def test_transport_choice_and_what_is_missing(monkeypatch):
    from flagagg.distributed._collective import check_transport

    spec = _spec()
    assert spec.transport == "tcp"  # authenticated by default; gloo and nccl only on request
    assert _spec(transport="gloo").transport == "gloo"
    with pytest.raises(ConfigError, match="not one of tcp, gloo, nccl"):
        _spec(transport="mpi")
    assert _spec(f=1).quorum_size == 3 and _spec(quorum=2).quorum_size == 2
    with pytest.raises(ConfigError, match="quorum 5 is not in 1..4"):
        _spec(quorum=5)
    check_transport("gloo")  # present in every torch build the suite runs on
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    with pytest.raises(RuntimeError, match="no NCCL backend.*--transport gloo or tcp"):
        check_transport("nccl", "cuda:0")
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    with pytest.raises(RuntimeError, match="run with --device cuda"):
        check_transport("nccl", "cpu")
    monkeypatch.delattr(torch.distributed.Store, "queue_pop")
    with pytest.raises(RuntimeError, match="lacks Store.queue_pop.*--transport tcp"):
        check_transport("gloo")
    spec_dict = distributed._settings.spec_to_dict(_spec(transport="tcp"))
    assert distributed._settings.spec_from_dict(spec_dict).transport == "tcp"


def test_a_worker_started_with_another_transport_says_so(monkeypatch, capsys):
    from flagagg.distributed._node import run_node

    store = torchrun_worker_env(monkeypatch, {"transport": "gloo"})  # noqa: F841 - kept open
    threads = torch.get_num_threads()
    try:
        status = run_node(_spec(transport="tcp", connect_timeout=10))
    finally:
        torch.set_num_threads(threads)
    assert status == 2
    assert "the server uses --transport gloo, this worker was started with --transport tcp" \
        in capsys.readouterr().err


def test_server_address_choice(monkeypatch):
    from flagagg.distributed._node import _server_address

    monkeypatch.delenv("FLAGAGG_SERVER_ADDR", raising=False)
    assert _server_address(None, "10.1.2.3", True) == ("127.0.0.1", "127.0.0.1", 0)
    assert _server_address(None, "127.0.0.1", False) == ("127.0.0.1", "127.0.0.1", 0)
    # elsewhere it binds the configured address, not every interface
    assert _server_address("192.0.2.7:4000", "10.1.2.3", False) == \
        ("192.0.2.7", "192.0.2.7", 4000)
    monkeypatch.setenv("FLAGAGG_SERVER_ADDR", "192.0.2.8")
    assert _server_address(None, "10.1.2.3", False) == ("192.0.2.8", "192.0.2.8", 0)


def test_cli_reports_config_errors_without_starting_processes(capsys):
    from flagagg.cli import main

    assert main(["train", "--config", "demo", "--rule", "nope"]) == 2
    assert "--rule 'nope' is not in the config" in capsys.readouterr().err


# --------------------------------------------------------------------------
# the server against hand-written peers


def _check_rounds_1_to_3(record, n, deadline=1.5):
    """What both hostile-peer tests stage in rounds 1-3, checked in the record.

    Round 1: worker 0 ok, 1 NaN, 2 wrong size, 3 float64. Round 2: worker 2
    silent, worker 3 cut off. Round 3: worker 2 late (its round-2 gradient
    stale), worker 3 back during the round. Returns ``status``, keyed by
    (round, worker).
    """
    status = {(r["round"], r["worker"]): (r["status"], r["reason"]) for r in record["workers"]}
    assert status[1, 0] == ("ok", "")
    assert status[1, 1] == ("excluded", "non-finite values (NaN or Inf)")
    assert status[1, 2] == ("excluded", f"wrong size: {4 * n + 12} bytes = {n + 3} float32 "
                            f"values, expected {4 * n} bytes = {n} values")
    assert status[1, 3][0] == "excluded" and "float64" in status[1, 3][1]
    assert status[2, 2] == ("missing", f"no gradient within the {deadline:g} s deadline")
    assert status[3, 2] == ("ok", "")
    assert status[3, 3] == ("missing", "joined during the round; takes part from the next")
    rounds = record["rounds"]
    assert rounds[1]["missing"] == [2, 3] and rounds[0]["excluded"] == [1, 2, 3]
    assert rounds[2]["stale"] == 1
    assert rounds[1]["wait_s"] >= 1.4 and rounds[2]["wait_s"] < 1.0  # no wait for a lagger
    assert all(r["stepped"] and r["bytes_sent"] > 4 * n for r in rounds)
    assert np.isfinite(record["parameters"]).all()
    return status


def test_server_survives_every_kind_of_bad_worker():
    server = distributed.Server(_spec(rounds=5), tls=SERVER_PEM)
    thread, out = _serve(server)
    n = server.n
    ok = np.full(n, 1e-3, np.float32)
    p0 = Peer(server, 0)
    stranger = Peer(server, 1, fingerprint="0" * 16)
    assert stranger.answer.kind == Kind.REJECT
    reason = stranger.answer.json()["reason"]
    # a member with another config hears why, but not the server's fingerprint
    assert "different config" in reason and server.spec.fingerprint() not in reason
    p1, p2, p3 = Peer(server, 1), Peer(server, 2), Peer(server, 3)
    peers = [p0, p1, p2, p3]
    assert all(p.answer.kind == Kind.WELCOME for p in peers)

    # round 1: a good row, NaN, 3 values too many, float64
    for p in peers:
        p.params(1)
    p0.send(1, ok)
    p1.send(1, np.full(n, np.nan, np.float32))
    p2.send(1, np.zeros(n + 3, np.float32))
    p3.send(1, ok.astype(np.float64))
    # round 2: worker 2 says nothing (the round waits for its deadline), worker 3
    # dies half-way through a frame, which must never reach the rule
    for p in peers:
        p.params(2)
    p0.send(2, ok)
    p1.send(2, ok)
    half = p3.frame(encode_tensor(Kind.GRAD, ok, worker=3, round=2))
    p3.sock.sendall(half[: len(half) // 2])
    p3.sock.close()
    # round 3 (it starts when round 2's deadline has passed): worker 2 is still
    # busy with round 2, so nobody waits for it; its late round-2 gradient is
    # dropped as stale, its round-3 one counts; worker 3 comes back on a new
    # connection
    p0.params(3)
    p2.send(2, ok)
    p2.params(3)
    p2.send(3, ok)
    p3 = Peer(server, 3)
    assert p3.answer.json()["round"] == 4
    p0.send(3, ok)
    p1.params(3)
    p1.send(3, ok)
    for t in (4, 5):
        for p in (p0, p1, p2, p3):
            p.params(t)
            p.send(t, ok)
    for p in (p0, p1, p2, p3):
        assert p.recv().kind == Kind.STOP
    thread.join(30)
    assert not thread.is_alive(), "the server did not finish"
    record = out["record"]

    status = _check_rounds_1_to_3(record, n)
    assert status[2, 3] == ("missing", "disconnected (connection closed)")
    assert all(status[t, w][0] == "ok" for t in (4, 5) for w in range(4))
    assert [r["received"] for r in record["rounds"]] == [1, 2, 3, 4, 4]
    events = [(e.get("worker"), e["event"]) for e in record["events"]]
    for expected in ((1, "refused"), (3, "disconnected"), (3, "reconnected")):
        assert expected in events
    # the rule's per-worker diagnostics, for the rows it got (and none for the rest)
    for r in record["workers"]:
        if r["status"] == "ok":
            assert -1 <= r["cosine"] <= 1 and r["verdict"] and isinstance(r["suspect"], bool)
        else:
            assert r["cosine"] is None and r["verdict"] == "" and r["suspect"] is False


def test_an_excluded_gradient_says_what_was_wrong_in_bytes_and_values():
    """The issue: a 2,602-byte gradient was excluded as "650 values, expected 650"."""
    server = distributed.Server(_spec(workers=2, rounds=1, round_timeout=20), tls=SERVER_PEM)
    thread, out = _serve(server)
    p, q = Peer(server, 0), Peer(server, 1)
    p.params(1)
    q.params(1)
    head = HEADER.pack(b"FLAG", Kind.GRAD, 1, PROTOCOL_VERSION, 0, 1, 4 * server.n + 2, 0.0)
    p.sock.sendall(head + bytes(4 * server.n + 2))
    q.send(1, np.zeros(server.n, np.float32))
    thread.join(60)
    row = out["record"]["workers"][0]
    n = server.n
    assert row["reason"] == (f"wrong size: {4 * n + 2} bytes = {n + 0.5:g} float32 values, "
                             f"expected {4 * n} bytes = {n} values")


class GlooPeer:
    """A gloo worker written by hand: announcements and bytes exactly as a test needs."""

    def __init__(self, server, worker, fingerprint=None, build=True):
        import torch.distributed as dist


        self.dist, self.server, self.worker = dist, server, worker
        host, port = server.address
        self.store = dist.TCPStore(host, port, is_master=False,
                                   timeout=datetime.timedelta(seconds=20))
        self.token = secrets.token_hex(8)
        hello = {"kind": "hello", "token": self.token, "worker": worker, "rank": worker + 1,
                 "pid": 0, "host": "test", "fingerprint": fingerprint or server.spec.fingerprint(),
                 "n_params": server.n, "device": "cpu"}
        self.store.queue_push(server.inbox, json.dumps(hello))
        self.answer = json.loads(self.store.get(f"{server.prefix}answer/{self.token}"))
        self.pg = None
        if self.answer["ok"] and build:
            sub = dist.PrefixStore(f"{server.prefix}pair/{self.token}/", self.store)
            self.pg = dist.ProcessGroupGloo(sub, 1, 2, datetime.timedelta(seconds=20))
        self.pings = 0

    def message(self):
        """The server's next message (header, values), skipping pings (kind 3)."""
        from flagagg.distributed._collective import _TAG_SERVER

        buf = torch.zeros(32 + 4 * self.server.n, dtype=torch.uint8)
        while True:
            self.pg.recv([buf], 0, _TAG_SERVER).wait(datetime.timedelta(seconds=20))
            head = buf[:32].view(torch.int64).tolist()
            if head[0] != 3:
                return head, buf[32:].view(torch.float32).clone()
            self.pings += 1

    def params(self, t):
        (kind, rnd, n, _), values = self.message()
        assert (kind, rnd, n) == (1, t, self.server.n)
        return values

    def send(self, t, row, *, announce=None, cut=None, wait=True):
        from flagagg.distributed._collective import _TAG_GRAD, MARK

        data = np.frombuffer(row.tobytes() + MARK, np.uint8)[:cut]
        msg = {"kind": "grad", "token": self.token, "worker": self.worker, "round": t,
               "dtype": row.dtype.name, "nbytes": row.nbytes, "seconds": 0.001}
        msg.update(announce or {})
        self.store.queue_push(self.server.inbox, json.dumps(msg))
        if (announce or {}).get("nbytes", 0) > self.server.max_gradient_bytes:
            return None  # the server refuses to receive it: nothing to send
        work = self.pg.send([torch.from_numpy(data.copy())], 0, _TAG_GRAD)
        if wait:
            work.wait(datetime.timedelta(seconds=20))
        return work


def test_gloo_server_survives_every_kind_of_bad_worker():
    import torch.distributed as dist

    from flagagg.distributed._collective import CollectiveServer

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=20))
    # the deadlines only end rounds in which someone is meant to be missing, so they
    # can be generous: on a loaded machine a gloo group takes seconds to form
    server = CollectiveServer(_spec(rounds=5, round_timeout=8.0), store, prefix="test/",
                              join_timeout=3.0)
    thread, out = _serve(server)
    n = server.n

    def wait_until(condition, what, timeout=60):
        # the server's own state, polled: no sleep that a loaded machine could outlast
        end = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < end, f"the server never {what}"
            time.sleep(0.01)

    ok = np.full(n, 1e-3, np.float32)
    # a worker that is accepted and never builds its group holds the server
    # up for join_timeout, and is then forgotten
    ghost = GlooPeer(server, 1, build=False)
    assert ghost.answer["ok"]
    p0 = GlooPeer(server, 0)
    impostor = GlooPeer(server, 0)
    stranger = GlooPeer(server, 1, fingerprint="0" * 16)
    assert not impostor.answer["ok"] and "already connected" in impostor.answer["reason"]
    assert not stranger.answer["ok"] and "different config" in stranger.answer["reason"]
    # the answers sit in a store anyone can read: nothing in them helps an outsider
    # pass the checks (the server's fingerprint, model size, the pid holding a slot)
    for answer in (ghost.answer, impostor.answer, stranger.answer):
        text = json.dumps(answer)
        assert server.spec.fingerprint() not in text and str(n) not in text, text
        assert "pid" not in text and str(os.getpid()) not in text, text
    p1, p2, p3 = GlooPeer(server, 1), GlooPeer(server, 2), GlooPeer(server, 3)
    assert all(p.answer["ok"] for p in (p0, p1, p2, p3))

    # round 1: a good row, NaN, 3 values too many (announced as such), float64
    for p in (p0, p1, p2, p3):
        p.params(1)
    p0.send(1, ok)
    p1.send(1, np.full(n, np.nan, np.float32))
    p2.send(1, np.zeros(n + 3, np.float32))
    p3.send(1, ok.astype(np.float64))
    # round 2: worker 2 says nothing (the round waits for its deadline); worker 3
    # announces more bytes than any gradient has: cut off before a byte is read
    for p in (p0, p1, p2, p3):
        p.params(2)
    p0.send(2, ok)
    p1.send(2, ok)
    # the server pings worker 3 while round 2 waits (pings it never reads)
    wait_until(lambda: getattr(server.peers.get(3), "pings", None), "pinged worker 3")
    p3.send(2, ok, announce={"nbytes": 100 * n})
    # the server closed worker 3's group, unread pings and all: it learns at once
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="(?i)closed|reset"):
        p3.params(3)
    assert time.monotonic() - t0 < 5 and p3.pings >= 1
    # round 3: worker 2's late round-2 gradient is drained as stale, its round-3
    # one counts; worker 3 comes back with a new group
    p0.params(3)
    p2.send(2, ok)
    p2.params(3)
    p2.send(3, ok)
    p3 = GlooPeer(server, 3)
    assert p3.answer["ok"] and p3.answer["round"] == 4
    p0.send(3, ok)
    p1.params(3)
    p1.send(3, ok)
    # round 4: worker 1 announces a whole gradient and sends half of it;
    # worker 0 dies (its group closes): the server's ping finds it gone, so the
    # round ends with the others; a new process for worker 0 is let in
    for p in (p0, p1, p2, p3):
        p.params(4)
    for p in (p2, p3):
        p.send(4, ok)
    half = p1.send(4, ok, cut=4 * n // 2, wait=False)  # noqa: F841 - keeps the send alive
    first_p0, p0.pg = p0, None
    gc.collect()
    # the server's ping finds worker 0 gone; round 4 ends at its deadline (worker 1's
    # half gradient), and the new worker 0 joins during round 5
    wait_until(lambda: any(e.get("worker") == 0 and e["event"] == "disconnected"
                           for e in list(server.events)), "saw worker 0 disconnect")
    wait_until(lambda: server.round >= 5, "reached round 5")
    p0 = GlooPeer(server, 0)
    assert p0.answer["ok"] and p0.answer["round"] == 6
    for p in (p2, p3):
        p.params(5)
        p.send(5, ok)
    for p in (p0, p2, p3):
        assert p.message()[0][0] == 2  # STOP
    thread.join(30)
    assert not thread.is_alive(), "the server did not finish"
    record = out["record"]
    with pytest.raises(RuntimeError):  # its group was closed by the server
        p1.params(5)

    status = _check_rounds_1_to_3(record, n, deadline=8)
    assert status[2, 3][0] == "missing" and "over the" in status[2, 3][1]
    assert status[4, 1] == ("missing", "disconnected (protocol error: sent fewer bytes than "
                            "it announced)")
    assert status[5, 1][0] == "missing"
    assert status[4, 0][0] == "missing" and status[4, 0][1].startswith("disconnected")
    assert status[5, 0] == ("missing", "joined during the round; takes part from the next")
    assert all(status[t, w][0] == "ok" for t, w in ((4, 2), (4, 3), (5, 2), (5, 3)))
    assert [r["received"] for r in record["rounds"]] == [1, 2, 3, 2, 2]
    events = [(e.get("worker"), e["event"]) for e in record["events"]]
    for expected in ((0, "refused"), (1, "refused"), (3, "disconnected"), (3, "reconnected"),
                     (1, "disconnected"), (0, "disconnected"), (0, "reconnected")):
        assert expected in events
    assert [e["reason"] for e in record["events"] if e["event"] == "refused"].count(
        "process group did not form") == 1
    assert record["transport"] == "gloo"
    # the impostor's hello made the server check that worker 0 was alive, and
    # silent worker 2 was pinged while round 2 waited for it
    assert first_p0.pings >= 1 and p2.pings >= 2


def test_checkpoints_resume_and_refuse_pickled_objects(tmp_path):
    path = tmp_path / "ck.pt"
    server = distributed.Server(_spec(workers=2, rounds=2), tls=SERVER_PEM, checkpoint=path)
    thread, out = _serve(server)
    peers = [Peer(server, w) for w in range(2)]
    for t in (1, 2):
        for p in peers:
            p.params(t)
            p.send(t, np.full(server.n, 0.01, np.float32))
    thread.join(30)
    assert not thread.is_alive()
    state = distributed.load_checkpoint(path)
    assert state["round"] == 2
    np.testing.assert_array_equal(state["parameters"].numpy(), out["record"]["parameters"])
    again = distributed.Server(_spec(workers=2, rounds=4), tls=SERVER_PEM, resume=path)
    assert again.start_round == 3 and torch.equal(again.flat, state["parameters"])
    again._stop_workers(0)
    with pytest.raises(ValueError, match="nothing left to train"):
        distributed.Server(_spec(workers=2, rounds=2), tls=SERVER_PEM, resume=path)

    # a checkpoint that smuggles in an arbitrary object is not unpickled
    torch.save({"format": "flagagg-distributed-checkpoint", "payload": Peer}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        distributed.load_checkpoint(tmp_path / "evil.pt")


def _in_threads(spec, **server_options):
    """A whole run in this process: the server and real workers on threads."""
    server = distributed.Server(spec, tls=SERVER_PEM, **server_options)
    thread, out = _serve(server)
    workers = [threading.Thread(target=distributed.run_worker, daemon=True,
                                args=(spec, w, server.address), kwargs={"tls": worker_pem(w)})
               for w in range(spec.workers)]
    for t in workers:
        t.start()
    for t in [thread, *workers]:
        t.join(60)
        assert not t.is_alive()
    return out["record"]


def test_a_resumed_run_continues_the_same_run(tmp_path):
    spec = _spec(rule="flag", attack="reverse", f=1, workers=3, round_timeout=20, quorum=3)
    first = _in_threads(dataclasses.replace(spec, config=spec.config.replace(rounds=3)),
                        checkpoint=tmp_path / "ck.pt")
    resumed = _in_threads(spec, resume=tmp_path / "ck.pt")
    straight = _in_threads(spec)
    assert [r["round"] for r in first["rounds"]] == [1, 2, 3]
    assert [r["round"] for r in resumed["rounds"]] == [4, 5]
    # the workers of the resumed run replayed rounds 1-3's minibatch draws
    np.testing.assert_array_equal(resumed["parameters"], straight["parameters"])


# --------------------------------------------------------------------------
# real runs: one server process and four worker processes on loopback


@pytest.mark.parametrize("transport", ["gloo", "tcp"])
def test_byzantine_run_trains_and_matches_the_simulator(transport):
    config = sim.load_config("demo")
    # quorum 4: every round waits for all four, as the simulator does
    run = distributed.train(config, rule="flag", attack="reverse", f=1, workers=4, rounds=20,
                            eval_every=10, timeout=RUN_TIMEOUT, transport=transport, quorum=4)
    assert run.status == 0 and run.transport == transport
    assert [t for t, _ in run.curve] == [0, 10, 20]
    assert run.final_accuracy > run.curve[0][1] + 0.3, run.curve

    ref = sim.simulate(sim.load_dataset("digits"), "flag", f=1, attack="reverse",
                       attack_params=config.attack("reverse").params, workers=4, rounds=20,
                       eval_every=10, lr=config.lr_of("flag"), seed=config.seeds[0])
    np.testing.assert_allclose(run.parameters, ref.parameters, rtol=1e-5, atol=1e-6)
    assert [a for _, a in run.curve] == pytest.approx(ref.accuracy, abs=1e-9)

    assert all(r["received"] == 4 and not r["missing"] and not r["excluded"]
               for r in run.rounds)
    ratios = [r["reconstruction_ratio"] for r in run.workers]
    assert len(ratios) == 20 * 4 and all(0 <= x <= 1 + 1e-6 for x in ratios)
    for r in run.rounds:
        assert r["bytes_sent"] >= 4 * 4 * run.parameters.size
        assert r["compute_s"] > 0 and r["aggregate_s"] > 0 and r["comm_s"] is not None


def test_worker_momentum_reaches_the_parameter_server_workers():
    # [optimizer] worker_momentum is read by every worker process, as by the simulator:
    # without it the run below trains on raw gradients and leaves the simulator's path.
    config = dataclasses.replace(sim.load_config("demo"), worker_momentum=0.9)
    run = distributed.train(config, rule="median", attack="reverse", f=1, workers=4, rounds=6,
                            eval_every=3, timeout=RUN_TIMEOUT, transport="tcp", quorum=4)
    assert run.status == 0
    kwargs = dict(attack_params=config.attack("reverse").params, workers=4, rounds=6,
                  eval_every=3, lr=config.lr_of("median"), seed=config.seeds[0])
    ref = sim.simulate(sim.load_dataset("digits"), "median", f=1, attack="reverse",
                       worker_momentum=0.9, **kwargs)
    plain = sim.simulate(sim.load_dataset("digits"), "median", f=1, attack="reverse", **kwargs)
    np.testing.assert_allclose(run.parameters, ref.parameters, rtol=1e-5, atol=1e-6)
    assert not np.allclose(run.parameters, plain.parameters, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("transport", ["gloo", "tcp"])
def test_killed_and_frozen_workers_do_not_stop_training(tmp_path, transport):
    out = tmp_path / "out"
    slow = [x for w in range(4) for x in ("--inject-fault", f"{w}:slow=0.1")]
    cmd = [sys.executable, "-m", "flagagg", "train", "--config", "demo", "--rule", "median",
           "--attack", "none", "--f", "0", "--workers", "4", "--rounds", "12",
           "--eval-every", "1", "--round-timeout", "2", "--output", str(out),
           "--transport", transport, *slow]
    pids = {}

    def kill_and_freeze(line, proc):
        note_pid(line, pids)
        if line.startswith("round    3: test accuracy"):
            os.kill(pids[1], signal.SIGKILL)   # a crash
        elif line.startswith("round    6: test accuracy"):
            os.kill(pids[2], signal.SIGSTOP)   # a hang: alive, silent

    status, output = watch(cmd, tmp_path, kill_and_freeze, RUN_TIMEOUT)
    assert status == 0, output
    assert "done: 12 rounds" in output, output
    assert f"worker 2 (pid {pids[2]}) was still running" in output
    with open(out / "rounds.csv", newline="") as fh:
        rounds = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rounds] == list(range(1, 13))
    assert all(r["stepped"] == "True" for r in rounds)
    assert {"1", "2"} <= set(rounds[-1]["missing"].split())
    with open(out / "workers.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh)]
    # each failure is missing from some round on, to the end, with its reason;
    # which round exactly depends on how fast the test's signal arrives
    # (a killed process's socket is closed or reset, depending on unread data;
    # over gloo the server's next send or ping to it fails)
    for w, after, reason in ((1, 3, "disconnected (connection "),
                             (2, 6, "no gradient within the 2 s deadline")):
        mine = [r for r in rows if r["worker"] == str(w)]
        first = next(int(r["round"]) for r in mine if r["status"] == "missing")
        assert first > after and mine[first - 1]["reason"].startswith(reason), output
        if w == 1:  # a crash is noticed at once, not at the round's deadline
            assert float(rounds[first - 1]["wait_s"]) < 1.9, rounds[first - 1]
        assert all(r["status"] == ("ok" if int(r["round"]) < first else "missing")
                   for r in mine)
        assert f"worker {w} missing in {13 - first} of 12 rounds ({first}-12)" in output
    assert "worker 1 disconnected (connection " in output
    for who, pid in pids.items():
        assert not _alive(pid), f"{who} (pid {pid}) outlived the run"


@pytest.mark.parametrize("transport", ["gloo", "tcp"])
def test_nan_and_wrong_sized_gradients_are_excluded_and_training_goes_on(transport):
    run = distributed.train(sim.load_config("demo"), rule="mean", attack="none", f=0, workers=4,
                            rounds=8, eval_every=4, faults=["1:nan@2-3", "2:wrong_size@4"],
                            round_timeout=20, timeout=RUN_TIMEOUT, transport=transport)
    assert run.status == 0
    excluded = {(r["round"], r["worker"]): r["reason"] for r in run.workers
                if r["status"] == "excluded"}
    n = run.parameters.size
    assert excluded == {(2, 1): "non-finite values (NaN or Inf)",
                        (3, 1): "non-finite values (NaN or Inf)",
                        (4, 2): f"wrong size: {4 * n + 28} bytes = {n + 7} float32 values, "
                                f"expected {4 * n} bytes = {n} values"}
    assert [r["received"] for r in run.rounds] == [4, 3, 3, 3, 4, 4, 4, 4]
    assert all(r["stepped"] for r in run.rounds)
    assert np.isfinite(run.parameters).all()
    assert run.final_accuracy > run.curve[0][1] + 0.3, run.curve


@pytest.mark.parametrize("transport", ["tcp", "gloo"])
def test_torchrun_starts_a_run(tmp_path, transport):
    """``torchrun`` (its agent hosts the store) launches the same run as ``flagagg train``.

    Over tcp the server publishes its address on torchrun's store and every
    process reads its own certificate from ``--certs`` (made by ``flagagg certs``).
    """
    # torchrun's module, not its script: a copied virtual environment's script
    # may start another Python (and another flagagg) than this one
    if importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torch.distributed.run is not available")
    extra = []
    if transport == "tcp":
        from flagagg.cli import main

        assert main(["certs", "--workers", "4", "--out", str(tmp_path / "certs")]) == 0
        extra = ["--certs", str(tmp_path / "certs")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "5", "-m", "flagagg", "train",
           "--config", "demo", "--rule", "flag", "--attack", "reverse", "--f", "1",
           "--workers", "4", "--rounds", "6", "--eval-every", "3", "--output", "out",
           "--transport", transport, "--quorum", "4", *extra]
    # its own session, so that a run that overstays can be ended with all its processes
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, output
    where = "server: mutual-TLS tcp" if transport == "tcp" else "server: gloo point-to-point"
    assert where in output and "done: 6 rounds" in output, output
    with open(tmp_path / "out" / "train.json", encoding="utf-8") as fh:
        doc = json.load(fh)
    assert doc["transport"] == transport and doc["status"] == 0
    assert all(r["received"] == 4 for r in doc["rounds"])
    config = sim.load_config("demo")
    ref = sim.simulate(sim.load_dataset("digits"), "flag", f=1, attack="reverse",
                       attack_params=config.attack("reverse").params, workers=4, rounds=6,
                       eval_every=3, lr=config.lr_of("flag"), seed=config.seeds[0])
    assert doc["run"]["final_accuracy"] == pytest.approx(ref.accuracy[-1], abs=1e-9)


def test_nccl_waits_poll_until_done_or_deadline():
    from flagagg.distributed._collective import _wait

    class Work:  # an NCCL work: wait() returns at once, is_completed() tells the truth
        def __init__(self, done_after):
            self.polls, self.done_after, self.waited = 0, done_after, False

        def is_completed(self):
            self.polls += 1
            return self.polls > self.done_after

        def wait(self):
            self.waited = True

    work = Work(done_after=5)
    _wait("nccl", work, 5.0)
    assert work.polls == 6 and work.waited
    never = Work(done_after=10**9)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="no data within 0.05 s"):
        _wait("nccl", never, 0.05)
    assert 0.05 <= time.monotonic() - t0 < 2.0 and not never.waited

