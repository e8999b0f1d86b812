"""A training loop that aggregates every step costs the plain step plus the aggregation.

The target (issue 23): ``step / (plain step + aggregation alone) <= 1.15``.
One process here; ``asv_bench/threads.py`` (``make bench``) also runs four
loops at once on shared cores, as torchrun ranks do.
"""

import statistics
import time

from . import common
from ._loop import make_loop


class TrainingLoop:
    """The 8-worker MLP loop of ``_loop.py``, torch and numba paths."""

    params = [["torch", "numba"]]
    param_names = ["path"]
    timeout = 300

    def setup(self, path):
        self.loop = make_loop(path)
        for fn in self.loop.values():  # compile, fill caches, start pools
            fn()

    def time_step(self, path):
        self.loop["step"]()

    def track_step_over_plain_plus_aggregation(self, path):
        # Interleaved, median per variant: load hits all three alike.
        times = {k: [] for k in ("plain", "agg", "step")}
        for _ in range(2 * common.RATIO_REPEATS + 1):
            for k in times:
                t0 = time.perf_counter()
                self.loop[k]()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        return med["step"] / (med["plain"] + med["agg"])

    track_step_over_plain_plus_aggregation.unit = "ratio"
