"""Simulated clusters and robustness experiments.

Needs the ``sim`` extra (torch, scikit-learn, matplotlib, tqdm).
A cluster of p workers, f of them faulty, trains a PyTorch model with a
parameter server that aggregates the workers' gradients with any flagagg rule.
Experiments run grids of rules x attacks x f x seeds from a TOML config and
report final accuracy with each rule's worst case over attacks.

Examples
--------
>>> from flagagg import sim                                     # doctest: +SKIP
>>> results = sim.run_experiment("demo", seeds=[0])             # doctest: +SKIP
>>> print(results.table())                                      # doctest: +SKIP
"""

from ..training._config import (
    AttackSpec,
    ConfigError,
    ExperimentConfig,
    RuleSpec,
    available_configs,
    load_config,
    parse_config,
)
from ..training._data import DATASETS, Dataset, cache_dir, load_dataset, partition
from ..training._models import MODELS, init_parameters, make_model
from ..training._results import Results
from ._cluster import TrainResult, build_rule, simulate
from ._experiment import run_experiment
from ._tune import TuneResult, tune

__all__ = [
    "DATASETS",
    "MODELS",
    "AttackSpec",
    "ConfigError",
    "Dataset",
    "ExperimentConfig",
    "Results",
    "RuleSpec",
    "TrainResult",
    "TuneResult",
    "available_configs",
    "build_rule",
    "cache_dir",
    "init_parameters",
    "load_config",
    "load_dataset",
    "make_model",
    "parse_config",
    "partition",
    "run_experiment",
    "simulate",
    "tune",
]
