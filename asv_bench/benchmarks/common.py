"""What every benchmark shares: the tier, the backends present here, device synchronisation.

Tiers (the environment variable ``FLAGAGG_ASV_TIER``, read at import):

* ``quick`` (the default, ``make asv``): one shape per benchmark, the default
  CPU backend (numba when installed, else numpy) plus the GPU backends present,
  one round of few samples. Minutes.
* ``full`` (``make asv-full``): every CPU backend installed, large shapes and
  the p-sweep, asv's default sampling.

Backends whose library or device is missing get no parameter sets at all
(``asv_bench/plan.py`` prints one line per class saying which were left out
and why). The GPU probe runs in a subprocess so that the process asv forks
benchmarks from never initialises CUDA. ``setup`` still raises
NotImplementedError (asv's skip) when an input would exceed
``FLAGAGG_ASV_MAX_BYTES`` (default 1 GiB) or when the flagagg being measured
(an older commit) lacks what a benchmark needs. Timed calls synchronise the
GPU before returning, and kernels are compiled in ``setup``.
"""

import contextlib
import importlib.util
import os
import re
import sys

import numpy as np

from ._data import make_stack, paired_ratio

TIERS = ("quick", "full")
TIER = os.environ.get("FLAGAGG_ASV_TIER", "quick")
if TIER not in TIERS:
    raise ValueError(f"FLAGAGG_ASV_TIER={TIER!r}: use one of {', '.join(TIERS)}")
QUICK = TIER == "quick"

ALL_BACKENDS = ("numpy", "numba", "torch:cpu", "torch:cuda", "cupy")
# Interleaved pairs behind every track_ratio_* benchmark (median of per-pair ratios).
RATIO_REPEATS = 7
MAX_BYTES = int(os.environ.get("FLAGAGG_ASV_MAX_BYTES", 1 << 30))

GPU_SPECS = ("torch:cuda", "cupy")


def _nvidia_driver():
    """An NVIDIA driver is loaded (no CUDA call: the process asv forks from must not make one)."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def _torch_has_cuda():
    """The installed torch is a CUDA build, read from its version file without importing it."""
    spec = importlib.util.find_spec("torch")
    path = os.path.join(os.path.dirname(spec.origin), "version.py")
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return True  # unknown: setup's own check decides
    return not re.search(r"^cuda\b.*=\s*None\s*$", text, re.MULTILINE)


def _present():
    """Backend spec -> None when usable here, else the reason it is not.

    The GPU check here is cheap (driver loaded, CUDA build of torch); setup
    asks the library itself (Device) and skips when the device does not work.
    """
    found = {}
    for spec in ALL_BACKENDS:
        library, _, where = spec.partition(":")
        if importlib.util.find_spec(library) is None:
            found[spec] = f"{library} not installed"
        elif spec in GPU_SPECS and not _nvidia_driver():
            found[spec] = "no CUDA device"
        elif spec == "torch:cuda" and not _torch_has_cuda():
            found[spec] = "torch is a CPU build"
        else:
            found[spec] = None
    return found


PRESENT = _present()
DEFAULT_CPU = "numba" if PRESENT["numba"] is None else "numpy"


def backends(full=ALL_BACKENDS, quick=None):
    """The backend specs of this tier that are usable here.

    Parameters
    ----------
    full : sequence of str
        The specs the class measures in the full tier.
    quick : sequence of str, optional
        The specs of the quick tier; default: the default CPU backend and the
        GPU specs among ``full``.
    """
    if QUICK:
        wanted = quick if quick is not None else (
            [DEFAULT_CPU] + [s for s in full if s in GPU_SPECS])
    else:
        wanted = full
    return [s for s in wanted if PRESENT[s] is None]


def left_out(full=ALL_BACKENDS, quick=None):
    """``{spec: reason}`` for the specs of this tier that :func:`backends` dropped."""
    wanted = full if not QUICK else (
        quick if quick is not None else [DEFAULT_CPU] + [s for s in full if s in GPU_SPECS])
    return {s: PRESENT[s] for s in wanted if PRESENT[s] is not None}


def tiered(quick, full):
    """``quick`` in the quick tier, ``full`` in the full one."""
    return quick if QUICK else full


class Device:
    """Moves NumPy data to a backend's library and device, and waits for the device."""

    def __init__(self, spec):
        if PRESENT.get(spec) is not None:
            raise NotImplementedError(f"{spec}: {PRESENT[spec]}")
        self.spec = spec
        library, _, where = spec.partition(":")
        self.backend = library
        self.sync = _no_sync
        if library in ("numpy", "numba"):
            self.to = np.ascontiguousarray
            self.mean = lambda G: np.mean(G, axis=0)
        elif library == "torch":
            import torch

            if where == "cuda" and not torch.cuda.is_available():
                raise NotImplementedError("torch: no CUDA device")
            self.to = lambda a: torch.from_numpy(a).to(where)
            self.mean = lambda G: G.mean(0)
            if where == "cuda":
                self.sync = torch.cuda.synchronize
        elif library == "cupy":
            import cupy

            try:
                if cupy.cuda.runtime.getDeviceCount() < 1:
                    raise NotImplementedError("cupy: no CUDA device")
            except cupy.cuda.runtime.CUDARuntimeError as exc:
                raise NotImplementedError(f"cupy: {exc}") from exc
            self.to = cupy.asarray
            self.mean = lambda G: G.mean(0)
            self.sync = cupy.cuda.get_current_stream().synchronize
        else:
            raise ValueError(f"unknown backend spec {spec!r}: use one of {ALL_BACKENDS}")


@contextlib.contextmanager
def one_cpu_thread():
    """numba's parallel kernels and the BLAS limited to the calling thread, then restored."""
    saved = None
    if "numba" in sys.modules:
        import numba

        saved = numba.get_num_threads()
        numba.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(1)
    try:
        with limits:
            yield
    finally:
        if saved is not None:
            numba.set_num_threads(saved)


def _no_sync():
    pass


def check_size(p, n, itemsize=4):
    """Skip (asv's NotImplementedError) a ``(p, n)`` input above ``FLAGAGG_ASV_MAX_BYTES``."""
    if p * n * itemsize > MAX_BYTES:
        raise NotImplementedError(f"({p}, {n}) is above the {MAX_BYTES / 2**20:,.0f} MiB cap")


def needs(fn, *args, **kwargs):
    """Call ``fn``; an error (the measured commit lacks the API) becomes asv's skip."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise
    except Exception as exc:
        raise NotImplementedError(f"{type(exc).__name__}: {exc}"[:300]) from exc


def backend_kernels(name):
    """The kernel implementation of backend ``name`` in the measured commit.

    ``flagagg.backends._implementation`` was public as ``get_backend_impl``
    before issue 25; asv measures older commits too (asv-publish, asv-compare).
    """
    import flagagg.backends as backends

    load = getattr(backends, "_implementation", None) or backends.get_backend_impl
    return needs(load, name)


def build_rule(name, **params):
    """``flagagg.get_rule(name, f=3, ...)``; ``"nnm+krum"`` is krum after NNM.

    Rules that take no ``f`` (older commits: mean, flag) get none.
    """
    import flagagg

    if "+" in name:
        *pre, name = name.split("+")
        params = {**params, "pre": pre}

    def build():
        try:
            return flagagg.get_rule(name, f=3, **params)
        except TypeError:  # commits where mean / flag take no f
            return flagagg.get_rule(name, **params)

    return needs(build)


class BackendBenchmark:
    """Base class: the first parameter is the backend; subclasses add theirs."""

    backend_axis = (ALL_BACKENDS, None)  # (full tier, quick tier): see backends()
    params = [backends(*backend_axis)]
    param_names = ["backend"]
    timeout = 600
    if QUICK:
        # One round of 2-5 samples (at most ~2 s each): the quick tier is for
        # catching large changes, the ratio tracks carry the comparisons.
        rounds = 1
        repeat = (2, 5, 2.0)

    def setup_device(self, spec, p, n):
        check_size(p, n)
        self.device = Device(spec)
        self.host = make_stack(p, n)
        self.G = self.device.to(self.host)
        self.device.sync()

    def ratio(self, base, cand, repeats=None):
        """Median over interleaved pairs of ``time(cand) / time(base)``, device synchronised.

        On the CPU both sides run on one thread (numba and BLAS limited to
        the calling thread): a ratio of single-threaded times does not
        depend on the core count, and a busy machine slows both sides alike
        instead of stalling one side's parallel workers.
        """
        sync = self.device.sync

        def timed(fn):
            def call():
                fn()
                sync()
            return call

        with one_cpu_thread():
            return paired_ratio(timed(base), timed(cand), repeats or RATIO_REPEATS).ratio

    def warm(self, fn, p):
        """Compile (or load from the cache) every kernel ``fn`` uses, serial and parallel."""
        small = self.device.to(make_stack(p, 300_000 // p + 1, seed=1))
        needs(fn, small)
        self.device.sync()
