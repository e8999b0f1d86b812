"""The README's install lines name extras that exist, and ``[all]`` asks for nothing CUDA-sized."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = __import__("tomli")

# benchmark / docs / packaging smoke: out of `pytest -m "not tooling"` (make test runs it)
pytestmark = pytest.mark.tooling

ROOT = Path(__file__).resolve().parents[1]


def _extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return project["name"], project["optional-dependencies"]


def _expand(extra, extras, name):
    """Requirement names of ``extra``, following ``name[...]`` self-references."""
    out = set()
    for req in extras[extra]:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*(\[([^\]]*)\])?", req)
        dist = m.group(1).lower()
        if dist == name:
            for inner in m.group(3).split(","):
                out |= _expand(inner.strip(), extras, name)
        else:
            out.add(dist)
    return out


def _install_block():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Install"):]
    return section[section.index("```") + 3:section.index("```", section.index("```") + 3)]


def test_readme_install_lines_name_existing_extras():
    name, extras = _extras()
    named = re.findall(r'pip install -e "\.\[([^\]]+)\]"', _install_block())
    assert "all" in named
    for group in named:
        for extra in group.split(","):
            assert extra in extras, f"README installs [{extra}], which pyproject.toml lacks"


def test_readme_installs_torch_before_the_extras():
    lines = [ln.split("#")[0].strip() for ln in _install_block().splitlines()]
    first_torch = next(i for i, ln in enumerate(lines) if ln.startswith("pip install \"torch"))
    first_extra = next(i for i, ln in enumerate(lines) if ln.startswith("pip install -e"))
    assert first_torch < first_extra


def test_all_pulls_nothing_cuda_sized_but_torch():
    name, extras = _extras()
    deps = _expand("all", extras, name)
    assert {"numba", "torch", "scikit-learn", "matplotlib"} <= deps
    # torch's own build is the user's choice (README, Makefile TORCH_SPEC); no
    # GPU-only package may come in through [all]
    gpu = {d for d in deps if d.startswith(("cupy", "nvidia", "cuda", "jax"))}
    assert not gpu, gpu
    assert any(d.startswith("cupy") for d in _expand("cupy", extras, name))
