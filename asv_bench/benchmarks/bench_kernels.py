"""The two kernels every Gram-space rule uses: the Gram matrix and the combination."""

import time

import numpy as np

from flagagg.backends import get_backend_impl

from .common import BackendBenchmark


class Kernels(BackendBenchmark):
    """``gram(G)`` (float64 accumulation) and ``combine(coef, G)`` on a float32 (p, n) stack."""

    params = BackendBenchmark.params + [[7, 15, 60], [100_000, 1_000_000, 10_000_000]]
    param_names = BackendBenchmark.param_names + ["p", "n"]

    def setup(self, backend, p, n):
        self.setup_device(backend, p, n)
        self.impl = get_backend_impl(self.device.backend)
        self.coef = np.linspace(-1.0, 1.0, p)
        self.warm(self.both, p)

    def both(self, G):
        self.impl.gram(G)
        self.impl.combine(self.coef, G)

    def time_gram(self, backend, p, n):
        self.impl.gram(self.G)  # returns a host matrix: the device is synchronised

    def time_combine(self, backend, p, n):
        self.impl.combine(self.coef, self.G)
        self.device.sync()

    def peakmem_combine(self, backend, p, n):
        self.impl.combine(self.coef, self.G)
        self.device.sync()


class GramVersusBlas(BackendBenchmark):
    """Speed-up of the Gram kernel over float32 BLAS ``G @ G.T``, and its accuracy."""

    params = [["numpy", "numba"], [15, 60], [1_000_000]]
    param_names = ["backend", "p", "n"]

    def setup(self, backend, p, n):
        self.setup_device(backend, p, n)
        self.impl = get_backend_impl(self.device.backend)
        self.warm(self.impl.gram, p)

    def track_speedup_over_blas(self, backend, p, n):
        G = self.G
        G @ G.T
        self.impl.gram(G)
        blas = min(_seconds(lambda: G @ G.T) for _ in range(3))
        kernel = min(_seconds(lambda: self.impl.gram(G)) for _ in range(3))
        return blas / kernel

    track_speedup_over_blas.unit = "x"

    def track_relative_error(self, backend, p, n):
        G = self.G
        G64 = G.astype(np.float64)
        K64 = G64 @ G64.T
        return float(np.abs(self.impl.gram(G) - K64).max() / np.abs(K64).max())

    track_relative_error.unit = "relative"


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
