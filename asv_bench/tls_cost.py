"""What TLS costs the parameter server: round times with TLS and in plaintext, and per message.

Run from a source checkout: ``python asv_bench/tls_cost.py`` (``--help`` for
the options). For each model (the demo's softmax regression and a 4096-unit
MLP on the same data) and number of workers, it trains short runs over the
tcp transport on loopback, one process for the server and one per worker,
alternating TLS and plaintext (TLS, plain, plain, TLS, ...). For each run it
reports the median round time (the round's wall time less its evaluation,
the first rounds left out as warm-up) and the CPU time the server and its
workers spent per round; for each cell, the medians per mode and the median
of the TLS/plaintext ratios of adjacent runs. On a shared machine the CPU
ratio is the steadier of the two: other people's load stretches wall times
far more than it changes the work done.

It also measures one message each way in one process, moved as a run moves
it: the server's side on an asyncio loop with the
:class:`~flagagg.distributed._protocol.FrameProtocol` it reads with after a
HELLO, the worker's side with a blocking socket, over TLS and in plaintext
alternately; it reports CPU and wall microseconds per round trip, and per MB.

``--floor`` adds what OpenSSL alone costs: one frame encrypted and
decrypted in memory (no sockets) with each TLS 1.3 AES suite, and the
round trip with the server's side on a thread and a blocking socket
instead of its event loop.

The plaintext mode exists for this measurement only: it is a private
argument of :class:`flagagg.distributed.Server` and
:func:`flagagg.distributed.run_worker` that refuses any address other than
loopback, and no command of the ``flagagg`` CLI sets it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_SERVER = """
import json, os, sys, time, torch
torch.set_num_threads(1)
from flagagg import distributed, sim
from flagagg.distributed._settings import spec_from_dict
spec = spec_from_dict(json.loads(open(sys.argv[1]).read()))
tls = None if sys.argv[2] == "plain" else sys.argv[2]
warmup = int(sys.argv[3])


def cpu():
    # seconds of CPU of the server and of its workers (their pids from their HELLOs)
    tick = os.sysconf("SC_CLK_TCK")
    theirs = 0.0
    for info in server.info.values():
        try:
            with open(f"/proc/{info['pid']}/stat") as fh:
                fields = fh.read().rpartition(")")[2].split()
            theirs += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return time.process_time(), theirs


class Meter:
    # a recorder that notes the CPU spent between the end of the warm-up and the end
    marks = {}

    def earlier(self, start_round):
        return {"rounds": [], "workers": [], "curve": [], "events": []}

    def write_round(self, row, wrows, events, point):
        # the last round evaluates the model: it is left out
        if row is not None and row["round"] in (warmup, spec.config.rounds - 1):
            self.marks[row["round"]] = cpu()

    def sync(self):
        pass


meter = Meter()
server = distributed.Server(spec, tls=tls, log=lambda text: None, recorder=meter,
                            _plaintext_benchmark=tls is None)
print(server.address[1], flush=True)
record = server.run()
rows = [(r["round"], r["round_s"], r["eval_s"], r["received"]) for r in record["rounds"]]
a, b = meter.marks.get(warmup), meter.marks.get(spec.config.rounds - 1)
used = None if a is None or b is None else [b[0] - a[0], b[1] - a[1]]
print(json.dumps({"status": record["status"], "rows": rows, "cpu": used}), flush=True)
"""

_WORKER = """
import json, sys, torch
torch.set_num_threads(1)
from flagagg import distributed
from flagagg.distributed._settings import spec_from_dict
spec = spec_from_dict(json.loads(open(sys.argv[1]).read()))
w, port = int(sys.argv[2]), int(sys.argv[3])
tls = None if sys.argv[4] == "plain" else sys.argv[4]
sys.exit(distributed.run_worker(spec, w, ("127.0.0.1", port), tls=tls, log=lambda t: None,
                                _plaintext_benchmark=tls is None))
"""


def _config(model):
    from flagagg.training._config import load_config

    config = load_config("demo")
    if model == "mlp4096":
        config = config.replace(model="mlp", hidden=4096)
    return config


def round_time(model, workers, mode, *, rounds, warmup=5, root=ROOT):
    """One run's median round time and CPU per round (seconds), ``mode`` tls or plain.

    The round time is the round's wall time less its evaluation, the first
    ``warmup`` rounds left out; the CPU is the server's and its workers'
    (user and system, from ``/proc``; None where there is none) over the
    rounds after the warm-up but the last (which evaluates), per round. ``root`` is
    the source tree whose ``flagagg`` the processes run.
    """
    from flagagg.distributed._settings import make_spec, spec_to_dict
    from flagagg.distributed._tls import file_of, issue

    spec = make_spec(_config(model), rule="mean", attack="none", f=0, workers=workers,
                     rounds=rounds, eval_every=rounds, round_timeout=30, connect_timeout=120)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        x for x in (str(root), os.environ.get("PYTHONPATH")) if x)}
    with tempfile.TemporaryDirectory(prefix="flagagg-tls-cost-") as tmp:
        spec_file = Path(tmp, "spec.json")
        spec_file.write_text(json.dumps(spec_to_dict(spec)))
        if mode == "tls":
            issue(Path(tmp, "certs"), workers)
        pem = (lambda rank: str(file_of(Path(tmp, "certs"), rank))) if mode == "tls" \
            else (lambda rank: "plain")
        # from the temporary folder: ``python -c`` puts its working folder first on the
        # path, and from a checkout that would import the checkout's flagagg, not root's
        server = subprocess.Popen([sys.executable, "-c", _SERVER, str(spec_file), pem(0),
                                   str(warmup)], stdout=subprocess.PIPE, text=True, env=env,
                                  cwd=tmp)
        port = int(server.stdout.readline())
        procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(spec_file), str(w),
                                   str(port), pem(w + 1)], env=env, cwd=tmp)
                 for w in range(workers)]
        doc = json.loads(server.stdout.readline())
        server.wait(60)
        for p in procs:
            p.wait(60)
    if doc["status"] != 0:
        raise RuntimeError(f"the run exited with status {doc['status']}")
    wall = statistics.median(s - (e or 0) for t, s, e, _ in doc["rows"] if t > warmup)
    cpu = None if doc["cpu"] is None else sum(doc["cpu"]) / (rounds - 1 - warmup)
    return wall, cpu


def _echo_times(n_params, tls, repeats, server="loop"):
    """Round trips of one ``n_params``-value frame each way, as the server and a worker move them.

    The server's side is its asyncio loop with :class:`FrameProtocol` (what it
    reads a connection with), or with ``server="thread"`` a thread on a
    blocking socket (what the event loop's share of the cost is measured
    against); the worker's a blocking socket with :func:`send_frame` and
    :func:`recv_frame`; ``tls`` is a (server, client) pair of contexts or
    None for plaintext.
    """
    import asyncio

    import numpy as np

    from flagagg.distributed._protocol import (
        FrameProtocol,
        Kind,
        encode_tensor,
    )

    parts = encode_tensor(Kind.GRAD, np.ones(n_params, np.float32))
    back = encode_tensor(Kind.PARAMS, np.ones(n_params, np.float32))
    if server == "thread":
        return _echo_times_blocking(n_params, tls, repeats, parts, back)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder = {}

    def serve():
        asyncio.set_event_loop(loop)

        def factory():
            link = FrameProtocol(8 * n_params, {Kind.GRAD},
                                 lambda frame: link.write(back[0], back[1]))
            return link

        holder["server"] = loop.run_until_complete(loop.create_server(
            factory, "127.0.0.1", 0, ssl=None if tls is None else tls[0]))
        ready.set()
        loop.run_forever()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    ready.wait(30)
    try:
        return _round_trips(holder["server"].sockets[0].getsockname()[:2], tls, parts,
                            n_params, repeats)
    finally:
        loop.call_soon_threadsafe(holder["server"].close)
        loop.call_soon_threadsafe(loop.stop)
        th.join(10)
        loop.close()


def _round_trips(address, tls, parts, n_params, repeats):
    """A worker's side: CPU seconds (this process, all threads) and median wall seconds of a
    round trip to the echo server at ``address``."""
    from flagagg.distributed._protocol import Kind, recv_frame, send_frame

    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        sock = tls[1].wrap_socket(sock)
    times = []
    with sock:
        for i in range(repeats + 2):
            if i == 2:  # the first two warm up
                c0 = time.process_time()
            t0 = time.perf_counter()
            send_frame(sock, parts)
            recv_frame(sock, 8 * n_params, {Kind.PARAMS}, 30)
            times.append(time.perf_counter() - t0)
    return (time.process_time() - c0) / repeats, statistics.median(times[2:])


def _echo_times_blocking(n_params, tls, repeats, parts, back):
    """:func:`_echo_times` with the server's side on a thread and a blocking socket."""
    from flagagg.distributed._protocol import Kind, recv_frame, send_frame

    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            conn = tls[0].wrap_socket(conn, server_side=True)
        with conn, contextlib.suppress(OSError):  # ends when the client closes
            while True:
                recv_frame(conn, 8 * n_params, {Kind.GRAD}, 30)
                send_frame(conn, back)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        return _round_trips(listener.getsockname()[:2], tls, parts, n_params, repeats)
    finally:
        th.join(10)
        listener.close()


_RECORDS = """
import json, ssl, statistics, sys, time
from flagagg.distributed._tls import client_context, file_of, server_context
folder, n, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
server = server_context(file_of(folder, 0)).wrap_bio(s_in, s_out, server_side=True)
client = client_context(file_of(folder, 1)).wrap_bio(c_in, c_out)
for _ in range(10):  # the handshake, through the memory BIOs
    for end in (client, server):
        try:
            end.do_handshake()
        except ssl.SSLWantReadError:
            pass
    s_in.write(c_out.read())
    c_in.write(s_out.read())
data, out = bytes(n), bytearray(n)
enc, dec = [], []
for _ in range(repeats):
    t = time.perf_counter()
    client.write(data)
    wire = c_out.read()
    t1 = time.perf_counter()
    s_in.write(wire)
    got = 0
    while got < n:
        got += server.read(n - got, memoryview(out)[got:])
    enc.append(t1 - t)
    dec.append(time.perf_counter() - t1)
print(json.dumps([server.cipher()[0], statistics.median(enc), statistics.median(dec)]))
"""

# OpenSSL's configuration is the only way Python 3.11 has to choose a TLS 1.3 cipher suite
_AES128 = """openssl_conf = conf
[conf]
ssl_conf = ssl
[ssl]
system_default = tls
[tls]
Ciphersuites = TLS_AES_128_GCM_SHA256
"""


def record_cost(n_bytes=1_228_876, repeats=30):
    """Encrypting and decrypting ``n_bytes`` in memory (no sockets), per TLS 1.3 cipher suite.

    Each suite in a fresh process (the AES-128 one chosen through an
    OpenSSL configuration file); returns ``{suite: (encrypt_s, decrypt_s)}``,
    medians of ``repeats``.
    """
    from flagagg.distributed._tls import issue

    got = {}
    with tempfile.TemporaryDirectory() as tmp:
        issue(tmp, 1)
        conf = Path(tmp, "aes128.cnf")
        conf.write_text(_AES128)
        for extra in ({}, {"OPENSSL_CONF": str(conf)}):
            out = subprocess.run([sys.executable, "-c", _RECORDS, tmp, str(n_bytes),
                                  str(repeats)], capture_output=True, text=True, check=True,
                                 cwd=tmp,
                                 env={**os.environ, "PYTHONPATH": str(ROOT), **extra})
            suite, enc, dec = json.loads(out.stdout)
            got[suite] = (enc, dec)
    return got


def message_cost(n_params, repeats=30, rounds=4, server="loop"):
    """What TLS adds to moving one ``n_params``-value frame each way on loopback.

    Plaintext and TLS alternate (plain, TLS, TLS, plain, ...), ``rounds``
    times each, so that a load that comes and goes hits both alike;
    ``server`` is where the server's side runs (see :func:`_echo_times`).

    Returns
    -------
    cost : dict
        ``cpu_tls``, ``cpu_plain``: median CPU microseconds (both ends, all
        threads) of one round trip, a frame each way; ``wall_tls``,
        ``wall_plain``: median wall microseconds of one.
    """
    from flagagg.distributed._tls import client_context, file_of, issue, server_context

    with tempfile.TemporaryDirectory() as tmp:
        issue(tmp, 1)
        contexts = (server_context(file_of(tmp, 0)), client_context(file_of(tmp, 1)))
        got = {True: [], False: []}
        for i in range(2 * rounds):
            tls = (i % 4) in (1, 2)
            got[tls].append(_echo_times(n_params, contexts if tls else None, repeats,
                                        server))
    return {f"{what}_{mode}": 1e6 * statistics.median(x[k] for x in got[tls])
            for k, what in enumerate(("cpu", "wall")) for mode, tls in (("tls", True),
                                                                        ("plain", False))}


def _med(runs, k):
    return statistics.median(r[k] for r in runs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", default="mlp4096:4:60,demo:4:60,mlp4096:15:30,demo:15:40",
                        help="MODEL:WORKERS:ROUNDS,... (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each mode per cell, interleaved (default: 3)")
    parser.add_argument("--out", default=None, help="CSV file for the runs")
    parser.add_argument("--floor", action="store_true",
                        help="also what OpenSSL alone costs per frame (in memory, per cipher "
                             "suite) and the server's side on a thread instead of its loop")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    rows = []
    if args.floor:
        for suite, (enc, dec) in record_cost().items():
            print(f"in memory, {suite}: encrypting 1229 kB {1e3 * enc:.3f} ms, decrypting "
                  f"{1e3 * dec:.3f} ms", flush=True)
        c = message_cost(307_210, server="thread")
        print(f"per message, mlp4096, the server's side on a thread and a blocking socket: "
              f"CPU {c['cpu_tls']:.0f} us with TLS, {c['cpu_plain']:.0f} us plaintext",
              flush=True)
    for n, name in ((650, "demo"), (307_210, "mlp4096")):
        c = message_cost(n)
        mb = 2 * 4 * n / 1e6
        line = (f"per message, {name} ({4 * n / 1e3:.0f} kB each way), one round trip: CPU "
                f"{c['cpu_tls']:.0f} us with TLS, {c['cpu_plain']:.0f} us plaintext; wall "
                f"{c['wall_tls']:.0f} vs {c['wall_plain']:.0f} us")
        if mb >= 1:  # per MB only where the bytes, not the per-message work, dominate
            line += (f"; per MB moved: {c['cpu_tls'] / mb:.0f} vs {c['cpu_plain'] / mb:.0f} us "
                     f"of CPU, TLS adds {(c['cpu_tls'] - c['cpu_plain']) / mb:.0f} us")
        print(line, flush=True)
    for cell in args.cells.split(","):
        model, workers, rounds = cell.split(":")
        # TLS, plain, plain, TLS, ...: each pair is one ratio, a load that comes and
        # goes hits both of its runs alike
        got = {"tls": [], "plain": []}
        for i in range(2 * args.repeats):
            mode = ("tls", "plain")[(i % 2) ^ ((i // 2) % 2)]
            wall, cpu = round_time(model, int(workers), mode, rounds=int(rounds))
            got[mode].append((wall, cpu))
            rows.append({"model": model, "workers": workers, "rounds": rounds, "mode": mode,
                         "round_ms": round(1e3 * wall, 2),
                         "cpu_ms_per_round": None if cpu is None else round(1e3 * cpu, 2)})
            print(f"  {model} x{workers} {mode}: {1e3 * wall:.1f} ms a round"
                  + ("" if cpu is None else f", {1e3 * cpu:.1f} ms CPU a round"), flush=True)
        pairs = list(zip(got["tls"], got["plain"], strict=True))
        wall = statistics.median(a[0] / b[0] for a, b in pairs)
        line = (f"{model}, {workers} workers: round time TLS {1e3 * _med(got['tls'], 0):.1f} ms,"
                f" plaintext {1e3 * _med(got['plain'], 0):.1f} ms; ratio {wall:.3f} (median of "
                f"{len(pairs)} pairs)")
        if all(a[1] is not None and b[1] is not None for a, b in pairs):
            cpu = statistics.median(a[1] / b[1] for a, b in pairs)
            line += (f"; CPU a round TLS {1e3 * _med(got['tls'], 1):.1f} ms, plaintext "
                     f"{1e3 * _med(got['plain'], 1):.1f} ms, ratio {cpu:.3f}")
        print(line, flush=True)
    if args.out:
        with open(args.out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
