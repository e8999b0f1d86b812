"""Many workers: the p-sweep 15, 64, 256, 1024 at about 256 MiB of float32 input.

Each shape times the Flag Aggregator, Krum and the Gram kernel, and tracks
their ratio to float64 BLAS ``G @ G.T`` on a float64 copy of the input (the
copy made in setup), measured in the same process.
"""

import os
import time

import numpy as np

import flagagg
from flagagg.backends import get_backend_impl

from .common import BackendBenchmark, check_size

# Bytes of float32 input per shape; the test suite's smoke run lowers it.
TARGET_BYTES = int(os.environ.get("FLAGAGG_ASV_LARGE_P_BYTES", 256 << 20))


def _n(p):
    target = int(os.environ.get("FLAGAGG_ASV_LARGE_P_BYTES", TARGET_BYTES))
    return max(1024, target // (4 * p))


class LargeP(BackendBenchmark):
    """Gram rules with hundreds of workers, numpy and numba backends."""

    params = [["numpy", "numba"], [15, 64, 256, 1024]]
    param_names = ["backend", "p"]

    def setup(self, backend, p):
        n = _n(p)
        check_size(p, n)
        self.setup_device(backend, p, n)
        self.impl = get_backend_impl(self.device.backend)
        self.krum = flagagg.get_rule("krum", f=3)
        self.warm(lambda G: flagagg.flag_aggregate(G, backend=self.device.backend), p)

    def time_flag(self, backend, p):
        flagagg.flag_aggregate(self.G, backend=self.device.backend)

    def time_krum(self, backend, p):
        self.krum(self.G, backend=self.device.backend)

    def time_gram(self, backend, p):
        self.impl.gram(self.G)

    def track_flag_over_dgemm(self, backend, p):
        G64 = self.G.astype(np.float64)
        dgemm = min(_seconds(lambda: G64 @ G64.T) for _ in range(2))
        flag = min(_seconds(lambda: flagagg.flag_aggregate(self.G, backend=self.device.backend))
                   for _ in range(2))
        return flag / dgemm

    track_flag_over_dgemm.unit = "x"


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
