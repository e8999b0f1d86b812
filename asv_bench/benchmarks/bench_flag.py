"""The Flag Aggregator end to end: time, peak memory and IRLS steps."""

import math

import flagagg

from .common import BackendBenchmark


class FlagAggregate(BackendBenchmark):
    """``flag_aggregate(G, r=ceil(p/2), lam)`` run to convergence on a float32 (p, n) stack."""

    params = BackendBenchmark.params + [[7, 15, 60], [100_000, 1_000_000, 10_000_000], [0.0, 1.0]]
    param_names = BackendBenchmark.param_names + ["p", "n", "lam"]

    def setup(self, backend, p, n, lam):
        self.setup_device(backend, p, n)
        self.r = math.ceil(p / 2)
        self.lam = lam
        self.warm(self.solve, p)

    def solve(self, G, **kw):
        return flagagg.flag_aggregate(G, self.r, self.lam, backend=self.device.backend, **kw)

    def time_flag_aggregate(self, backend, p, n, lam):
        self.solve(self.G)
        self.device.sync()

    def peakmem_flag_aggregate(self, backend, p, n, lam):
        self.solve(self.G)
        self.device.sync()

    def track_n_iter(self, backend, p, n, lam):
        return self.solve(self.G, return_result=True).n_iter

    track_n_iter.unit = "steps"


class FlagIterations(BackendBenchmark):
    """Cost of IRLS steps: 20 steps (tol=0) should cost about as much as one."""

    params = BackendBenchmark.params + [[1, 20]]
    param_names = BackendBenchmark.param_names + ["max_iter"]

    def setup(self, backend, max_iter):
        self.setup_device(backend, 15, 1_000_000)
        self.warm(self.solve, 15)

    def solve(self, G, max_iter=1):
        return flagagg.flag_aggregate(G, 8, 1.0, max_iter=max_iter, tol=0.0,
                                      backend=self.device.backend)

    def time_flag_max_iter(self, backend, max_iter):
        self.solve(self.G, max_iter)
        self.device.sync()
