"""The tcp transport against outsiders: each attack first, then what the server does about it.

Every test plays the attacker on loopback against a real :class:`Server`
(in this process, or in a subprocess where the attack needs one: a file
descriptor limit, a kill): a peer without the secret, one that got there
first, a replayed, a tampered, a garbage or an oversized message, a flood of
idle connections, no file descriptors left, a peer that answers just before
the deadline, a fake server, a kill of the server during a run and during
result writing, SIGTERM to the launcher. Each is bounded in time and stops
by itself; deadlines are generous wherever correctness does not depend on
them, so that a loaded machine slows the tests without failing them.
"""

from __future__ import annotations

import csv
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from _procs import note_pid, watch

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from test_distributed import (  # noqa: E402
    RUN_TIMEOUT,
    SECRET,
    Peer,
    _alive,
    _serve,
    _spec,
)

from flagagg import distributed  # noqa: E402
from flagagg.distributed._protocol import (  # noqa: E402
    CHALLENGE_BYTES,
    HEADER,
    PROOF_BYTES,
    PROTOCOL_VERSION,
    RESPONSE_BYTES,
    Kind,
    encode_json,
    encode_tensor,
    recv_exactly,
    respond,
)

WRONG = b"not-the-secret-" + b"x" * 16


def _closed_without_answer(sock, timeout=20):
    """Whether the server closes ``sock`` without sending anything (more)."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(1 << 16)
    except ConnectionResetError:
        return True
    return data == b""


def _stranger(server, response=None):
    """A connection that reads the challenge and answers with ``response`` (or a wrong one)."""
    sock = socket.create_connection(server.address, timeout=20)
    challenge = recv_exactly(sock, CHALLENGE_BYTES, 20)
    if response is None:
        response = respond(WRONG, challenge)[0]
    sock.sendall(response)
    return sock


def _in_threads(spec, *, secret=SECRET, attack=None, attack_ready=None, worker_options=None,
                **server_options):
    """A whole run in this process (server and real workers on threads), with ``attack``
    running beside it; returns (record, server).

    With ``attack_ready`` (an event the attack sets), the workers start only once the
    attack is in place, so that what the attack did before training does not depend on
    how fast the machine is.
    """
    lines = []
    server = distributed.Server(spec, secret=SECRET, log=lines.append, **server_options)
    server.lines = lines
    thread, out = _serve(server)
    stop = threading.Event()
    attacker = None
    if attack is not None:
        attacker = threading.Thread(target=attack, args=(server, stop), daemon=True)
        attacker.start()
    if attack_ready is not None:
        assert attack_ready.wait(RUN_TIMEOUT), "the attack never got in place"
    workers = [threading.Thread(target=distributed.run_worker, daemon=True,
                                args=(spec, w, server.address),
                                kwargs={"secret": secret, "log": lines.append,
                                        **(worker_options or {})})
               for w in range(spec.workers)]
    for t in workers:
        t.start()
    for t in [thread, *workers]:
        t.join(RUN_TIMEOUT)
        assert not t.is_alive(), "\n".join(lines)
    stop.set()
    if attacker is not None:
        attacker.join(30)
    return out["record"], server


# --------------------------------------------------------------------------
# membership


def test_an_outsider_without_the_secret_gets_nothing_and_changes_nothing():
    answers = []

    def outsider(server, stop):
        # a wrong response; a HELLO of the old, unauthenticated protocol
        try:
            while not stop.is_set():
                with _stranger(server) as sock:
                    answers.append(_closed_without_answer(sock))
                with socket.create_connection(server.address, timeout=20) as sock:
                    recv_exactly(sock, CHALLENGE_BYTES, 20)
                    sock.sendall(b"".join(bytes(x) for x in encode_json(
                        Kind.HELLO, {"worker": 0, "fingerprint": server.spec.fingerprint()})))
                    answers.append(_closed_without_answer(sock))
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
    assert server.refusals.total > 0 and answers and all(answers)
    shown = [x for x in server.lines if "refused" in x]
    assert shown and all("HMAC" in x or "handshake" in x or "more connections" in x
                         for x in shown), shown
    # refusals are for the operator, and rate-limited: a few lines, then a count
    assert len(shown) <= 20, shown


def test_a_preempting_impostor_never_gets_a_slot_and_the_real_worker_joins():
    spec = _spec(workers=2, rounds=2, round_timeout=20)
    server = distributed.Server(spec, secret=SECRET)
    thread, out = _serve(server)
    # the impostor comes first and asks for worker 0, with a guessed secret
    with socket.create_connection(server.address, timeout=20) as sock:
        challenge = recv_exactly(sock, CHALLENGE_BYTES, 20)
        assert challenge[:8] == b"FLAGAUTH" and len(challenge) == 42
        sock.sendall(respond(WRONG, challenge)[0])
        assert _closed_without_answer(sock)
    # the real worker 0 records its handshake; replaying its response later fails,
    # because every connection gets a fresh challenge
    recorded = []
    real = Peer(server, 0)
    assert real.answer.kind == Kind.WELCOME and real.worker == 0
    with socket.create_connection(server.address, timeout=20) as spy:
        ch = recv_exactly(spy, CHALLENGE_BYTES, 20)
        recorded.append(respond(SECRET, ch)[0])
    with _stranger(server, recorded[0]) as sock:
        assert _closed_without_answer(sock)
    # a restarted worker 0 (it knows the secret) gets its slot back; the old
    # connection is closed
    again = Peer(server, 0)
    assert again.answer.kind == Kind.WELCOME and again.worker == 0
    assert _closed_without_answer(real.sock)
    other = Peer(server, 1)
    assert other.worker == 1
    for t in (1, 2):
        for p in (again, other):
            p.params(t)
            p.send(t, np.zeros(server.n, np.float32))
    thread.join(60)
    assert not thread.is_alive()
    record = out["record"]
    assert [r["received"] for r in record["rounds"]] == [2, 2]
    assert record["info"][0]["host"] == "test"
    assert any(e["event"] == "replaced" for e in record["events"])


def test_a_fake_server_is_detected_by_the_worker():
    """Whatever an outsider writes into an address: no proof, no gradient."""
    lsock = socket.create_server(("127.0.0.1", 0))
    got = []

    def fake():
        conn, _ = lsock.accept()
        with conn:
            conn.sendall(b"FLAGAUTH" + PROTOCOL_VERSION.to_bytes(2, "little") + os.urandom(32))
            got.append(recv_exactly(conn, RESPONSE_BYTES, 20))
            conn.sendall(os.urandom(PROOF_BYTES))  # it cannot compute the proof
            conn.settimeout(20)
            got.append(conn.recv(1 << 16))

    th = threading.Thread(target=fake, daemon=True)
    th.start()
    lines = []
    status = distributed.run_worker(_spec(workers=2, connect_timeout=20), 0,
                                    lsock.getsockname(), secret=SECRET, log=lines.append)
    th.join(30)
    lsock.close()
    assert status == 2
    assert "did not prove that it knows the run's secret" in lines[-1]
    assert got[1] == b""  # not even a HELLO (fingerprint, pid) reached the fake server


def _self_signed(folder, name):
    """(certificate, key) PEM files of a fresh self-signed certificate, by the openssl tool."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: cannot make a test certificate")
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def test_tls_trains_refuses_plain_tcp_and_workers_check_the_certificate(tmp_path):
    from flagagg.distributed._node import _tls_context

    cert, key = _self_signed(tmp_path, "server")
    other, _ = _self_signed(tmp_path, "impostor")
    plain = []

    def plain_client(server, stop):
        # a client without TLS: what it sends is not a TLS hello, and it never sees
        # the challenge in clear
        with socket.create_connection(server.address, timeout=20) as sock:
            sock.sendall(bytes(RESPONSE_BYTES))
            plain.append(_closed_without_answer(sock))

    spec = _spec(workers=2, rounds=3, round_timeout=20, quorum=2, connect_timeout=90)
    record, server = _in_threads(spec, attack=plain_client, tls=_tls_context(0, cert, key),
                                 worker_options={"tls": _tls_context(1, cert, None)})
    assert record["status"] == 0, server.lines
    assert [r["received"] for r in record["rounds"]] == [2, 2, 2]
    assert plain == [True]
    assert any("TLS handshake failed" in x for x in server.lines), server.lines

    # a worker that trusts another certificate does not talk to this server
    server = distributed.Server(_spec(workers=2, rounds=1, connect_timeout=2), secret=SECRET,
                                tls=_tls_context(0, cert, key), log=lambda text: None)
    thread, out = _serve(server)
    lines = []
    status = distributed.run_worker(_spec(workers=2, connect_timeout=10), 0, server.address,
                                    secret=SECRET, log=lines.append,
                                    tls=_tls_context(1, other, None))
    thread.join(60)
    assert status == 1 and "certificate verify failed" in lines[-1], lines
    assert not server.info  # no HELLO reached the server


def test_a_multi_node_process_refuses_to_start_without_a_secret(monkeypatch, capsys):
    from flagagg.distributed._node import run_node

    for k, v in {"RANK": "0", "WORLD_SIZE": "5", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("FLAGAGG_SECRET", "FLAGAGG_SECRET_FILE", "FLAGAGG_SERVER_ADDR", "LOCAL_RANK",
              "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    threads = torch.get_num_threads()
    try:
        assert run_node(_spec()) == 2
        assert "no secret for this run" in capsys.readouterr().out
        monkeypatch.setenv("FLAGAGG_SECRET", "short")
        assert run_node(_spec()) == 2
        assert "fewer than 16" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="fewer than 16"):
        distributed.Server(_spec(), secret=b"short")


# --------------------------------------------------------------------------
# messages


def test_replayed_and_tampered_frames_cost_their_sender_its_connection():
    spec = _spec(workers=4, rounds=3, round_timeout=20)
    server = distributed.Server(spec, secret=SECRET)
    thread, out = _serve(server)
    n = server.n
    peers = [Peer(server, w) for w in range(4)]
    ok = np.full(n, 1e-3, np.float32)
    for p in peers:
        p.params(1)
    # round 1: everyone sends; worker 0's frame is recorded on the way
    frame0 = peers[0].frame(encode_tensor(Kind.GRAD, ok, worker=0, round=1, seconds=0.001))
    peers[0].sock.sendall(frame0)
    for p in peers[1:]:
        p.send(1, ok)
    for p in peers:
        p.params(2)
    # round 2: worker 0 replays its round-1 frame (same connection); worker 1's
    # frame is replayed on another authenticated connection; worker 2 changes
    # one byte of its payload; worker 3 changes the round in its header
    peers[0].sock.sendall(frame0)
    frame1 = peers[1].frame(encode_tensor(Kind.GRAD, ok, worker=1, round=2, seconds=0.001))
    peers[1].sock.sendall(frame1)
    frame2 = bytearray(peers[2].frame(encode_tensor(Kind.GRAD, ok, worker=2, round=2)))
    frame2[HEADER.size + 5] ^= 1
    peers[2].sock.sendall(frame2)
    frame3 = bytearray(peers[3].frame(encode_tensor(Kind.GRAD, ok, worker=3, round=2)))
    frame3[12] ^= 3  # the low byte of the round field
    peers[3].sock.sendall(frame3)
    for w in (0, 2, 3):
        assert _closed_without_answer(peers[w].sock)
    # worker 1's frame, sent again on a new connection of worker 1 (which
    # replaces the old one)
    stolen = Peer(server, 1)
    assert stolen.worker == 1
    peers[1].sock.settimeout(20)
    while peers[1].sock.recv(1 << 20):  # round 3's parameters, then the end
        pass
    stolen.sock.sendall(frame1)
    assert _closed_without_answer(stolen.sock)
    thread.join(60)
    assert not thread.is_alive()
    record = out["record"]
    status = {(r["round"], r["worker"]): (r["status"], r["reason"]) for r in record["workers"]}
    assert all(status[1, w] == ("ok", "") for w in range(4))
    for w in (0, 2, 3):
        assert status[2, w][0] == "missing"
        assert "wrong tag" in status[2, w][1], status[2, w]
    # none of the changed or replayed frames reached the rule
    assert record["rounds"][1]["received"] == 1 and status[2, 1] == ("ok", "")
    assert record["rounds"][2]["received"] == 0


def test_garbage_and_oversized_headers_before_and_after_authentication():
    spec = _spec(workers=2, rounds=1, round_timeout=20)
    server = distributed.Server(spec, secret=SECRET)
    thread, out = _serve(server)
    big = HEADER.pack(b"FLAG", Kind.GRAD, 1, PROTOCOL_VERSION, 0, 1, 10**12, 0.0)
    before = server.bytes_received
    # before authentication: 4 MB of garbage, and an oversized header; the server
    # reads the response's 74 bytes of each and not one more
    for data in (os.urandom(1 << 22), big + bytes(RESPONSE_BYTES)):
        with socket.create_connection(server.address, timeout=20) as sock:
            recv_exactly(sock, CHALLENGE_BYTES, 20)
            with pytest.raises(OSError):  # reset once the server has closed it
                for _ in range(64):
                    sock.sendall(data)
                    time.sleep(0.01)
    assert server.bytes_received - before <= 2 * RESPONSE_BYTES
    # after authentication: an oversized header is refused before its payload,
    # garbage closes the connection
    for data in (big, b"JUNK" + os.urandom(200)):
        p = Peer(server, 0)
        assert p.answer.kind == Kind.WELCOME
        start = server.bytes_received
        p.sock.sendall(data)
        assert _closed_without_answer(p.sock)
        assert server.bytes_received - start <= len(data)
    good = [Peer(server, w) for w in range(2)]
    for p in good:
        p.params(1)
        p.send(1, np.zeros(server.n, np.float32))
    thread.join(60)
    assert not thread.is_alive()
    assert out["record"]["rounds"][0]["received"] == 2


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
                # the server sends a challenge, then nothing; closed means shed
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


_EMFILE_SERVER = textwrap.dedent("""
    import json, os, resource, sys
    from flagagg import distributed, sim
    spec = distributed.make_spec(sim.load_config("demo"), rule="mean", attack="none", f=0,
                                 workers=2, rounds=4, eval_every=4, round_timeout=30,
                                 connect_timeout=60)
    server = distributed.Server(spec, secret=sys.argv[1].encode(), handshake_timeout=2.0,
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
                                        kwargs={"secret": SECRET, "log": text.append})
                       for w in range(2))
        for t in workers:
            t.start()

    try:
        status, output = watch([sys.executable, "-c", _EMFILE_SERVER, SECRET.decode()], None,
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
    server = distributed.Server(spec, secret=SECRET)
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
    with open(out / "rounds.csv", newline="") as fh:
        assert [int(r["round"]) for r in csv.DictReader(fh)] == \
            list(range(1, len(doc["rounds"]) + 1))
    assert (out / "checkpoint.pt").exists()
