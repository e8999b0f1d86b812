"""What every benchmark shares: the backend parameter, data, device synchronisation.

A benchmark class derives from :class:`BackendBenchmark`, whose first
parameter is the backend: "numpy", "numba", "torch:cpu", "torch:cuda" or
"cupy". ``setup`` raises NotImplementedError (asv's way to skip) when the
library or the device is missing, or when the input would exceed
``FLAGAGG_ASV_MAX_BYTES`` (default 1 GiB). Timed calls synchronise the GPU
before returning, and kernels are compiled in ``setup``.
"""

import importlib.util
import os

import numpy as np

BACKENDS = ["numpy", "numba", "torch:cpu", "torch:cuda", "cupy"]
MAX_BYTES = int(os.environ.get("FLAGAGG_ASV_MAX_BYTES", 1 << 30))


def make_stack(p, n, f=3, seed=0):
    """float32 (p, n): p - f rows around a common direction, f reversed rows."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(n, dtype=np.float32)
    G = np.empty((p, n), dtype=np.float32)
    for i in range(p):
        G[i] = base + np.float32(0.5) * rng.standard_normal(n, dtype=np.float32)
    G[p - f:] *= np.float32(-10.0)
    return G


class Device:
    """Moves NumPy data to a backend's library and device, and waits for the device."""

    def __init__(self, spec):
        self.spec = spec
        library, _, where = spec.partition(":")
        if importlib.util.find_spec(library) is None:
            raise NotImplementedError(f"{library} is not installed")
        self.backend = library
        self.sync = _no_sync
        if library == "numpy":
            self.to = np.ascontiguousarray
        elif library == "numba":
            self.to = np.ascontiguousarray
        elif library == "torch":
            import torch

            if where == "cuda" and not torch.cuda.is_available():
                raise NotImplementedError("no CUDA device")
            self.to = lambda a: torch.from_numpy(a).to(where)
            if where == "cuda":
                self.sync = torch.cuda.synchronize
        elif library == "cupy":
            import cupy

            try:
                if cupy.cuda.runtime.getDeviceCount() < 1:
                    raise NotImplementedError("no CUDA device")
            except cupy.cuda.runtime.CUDARuntimeError as exc:
                raise NotImplementedError("no CUDA device") from exc
            self.to = cupy.asarray
            self.sync = cupy.cuda.get_current_stream().synchronize
        else:
            raise ValueError(spec)


def _no_sync():
    pass


def check_size(p, n, itemsize=4):
    if p * n * itemsize > MAX_BYTES:
        raise NotImplementedError(f"({p}, {n}) is above the {MAX_BYTES / 2**20:,.0f} MiB cap")


class BackendBenchmark:
    """Base class: the first parameter is the backend; subclasses add theirs."""

    params = [BACKENDS]
    param_names = ["backend"]
    timeout = 600

    def setup_device(self, spec, p, n):
        check_size(p, n)
        self.device = Device(spec)
        self.G = self.device.to(make_stack(p, n))
        self.device.sync()

    def warm(self, fn, p):
        """Compile (or load from the cache) every kernel ``fn`` uses, serial and parallel."""
        small = self.device.to(make_stack(p, 300_000 // p + 1, seed=1))
        fn(small)
        self.device.sync()
