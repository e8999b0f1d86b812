"""How flagagg's modules depend on each other, as declared in pyproject.toml.

The layers, the private-module rule and the absence of cycles are
import-linter contracts (``[tool.importlinter]`` in pyproject.toml, checked
by ``lint-imports``); these tests run it, show that it fails on a tree that
breaks each contract, and check at run time what static contracts cannot:
which heavy libraries an import really loads.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import flagagg

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

PACKAGE = pathlib.Path(flagagg.__file__).parent
PYPROJECT = PACKAGE.parent / "pyproject.toml"

pytest.importorskip("importlinter", reason="import-linter is in the dev extra")


def lint_imports(root):
    """Run ``lint-imports`` on the ``flagagg`` found in folder ``root``; (exit status, output)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = ("import sys\nfrom importlinter.cli import lint_imports_command\n"
            "sys.exit(lint_imports_command())\n")
    out = subprocess.run([sys.executable, "-c", code, "--no-cache", str(PYPROJECT)],
                         capture_output=True, text=True, cwd=root, env=env, timeout=300)
    return out.returncode, out.stdout + out.stderr


def _contracts():
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["importlinter"][
        "contracts"]


def test_the_declared_contracts_hold():
    status, out = lint_imports(PACKAGE.parent)
    assert status == 0, out
    assert f"{len(_contracts())} kept, 0 broken" in out, out


def test_lint_imports_fails_on_a_tree_that_breaks_each_contract(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "flagagg",
                    ignore=shutil.ignore_patterns("__pycache__"))
    planted = {
        # a rule reaching up into the simulator: a layer crossed
        "rules/_planted_layer.py": "def f():\n    from ..sim import simulate\n",
        # the simulator reaching into a rule's private module
        "sim/_planted_private.py": "from ..rules._krum import Krum\n",
        # two backends importing each other
        "backends/_planted_a.py": "from . import _planted_b\n",
        "backends/_planted_b.py": "from . import _planted_a\n",
    }
    for name, text in planted.items():
        (tmp_path / "flagagg" / name).write_text(text)
    status, out = lint_imports(tmp_path)
    assert status != 0
    assert f"0 kept, {len(_contracts())} broken" in out, out
    assert "flagagg.rules._planted_layer -> flagagg.sim" in out
    assert "flagagg.sim._planted_private -> flagagg.rules._krum" in out
    assert "_planted_a" in out and "_planted_b" in out


def test_importing_the_package_its_config_and_its_rules_loads_no_heavy_library():
    code = (
        "import sys, numpy as np\n"
        "import flagagg, flagagg.attacks, flagagg.training._config as config\n"
        "config.load_config('demo')\n"
        "G = np.random.default_rng(0).normal(size=(9, 20))\n"
        "for name in flagagg.available_rules():\n"
        "    rule = flagagg.get_rule(name, f=1)\n"
        "    # FLTrust takes the server's reference gradient on every call\n"
        "    extra = {k: G.mean(axis=0) for k in rule.call_inputs}\n"
        "    rule(G, backend='numpy', **extra)\n"
        "heavy = [m for m in ('numba', 'torch', 'cupy', 'flagagg.sim', 'flagagg.distributed')\n"
        "         if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FLAGAGG_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"these were loaded: {out.stdout}"


def test_reading_a_config_and_importing_distributed_load_no_simulator():
    pytest.importorskip("torch")
    code = ("import sys\n"
            "from flagagg.training._config import load_config\n"
            "load_config('demo')\n"
            "import flagagg.distributed\n"
            "print(sorted(m for m in sys.modules if m.startswith('flagagg.sim')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout
