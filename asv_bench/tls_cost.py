"""What TLS costs the parameter server: round times with TLS and in plaintext, and per message.

Run from a source checkout: ``python asv_bench/tls_cost.py`` (``--help`` for
the options). For each model (the demo's softmax regression and a 4096-unit
MLP on the same data) and number of workers, it trains short runs over the
tcp transport on loopback, one process for the server and one per worker,
alternating TLS and plaintext (TLS, plain, plain, TLS, ...), and reports the
median round time of each run (the round's wall time less its evaluation,
the first rounds left out as warm-up), the median per mode and the ratio.
It also times one message each way in one process: a frame sent over a
loopback TLS connection against the same over a plain one.

The plaintext mode exists for this measurement only: it is a private
argument of :class:`flagagg.distributed.Server` and
:func:`flagagg.distributed.run_worker` that refuses any address other than
loopback, and no command of the ``flagagg`` CLI sets it.
"""

from __future__ import annotations

import argparse
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
import json, sys, torch
torch.set_num_threads(1)
from flagagg import distributed, sim
from flagagg.distributed._settings import spec_from_dict
spec = spec_from_dict(json.loads(open(sys.argv[1]).read()))
tls = None if sys.argv[2] == "plain" else sys.argv[2]
server = distributed.Server(spec, tls=tls, log=lambda text: None,
                            _plaintext_benchmark=tls is None)
print(server.address[1], flush=True)
record = server.run()
rows = [(r["round"], r["round_s"], r["eval_s"], r["received"]) for r in record["rounds"]]
print(json.dumps({"status": record["status"], "rows": rows}), flush=True)
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


def round_time(model, workers, mode, *, rounds, warmup=5):
    """Median round time of one run (seconds, evaluation excluded); ``mode`` tls or plain."""
    from flagagg.distributed._settings import make_spec, spec_to_dict
    from flagagg.distributed._tls import file_of, issue

    spec = make_spec(_config(model), rule="mean", attack="none", f=0, workers=workers,
                     rounds=rounds, eval_every=rounds, round_timeout=30, connect_timeout=120)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)}
    with tempfile.TemporaryDirectory(prefix="flagagg-tls-cost-") as tmp:
        spec_file = Path(tmp, "spec.json")
        spec_file.write_text(json.dumps(spec_to_dict(spec)))
        if mode == "tls":
            issue(Path(tmp, "certs"), workers)
        pem = (lambda rank: str(file_of(Path(tmp, "certs"), rank))) if mode == "tls" \
            else (lambda rank: "plain")
        server = subprocess.Popen([sys.executable, "-c", _SERVER, str(spec_file), pem(0)],
                                  stdout=subprocess.PIPE, text=True, env=env)
        port = int(server.stdout.readline())
        procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(spec_file), str(w),
                                   str(port), pem(w + 1)], env=env)
                 for w in range(workers)]
        doc = json.loads(server.stdout.readline())
        server.wait(60)
        for p in procs:
            p.wait(60)
    if doc["status"] != 0:
        raise RuntimeError(f"the run exited with status {doc['status']}")
    return statistics.median(s - (e or 0) for t, s, e, _ in doc["rows"] if t > warmup)


def message_cost(n_params, repeats=30):
    """Microseconds TLS adds to one ``n_params``-value frame, sent and received on loopback."""
    import numpy as np

    from flagagg.distributed._protocol import Kind, encode_tensor, recv_frame, send_frame
    from flagagg.distributed._tls import client_context, file_of, issue, server_context

    parts = encode_tensor(Kind.GRAD, np.ones(n_params, np.float32))
    with tempfile.TemporaryDirectory() as tmp:
        issue(tmp, 1)
        sctx, cctx = server_context(file_of(tmp, 0)), client_context(file_of(tmp, 1))

        def timed(tls):
            lsock = socket.create_server(("127.0.0.1", 0))

            def serve():
                conn, _ = lsock.accept()
                if tls:
                    conn = sctx.wrap_socket(conn, server_side=True)
                for _ in range(repeats + 1):
                    recv_frame(conn, 8 * n_params, {Kind.GRAD}, 30)
                    conn.sendall(b"k")
                conn.close()

            th = threading.Thread(target=serve)
            th.start()
            sock = socket.create_connection(lsock.getsockname())
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls:
                sock = cctx.wrap_socket(sock)
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                send_frame(sock, parts)
                sock.recv(1)
                times.append(time.perf_counter() - t0)
            th.join()
            sock.close()
            lsock.close()
            return statistics.median(times[1:])

        plain = [timed(False) for _ in range(3)]
        tls = [timed(True) for _ in range(3)]
    return 1e6 * (statistics.median(tls) - statistics.median(plain)), 1e6 * statistics.median(
        plain)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", default="mlp4096:4:60,demo:4:60,mlp4096:15:30,demo:15:40",
                        help="MODEL:WORKERS:ROUNDS,... (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each mode per cell, interleaved (default: 2)")
    parser.add_argument("--out", default=None, help="CSV file for the runs")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    rows = []
    for n, name in ((650, "demo"), (307_210, "mlp4096")):
        extra, plain = message_cost(n)
        print(f"per message, {name} ({4 * n / 1e3:.0f} kB): TLS adds {extra:.0f} us to a "
              f"loopback send+receive of {plain:.0f} us", flush=True)
    for cell in args.cells.split(","):
        model, workers, rounds = cell.split(":")
        order = ["tls", "plain", "plain", "tls"] * ((args.repeats + 1) // 2)
        got = {"tls": [], "plain": []}
        for mode in order[:2 * args.repeats]:
            t = round_time(model, int(workers), mode, rounds=int(rounds))
            got[mode].append(t)
            rows.append({"model": model, "workers": workers, "rounds": rounds, "mode": mode,
                         "round_ms": round(1e3 * t, 2)})
            print(f"  {model} x{workers} {mode}: {1e3 * t:.1f} ms", flush=True)
        a, b = statistics.median(got["tls"]), statistics.median(got["plain"])
        print(f"{model}, {workers} workers: TLS {1e3 * a:.1f} ms, plaintext {1e3 * b:.1f} ms, "
              f"ratio {a / b:.3f}", flush=True)
    if args.out:
        with open(args.out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
