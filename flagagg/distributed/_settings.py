"""What one distributed run trains, and the faults a test or a demo injects."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass

from ..training._config import ConfigError, ExperimentConfig

__all__ = ["FAULT_KINDS", "TRANSPORTS", "Fault", "RunSpec", "make_replica", "make_spec",
           "parse_fault", "spec_from_dict", "spec_to_dict"]

# kind -> whether it takes "=VALUE"
FAULT_KINDS = {
    "crash": False,       # the process kills itself with SIGKILL
    "hang": False,        # stops answering, stays alive
    "slow": True,         # sleeps VALUE seconds before sending
    "nan": False,         # sends a gradient full of NaN
    "wrong_size": False,  # sends 7 values too many
    "bad_frame": False,   # sends bytes that are not a frame
}
# tcp (authenticated) first: the default; gloo and NCCL trust everyone who can
# reach torch's store and are for trusted clusters only
TRANSPORTS = ("tcp", "gloo", "nccl")
_FAULT = re.compile(
    r"^(?P<worker>\d+):(?P<kind>[a-z_]+)(=(?P<value>[0-9.]+))?"
    r"(@(?P<first>\d+)(?P<dash>-(?P<last>\d+)?)?)?$"
)


@dataclass(frozen=True)
class Fault:
    """A fault injected into one worker.

    Attributes
    ----------
    worker : int
        Worker index (0-based; the worker of rank ``worker + 1``).
    kind : str
        One of ``crash``, ``hang``, ``slow``, ``nan``, ``wrong_size``,
        ``bad_frame``.
    value : float
        Seconds for ``slow``.
    first, last : int
        Rounds it applies to (``last`` is None for "to the end").
    """

    worker: int
    kind: str
    value: float = 0.0
    first: int = 1
    last: int | None = None

    def active(self, t):
        """Whether the fault applies in round ``t``."""
        return t >= self.first and (self.last is None or t <= self.last)


def parse_fault(text):
    """Parse ``WORKER:KIND[=VALUE][@ROUNDS]``, e.g. ``2:crash@5`` or ``1:slow=3@2-4``.

    Parameters
    ----------
    text : str
        The fault. ``ROUNDS`` is ``R`` (that round), ``R-S`` (rounds R to
        S), ``R-`` (from round R on); without it, every round. ``crash``
        and ``hang`` act once, at their first round.

    Returns
    -------
    fault : Fault

    Raises
    ------
    ValueError
        If ``text`` does not follow the pattern or names an unknown kind.
    """
    m = _FAULT.match(text.strip())
    kinds = ", ".join(FAULT_KINDS)
    if not m:
        raise ValueError(
            f"fault {text!r} is not WORKER:KIND[=VALUE][@R|@R-S|@R-] (e.g. 2:crash@5, "
            f"1:slow=3@2-4, 3:nan@6-); kinds: {kinds}"
        )
    kind = m.group("kind")
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r} in {text!r}: choose one of {kinds}")
    if FAULT_KINDS[kind] != (m.group("value") is not None):
        need = "needs =VALUE (seconds)" if FAULT_KINDS[kind] else "takes no =VALUE"
        raise ValueError(f"fault kind {kind!r} {need}: got {text!r}")
    if m.group("first") is None:
        first, last = 1, None
    else:
        first = int(m.group("first"))
        last = int(m.group("last")) if m.group("last") else (None if m.group("dash") else first)
    if first < 1 or (last is not None and last < first):
        raise ValueError(f"fault rounds must satisfy 1 <= FIRST <= LAST: got {text!r}")
    return Fault(int(m.group("worker")), kind, float(m.group("value") or 0.0), first, last)


@dataclass(frozen=True)
class RunSpec:
    """One distributed training run: a cell of an experiment config, and how to run it.

    Attributes
    ----------
    config : ExperimentConfig
        The config, cut down to the chosen rule, attack, f and seed.
    rule, attack : str
        Labels of the rule and the attack in the config.
    f : int
        Number of faulty (Byzantine) workers.
    seed : int
        The run's seed.
    round_timeout : float
        Seconds the server waits for a round's gradients.
    connect_timeout : float
        Seconds the server waits for the workers to connect at the start,
        and a worker for the server.
    drop_nonfinite : bool
        Whether the server drops gradients with NaN or Inf before the rule
        sees them.
    device : str
        ``"cpu"``, ``"cuda"`` or ``"auto"``.
    transport : str
        How parameters and gradients travel: ``"tcp"`` (the default:
        mutual TLS with one certificate per process, see
        :func:`flagagg.distributed.issue_certificates`), or, on trusted
        clusters only, ``"gloo"`` or ``"nccl"``
        (torch.distributed point-to-point, one process group per worker,
        which anyone who reaches torch's store can join or disrupt).
    faults : tuple of Fault
        Injected faults.
    quorum : int, optional
        Gradients after which a round closes (plus a grace) instead of
        waiting for its deadline; ``workers - f`` by default, never below
        ``min_gradients``.
    min_gradients : int, optional
        The floor: the server never steps with fewer accepted gradients
        than this; by default the fewest the rule accepts with the run's f
        (e.g. ``2 f + 1`` for the median, ``2 f + 3`` for Krum), and at
        least ``2 f + 1`` when f > 0.
    """

    config: ExperimentConfig
    rule: str
    attack: str
    f: int
    seed: int
    round_timeout: float = 30.0
    connect_timeout: float = 120.0
    drop_nonfinite: bool = True
    device: str = "cpu"
    transport: str = "tcp"
    faults: tuple = ()
    quorum: int | None = None
    min_gradients: int | None = None

    def __post_init__(self):
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport {self.transport!r} is not one of "
                              f"{', '.join(TRANSPORTS)}")
        if self.quorum is not None and not 1 <= self.quorum <= self.config.workers:
            raise ConfigError(f"quorum {self.quorum} is not in 1..{self.config.workers} "
                              "(the number of workers)")
        if self.min_gradients is not None and \
                not 1 <= self.min_gradients <= self.config.workers:
            raise ConfigError(f"min_gradients {self.min_gradients} is not in "
                              f"1..{self.config.workers} (the number of workers)")
        if self.quorum is not None and self.min_gradients is not None and \
                self.quorum < self.min_gradients:
            raise ConfigError(f"quorum {self.quorum} is below min_gradients "
                              f"{self.min_gradients}: a round could close with too few")

    @property
    def quorum_size(self):
        """Gradients that close a round early: ``quorum``, else ``workers - f`` (at least 1)."""
        if self.quorum is not None:
            return int(self.quorum)
        return max(1, self.config.workers - self.f)

    @property
    def workers(self):
        """Number of workers p."""
        return self.config.workers

    @property
    def rounds(self):
        """Number of rounds."""
        return self.config.rounds

    def fingerprint(self):
        """Hash of what every process must agree on (not the number of rounds)."""
        data = self.config.to_dict()
        data["experiment"] = {k: v for k, v in data["experiment"].items()
                              if k not in ("rounds", "eval_every", "name")}
        doc = {"config": data, "rule": self.rule, "attack": self.attack, "f": self.f,
               "seed": self.seed}
        text = json.dumps(doc, sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def faults_of(self, worker):
        """The faults injected into ``worker``."""
        return tuple(x for x in self.faults if x.worker == worker)


def _pick(what, value, options, flag):
    if value is None:
        return options[0]
    if value not in options:
        raise ConfigError(
            f"{flag} {value!r} is not in the config: choose one of "
            f"{', '.join(map(str, options))}"
        )
    return value


def make_spec(config, *, rule=None, attack=None, f=None, seed=None, rounds=None, workers=None,
              eval_every=None, **options):
    """Choose one cell of an experiment config to train.

    Parameters
    ----------
    config : ExperimentConfig
        The experiment.
    rule, attack : str, optional
        Labels; the first rule (attack) of the config by default.
    f : int, optional
        Number of faulty workers; the first of the config's ``f`` by default.
        Need not be one of the config's values.
    seed : int, optional
        The first of the config's seeds by default.
    rounds, workers, eval_every : int, optional
        Override the config's values.
    **options
        Other fields of :class:`RunSpec`.

    Returns
    -------
    spec : RunSpec

    Raises
    ------
    ConfigError
        If a label is not in the config or an override is invalid.
    """
    rule = _pick("rule", rule, [r.label for r in config.rules], "--rule")
    attack = _pick("attack", attack, [a.label for a in config.attacks], "--attack")
    f = config.f[0] if f is None else int(f)
    seed = config.seeds[0] if seed is None else int(seed)
    changes = {"f": [f], "seeds": [seed],
               "validation_seeds": [v for v in config.validation_seeds if v != seed] or [seed + 1]}
    if rounds is not None:
        changes["rounds"] = int(rounds)
        changes["eval_every"] = min(config.eval_every, int(rounds))
    if eval_every is not None:
        changes["eval_every"] = int(eval_every)
    if workers is not None:
        changes["workers"] = int(workers)
    cut = dataclasses.replace(config, rules=(config.rule(rule),),
                              attacks=(config.attack(attack),))
    cut = cut.replace(**changes)
    faults = tuple(options.pop("faults", ()) or ())
    for fault in faults:
        if not 0 <= fault.worker < cut.workers:
            raise ConfigError(
                f"fault on worker {fault.worker}, but the workers are 0..{cut.workers - 1}"
            )
    return RunSpec(cut, rule, attack, f, seed, faults=faults, **options)


def make_replica(spec, device):
    """The simulator's replica of the run's data, model and random streams, on ``device``.

    The server and every worker build the same one from the spec, which is
    what makes a distributed run train the model the simulator trains.
    """
    from ..training._data import load_dataset
    from ..training._replica import Replica

    config = spec.config
    return Replica(load_dataset(config.dataset, **config.data_kwargs()), workers=config.workers,
                   f=spec.f, seed=spec.seed, model=config.model,
                   model_params={"hidden": config.hidden, "channels": config.channels},
                   partition_method=config.partition, alpha=config.alpha, device=device,
                   worker_momentum=config.worker_momentum)


def spec_to_dict(spec):
    """A JSON-able description of ``spec`` (see :func:`spec_from_dict`)."""
    out = {k: getattr(spec, k) for k in ("rule", "attack", "f", "seed", "round_timeout",
                                          "connect_timeout", "drop_nonfinite", "device",
                                          "transport", "quorum", "min_gradients")}
    out["config"] = spec.config.to_dict()
    out["source"] = spec.config.source
    out["faults"] = [dataclasses.asdict(x) for x in spec.faults]
    return out


def spec_from_dict(data):
    """Rebuild a :class:`RunSpec` from :func:`spec_to_dict`'s output, validating the config."""
    from ..training._config import parse_config

    fields = dict(data)
    config = parse_config(fields.pop("config"), source=fields.pop("source", "<dict>"))
    faults = tuple(Fault(**x) for x in fields.pop("faults", ()))
    return RunSpec(config, faults=faults, **fields)
