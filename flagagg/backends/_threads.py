"""How many threads flagagg's numba kernels use: no more than the process asked for.

Imported by :mod:`flagagg.backends._numba_kernels` before its first kernel
is compiled or loaded, so that :func:`size_pool` runs before numba starts
its thread pool.
"""

from __future__ import annotations

import os
import sys

import numba

__all__ = ["size_pool", "thread_cap"]


def thread_cap() -> int | None:
    """The most threads a process asked for, or None: ``OMP_NUM_THREADS``, torch's intra-op.

    torchrun sets ``OMP_NUM_THREADS=1`` for every rank it starts, and a user
    who calls ``torch.set_num_threads(n)`` has said how many cores the
    process may use; numba reads neither.
    """
    caps = []
    try:
        caps.append(int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0]))
    except ValueError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        caps.append(int(torch.get_num_threads()))
    caps = [c for c in caps if c >= 1]
    return min(caps) if caps else None


def size_pool() -> None:
    """Size numba's thread pool to the process's thread budget before it starts.

    numba starts ``NUMBA_NUM_THREADS`` (default: every core) threads at the
    first parallel kernel, whatever ``OMP_NUM_THREADS`` or torch say. With
    its OpenMP layer they are libgomp threads (torch's own libgomp when torch
    is loaded first) that spin-wait between regions: four torchrun ranks on
    two cores with two idle spinning threads each ran their training steps
    20x slower (see asv_bench/threads.py). Restricting the threads per call
    (``numba.set_num_threads``) does not stop the idle ones spinning; a pool
    of the right size does. A pool already started, or a
    ``NUMBA_NUM_THREADS`` the user set, is left alone.
    """
    from numba.np.ufunc import parallel

    cap = thread_cap()
    if (cap is None or "NUMBA_NUM_THREADS" in os.environ
            or getattr(parallel, "_is_initialized", True)):
        return
    n = max(1, min(cap, numba.config.NUMBA_NUM_THREADS))
    numba.config.NUMBA_NUM_THREADS = n
    parallel.NUM_THREADS = n
