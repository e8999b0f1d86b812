"""flagagg's numba threads do not fight torch's: the pool follows the process's thread budget."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")
pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import sys, numpy as np
if sys.argv[1] == "torch-first":
    import torch
    torch.set_num_threads(int(sys.argv[2]))
import flagagg, numba
flagagg.aggregate(np.ones((4, 3)), rule="flag", backend="numba")
print(numba.config.NUMBA_NUM_THREADS, numba.get_num_threads())
"""


def _probe(env, *args):
    full = dict(os.environ, PYTHONPATH=str(ROOT))
    for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        full.pop(k, None)
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env=full, capture_output=True,
                         text=True, timeout=120, check=True)
    return tuple(int(x) for x in out.stdout.split())


def test_pool_follows_omp_num_threads_as_torchrun_sets_it():
    assert _probe({"OMP_NUM_THREADS": "1"}, "numpy", "0") == (1, 1)


def test_pool_follows_torch_intra_op_threads():
    assert _probe({}, "torch-first", "1") == (1, 1)


def test_a_pool_size_the_user_set_is_kept():
    assert _probe({"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}, "numpy", "0")[0] == 2


def test_no_budget_no_change():
    n = _probe({}, "numpy", "0")[0]
    import numba

    assert n == numba.config.NUMBA_DEFAULT_NUM_THREADS


def _loops(env, n=4, steps=25, path="torch"):
    """Seconds per step of ``n`` concurrent training loops that aggregate every step."""
    full = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("OMP_WAIT_POLICY", "NUMBA_NUM_THREADS"):
        full.pop(k, None)
    full.update(env)
    script = str(ROOT / "asv_bench" / "threads.py")
    procs = [subprocess.Popen([sys.executable, script, "--child", "step", path, str(steps)],
                              env=full, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    times = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        times.append(float(out.split()[-1]))
    return sum(times) / n


@pytest.mark.parametrize("path", ["torch", pytest.param("numba", marks=pytest.mark.slow)])
def test_four_loops_on_shared_cores_run_like_hand_tamed_ones(path):
    """The gross form of the thread fight: 4 torchrun-like loops > 1.5x the tamed ones.

    Before flagagg sized numba's pool, they were 20x slower on 2 cores. The
    best of two interleaved rounds, so that other load cannot fail it.
    """
    tamed_env = {"OMP_WAIT_POLICY": "PASSIVE", "NUMBA_NUM_THREADS": "1"}
    ratios = []
    for _ in range(2):
        default = _loops({}, path=path)
        tamed = _loops(tamed_env, path=path)
        ratios.append(default / tamed)
        if ratios[-1] <= 1.5:
            break
    assert min(ratios) <= 1.5, ratios


@pytest.mark.slow  # 4 DDP ranks twice; the torch case above runs the same kernels on tensors
def test_four_ddp_ranks_with_the_flag_hook_run_like_hand_tamed_ones():
    """The gross form with DDP: 4 gloo ranks (flag hook, as documented) > 1.5x the tamed ones."""
    sys.path.insert(0, str(ROOT / "asv_bench"))
    import threads as bench

    tamed_env = {"OMP_WAIT_POLICY": "PASSIVE", "NUMBA_NUM_THREADS": "1"}
    ratios = []
    for _ in range(2):
        default = bench._spawn_ddp(25, 4, {})
        tamed = bench._spawn_ddp(25, 4, tamed_env)
        ratios.append(default / tamed)
        if ratios[-1] <= 1.5:
            break
    assert min(ratios) <= 1.5, ratios
