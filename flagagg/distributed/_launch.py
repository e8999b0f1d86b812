"""Start a whole run on this machine: one server process and p worker processes.

The launcher gives each process the environment ``torchrun`` would
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
relays what they print, and, unlike ``torchrun``, does not tear the run down
when a worker dies: the server decides what a missing worker means. It makes
the run's own CA and one certificate per process
(:func:`flagagg.distributed.issue_certificates`) in a temporary folder only
this user can read (files 0600, removed at the end), and tells the
processes where (``FLAGAGG_CERTS``), with the server's loopback address
(``FLAGAGG_SERVER_ADDR``). When the server has
finished, workers get a few seconds to leave; any still running (hung,
stopped) is terminated and then killed, so no process outlives the launcher.
SIGTERM or SIGINT to the launcher asks the server to stop after its round
and write its results, then ends the workers the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import flagagg

from ._settings import spec_to_dict
from ._tls import issue

__all__ = ["free_port", "launch"]

# environment of an enclosing torchrun that must not leak into our processes
_TORCHRUN_VARIABLES = ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT",
                       "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE")


def free_port(host="127.0.0.1"):
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _relay(stream, prefix, out, lock, kept):
    for line in iter(stream.readline, ""):
        text = line.rstrip("\n")
        if prefix and not text.startswith(prefix.strip("[] ")):
            text = prefix + text
        with lock:
            if kept is None:
                print(text, file=out, flush=True)
            else:
                kept.append(text)
    stream.close()


def launch(spec, *, output=None, checkpoint=None, checkpoint_every=0, resume=None, threads=1,
           grace=3.0, timeout=None, quiet=False, log=None):
    """Run a distributed training run as local processes and wait for it.

    Parameters
    ----------
    spec : RunSpec
        The run.
    output : str or path-like, optional
        Folder for the results.
    checkpoint, checkpoint_every, resume
        See :class:`flagagg.distributed.Server`.
    threads : int, default=1
        Torch threads per process.
    grace : float, default=3.0
        Seconds the workers get to exit after the server has finished before
        they are terminated.
    timeout : float, optional
        Seconds the whole run may take; then every process is stopped and
        TimeoutError raised. No limit by default (the server itself never
        waits on a worker past a round's deadline).
    quiet : bool, default=False
        Show what the processes print only if the server fails.
    log : callable, optional
        Where the launcher's own messages go; ``print`` by default.

    Returns
    -------
    status : int
        The server's exit status (0 when it trained all rounds).

    Raises
    ------
    TimeoutError
        If the run took longer than ``timeout``.
    """
    say = log or (lambda text: print(text, flush=True))
    out = sys.stdout
    with tempfile.TemporaryDirectory(prefix="flagagg-train-") as tmp:
        spec_file, env = _prepare(spec, tmp, output=output, checkpoint=checkpoint,
                                  checkpoint_every=checkpoint_every, resume=resume,
                                  threads=threads)
        procs, relays, lock = [], [], threading.Lock()
        kept = [] if quiet else None
        status = None
        main = threading.current_thread() is threading.main_thread()
        previous = {}
        if main:
            def interrupted(signum, _frame):
                raise _Interrupted(signum)

            previous = {s: signal.signal(s, interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for rank in range(spec.workers + 1):
                _start(rank, spec_file, env, procs, relays, (out, lock, kept))
            status = _wait(procs, timeout, grace, say)
        except _Interrupted as exc:
            # a second signal must not cut the clean stop short
            for s in previous:
                signal.signal(s, signal.SIG_IGN)
            status = _stop_cleanly(procs, exc.signum, max(grace, spec.round_timeout + 10.0), say)
        finally:
            _stop(procs)
            for s, handler in previous.items():
                signal.signal(s, handler)
            for th in relays:
                th.join(5.0)
            if kept is not None and status != 0:
                print("\n".join(kept), file=out, flush=True)
    return status


def _prepare(spec, tmp, *, output, checkpoint, checkpoint_every, resume, threads):
    """Write the run's file and certificates into ``tmp``; returns (run file, environment)."""
    root = str(Path(flagagg.__file__).resolve().parents[1])
    node = {"output": None if output is None else str(Path(output).resolve()),
            "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
            "checkpoint_every": int(checkpoint_every),
            "resume": None if resume is None else str(Path(resume).resolve()),
            "threads": int(threads)}
    spec_file = Path(tmp, "run.json")
    spec_file.write_text(json.dumps({"spec": spec_to_dict(spec), "node": node}),
                         encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if k not in _TORCHRUN_VARIABLES and k != "FLAGAGG_CERTS"}
    if spec.transport == "tcp":
        issue(Path(tmp, "certs"), spec.workers)
    p = spec.workers
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(p + 1), LOCAL_WORLD_SIZE=str(p + 1), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(x for x in (root, env.get("PYTHONPATH")) if x),
               FLAGAGG_CERTS=str(Path(tmp, "certs")),
               FLAGAGG_SERVER_ADDR=f"127.0.0.1:{free_port()}", FLAGAGG_LAUNCHED="1")
    return spec_file, env


def _start(rank, spec_file, env, procs, relays, relay_to):
    """Start the process of ``rank`` and a thread relaying its output (appended to the lists)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flagagg.distributed", str(spec_file)],
        env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1,
    )
    procs.append(proc)
    prefix = "" if rank == 0 else f"[worker {rank - 1}] "
    th = threading.Thread(target=_relay, args=(proc.stdout, prefix, *relay_to), daemon=True)
    th.start()
    relays.append(th)


def _wait(procs, timeout, grace, say):
    """The server's exit status; the workers get ``grace`` seconds more to exit."""
    try:
        status = procs[0].wait(timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(
            f"the run did not finish within {timeout:g} s; all its processes were stopped"
        ) from None
    end = time.monotonic() + grace
    for rank, proc in enumerate(procs[1:], start=1):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, end - time.monotonic()))
        if proc.poll() is None:
            say(f"worker {rank - 1} (pid {proc.pid}) was still running {grace:g} s after "
                "the server finished; stopping it")
    return status


def _stop_cleanly(procs, signum, wait, say):
    """SIGTERM/SIGINT: the server finishes its round and writes its results (``wait`` s)."""
    name = signal.Signals(signum).name
    say(f"flagagg train: {name}: asking the server to finish its round and write its "
        "results, then stopping the workers")
    if procs and procs[0].poll() is None:
        with contextlib.suppress(OSError):
            procs[0].send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            procs[0].wait(wait)
    return 128 + signum


class _Interrupted(BaseException):
    """SIGTERM or SIGINT reached the launcher."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _stop(procs):
    """Terminate, then kill, every process still running; reap them all."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.terminate()
                if hasattr(signal, "SIGCONT"):
                    # a stopped process acts on SIGTERM only once it runs again
                    proc.send_signal(signal.SIGCONT)
    end = time.monotonic() + 3.0
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, end - time.monotonic()))
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
