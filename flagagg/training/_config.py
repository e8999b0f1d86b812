"""Experiment configuration: a TOML file, validated before anything runs.

A configuration has the sections ``[experiment]``, ``[data]``, ``[cluster]``,
``[model]``, ``[optimizer]``, ``[tune]`` (all optional, with defaults), and
one table per rule (``[rules.<label>]``) and per attack
(``[attacks.<label>]``). A label is the rule or attack name unless the table
names it with ``rule = ...`` / ``attack = ...``, which lets one grid hold
several settings of the same rule or a sweep of an attacker's parameter::

    [rules.flag]
    params = { rescale = "median_norm" }
    lr = 0.3                      # tuned with `flagagg tune`

    [rules.flag-reference]
    rule = "flag"
    params = { variant = "reference" }

    [attacks.lie-z1]
    attack = "little_is_enough"
    params = { z = 1.0 }

Every mistake found is reported with its section and key and what to do,
before any training starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .._validation import Choice, Int, Real, Text
from ._data import DATASETS
from ._models import MODELS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ImportError as exc:
        raise ImportError(
            "reading experiment configs on Python 3.10 needs tomli: pip install tomli"
        ) from exc

__all__ = [
    "AttackSpec",
    "ConfigError",
    "ExperimentConfig",
    "RuleSpec",
    "available_configs",
    "load_config",
    "as_config",
    "parse_config",
]


class ConfigError(ValueError):
    """An experiment configuration is invalid; the message says where and why."""


class ConfigTypeError(ConfigError, TypeError):
    """A value of the wrong type in a configuration (a ConfigError and a TypeError)."""


def _error(bad):
    return ConfigTypeError if bad.wrong_type else ConfigError


@dataclass(frozen=True)
class RuleSpec:
    """One rule of the grid: a label, the flagagg rule, its parameters, its learning rate."""

    label: str
    rule: str
    params: dict = field(default_factory=dict)
    lr: float | None = None
    lr_grid: tuple | None = None


@dataclass(frozen=True)
class AttackSpec:
    """One attack of the grid: a label, the flagagg attack and its parameters."""

    label: str
    attack: str
    params: dict = field(default_factory=dict)


def _by_label(specs, label, kind):
    """The spec with ``label`` among ``specs``; a KeyError lists the labels there are."""
    for spec in specs:
        if spec.label == label:
            return spec
    raise KeyError(f"no {kind} labelled {label!r}: the config has {[s.label for s in specs]}")


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment: rules x attacks x f x seeds, and how to train.

    Build one with :func:`load_config` (TOML file or packaged config name) or
    :func:`parse_config` (a dict with the TOML's structure). Field names match
    the TOML keys; see the packaged ``demo`` config for a commented example.
    """

    name: str = "experiment"
    rounds: int = 150
    seeds: tuple = (0, 1, 2)
    validation_seeds: tuple = (100, 101)
    eval_every: int = 10
    array: str = "numpy"
    backend: str = "numpy"
    dataset: str = "digits"
    path: str | None = None
    split_seed: int = 0
    test_fraction: float = 0.25
    validation_fraction: float = 0.15
    max_train: int | None = None
    n_samples: int | None = None
    n_features: int = 20
    n_classes: int = 4
    workers: int = 15
    f: tuple = (3,)
    partition: str = "iid"
    alpha: float = 0.5
    batch_size: int = 32
    model: str = "logreg"
    hidden: int = 64
    channels: tuple = (16, 32)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    worker_momentum: float = 0.0
    lr_grid: tuple = (0.01, 0.03, 0.1, 0.3, 1.0)
    rules: tuple = ()
    attacks: tuple = ()
    source: str = "<dict>"

    def rule(self, label):
        """The :class:`RuleSpec` with this label."""
        return _by_label(self.rules, label, "rule")

    def attack(self, label):
        """The :class:`AttackSpec` with this label."""
        return _by_label(self.attacks, label, "attack")

    def lr_of(self, label):
        """The learning rate a rule trains with: its own, else ``[optimizer] lr``."""
        own = self.rule(label).lr
        return self.lr if own is None else own

    def replace(self, **changes):
        """A copy with some fields changed, validated again."""
        return parse_config(_merge(self.to_dict(), changes), source=self.source)

    def with_learning_rates(self, lrs):
        """A copy with the learning rate of some rules set (``{label: lr}``)."""
        rules = tuple(
            dataclasses.replace(r, lr=float(lrs[r.label])) if r.label in lrs else r
            for r in self.rules
        )
        return dataclasses.replace(self, rules=rules)

    def data_kwargs(self):
        """Keyword arguments of :func:`flagagg.sim.load_dataset`."""
        return dict(
            path=self.path, split_seed=self.split_seed, test_fraction=self.test_fraction,
            validation_fraction=self.validation_fraction, max_train=self.max_train,
            n_samples=self.n_samples, n_features=self.n_features, n_classes=self.n_classes,
        )

    def to_dict(self):
        """The configuration in the TOML file's structure."""
        out = {}
        for section, keys in _SECTIONS.items():
            table = {}
            for key in keys:
                value = getattr(self, key)
                if value is None:
                    continue
                table[key] = list(value) if isinstance(value, tuple) else value
            out[section] = table
        out["rules"] = {}
        for r in self.rules:
            entry = {"rule": r.rule, "params": dict(r.params)}
            if r.lr is not None:
                entry["lr"] = r.lr
            if r.lr_grid is not None:
                entry["lr_grid"] = list(r.lr_grid)
            out["rules"][r.label] = entry
        out["attacks"] = {a.label: {"attack": a.attack, "params": dict(a.params)}
                          for a in self.attacks}
        return out

    def to_toml(self, header=""):
        """The configuration as TOML text (comments are not kept), written by tomli-w."""
        import tomli_w

        lines = [f"# {line}" for line in header.splitlines()]
        body = tomli_w.dumps(self.to_dict())
        return ("\n".join(lines) + "\n\n" if lines else "") + body


# section -> fields of ExperimentConfig it holds (the TOML keys)
_SECTIONS = {
    "experiment": ("name", "rounds", "seeds", "validation_seeds", "eval_every", "array",
                   "backend"),
    "data": ("dataset", "path", "split_seed", "test_fraction", "validation_fraction",
             "max_train", "n_samples", "n_features", "n_classes"),
    "cluster": ("workers", "f", "partition", "alpha", "batch_size"),
    "model": ("model", "hidden", "channels"),
    "optimizer": ("lr", "momentum", "weight_decay", "worker_momentum"),
    "tune": ("lr_grid",),
}
_RULE_KEYS = ("rule", "params", "lr", "lr_grid")
_ATTACK_KEYS = ("attack", "params")


def _merge(base, changes):
    """Apply flat field changes (``workers=7``) to a config dict."""
    out = {k: dict(v) for k, v in base.items()}
    for key, value in changes.items():
        if key in ("rules", "attacks"):
            raise TypeError(f"replace {key} with dataclasses.replace or edit the TOML")
        section = next((s for s, keys in _SECTIONS.items() if key in keys), None)
        if section is None:
            raise TypeError(f"unknown config field {key!r}")
        out[section][key] = list(value) if isinstance(value, tuple) else value
    return out


# --------------------------------------------------------------------------
# checks of single values: the declared constraints of flagagg._validation (one
# vocabulary with the rules and attacks); each returns the normalised value or
# raises _Bad(what is expected, whether the type was wrong)


class _Bad(Exception):
    def __init__(self, expected, wrong_type=False):
        super().__init__(expected)
        self.wrong_type = wrong_type


def _declared(constraint):
    def check(v):
        try:
            return constraint.check("value", v)
        except TypeError:
            raise _Bad(constraint.describe(), wrong_type=True) from None
        except ValueError:
            raise _Bad(constraint.describe()) from None
    return check


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _int(lo=None):
    return _declared(Int(low=lo))


def _float(lo=None, hi=None, lo_open=False, hi_open=False):
    return _declared(Real(low=lo, strict=lo_open, high=hi, high_strict=hi_open))


def _choice(options):
    return _declared(Choice(tuple(options)))


_string = _declared(Text())


def _optional(check, none_values=("",), zero=False):
    def wrapped(v):
        if v in none_values or (zero and _is_int(v) and v == 0):
            return None
        return check(v)
    return wrapped


def _list(item, min_len=1, unique=False):
    def check(v):
        if not isinstance(v, (list, tuple)) or len(v) < min_len:
            raise _Bad(f"a list of at least {min_len} value(s)",
                       wrong_type=not isinstance(v, (list, tuple)))
        out = []
        for x in v:
            try:
                out.append(item(x))
            except _Bad as exc:
                raise _Bad(f"a list whose items are each {exc}", exc.wrong_type) from None
        if unique and len(set(out)) != len(out):
            raise _Bad("a list without repeated values")
        return tuple(out)
    return check


def _int_or_list(lo):
    scalar, many = _int(lo), _list(_int(lo), unique=True)

    def check(v):
        return (scalar(v),) if _is_int(v) else many(v)
    return check


_CHECKS = {
    "name": _string,
    "rounds": _int(1),
    "seeds": _list(_int(0), unique=True),
    "validation_seeds": _list(_int(0), unique=True),
    "eval_every": _int(1),
    "array": _choice(("numpy", "torch")),
    "backend": _string,
    "dataset": _choice(tuple(DATASETS)),
    "path": _optional(_string),
    "split_seed": _int(0),
    "test_fraction": _float(0, 1, lo_open=True, hi_open=True),
    "validation_fraction": _float(0, 1, lo_open=True, hi_open=True),
    "max_train": _optional(_int(1), zero=True),
    "n_samples": _optional(_int(20)),
    "n_features": _int(2),
    "n_classes": _int(2),
    "workers": _int(2),
    "f": _int_or_list(0),
    "partition": _choice(("iid", "dirichlet")),
    "alpha": _float(0, lo_open=True),
    "batch_size": _int(1),
    "model": _choice(MODELS),
    "hidden": _int(1),
    "channels": _list(_int(1), min_len=2),
    "lr": _float(0, lo_open=True),
    "momentum": _float(0, 1, hi_open=True),
    "weight_decay": _float(0),
    "worker_momentum": _float(0, 1, hi_open=True),
    "lr_grid": _list(_float(0, lo_open=True), unique=True),
}


def _unknown(where, key, known, source):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"{source}: unknown key {key!r} in {where}{hint}; known keys: {', '.join(known)}"
    )


def _check_table(where, value, source):
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {where} must be a table, got {value!r}")
    return value


def parse_config(data, *, source="<dict>"):
    """Validate a configuration given as a dict with the TOML file's structure.

    Parameters
    ----------
    data : dict
        Sections as nested dicts, e.g. ``{"cluster": {"workers": 15}, "rules":
        {"mean": {}}, "attacks": {"none": {}}}``.
    source : str, default="<dict>"
        Where the data came from, for error messages.

    Returns
    -------
    config : ExperimentConfig

    Raises
    ------
    ConfigError
        On the first problem found, naming its section and key.
    """
    _check_table("the configuration", data, source)
    known_sections = (*_SECTIONS, "rules", "attacks")
    values = {}
    for section, table in data.items():
        if section not in known_sections:
            raise _unknown("the top level", section, known_sections, source)
        if section in ("rules", "attacks"):
            continue
        _check_table(f"[{section}]", table, source)
        for key, v in table.items():
            if key not in _SECTIONS[section]:
                raise _unknown(f"[{section}]", key, _SECTIONS[section], source)
            try:
                values[key] = _CHECKS[key](v)
            except _Bad as exc:
                raise _error(exc)(
                    f"{source}: [{section}] {key} must be {exc}: got {v!r}"
                ) from None

    rules_table = _check_table("[rules]", data.get("rules", {}), source)
    attacks_table = _check_table("[attacks]", data.get("attacks", {}), source)
    if not rules_table:
        raise ConfigError(f"{source}: no rules: add at least one table like [rules.mean]")
    if not attacks_table:
        raise ConfigError(f"{source}: no attacks: add at least one table like [attacks.none]")
    rules = []
    for label, entry in rules_table.items():
        where = f"[rules.{label}]"
        _check_table(where, entry, source)
        for key in entry:
            if key not in _RULE_KEYS:
                raise _unknown(where, key, _RULE_KEYS, source)
        checks = {"rule": _string, "lr": _CHECKS["lr"], "lr_grid": _CHECKS["lr_grid"]}
        checked = {}
        for key, check in checks.items():
            if key in entry:
                try:
                    checked[key] = check(entry[key])
                except _Bad as exc:
                    raise _error(exc)(
                        f"{source}: {where} {key} must be {exc}: got {entry[key]!r}"
                    ) from None
        rule = checked.get("rule", label)
        lr, grid = checked.get("lr"), checked.get("lr_grid")
        params = _check_table(f"{where} params", entry.get("params", {}), source)
        if "f" in params:
            raise ConfigError(
                f"{source}: {where} params sets f; f comes from [cluster] f, remove it here"
            )
        rules.append(RuleSpec(label, rule, dict(params), lr, grid))
    attacks = []
    for label, entry in attacks_table.items():
        where = f"[attacks.{label}]"
        _check_table(where, entry, source)
        for key in entry:
            if key not in _ATTACK_KEYS:
                raise _unknown(where, key, _ATTACK_KEYS, source)
        try:
            name = _string(entry.get("attack", label))
        except _Bad as exc:
            raise _error(exc)(f"{source}: {where} attack must be {exc}") from None
        params = _check_table(f"{where} params", entry.get("params", {}), source)
        attacks.append(AttackSpec(label, name, dict(params)))

    config = ExperimentConfig(**values, rules=tuple(rules), attacks=tuple(attacks),
                              source=source)
    _cross_check(config)
    return config


def _cross_check(c):
    """Checks that involve several keys, the rule registry and the attack registry."""
    from .. import attacks as attacks_mod
    from ._step import build_rule

    src = c.source
    if set(c.seeds) & set(c.validation_seeds):
        raise ConfigError(
            f"{src}: [experiment] seeds and validation_seeds share "
            f"{sorted(set(c.seeds) & set(c.validation_seeds))}: tuning must not see the seeds "
            "results are reported on; make them disjoint"
        )
    if DATASETS[c.dataset][1] and not c.path:
        raise ConfigError(
            f"{src}: [data] dataset {c.dataset!r} needs path = the folder holding files you "
            "downloaded yourself (flagagg never downloads data)"
        )
    if c.model == "cnn" and DATASETS[c.dataset][0] != "image":
        raise ConfigError(
            f"{src}: [model] 'cnn' needs image data but dataset {c.dataset!r} is tabular; "
            "use model = 'logreg' or 'mlp'"
        )
    if c.model == "cnn1d" and DATASETS[c.dataset][0] != "sequence":
        raise ConfigError(
            f"{src}: [model] 'cnn1d' needs sequence data (e.g. dataset = 'mnist1d') but "
            f"dataset {c.dataset!r} is {DATASETS[c.dataset][0]}; use 'cnn', 'logreg' or 'mlp'"
        )
    bad_f = [f for f in c.f if f >= c.workers]
    if bad_f:
        raise ConfigError(
            f"{src}: [cluster] f = {list(c.f)} has values >= workers = {c.workers}; "
            "at least one worker must be honest"
        )
    for labels, kind in (([r.label for r in c.rules], "rules"),
                         ([a.label for a in c.attacks], "attacks")):
        bad = [s for s in labels if "/" in s or "," in s]
        if bad:
            raise ConfigError(f"{src}: [{kind}] labels must not contain '/' or ',': {bad}")

    import flagagg

    backends = ("auto", *flagagg.available_backends())
    if c.backend not in backends:
        raise ConfigError(
            f"{src}: [experiment] backend must be one of {', '.join(backends)}: "
            f"got {c.backend!r}"
        )
    if (c.array, c.backend) in (("numpy", "torch"), ("torch", "numpy"), ("torch", "numba")):
        raise ConfigError(
            f"{src}: [experiment] backend {c.backend!r} does not take array = {c.array!r}; "
            "use backend = 'auto' or the backend of that array library"
        )
    known = tuple(flagagg.available_rules())
    for r in c.rules:
        if r.rule not in known:
            raise ConfigError(
                f"{src}: [rules.{r.label}] rule {r.rule!r} is not available in this flagagg "
                f"(available: {', '.join(known)}); remove [rules.{r.label}], or leave it out "
                "with --rules on the command line (rules= in load_config)"
            )
        for f in c.f:
            try:
                # the rule's declared bound on p for this f, checked before anything runs
                build_rule(r.rule, f, r.params).check_workers(c.workers)
            except (TypeError, ValueError) as exc:
                raise ConfigError(
                    f"{src}: [rules.{r.label}] cannot be built with workers = {c.workers}, "
                    f"f = {f}: {exc}"
                ) from None
    for a in c.attacks:
        try:
            attack = attacks_mod.get_attack(a.attack, **a.params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{src}: [attacks.{a.label}] {exc}") from None
        if attack.name == "little_is_enough" and attack.params.get("z") is None:
            for f in c.f:
                if f == 0:
                    continue
                try:
                    attacks_mod.little_is_enough_z(c.workers, f)
                except ValueError as exc:
                    raise ConfigError(f"{src}: [attacks.{a.label}] with f = {f}: {exc}") from None


def _shipped():
    # The shipped configs are the simulator's package data; they are read
    # through the top-level package so that reading one imports no flagagg.sim.
    return resources.files("flagagg").joinpath("sim").joinpath("configs")


def available_configs():
    """Names of the configurations shipped with flagagg (e.g. ``"demo"``).

    Returns
    -------
    names : tuple of str
    """
    folder = _shipped()
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml")))


def as_config(config):
    """Accept an ExperimentConfig, a dict in the TOML structure, a path or a shipped name."""
    if isinstance(config, ExperimentConfig):
        return config
    if isinstance(config, dict):
        return parse_config(config)
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    raise TypeError(
        f"config must be an ExperimentConfig, a dict, a TOML path or a shipped config name: "
        f"got {type(config).__name__}"
    )


def _keep(data, kind, labels, source):
    """Keep only some ``[rules.*]`` or ``[attacks.*]`` tables, in the given order."""
    table = data.get(kind, {})
    missing = [label for label in labels if label not in table]
    if missing:
        raise ConfigError(
            f"{source}: no [{kind}.{missing[0]}] to select; the config has "
            f"{', '.join(table) or 'none'}"
        )
    data[kind] = {label: table[label] for label in labels}


def load_config(source, *, rules=None, attacks=None):
    """Read and validate an experiment configuration.

    Parameters
    ----------
    source : str or path-like
        A TOML file, or the name of a configuration shipped with flagagg
        (see :func:`available_configs`).
    rules, attacks : sequence of str, optional
        Keep only the rules (attacks) with these labels, dropped before
        validation, so a config can be run without a rule this flagagg lacks.

    Returns
    -------
    config : ExperimentConfig

    Raises
    ------
    ConfigError
        If the file is not valid TOML or the configuration is invalid.
    FileNotFoundError
        If ``source`` is neither a file nor a shipped configuration.
    """
    path = Path(source)
    if path.is_file():
        text, label = path.read_text(encoding="utf-8"), str(path)
    elif isinstance(source, str) and source in available_configs():
        res = _shipped().joinpath(f"{source}.toml")
        text, label = res.read_text(encoding="utf-8"), f"{source} (shipped config)"
    else:
        raise FileNotFoundError(
            f"no config file {str(source)!r}, and it is not a shipped config "
            f"({', '.join(available_configs())})"
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: not valid TOML: {exc}") from None
    if rules is not None:
        _keep(data, "rules", list(rules), label)
    if attacks is not None:
        _keep(data, "attacks", list(attacks), label)
    return parse_config(data, source=label)

