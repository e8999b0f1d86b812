"""One process of a run: find the others through torch.distributed's store, then serve or work.

Every process reads its role from the environment that ``torchrun`` (or the
local launcher, which sets the same variables) provides: ``RANK`` 0 is the
parameter server, ranks 1..p are workers 0..p-1. Over the ``tcp`` transport
(the default) the workers reach the server at ``FLAGAGG_SERVER_ADDR`` when it
names a port (the local launcher sets it), else at the address the server
publishes on a ``torch.distributed.TCPStore`` at ``MASTER_ADDR:MASTER_PORT``;
either way every connection is mutual TLS with the run's certificates
(``--certs`` or ``FLAGAGG_CERTS``, from ``flagagg certs``): a worker talks
only to the holder of the run's server certificate, so a store or an address
an outsider has changed leads nowhere. The gloo and
NCCL transports meet and talk through the store, which trusts everyone (see
:mod:`flagagg.distributed._collective`).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import sys
import threading

from ._collective import CollectiveServer, run_collective_worker
from ._results import RunLog, write_results
from ._server import Server
from ._tls import file_of
from ._worker import run_worker

__all__ = ["ROLE_VARIABLES", "cert_file", "in_launched_process", "run_node"]

ROLE_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def in_launched_process():
    """Whether this process was started by torchrun or a launcher (RANK and WORLD_SIZE set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env():
    missing = [v for v in ROLE_VARIABLES if not os.environ.get(v)]
    if missing:
        raise RuntimeError(
            f"environment variables {', '.join(missing)} are not set: start the processes with "
            "torchrun (or `flagagg train` without torchrun, which starts them itself)"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return rank, world, local_rank, local_world, os.environ["MASTER_ADDR"], \
        int(os.environ["MASTER_PORT"])


def _is_loopback(host):
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _server_address(server_addr, master_addr, all_local):
    """(host to advertise, host to bind, port) of the server's data connections."""
    spec = server_addr or os.environ.get("FLAGAGG_SERVER_ADDR") or ""
    host, _, port = spec.rpartition(":") if ":" in spec else (spec, "", "0")
    port = int(port or 0)
    if not host:
        if all_local or _is_loopback(master_addr):
            host = "127.0.0.1"
        else:
            # the address of the interface this node reaches the rendezvous through
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                probe.connect((master_addr, 9))
                host = probe.getsockname()[0]
            except OSError:
                host = socket.getfqdn()
            finally:
                probe.close()
            if _is_loopback(host):
                host = socket.getfqdn()
    # the configured address, not every interface
    bind = "127.0.0.1" if _is_loopback(host) else socket.gethostbyname(host)
    return host, bind, port


def cert_file(rank, certs=None):
    """The PEM file of a rank: ``certs`` (or ``FLAGAGG_CERTS``) / server.pem or worker-W.pem.

    Returns
    -------
    path : pathlib.Path or None
        None when no folder is given.

    Raises
    ------
    FileNotFoundError
        If the folder lacks this rank's file.
    """
    folder = certs or os.environ.get("FLAGAGG_CERTS")
    if not folder:
        return None
    path = file_of(folder, rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: this node needs the file of rank "
                                f"{rank} from `flagagg certs`")
    return path


_NO_CERTS = (
    "no certificates for this run: the tcp transport admits only processes holding a "
    "certificate of the run's own CA, one per process. Make them once with `flagagg certs "
    "--workers P --out run-certs`, copy server.pem to the server's node and worker-W.pem to "
    "the node of rank W+1 (each 0600, never the others'), and pass --certs run-certs on every "
    "node (or set FLAGAGG_CERTS); `flagagg train` without torchrun makes them itself"
)


def _direct_address(server_addr):
    """(host, port) from ``--server-addr`` or ``FLAGAGG_SERVER_ADDR`` when it names a port."""
    text = server_addr or os.environ.get("FLAGAGG_SERVER_ADDR") or ""
    host, _, port = text.rpartition(":")
    if host and port.isdigit() and int(port) > 0:
        return host, int(port)
    return None


def _device(choice, local_rank):
    import torch

    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but torch sees no CUDA device here")
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return "cpu"


def _store(rank, world, master_addr, master_port, timeout):
    """The run's TCPStore: hosted by rank 0 on ``MASTER_ADDR`` only, joined by the others.

    A TCPStore made by torch listens on every interface; rank 0 instead hands
    it a socket listening on the address the run was given (``MASTER_ADDR``,
    loopback on one machine), so that nothing of flagagg's is reachable from
    networks the run does not use.
    """
    import torch.distributed as dist

    # under torchrun's elastic agent the agent hosts the store and every rank is a client
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    master = rank == 0 and not agent
    listen = {}
    if master:
        sock = socket.create_server((master_addr, master_port), backlog=max(128, 2 * world))
        listen["master_listen_fd"] = sock.detach()  # the store owns the descriptor now
    return dist.TCPStore(master_addr, master_port, world, is_master=master,
                         timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False,
                         **listen)


def run_node(spec, *, output=None, checkpoint=None, checkpoint_every=0, resume=None,
             server_addr=None, threads=1, log=None, certs=None):
    """Run this process's part of a distributed run (server or worker).

    Parameters
    ----------
    spec : RunSpec
        The run; the same in every process.
    output : str or path-like, optional
        Folder the server writes results to.
    checkpoint, checkpoint_every, resume
        See :class:`flagagg.distributed.Server`.
    server_addr : str, optional
        ``HOST[:PORT]`` the server listens on and advertises; by default
        127.0.0.1 when all processes are on one machine, else the address of
        the interface that reaches ``MASTER_ADDR``, and a free port.
        ``FLAGAGG_SERVER_ADDR`` sets it too.
    threads : int, default=1
        Torch threads per process.
    log : callable, optional
        Where messages go; ``print`` (flushed) by default.
    certs : str or path-like, optional
        Folder holding this process's file from ``flagagg certs``
        (``server.pem`` on rank 0, ``worker-W.pem`` on rank W + 1); also
        ``FLAGAGG_CERTS``. The tcp transport needs it.

    Returns
    -------
    status : int
        The process exit status.
    """
    import torch

    if log is None:
        def log(text):
            print(text, flush=True)

    rank, world, local_rank, local_world, master_addr, master_port = _env()
    if world != spec.workers + 1:
        raise RuntimeError(
            f"WORLD_SIZE is {world}, but the config has workers = {spec.workers}: a run needs "
            f"workers + 1 = {spec.workers + 1} processes (rank 0 is the server); e.g. "
            f"`torchrun --nproc-per-node {spec.workers + 1} -m flagagg train ...`, or pass "
            f"--workers {world - 1}"
        )
    torch.set_num_threads(max(1, int(threads)))
    device = _device(spec.device, local_rank)
    tls = None
    if spec.transport == "tcp":
        try:
            tls = cert_file(rank, certs)
        except OSError as exc:
            log(f"rank {rank}: {exc}")
            return 2
        if tls is None:
            log(f"rank {rank}: {_NO_CERTS}")
            return 2
    direct = _direct_address(server_addr) if spec.transport == "tcp" else None
    store = None
    if direct is None:
        store = _store(rank, world, master_addr, master_port, spec.connect_timeout)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key, prefix = f"flagagg/server/{restart}", f"flagagg/{restart}/"
    if rank == 0:
        server, where, published = _start_server(
            spec, tls, store, prefix, device, log, server_addr=server_addr,
            master=(master_addr, master_port), all_local=local_world == world,
            checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume)
        if store is not None:
            store.set(key, json.dumps(published))
        return _serve(spec, server, where, device, log, output, resume)
    # with worker momentum, workers keep their momenta beside the checkpoint
    momenta = {"checkpoint": checkpoint, "checkpoint_every": checkpoint_every,
               "resume": resume}
    return _work(spec, rank - 1, tls, device, direct, store, key, prefix, momenta)


def _start_server(spec, tls, store, prefix, device, log, *, server_addr, master, all_local,
                  **options):
    """Rank 0's server; returns (server, how it is reached, what the store publishes)."""
    if spec.transport == "tcp":
        host, bind, port = _server_address(server_addr, master[0], all_local)
        server = Server(spec, tls=tls, listen=(bind, port), device=device, log=log, **options)
        return (server, f"mutual-TLS tcp, listening on {host}:{server.address[1]}",
                {"transport": "tcp", "host": host, "port": server.address[1]})
    server = CollectiveServer(spec, store, transport=spec.transport, prefix=prefix,
                              device=device, log=log, **options)
    log(f"server: WARNING: --transport {spec.transport} is for TRUSTED CLUSTERS ONLY: "
        f"anyone who can reach {master[0]}:{master[1]} can join, crash or stall "
        "this run; use --transport tcp (mutual TLS) otherwise")
    return (server, f"{spec.transport} point-to-point, store {master[0]}:{master[1]}",
            {"transport": spec.transport})


def _serve(spec, server, where, device, log, output, resume):
    """Run the server's rounds (SIGTERM/SIGINT: finish the round, then stop); write results."""
    recorder = None
    if output is not None:
        recorder = RunLog(output, spec, server.lr, resuming=resume is not None, log=log)
        server.recorder = recorder
    log(f"server: {where}, waiting for {spec.workers} workers (pid {os.getpid()}, device "
        f"{device}); round deadline {spec.round_timeout:g} s, quorum {server.quorum}, "
        f"never a step with fewer than {server.floor} gradients")
    if spec.f:
        log(f"server: Byzantine workers (drawn from the seed): {sorted(server.byzantine)}, "
            f"attack {spec.attack}")

    def stop(signum, _frame):
        # finish the round, then write the checkpoint and the results
        server.stop_requested = signal.Signals(signum).name

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} \
        if main else {}
    try:
        record = server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    _report(spec, record, log)
    if recorder is not None:
        recorder.close()
        write_results(output, spec, record, server.lr)
    return record["status"]


def _work(spec, worker, tls, device, direct, store, key, prefix, momenta):
    """Serve worker ``worker``: find the server (``direct`` or the store's ``key``), work."""
    def wlog(text):
        print(text, file=sys.stderr, flush=True)

    if os.environ.get("FLAGAGG_LAUNCHED") == "1" and \
            threading.current_thread() is threading.main_thread():
        # Ctrl-C reaches the whole process group; the launcher stops the workers
        # once the server has finished its round
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    if direct is not None:
        return run_worker(spec, worker, direct, tls=tls, device=device, log=wlog, **momenta)
    try:
        published = json.loads(store.get(key).decode())
    except Exception as exc:  # noqa: BLE001 - the store raises several types on a timeout
        wlog(f"worker {worker}: the server (rank 0) did not publish how to reach it within "
             f"{spec.connect_timeout:g} s ({exc})")
        return 1
    published = published if isinstance(published, dict) else {}
    if published.get("transport") != spec.transport:
        wlog(f"worker {worker}: the server uses --transport {published.get('transport')}, "
             f"this worker was started with --transport {spec.transport}: start every process "
             "with the same arguments")
        return 2
    if spec.transport == "tcp":
        del store  # the worker needs it no more, and must not keep the rendezvous alive
        # the address comes from an unauthenticated store: the TLS handshake proves
        # whether what answers there holds the run's server certificate
        try:
            address = (str(published["host"]), int(published["port"]))
        except (KeyError, TypeError, ValueError):
            wlog(f"worker {worker}: the store holds no usable server address")
            return 1
        return run_worker(spec, worker, address, tls=tls, device=device, log=wlog,
                          **momenta)
    return run_collective_worker(spec, worker, store, transport=spec.transport, prefix=prefix,
                                 device=device, log=wlog, **momenta)


def _ranges(rounds):
    """'3-5, 9' for [3, 4, 5, 9]."""
    out, start, prev = [], None, None
    for t in sorted(rounds) + [None]:
        if start is not None and (t is None or t != prev + 1):
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = None
        if t is not None and start is None:
            start = t
        prev = t
    return ", ".join(out)


def _report(spec, record, log):
    """Print the run's outcome: accuracy, and every worker that was missing or excluded."""
    rounds = record["rounds"]
    done = len(rounds)
    text = (f"done: {done} rounds in {record['seconds']:.1f} s, final test accuracy "
            f"{record['final_accuracy']:.3f}")
    if record["diverged_round"] is not None:
        text += f" (diverged at round {record['diverged_round']})"
    log(text)
    for w in range(spec.workers):
        mine = [r for r in record["workers"] if r["worker"] == w]
        for status in ("missing", "excluded"):
            hit = [r["round"] for r in mine if r["status"] == status]
            if hit:
                log(f"  worker {w} {status} in {len(hit)} of {done} rounds ({_ranges(hit)})")
        left = record.get("left_out_by_quorum", {}).get(w, 0)
        if left:
            log(f"  worker {w} left out by the quorum (answered after the round closed) in "
                f"{left} of {done} rounds")
        ruled = [r["round"] for r in mine if r["rule_excluded"]]
        if ruled:
            log(f"  worker {w} left out by the rule in {len(ruled)} rounds ({_ranges(ruled)})")
    skipped = [r["round"] for r in rounds if not r["stepped"]]
    if skipped:
        log(f"  no step in {len(skipped)} rounds ({_ranges(skipped)})")
