"""The two kernels every Gram-space rule uses: the Gram matrix and the combination."""

import numpy as np

from .common import BackendBenchmark, backend_kernels, backends, tiered


class Kernels(BackendBenchmark):
    """``gram(G)`` (float64 accumulation) and ``combine(coef, G)`` on a float32 (p, n) stack.

    ``track_ratio_gram_over_blas`` is the kernel's time over float32 BLAS
    ``G @ G.T`` on the same array (lower is better), ``track_relative_error``
    its error against float64 BLAS on a widened copy.
    """

    params = [backends(), tiered([15], [7, 15, 60]),
              tiered([1_000_000], [100_000, 1_000_000, 10_000_000])]
    param_names = ["backend", "p", "n"]

    def setup(self, backend, p, n):
        self.setup_device(backend, p, n)

        self.impl = backend_kernels(self.device.backend)
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

    def track_ratio_gram_over_blas(self, backend, p, n):
        G = self.G
        return self.ratio(lambda: G @ G.T, lambda: self.impl.gram(G))

    track_ratio_gram_over_blas.unit = "ratio"

    def track_relative_error(self, backend, p, n):
        G64 = self.host.astype(np.float64)
        K64 = G64 @ G64.T
        K = np.asarray(self.impl.gram(self.G), dtype=np.float64)
        return float(np.abs(K - K64).max() / np.abs(K64).max())

    track_relative_error.unit = "relative"
