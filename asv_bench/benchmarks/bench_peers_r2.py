"""The peers' rules added by r2 (f = 3, float32 (15, n)): time and ratio to the mean.

A list of their own (not ``_data.RULES``), so the main suite's parameters stay
those of older commits; FLTrust is given the server's reference gradient (the
honest rows' mean) on every call, as its definition requires: one per stack
(the warm-up's small stack has its own), made before any timed call.
"""

from . import bench_rules
from .common import backends, build_rule, tiered

PEERS_R2 = ["aksel", "clipped_clustering", "dnc", "fltrust", "signguard"]


class PeersR2(bench_rules.Rules):  # a module import: asv would list an imported class twice
    """``rule(G)`` for each of r2's peer rules, and its time over ``mean(G, 0)``."""

    params = [backends(), PEERS_R2, tiered([1_000_000], [100_000, 1_000_000])]

    def setup(self, backend, rule, n):
        self.setup_device(backend, 15, n)
        self.rule = build_rule(rule)
        self.rule_name = rule
        self.references = {}  # FLTrust's reference gradient, one per stack width
        self.apply(self.G)  # the timed stack's reference is made here, not in a timed call
        self.warm(self.apply, 15)

    def apply(self, G):
        kwargs = {}
        if self.rule_name == "fltrust":
            n = G.shape[1]
            if n not in self.references:
                self.references[n] = self.device.mean(G[3:])
            kwargs["reference"] = self.references[n]
        return self.rule(G, backend=self.device.backend, **kwargs)
