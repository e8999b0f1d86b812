"""Many workers: the Flag Aggregator, Krum and the Gram kernel against float64 BLAS.

Quick tier: p = 256 at 32 MiB of float32 input, the Flag Aggregator's time and
the two ratios. Full tier: the p-sweep 15,
64, 256, 1024 at 256 MiB each. The ratios divide by ``G64 @ G64.T`` on a
float64 copy of the input (made in setup), measured in the same process.
``FLAGAGG_ASV_LARGE_P_BYTES`` overrides the size (the test suite's smoke run
lowers it).
"""

import os

import numpy as np

from .common import (
    QUICK,
    BackendBenchmark,
    backend_kernels,
    backends,
    build_rule,
    check_size,
    tiered,
)


def _n(p):
    target = int(os.environ.get("FLAGAGG_ASV_LARGE_P_BYTES", tiered(32 << 20, 256 << 20)))
    return max(1024, target // (4 * p))


class LargeP(BackendBenchmark):
    """Gram rules with hundreds of workers."""

    backend_axis = (("numpy", "numba", "torch:cuda", "cupy"), None)
    params = [backends(*backend_axis), tiered([256], [15, 64, 256, 1024])]
    param_names = ["backend", "p"]

    def setup(self, backend, p):
        n = _n(p)
        check_size(p, n)
        self.setup_device(backend, p, n)
        import flagagg

        self.fa = flagagg.flag_aggregate
        self.impl = backend_kernels(self.device.backend)
        self.krum = build_rule("krum")
        self.G64 = self.device.to(self.host.astype(np.float64))
        self.warm(self.flag, p)

    def flag(self, G):
        return self.fa(G, backend=self.device.backend)

    def time_flag(self, backend, p):
        self.flag(self.G)
        self.device.sync()

    if not QUICK:

        def time_krum(self, backend, p):
            self.krum(self.G, backend=self.device.backend)
            self.device.sync()

        def time_gram(self, backend, p):
            self.impl.gram(self.G)

    def dgemm(self):
        return self.G64 @ self.G64.T

    def track_ratio_flag_over_dgemm(self, backend, p):
        return self.ratio(self.dgemm, lambda: self.flag(self.G), repeats=3)

    track_ratio_flag_over_dgemm.unit = "ratio"

    def track_ratio_krum_over_dgemm(self, backend, p):
        return self.ratio(self.dgemm, lambda: self.krum(self.G, backend=self.device.backend),
                          repeats=3)

    track_ratio_krum_over_dgemm.unit = "ratio"
