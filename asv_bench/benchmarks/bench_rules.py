"""Every aggregation rule, f = 3, on a float32 (15, n) stack: time, memory, ratio to the mean."""

from ._data import RULES
from .common import QUICK, BackendBenchmark, backends, build_rule, tiered


class Rules(BackendBenchmark):
    """``rule(G)`` for every rule (and NNM or ARC before Krum), and its time over ``mean(G, 0)``."""

    params = [backends(), RULES + ["nnm+krum", "arc+krum"],
              tiered([1_000_000], [100_000, 1_000_000])]
    param_names = ["backend", "rule", "n"]
    kwargs: dict = {}  # per-call inputs a rule needs beside G (none here)

    def setup(self, backend, rule, n):
        self.setup_device(backend, 15, n)
        self.rule = build_rule(rule)
        self.warm(self.apply, 15)

    def apply(self, G):
        return self.rule(G, backend=self.device.backend, **self.kwargs)

    def time_rule(self, backend, rule, n):
        self.apply(self.G)
        self.device.sync()

    if not QUICK:  # the input dominates the peak; the quick tier leaves it to FlagAggregate

        def peakmem_rule(self, backend, rule, n):
            self.apply(self.G)
            self.device.sync()

    def track_ratio_over_mean(self, backend, rule, n):
        return self.ratio(lambda: self.device.mean(self.G), lambda: self.apply(self.G))

    track_ratio_over_mean.unit = "ratio"
