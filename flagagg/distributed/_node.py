"""One process of a run: find the others through torch.distributed's store, then serve or work.

Every process reads its role from the environment that ``torchrun`` (or the
local launcher, which sets the same variables) provides: ``RANK`` 0 is the
parameter server, ranks 1..p are workers 0..p-1. They meet through a
``torch.distributed.TCPStore`` at ``MASTER_ADDR:MASTER_PORT``: the server
publishes its transport there (and, for ``tcp``, the address it listens on);
the workers read it and join (see :mod:`flagagg.distributed._collective` for
the gloo and NCCL transports).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import sys

__all__ = ["ROLE_VARIABLES", "in_launched_process", "run_node"]

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
    bind = "127.0.0.1" if _is_loopback(host) else "0.0.0.0"
    return host, bind, port


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
    import torch.distributed as dist

    # under torchrun's elastic agent the agent hosts the store and every rank is a client
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(master_addr, master_port, world, is_master=(rank == 0 and not agent),
                         timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)


def run_node(spec, *, output=None, checkpoint=None, checkpoint_every=0, resume=None,
             server_addr=None, threads=1, log=None):
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

    Returns
    -------
    status : int
        The process exit status.
    """
    import torch

    from ._server import Server
    from ._worker import run_worker

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
    store = _store(rank, world, master_addr, master_port, spec.connect_timeout)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key, prefix = f"flagagg/server/{restart}", f"flagagg/{restart}/"
    if rank == 0:
        transport = spec.transport_for(device)
        if transport == "tcp":
            host, bind, port = _server_address(server_addr, master_addr, local_world == world)
            server = Server(spec, listen=(bind, port), device=device, log=log,
                            checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                            resume=resume)
            where = f"listening on {host}:{server.address[1]}"
            published = {"transport": "tcp", "host": host, "port": server.address[1]}
        else:
            from ._collective import CollectiveServer

            server = CollectiveServer(spec, store, transport=transport, prefix=prefix,
                                      device=device, log=log, checkpoint=checkpoint,
                                      checkpoint_every=checkpoint_every, resume=resume)
            where = f"{transport} point-to-point, store {master_addr}:{master_port}"
            published = {"transport": transport}
        store.set(key, json.dumps(published))
        log(f"server: {where}, waiting for {spec.workers} workers (pid {os.getpid()}, device "
            f"{device}); round deadline {spec.round_timeout:g} s")
        if spec.f:
            log(f"server: Byzantine workers (drawn from the seed): {sorted(server.byzantine)}, "
                f"attack {spec.attack}")
        record = server.run()
        _report(spec, record, log)
        if output is not None:
            from ._results import write_results

            write_results(output, spec, record, server.lr)
        return record["status"]

    def wlog(text):
        print(text, file=sys.stderr, flush=True)

    try:
        published = json.loads(store.get(key).decode())
    except Exception as exc:  # noqa: BLE001 - the store raises several types on a timeout
        wlog(f"worker {rank - 1}: the server (rank 0) did not publish how to reach it within "
             f"{spec.connect_timeout:g} s ({exc})")
        return 1
    transport = published.get("transport")
    if spec.transport not in ("auto", transport):
        wlog(f"worker {rank - 1}: the server uses --transport {transport}, this worker was "
             f"started with --transport {spec.transport}: start every process with the same "
             "arguments")
        return 2
    if transport == "tcp":
        del store  # the worker needs it no more, and must not keep the rendezvous alive
        return run_worker(spec, rank - 1, (published["host"], int(published["port"])),
                          device=device, log=wlog)
    from ._collective import run_collective_worker

    # a worker left at auto follows the server, e.g. NCCL on a GPU server
    return run_collective_worker(spec, rank - 1, store, transport=transport, prefix=prefix,
                                 device=device, log=wlog)


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
        ruled = [r["round"] for r in mine if r["rule_excluded"]]
        if ruled:
            log(f"  worker {w} left out by the rule in {len(ruled)} rounds ({_ranges(ruled)})")
    skipped = [r["round"] for r in rounds if not r["stepped"]]
    if skipped:
        log(f"  no step in {len(skipped)} rounds ({_ranges(skipped)})")
