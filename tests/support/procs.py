"""Helpers for tests that start whole runs as subprocesses and act on what they print."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time

import pytest

__all__ = ["note_pid", "watch"]


def watch(cmd, cwd, on_line, timeout):
    """Run ``cmd``, calling ``on_line(line, proc)`` for each line it prints; (status, text).

    The command runs in its own session, so that whatever happens (a test
    that fails half-way, a run that overstays ``timeout`` seconds) the whole
    process tree is killed before this returns.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=cwd)
    lines = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)  # end of output

    threading.Thread(target=read, daemon=True).start()
    text, end = [], time.monotonic() + timeout
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                pytest.fail("the run did not finish in time:\n" + "".join(text))
            if line is None:
                break
            text.append(line)
            on_line(line, proc)
        status = proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return status, "".join(text)


def note_pid(line, pids):
    """Record the pid a ``flagagg train`` line names: ``pids[worker]`` or ``pids["server"]``."""
    if "connected (rank" in line:
        pids[int(line.split()[1])] = int(line.split("pid ")[1].split(",")[0])
    elif line.startswith("server: ") and "waiting for" in line and "(pid " in line:
        pids["server"] = int(line.split("(pid ")[1].split(",")[0])
