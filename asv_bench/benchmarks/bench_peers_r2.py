"""The peers' rules added by r2 (f = 3, float32 (15, n)): time and ratio to the mean.

A list of their own (not ``_data.RULES``), so the main suite's parameters stay
those of older commits; FLTrust is given the server's reference gradient (the
honest rows' mean) on every call, as its definition requires.
"""

import numpy as np

from .common import QUICK, BackendBenchmark, backends, build_rule, tiered

PEERS_R2 = ["aksel", "clipped_clustering", "dnc", "fltrust", "signguard"]


class PeersR2(BackendBenchmark):
    """``rule(G)`` for each of r2's peer rules, and its time over ``mean(G, 0)``."""

    params = [backends(), PEERS_R2, tiered([1_000_000], [100_000, 1_000_000])]
    param_names = ["backend", "rule", "n"]

    def setup(self, backend, rule, n):
        self.setup_device(backend, 15, n)
        self.rule = build_rule(rule)
        self.kwargs = {}
        if rule == "fltrust":
            self.kwargs["reference"] = self.device.to(np.mean(self.host[3:], axis=0))
        self.warm(self.apply, 15)

    def apply(self, G):
        return self.rule(G, backend=self.device.backend, **self.kwargs)

    def time_rule(self, backend, rule, n):
        self.apply(self.G)
        self.device.sync()

    if not QUICK:

        def peakmem_rule(self, backend, rule, n):
            self.apply(self.G)
            self.device.sync()

    def track_ratio_over_mean(self, backend, rule, n):
        return self.ratio(lambda: self.device.mean(self.G), lambda: self.apply(self.G))

    track_ratio_over_mean.unit = "ratio"
