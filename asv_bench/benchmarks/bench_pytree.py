"""Rules on a ResNet-18-shaped pytree of per-layer arrays, against the same data stacked.

The target (``make bench`` judges it): per-layer within 1.3x of stacked.
``width`` 64 is the real ResNet-18 (11.2M parameters), 8 a small model of
the same structure (175k). ``input`` is the library of the arrays; the
backend is flagagg's automatic choice for it.
"""

import math

from ._data import RULES, make_stack, per_layer, resnet18_shapes
from .common import BackendBenchmark, Device, backends, build_rule, check_size, needs, tiered


class PerLayer(BackendBenchmark):
    """``rule(per_layer)`` for 15 lists of 62 arrays, and its time over ``rule(stacked)``."""

    backend_axis = (("numpy", "torch:cpu", "torch:cuda"), ("numpy", "torch:cuda"))
    params = [backends(*backend_axis), tiered(["flag", "krum", "median"], RULES),
              tiered([8], [8, 64])]
    param_names = ["input", "rule", "width"]

    def setup(self, spec, rule, width):
        shapes = resnet18_shapes(width=width)
        n = sum(math.prod(s) for s in shapes)
        check_size(15, n)
        self.device = Device(spec)
        G = make_stack(15, n)
        self.stacked = self.device.to(G)
        self.layers = [[self.device.to(a) for a in tree] for tree in per_layer(G, shapes)]
        self.rule = build_rule(rule)
        needs(self.rule, self.layers)  # compile outside the timings; skip where unsupported
        needs(self.rule, self.stacked)
        self.device.sync()

    def time_per_layer(self, spec, rule, width):
        self.rule(self.layers)
        self.device.sync()

    def peakmem_per_layer(self, spec, rule, width):
        self.rule(self.layers)
        self.device.sync()

    def track_ratio_per_layer_over_stacked(self, spec, rule, width):
        return self.ratio(lambda: self.rule(self.stacked), lambda: self.rule(self.layers))

    track_ratio_per_layer_over_stacked.unit = "ratio"
