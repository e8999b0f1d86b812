"""The cost of a robustness grid: MNIST-1D, the paper's 1-D CNN, p = 15, f = 3.

``track_grid_cpu_seconds`` is the CPU time of a whole grid (2 rules x 3
seeds, A Little Is Enough) in a fresh process on one thread: interpreter,
imports, data and every round, as ``flagagg experiment`` pays it. It uses
only ``flagagg.sim.run_experiment``, so ``make asv-compare`` measures it on
older commits too (the before/after of issue 26). ``data`` says whether the
data set cache starts empty (``cold``: the first process of a grid on a
machine) or filled (``warm``: every other one); a commit without the cache
generates the data either way.

``track_ratio_gradients_vmap_over_engine`` times one round's per-worker
gradients through ``torch.func.vmap`` against the hand-written engine
(skipped on commits without it).

``track_ratio_grid_alone_over_lockstep`` is the same grid's CPU seconds
with every run alone (``lockstep=1``, the default) over lockstep groups
(``lockstep=3``: the seeds of a cell stepped together through the engine), in fresh
processes, interleaved pairs, median of the ratios (skipped on commits
without lockstep). Both run on one PyTorch and one BLAS thread.

``track_ratio_grid_original_over_now`` is issue 26's target in one number:
the same grid's CPU seconds with the simulator of commit 0da2843 (before
the data cache and the gradient engine; taken with ``git archive`` from the
repository the benchmarks live in) over the measured commit's, in fresh
processes, interleaved pairs with alternating order, median of the pairs'
ratios (the build machine is shared, so only a ratio measured in one run
means anything). The original generates its data in every process (it had
no cache); the measured commit reads them from a filled cache, as every
process of a grid but the first does.
``track_ratio_cli_grid_original_over_now`` is the same ratio with the grid
run as a user runs it, ``flagagg experiment grid.toml`` (a fresh output
folder, no plots), the command line's whole process included.
"""

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap

from ._data import paired_ratio
from .common import RATIO_REPEATS, tiered


def _grid_config(rounds):
    """The grid every benchmark here runs: 2 rules x 3 seeds, ALIE, p = 15, f = 3."""
    return {"experiment": {"name": "bench", "rounds": rounds, "seeds": [0, 1, 2],
                           "eval_every": min(100, rounds)},
            "data": {"dataset": "mnist1d", "n_samples": 5000},
            "cluster": {"workers": 15, "f": 3},
            "model": {"model": "cnn1d", "channels": [25, 25, 25]},
            "optimizer": {"lr": 0.05},
            "rules": {"mean": {}, "flag": {}}, "attacks": {"little_is_enough": {}}}


def _grid_code(rounds, extra=""):
    """A process's code that runs the grid through ``run_experiment`` (``extra``: its keywords)."""
    return textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from flagagg import sim
        kw = {{"store": False}} if "store" in sim.run_experiment.__code__.co_varnames else {{}}
        kw.update({{{extra}}})
        sim.run_experiment({_grid_config(rounds)!r}, plots=False, progress=False, **kw)
    """)


def _grid_toml(rounds):
    """The grid as a config file for ``flagagg experiment`` (sections of scalars and lists)."""
    lines = []
    for section, body in _grid_config(rounds).items():
        if section in ("rules", "attacks"):
            for name, params in body.items():
                lines += [f"[{section}.{name}]"] + [f"{k} = {json.dumps(v)}"
                                                    for k, v in params.items()]
        else:
            lines += [f"[{section}]"] + [f"{k} = {json.dumps(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def _child_cpu_seconds(argv, env, cwd):
    """CPU seconds (user + system) of a child process running ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, env=env, check=True, cwd=cwd, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


ORIGINAL = "0da2843"  # the commit issue 26's "3 times less CPU" is measured against


def _grid_cpu_seconds(code, env):
    """CPU seconds (user + system) of a fresh Python process running ``code``.

    It runs in an empty folder: ``python -c`` puts its working folder first on
    the path, ahead of ``PYTHONPATH``, and from a checkout that would import
    the checkout's ``flagagg`` whatever ``env`` names.
    """
    with tempfile.TemporaryDirectory() as empty:
        return _child_cpu_seconds([sys.executable, "-c", code], env, empty)


def _needs_mnist1d():
    try:
        import mnist1d  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise NotImplementedError(f"needs the sim extra: {exc}") from None


class MNIST1DGrid:
    """CPU seconds of a 6-run grid in a fresh process, data included."""

    params = [tiered([200], [200, 1000]), ["cold", "warm"]]
    param_names = ["rounds", "data"]
    timeout = 1800
    number = 1
    repeat = 1

    def setup(self, rounds, data):
        _needs_mnist1d()
        self.cache = tempfile.TemporaryDirectory()
        self.env = dict(os.environ, FLAGAGG_CACHE_DIR=self.cache.name)
        if data == "warm":
            _fill_cache(self.env)

    def teardown(self, rounds, data):
        self.cache.cleanup()

    def track_grid_cpu_seconds(self, rounds, data):
        code = _grid_code(rounds)
        return _grid_cpu_seconds(code, self.env)

    track_grid_cpu_seconds.unit = "seconds"


def _fill_cache(env):
    """Generate the grid's data set once into the cache of ``env``, outside the timed runs."""
    subprocess.run([sys.executable, "-c", "from flagagg import sim; "
                    "sim.load_dataset('mnist1d', n_samples=5000)"], env=env, check=True)


def _cpu_ratio(first, second, pairs=3):
    """Median of ``first() / second()`` (CPU seconds each returns) over interleaved pairs.

    The order within a pair alternates, so that a change of load hits both alike.
    """
    ratios = []
    for k in range(pairs):
        if k % 2:
            b = second()
            a = first()
        else:
            a = first()
            b = second()
        ratios.append(a / b)
    return statistics.median(ratios)


class _WithOriginal:
    """Set-up of the comparisons with commit 0da2843: its package, and a filled cache."""

    params = [tiered([200], [200, 1000])]
    param_names = ["rounds"]
    timeout = 3600
    number = 1
    repeat = 1

    def setup(self, rounds):
        _needs_mnist1d()
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        git = shutil.which("git")
        if git is None or not os.path.exists(os.path.join(root, ".git")):
            raise NotImplementedError("needs git and the repository to take the original from")
        self.tmp = tempfile.TemporaryDirectory()
        self.original = os.path.join(self.tmp.name, "original")
        os.makedirs(self.original)
        archive = subprocess.run([git, "-C", root, "archive", ORIGINAL, "flagagg"],
                                 capture_output=True)
        if archive.returncode:
            self.tmp.cleanup()
            raise NotImplementedError(f"commit {ORIGINAL} is not in {root}")
        subprocess.run(["tar", "-x", "-C", self.original], input=archive.stdout, check=True)
        cache = os.path.join(self.tmp.name, "cache")
        self.env_now = dict(os.environ, FLAGAGG_CACHE_DIR=cache)
        # the original's package first on the path, ahead of the measured one
        path = os.pathsep.join(p for p in (self.original, os.environ.get("PYTHONPATH")) if p)
        self.env_original = dict(self.env_now, PYTHONPATH=path)
        # a comparison of the measured commit with itself would pass for a result
        where = subprocess.run([sys.executable, "-c", "import flagagg; print(flagagg.__file__)"],
                               env=self.env_original, cwd=self.tmp.name, capture_output=True,
                               text=True, check=True).stdout.strip()
        if not where.startswith(self.original):
            self.tmp.cleanup()
            raise RuntimeError(f"the original's processes import {where}, not {ORIGINAL}")
        _fill_cache(self.env_now)

    def teardown(self, rounds):
        self.tmp.cleanup()


class MNIST1DGridVsOriginal(_WithOriginal):
    """The 6-run grid's CPU seconds at commit 0da2843 over the measured commit's."""

    def track_ratio_grid_original_over_now(self, rounds):
        code = _grid_code(rounds)
        return _cpu_ratio(lambda: _grid_cpu_seconds(code, self.env_original),
                          lambda: _grid_cpu_seconds(code, self.env_now))

    track_ratio_grid_original_over_now.unit = "ratio"


def _cli_grid_cpu_seconds(rounds, env):
    """CPU seconds of ``python -m flagagg experiment`` on the grid, as a user runs it.

    A fresh output folder each time (nothing stored before: every run runs),
    no plots, no progress bar; in an empty folder, as :func:`_grid_cpu_seconds`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "grid.toml")
        with open(cfg, "w") as fh:
            fh.write(_grid_toml(rounds))
        return _child_cpu_seconds([sys.executable, "-m", "flagagg", "experiment", cfg,
                                   "--output", os.path.join(tmp, "out"), "--no-plots",
                                   "--quiet"], env, tmp)


class MNIST1DCliGridVsOriginal(_WithOriginal):
    """The same grid run by ``flagagg experiment`` at 0da2843 and now, CPU seconds' ratio.

    What a user pays: the command line's whole process, its start and its end
    included (since this change the command skips the garbage collector's
    shutdown passes over PyTorch's objects; ``run_experiment`` in a process of
    the user's own, the benchmark above, does not).
    """

    def track_ratio_cli_grid_original_over_now(self, rounds):
        return _cpu_ratio(lambda: _cli_grid_cpu_seconds(rounds, self.env_original),
                          lambda: _cli_grid_cpu_seconds(rounds, self.env_now))

    track_ratio_cli_grid_original_over_now.unit = "ratio"


class MNIST1DGridLockstep:
    """The 6-run grid's CPU seconds with runs alone over runs in lockstep groups."""

    params = [tiered([200], [200, 1000])]
    param_names = ["rounds"]
    timeout = 1800
    number = 1
    repeat = 1

    def setup(self, rounds):
        _needs_mnist1d()
        from flagagg import sim

        if "lockstep" not in sim.run_experiment.__code__.co_varnames:
            raise NotImplementedError("this commit has no lockstep runs")
        self.cache = tempfile.TemporaryDirectory()
        self.env = dict(os.environ, FLAGAGG_CACHE_DIR=self.cache.name)
        _fill_cache(self.env)

    def teardown(self, rounds):
        self.cache.cleanup()

    def track_ratio_grid_alone_over_lockstep(self, rounds):
        def grid(extra):
            code = _grid_code(rounds, extra)
            return lambda: _grid_cpu_seconds(code, self.env)

        return _cpu_ratio(grid('"lockstep": 1'), grid('"lockstep": 3'))

    track_ratio_grid_alone_over_lockstep.unit = "ratio"


class MNIST1DGradients:
    """One round's 15 per-worker gradients of the 1-D CNN: vmap over the engine."""

    def setup(self):
        _needs_mnist1d()
        import torch

        from flagagg import sim
        from flagagg.training import _replica

        try:
            from flagagg.training import _grads  # noqa: F401
        except ImportError:
            raise NotImplementedError("this commit has no gradient engine") from None
        torch.set_num_threads(1)
        ds = sim.load_dataset("mnist1d", n_samples=5000)
        self.rep = _replica.Replica(ds, workers=15, f=0, seed=0, model="cnn1d",
                                    model_params={"channels": (25, 25, 25)})
        self.flat = self.rep.initial_parameters()
        idx = torch.from_numpy(self.rep.draw_batches(32))
        self.xb, self.yb = self.rep.X_train[idx], self.rep.y_train[idx]

    def track_ratio_gradients_vmap_over_engine(self):
        rep = self.rep
        return paired_ratio(
            lambda: rep._per_worker(self.flat, self.xb, self.yb, rep.shapes),
            lambda: rep._per_worker_vmap(self.flat, self.xb, self.yb, rep.shapes),
            RATIO_REPEATS * 3,
        ).ratio

    track_ratio_gradients_vmap_over_engine.unit = "ratio"
