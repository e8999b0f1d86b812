"""The training core shared by the simulator and the distributed trainer.

Data sets, models, the replica of a run's state, experiment configs, the
aggregation step and the results records live here, so that
:mod:`flagagg.sim` and :mod:`flagagg.distributed` both build on them and
neither reaches into the other. The modules are private: their public names
are re-exported by :mod:`flagagg.sim`, which is where to import them from.
Importing this package imports nothing. Reading a configuration (``_config``,
with the data set and model names and the rule check it uses) loads no torch;
the replica, the gradient engine and the models import it.
"""
