"""Every registered aggregation rule, f = 3, on a float32 (15, n) stack."""

import flagagg

from .common import BackendBenchmark


def _build(name):
    try:
        return flagagg.get_rule(name, f=3)
    except TypeError:  # rules without f (mean, flag)
        return flagagg.get_rule(name)


class Rules(BackendBenchmark):
    """``aggregate(G, rule=name)`` for every name in ``flagagg.available_rules()``."""

    params = BackendBenchmark.params + [flagagg.available_rules(), [100_000, 1_000_000]]
    param_names = BackendBenchmark.param_names + ["rule", "n"]

    def setup(self, backend, rule, n):
        self.setup_device(backend, 15, n)
        try:
            self.rule = _build(rule)
            self.warm(self.apply, 15)
        except NotImplementedError:
            raise
        except Exception as exc:  # a rule that cannot run here is skipped, not a crash
            raise NotImplementedError(f"{rule}: {exc}") from exc

    def apply(self, G):
        return self.rule(G, backend=self.device.backend)

    def time_rule(self, backend, rule, n):
        self.apply(self.G)
        self.device.sync()

    def peakmem_rule(self, backend, rule, n):
        self.apply(self.G)
        self.device.sync()
