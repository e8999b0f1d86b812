"""The Flag Aggregator end to end: time, peak memory, IRLS steps, ratio to the mean."""

import math

from .common import BackendBenchmark, backends, needs, tiered


def _flag_aggregate():
    import flagagg

    return flagagg.flag_aggregate


class FlagAggregate(BackendBenchmark):
    """``flag_aggregate(G, r=ceil(p/2), lam)`` run to convergence on a float32 (p, n) stack."""

    params = [backends(), tiered([15], [7, 15, 60]),
              tiered([1_000_000], [100_000, 1_000_000, 10_000_000]), [0.0, 1.0]]
    param_names = ["backend", "p", "n", "lam"]

    def setup(self, backend, p, n, lam):
        self.setup_device(backend, p, n)
        self.fa = _flag_aggregate()
        self.r = math.ceil(p / 2)
        self.lam = lam
        self.warm(self.solve, p)

    def solve(self, G, **kw):
        return self.fa(G, self.r, self.lam, backend=self.device.backend, **kw)

    def time_flag_aggregate(self, backend, p, n, lam):
        self.solve(self.G)
        self.device.sync()

    def peakmem_flag_aggregate(self, backend, p, n, lam):
        self.solve(self.G)
        self.device.sync()

    def track_n_iter(self, backend, p, n, lam):
        return needs(self.solve, self.G, return_result=True).n_iter

    track_n_iter.unit = "steps"

    def track_ratio_over_mean(self, backend, p, n, lam):
        return self.ratio(lambda: self.device.mean(self.G), lambda: self.solve(self.G))

    track_ratio_over_mean.unit = "ratio"


class FlagIterations(BackendBenchmark):
    """Cost of IRLS steps: 20 steps (tol=0) should cost about as much as one (Gram space)."""

    params = [backends(), [0.0, 1.0]]
    param_names = ["backend", "lam"]

    def setup(self, backend, lam):
        self.setup_device(backend, 15, 1_000_000)
        self.fa = _flag_aggregate()
        self.warm(self.solve, 15)

    def solve(self, G, max_iter=1, lam=1.0):
        return self.fa(G, 8, lam, max_iter=max_iter, tol=0.0, backend=self.device.backend)

    def time_flag_20_steps(self, backend, lam):
        self.solve(self.G, 20, lam)
        self.device.sync()

    def track_ratio_20_steps_over_1(self, backend, lam):
        return self.ratio(lambda: self.solve(self.G, 1, lam), lambda: self.solve(self.G, 20, lam))

    track_ratio_20_steps_over_1.unit = "ratio"
