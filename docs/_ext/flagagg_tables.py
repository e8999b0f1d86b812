"""Tables of the documentation, computed from flagagg itself at build time.

Nothing here is written by hand: the rules come from
:func:`flagagg.available_rules` and what each rule class declares once in its
``contract`` (parameters, bound on p, NaN policy, cost, reference; see
:mod:`flagagg.rules._contract`), its first docstring line, and the behaviour
measured by running it; the attacks from the registry of
:mod:`flagagg.attacks`, and the backend support table from running every rule
on a tiny input with every installed backend. A rule or attack added to a
registry appears in the next docs build.

Each ``*_rst`` function returns reStructuredText lines; the Sphinx extension
(:mod:`flagagg_sphinx`) parses them into the page, and ``tests/test_docs.py``
calls them too so that a broken registry entry fails ``make test``.

Attacks declare their source with the function (``attack.func.reference``).
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RuleInfo",
    "extras_rst",
    "attack_rows",
    "attacks_rst",
    "pre_rows",
    "pre_rst",
    "rule_infos",
    "rules_rst",
    "support_rst",
    "support_table",
]

# Rules whose class docstring does not start with a definition.
_DEFINITION_OVERRIDES = {
    "flag": "Projection of the normalised inputs onto the r-dimensional subspace that "
    "minimises the robust (square-root) reconstruction error; see "
    ":doc:`/flag-aggregator`.",
}

_SEED = 12345


# --------------------------------------------------------------------------
# text helpers


def _doc(obj: Any) -> str:
    return inspect.cleandoc(getattr(obj, "__doc__", None) or "")


def _summary(obj: Any) -> str:
    doc = _doc(obj)
    para = doc.split("\n\n", 1)[0] if doc else ""
    return " ".join(para.split())


def _cell(text: str) -> str:
    """Make text safe as one list-table cell (no line breaks)."""
    return " ".join(str(text).split()) or "--"



def _list_table(header: list[str], rows: list[list[str]], widths: str | None = None,
                css: str | None = "flagagg-table") -> list[str]:
    """A ``list-table`` directive with one header row, cells given as rst text."""
    lines = [".. list-table::", "   :header-rows: 1"]
    if widths:
        lines.append(f"   :widths: {widths}")
    if css:
        lines.append(f"   :class: {css}")
    lines.append("")
    for row in [header, *rows]:
        lines.append(f"   * - {row[0]}")
        lines += [f"     - {cell}" for cell in row[1:]]
    return lines


def _fmt_default(value: Any) -> str:
    return repr(value) if isinstance(value, str) else f"{value!r}"


# --------------------------------------------------------------------------
# rules


@dataclass
class RuleInfo:
    """What the docs say about one registered rule.

    Attributes
    ----------
    name : str
        Registry name.
    cls : type
        The rule class.
    path : str
        Importable dotted path of the class, for cross-references.
    definition : str
        First line of its docstring.
    parameters : list of str
        ``name=default`` of its constructor, ``backend`` left out.
    takes_f : bool
        Whether it takes the Byzantine count ``f``.
    min_p : dict
        ``f -> smallest p`` the rule's ``check_workers`` accepts (key
        ``None`` for rules without ``f``), or empty when the rule cannot be
        built with defaults.
    precondition : str
        The rule's declared bound (``contract.bound``) in words, with those values.
    complexity : str
        ``contract.cost``.
    nan_documented : str or None
        ``contract.nan_policy``.
    nan_measured : str
        What a NaN row and an Inf row did.
    source : str
        ``contract.reference``, short form.
    output : str
        ``"aggregate"`` (a vector) or a description of a pre-aggregation output.
    problems : list of str
        Anything that went wrong while measuring.
    """

    name: str
    cls: type
    path: str
    definition: str
    parameters: list[str]
    takes_f: bool
    min_p: dict = field(default_factory=dict)
    precondition: str = ""
    complexity: str = ""
    nan_documented: str | None = None
    nan_measured: str = ""
    source: str = ""
    output: str = "aggregate"
    problems: list[str] = field(default_factory=list)


def _rule_class(name: str) -> type:
    from flagagg.rules import _rule_class

    return _rule_class(name)


def _public_path(cls: type) -> str:
    """Shortest importable dotted path of ``cls`` (``flagagg.X`` when re-exported)."""
    import flagagg
    import flagagg.rules

    for mod in (flagagg, flagagg.rules):
        if getattr(mod, cls.__name__, None) is cls:
            return f"{mod.__name__}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _init_parameters(cls: type) -> list[inspect.Parameter]:
    """The declared parameters (``contract.params``), with their constructor defaults."""
    sig = inspect.signature(cls.__init__).parameters
    return [sig[name] for name in cls.contract.params if name != "backend"]


def _inputs(p: int, n: int = 16, seed: int = _SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 1.0, size=(p, n))


def _build(name: str, f: int | None, pre: list | None = None) -> Any:
    import flagagg

    kwargs = {"pre": pre} if pre else {}
    return flagagg.get_rule(name, f=f, **kwargs) if f is not None else flagagg.get_rule(
        name, **kwargs)


def _smallest_p(rule: Any, p_max: int = 64) -> int | None:
    """Smallest number of inputs the rule's own ``check_workers`` accepts."""
    for p in range(1, p_max + 1):
        try:
            rule.check_workers(p)
        except ValueError:
            continue
        return p
    return None


def _formula(bound: Any) -> str:
    """``"p ≥ a f + b"`` from a rule's declared ``contract.bound``."""
    return str(bound).replace(">=", "≥")


def _call(rule: Any, G: np.ndarray, **kwargs: Any) -> Any:
    """``rule(G, **kwargs)`` with the per-call inputs it declares (``contract.call_inputs``).

    The one kind there is, FLTrust's trusted reference, is a vector like one
    input: the median of the finite inputs, as a server's clean gradient would point.
    """
    with np.errstate(all="ignore"):
        ref = np.nanmedian(np.where(np.isfinite(G), G, np.nan), axis=0)
    extra = {k: np.nan_to_num(ref, nan=1.0) for k in rule.missing_inputs()}
    return rule(G, **kwargs, **extra)


def _nan_behaviour(name: str, f: int | None, p: int, value: float) -> str:
    G = _inputs(p)
    G[0] = value
    try:
        res = _call(_build(name, f), G, return_result=True, backend="numpy")
    except Exception as exc:  # noqa: BLE001 - the docs report whatever happens
        return f"raises {type(exc).__name__}"
    out = np.asarray(getattr(res, "aggregate", res))
    excluded = tuple(i for i, *_ in getattr(res, "excluded", ()) or ())
    if not np.all(np.isfinite(out)):
        return "output non-finite"
    if 0 in excluded:
        return "row excluded and reported"
    return "finite output"


def _source(cls: type) -> str:
    ref = cls.contract.reference
    return ref.short() if ref is not None else "--"


def rule_infos(f_values: tuple[int, ...] = (1, 2, 3)) -> list[RuleInfo]:
    """Describe every registered rule: its declared bound on p, its measured NaN handling.

    Parameters
    ----------
    f_values : tuple of int, default=(1, 2, 3)
        Byzantine counts at which the smallest accepted ``p`` is listed.

    Returns
    -------
    infos : list of RuleInfo
        One per name of :func:`flagagg.available_rules`, in that order.
    """
    import flagagg

    infos = []
    for name in flagagg.available_rules():
        cls = _rule_class(name)
        params = _init_parameters(cls)
        takes_f = any(p.name == "f" for p in params)
        required = [p.name for p in params
                    if p.default is inspect.Parameter.empty and p.name != "f"]
        info = RuleInfo(
            name=name,
            cls=cls,
            path=_public_path(cls),
            definition=_DEFINITION_OVERRIDES.get(name) or _summary(cls) or "not documented",
            parameters=[p.name if p.default is inspect.Parameter.empty
                        else f"{p.name}={_fmt_default(p.default)}" for p in params],
            takes_f=takes_f,
            complexity=cls.contract.cost or "not declared",
            nan_documented=cls.contract.nan_policy or None,
            source=_source(cls),
        )
        if required:
            info.precondition = f"needs parameters {', '.join(required)}; not measured"
            info.nan_measured = "not measured"
            infos.append(info)
            continue
        try:
            # the bound each rule declares (contract.bound) and enforces (check_workers)
            if takes_f:
                rules = {f: _build(name, f) for f in f_values}
                f_probe = f_values[0]
            else:
                rules = {None: _build(name, None)}
                f_probe = None
            info.min_p = {f: _smallest_p(rule) for f, rule in rules.items()}
            bound = cls.contract.bound
            listed = ", ".join(f"f={f}: p ≥ {p}" for f, p in info.min_p.items()
                               if f is not None)
            info.precondition = (f"{_formula(bound)} ({listed})" if bound and listed
                                 else f"any p ≥ {min(info.min_p.values())}")
            if cls.contract.breakdown:
                # A rule without a bound against some inputs says so next to its bound
                # (its first clause; the rules page has the rest).
                info.precondition += f"; breakdown: {cls.contract.breakdown.split(':')[0]}"
            p_probe = max(7, (info.min_p.get(f_probe) or 7))
            out = _call(_build(name, f_probe), _inputs(p_probe), backend="numpy")
            if getattr(out, "ndim", 1) != 1:
                info.output = f"array of shape {tuple(out.shape)} from (p, n) = ({p_probe}, 16)"
            nan = _nan_behaviour(name, f_probe, p_probe, np.nan)
            inf = _nan_behaviour(name, f_probe, p_probe, np.inf)
            info.nan_measured = f"NaN: {nan}" if nan == inf else f"NaN: {nan}; Inf: {inf}"
        except Exception as exc:  # noqa: BLE001 - report, do not hide the rule
            info.problems.append(f"{type(exc).__name__}: {exc}")
            info.precondition = info.precondition or "could not be measured"
            info.nan_measured = info.nan_measured or "could not be measured"
        infos.append(info)
    return infos


def rules_rst(infos: list[RuleInfo] | None = None) -> list[str]:
    """The rules table as reStructuredText lines.

    Parameters
    ----------
    infos : list of RuleInfo, optional
        From :func:`rule_infos` (computed when not given).

    Returns
    -------
    lines : list of str
    """
    infos = rule_infos() if infos is None else infos
    body = []
    for info in infos:
        nan = info.nan_measured
        if info.nan_documented:
            nan += f". Documented: {info.nan_documented}"
        definition = info.definition
        if info.output != "aggregate":
            definition += f" (returns an {info.output})"
        body.append([
            f"``{info.name}`` (:class:`~{info.path}`)",
            _cell(definition),
            _cell(", ".join(f"``{p}``" for p in info.parameters) or "none"),
            _cell(info.precondition),
            _cell(info.complexity),
            _cell(nan),
            _cell(info.source),
        ])
    lines = _list_table(["Rule", "Definition", "Parameters", "Preconditions (measured)",
                         "Complexity", "NaN / Inf input row (measured)", "Source"],
                        body, widths="10 30 16 16 18 14 10")
    problems = [(i.name, msg) for i in infos for msg in i.problems]
    if problems:
        lines += ["", "Measuring these rules failed:", ""]
        lines += [f"* ``{name}``: {_cell(msg)}" for name, msg in problems]
    return lines


def rule_classes_rst(infos: list[RuleInfo] | None = None) -> list[str]:
    """An ``autoclass`` entry for every rule class not re-exported at top level.

    Parameters
    ----------
    infos : list of RuleInfo, optional
        From :func:`rule_infos`.

    Returns
    -------
    lines : list of str
    """
    import flagagg

    lines: list[str] = []
    seen = set()
    for name in flagagg.available_rules():
        cls = _rule_class(name)
        path = _public_path(cls)
        if path.count(".") == 1 or path in seen:  # flagagg.X: documented on the main API page
            continue
        seen.add(path)
        title = f"``{name}``"
        lines += [title, "-" * len(title), "", f".. autoclass:: {path}", "   :members:", ""]
    for row in pre_rows():
        title = f"``{row['name']}`` (pre-aggregation)"
        lines += [title, "-" * len(title), "", f".. autoclass:: {row['path']}", "   :members:",
                  ""]
    return lines


# --------------------------------------------------------------------------
# pre-aggregation steps


def _pre_names() -> list[str]:
    try:
        from flagagg.rules import available_pre
    except ImportError:
        return []
    return list(available_pre())


def _pre_class(name: str) -> type:
    from flagagg.rules._pre import make_pre

    return type(make_pre(name, 1))


def _pre_parameters(name: str) -> dict[str, inspect.Parameter]:
    return {p.name: p for p in _init_parameters(_pre_class(name))}


def pre_rows() -> list[dict]:
    """One dict per pre-aggregation step: name, class path, definition, parameters, source.

    Returns
    -------
    rows : list of dict
        Empty when this version has no pre-aggregation steps.
    """
    rows = []
    for name in _pre_names():
        cls = _pre_class(name)
        params = _init_parameters(cls)
        rows.append({
            "name": name,
            "path": f"{cls.__module__}.{cls.__qualname__}",
            "definition": _summary(cls),
            "parameters": [p.name if p.default is inspect.Parameter.empty
                           else f"{p.name}={_fmt_default(p.default)}" for p in params],
            "source": _source(cls),
        })
    return rows


def pre_rst(rows: list[dict] | None = None) -> list[str]:
    """The pre-aggregation table as reStructuredText lines.

    Parameters
    ----------
    rows : list of dict, optional
        From :func:`pre_rows`.

    Returns
    -------
    lines : list of str
    """
    rows = pre_rows() if rows is None else rows
    if not rows:
        return [".. note::", "", "   This version has no pre-aggregation steps."]
    body = [[
        f"``{row['name']}`` (:class:`~{row['path']}`)",
        _cell(row["definition"]),
        _cell(", ".join(f"``{p}``" for p in row["parameters"]) or "none"),
        _cell(row["source"]),
    ] for row in rows]
    return _list_table(["Step", "Definition", "Parameters", "Source"], body,
                       widths="14 46 20 20")


# --------------------------------------------------------------------------
# attacks


def attack_rows() -> list[dict]:
    """One dict per registered attack: name, kind, omniscient, function, definition, ...

    Returns
    -------
    rows : list of dict
        Empty when :mod:`flagagg.attacks` does not exist yet.
    """
    try:
        from flagagg import attacks
    except ImportError:
        return []
    rows = []
    for name in attacks.available_attacks():
        attack = attacks.get_attack(name)
        func = attack.func
        params = attacks.attack_parameters(name)
        ref = getattr(func, "reference", None)  # declared with the attack (attacks._cites)
        rows.append({
            "name": name,
            "kind": attack.kind,
            "omniscient": attack.omniscient,
            "function": f"{func.__module__}.{func.__name__}",
            "definition": _summary(func),
            "parameters": params,
            "source": ref.short() if ref is not None else "--",
        })
    return rows


def attacks_rst(rows: list[dict] | None = None) -> list[str]:
    """The attacks table as reStructuredText lines.

    Parameters
    ----------
    rows : list of dict, optional
        From :func:`attack_rows`.

    Returns
    -------
    lines : list of str
    """
    rows = attack_rows() if rows is None else rows
    if not rows:
        return [".. note::", "", "   :mod:`flagagg.attacks` is not available in this build."]
    body = []
    for row in rows:
        params = ", ".join(f"``{k}={_fmt_default(v)}``" for k, v in row["parameters"].items())
        body.append([
            f"``{row['name']}`` (:func:`~{row['function']}`)",
            row["kind"],
            "yes" if row["omniscient"] else "no",
            _cell(row["definition"]),
            _cell(params or "none"),
            _cell(row["source"]),
        ])
    return _list_table(["Attack", "Kind", "Reads honest gradients", "Definition",
                        "Parameters (defaults of this name)", "Source"], body,
                       widths="14 10 10 36 18 12")


# --------------------------------------------------------------------------
# backend support


@dataclass
class _Target:
    label: str
    backend: str
    library: str
    make: Any  # numpy array -> input array, or None when unavailable
    unavailable: str | None = None


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def _targets() -> list[_Target]:
    from flagagg.backends import BACKEND_NAMES

    has = {m: importlib.util.find_spec(m) is not None
           for m in ("numba", "torch", "cupy", "array_api_strict")}
    out = []
    for name in BACKEND_NAMES:
        if name in ("numpy", "numba"):
            miss = None if name == "numpy" or has["numba"] else "not installed"
            out.append(_Target(name, name, "numpy", np.array, miss))
        elif name == "torch":
            if not has["torch"]:
                out += [_Target("torch (CPU)", name, "torch", None, "not installed"),
                        _Target("torch (CUDA)", name, "torch", None, "not installed")]
                continue
            import torch

            out.append(_Target("torch (CPU)", name, "torch", torch.as_tensor))
            out.append(_Target(
                "torch (CUDA)", name, "torch",
                lambda a, torch=torch: torch.as_tensor(a, device="cuda"),
                None if _cuda_available() else "GPU: untested here"))
        elif name == "cupy":
            if not has["cupy"]:
                out.append(_Target("cupy (GPU)", name, "cupy", None, "not installed"))
                continue
            try:
                import cupy

                ok = cupy.cuda.runtime.getDeviceCount() > 0
            except Exception:  # noqa: BLE001 - no driver means no GPU
                ok = False
            out.append(_Target("cupy (GPU)", name, "cupy", cupy.asarray,
                               None if ok else "GPU: untested here"))
        elif name == "array_api":
            if has["array_api_strict"]:
                import array_api_strict as xps

                out.append(_Target("array_api (array-api-strict)", name, "array_api_strict",
                                   xps.asarray))
            else:
                out.append(_Target("array_api (NumPy)", name, "numpy", np.array))
        else:
            out.append(_Target(name, name, "?", None, "no test input known to the docs"))
    return out


def _check_cell(rule: Any, G: np.ndarray, reference: np.ndarray, target: _Target) -> str | None:
    """Run ``rule`` on ``G`` in ``target``'s library; None when all is right, else why not."""
    from flagagg._array import array_library, to_numpy

    X = target.make(G)
    # A rule's per-call inputs (contract.call_inputs: FLTrust's trusted reference, the
    # one kind there is) are vectors like one input: the inputs' median, as a server's
    # clean gradient would point.
    extra = {k: target.make(np.median(G, axis=0, keepdims=True))[0]
             for k in rule.missing_inputs()}
    out = rule(X, backend=target.backend, **extra)
    lib = array_library(out)
    if lib != target.library:
        return f"output is a {lib} array, input was {target.library}"
    if "float64" not in str(out.dtype):
        return f"float64 input gave {out.dtype} output"
    got = np.asarray(to_numpy(out), dtype=np.float64)
    if got.shape != reference.shape:
        return f"shape {got.shape}, NumPy backend gave {reference.shape}"
    if not np.allclose(got, reference, rtol=1e-6, atol=1e-9, equal_nan=True):
        err = np.max(np.abs(got - reference)) / max(np.max(np.abs(reference)), 1e-300)
        return f"differs from the NumPy backend (max relative difference {err:.1e})"
    return None


def _support_cases(infos: list[RuleInfo]) -> list[tuple[str, Any, int]]:
    """``(label, factory, p)``: every rule, and each pre-aggregation step before two rules."""
    cases = []
    for info in infos:
        f = 1 if info.takes_f else None
        p = max(11, (info.min_p.get(f) or 0))
        cases.append((f"``{info.name}``", lambda name=info.name, f=f: _build(name, f), p))
    by_name = {i.name: i for i in infos}
    for step in _pre_names():
        # bucketing draws random buckets: every call gets a fresh, equally seeded rule
        spec = (step, {"random_state": 0}) if "random_state" in _pre_parameters(step) else step
        for then in ("krum", "median"):
            if then not in by_name:
                continue
            info = by_name[then]
            f = 1 if info.takes_f else None
            p = max(11, 2 * (info.min_p.get(f) or 0))
            cases.append((f"``{step}`` then ``{then}``",
                          lambda then=then, f=f, spec=spec: _build(then, f, pre=[spec]), p))
    return cases


def support_table(infos: list[RuleInfo] | None = None) -> tuple[list[str], list[list[str]], list]:
    """Run every rule with every backend on a tiny float64 input.

    Parameters
    ----------
    infos : list of RuleInfo, optional
        From :func:`rule_infos`; gives the ``p`` each rule needs.

    Returns
    -------
    header : list of str
        Column labels (backend and device).
    rows : list of list of str
        One row per rule (and per pre-aggregation step before a rule): its
        label, then one cell per column.
    failures : list of (rule, column, message)
    """
    infos = rule_infos() if infos is None else infos
    targets = _targets()
    header = [t.label for t in targets]
    rows, failures = [], []
    for label, factory, p in _support_cases(infos):
        row = [label]
        G = _inputs(p, n=24)
        try:
            reference = np.asarray(_call(factory(), G, backend="numpy"), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001
            rows.append(row + ["not measured"] * len(targets))
            failures.append((label, "NumPy", f"{type(exc).__name__}: {exc}"))
            continue
        for t in targets:
            if t.unavailable:
                row.append(t.unavailable)
                continue
            try:
                why = _check_cell(factory(), G, reference, t)
            except Exception as exc:  # noqa: BLE001 - a failing cell is the information
                why = f"{type(exc).__name__}: {exc}"
            if why is None:
                row.append("✓")
            else:
                row.append("✗ (see below)")
                failures.append((label, t.label, why))
        rows.append(row)
    return header, rows, failures


def support_rst(infos: list[RuleInfo] | None = None) -> list[str]:
    """The rule x backend x device support table as reStructuredText lines.

    Parameters
    ----------
    infos : list of RuleInfo, optional
        From :func:`rule_infos`.

    Returns
    -------
    lines : list of str
    """
    header, rows, failures = support_table(infos)
    body = [[row[0], *(_cell(c) for c in row[1:])] for row in rows]
    lines = _list_table(["Rule", *header], body)
    if failures:
        lines += ["", "Failures:", ""]
        lines += [f"* {rule} on {col}: {_cell(msg)}" for rule, col, msg in failures]
    return lines


# --------------------------------------------------------------------------
# install extras

_EXTRA_PURPOSE = {
    "numba": "parallel CPU kernels; the default backend for NumPy inputs when installed",
    "torch": "the ``torch`` backend: PyTorch tensors on CPU or CUDA",
    "cupy": "the ``cupy`` backend: CuPy arrays on an NVIDIA GPU (CUDA 12 wheels)",
    "sim": "the simulated cluster (:doc:`/simulation`): ``flagagg demo``, "
    "``flagagg experiment``, ``flagagg tune``",
    "all": "everything a user needs on a CPU machine",
    "test": "the test suite",
    "docs": "this documentation",
    "bench": "the asv benchmarks",
    "dev": "development: all of the above and ruff",
}


def extras() -> dict[str, list[str]]:
    """The optional dependencies, read from ``pyproject.toml`` (or the installed metadata).

    Returns
    -------
    extras : dict
        Extra name -> requirement strings.
    """
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = None
    if tomllib is not None and pyproject.is_file():
        with pyproject.open("rb") as fh:
            data = tomllib.load(fh)
        return dict(data["project"].get("optional-dependencies", {}))
    from importlib import metadata

    out: dict[str, list[str]] = {}
    meta = metadata.metadata("flagagg")
    for extra in meta.get_all("Provides-Extra") or []:
        out[extra] = []
    for req in meta.get_all("Requires-Dist") or []:
        m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        if m:
            out.setdefault(m.group(1), []).append(req.split(";")[0].strip())
    return out


def extras_rst() -> list[str]:
    """The table of install extras as reStructuredText lines.

    Returns
    -------
    lines : list of str
    """
    body = [[
        f"``{name}``",
        _cell(", ".join(f"``{r}``" for r in reqs) or "--"),
        _cell(_EXTRA_PURPOSE.get(name, "--")),
    ] for name, reqs in extras().items()]
    return _list_table(["Extra", "Installs", "For"], body, widths="12 40 48", css=None)
