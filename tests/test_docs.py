"""The guides' code runs: every executable block of docs/*.rst, and the generated tables.

The docs build (``make docs``) executes the same blocks with the same helper
(``docs/_ext/docblocks.py``); running them here makes ``make test`` fail as
soon as a guide stops matching the code, without building the HTML.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import docblocks  # noqa: E402 - the docs' own helper, found through the path above

PAGES = sorted(
    p for p in DOCS.rglob("*.rst")
    if not ({"_build", "generated", "_templates"} & set(p.relative_to(DOCS).parts))
)


def _page_id(path: Path) -> str:
    return str(path.relative_to(DOCS).with_suffix(""))


def test_pages_found():
    names = {_page_id(p) for p in PAGES}
    assert {"index", "getting-started", "flag-aggregator", "rules-and-attacks"} <= names
    # The guides hold executable blocks, so the parametrised test below is not empty.
    assert sum(len(docblocks.page_blocks(p)) for p in PAGES) >= 20


def test_extract_blocks():
    text = "\n".join([
        "Title",
        "",
        ".. exec-code::",
        "   :requires: numpy, os",
        "",
        "   x = 1",
        "",
        "   print(x)",
        "",
        "Text.",
        "",
        ".. command-output:: flagagg demo --help",
        "",
        ".. code-block:: python",
        "",
        "   not_run()",
    ])
    blocks = docblocks.extract_blocks(text)
    assert [b.directive for b in blocks] == ["exec-code", "command-output"]
    first, second = blocks
    assert first.code == "x = 1\n\nprint(x)"
    assert first.requires == ["numpy", "os"]
    assert (first.lineno, first.code_lineno) == (3, 6)
    assert second.argument == "flagagg demo --help" and second.code == ""
    assert docblocks.skip_reason(first) is None
    assert "not available" in docblocks.skip_reason(
        docblocks.Block("exec-code", "", "", 1, 1, {"requires": "no_such_module_xyz"}))


def test_traceback_points_into_the_page():
    block = docblocks.extract_blocks(".. exec-code::\n\n   a = 1\n   raise KeyError(a)\n")[0]
    with pytest.raises(KeyError) as info:
        docblocks.run_block(block, {}, filename="page.rst")
    assert info.traceback[-1].lineno + 1 == 4  # pytest counts from 0


@pytest.mark.parametrize("page", [p for p in PAGES if docblocks.page_blocks(p)], ids=_page_id)
def test_page_blocks_run(page, tmp_path, monkeypatch):
    """Run a page's blocks in order, sharing one namespace, as the docs build does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs.{_page_id(page)}"}
    ran, skipped = 0, []
    for block in docblocks.page_blocks(page):
        where = f"{page.relative_to(DOCS)}:{block.lineno}"
        reason = docblocks.skip_reason(block)
        if reason:
            skipped.append(f"{where}: {reason}")
            continue
        if block.directive == "exec-code":
            docblocks.run_block(block, namespace, filename=str(page))
        elif block.directive == "plot":
            # matplotlib's plot directive: a fresh namespace with conf.py's plot_pre_code
            code = block.code or (page.parent / block.argument).read_text(encoding="utf-8")
            plot = dataclasses.replace(block, code=code)
            try:
                docblocks.run_block(plot, {"np": np, "plt": plt, "__name__": "__plot__"},
                                    filename=str(page))
            finally:
                plt.close("all")
        elif block.directive == "command-output":
            docblocks.run_command(block, tmp_path, page_dir=page.parent, timeout=240)
        ran += 1
    if not ran:
        pytest.skip("; ".join(skipped))


def test_flag_result_fields_documented():
    """Every FlagResult field is explained on the diagnostics page."""
    import flagagg

    text = (DOCS / "flag-aggregator.rst").read_text(encoding="utf-8")
    section = text[text.index(".. _flag-diagnostics:"):text.index(".. _flag-bad-inputs:")]
    # Private fields (the deferred diagnostics' inputs) are not part of the result's API.
    missing = [f.name for f in dataclasses.fields(flagagg.FlagResult)
               if not f.name.startswith("_") and f"``{f.name}``" not in section]
    assert not missing, f"document these FlagResult fields in flag-aggregator.rst: {missing}"


@pytest.fixture(scope="module")
def infos():
    import flagagg_tables

    return flagagg_tables.rule_infos()


def test_generated_tables(infos):
    """The tables the docs build computes from the registries can be computed."""
    import flagagg_tables

    import flagagg

    assert [i.name for i in infos] == flagagg.available_rules()
    problems = {i.name: i.problems for i in infos if i.problems}
    assert not problems, f"measuring these rules for the docs failed: {problems}"
    for lines in (flagagg_tables.rules_rst(infos), flagagg_tables.attacks_rst(),
                  flagagg_tables.support_rst(infos), flagagg_tables.extras_rst()):
        assert lines and all("\n" not in line for line in lines)
    assert any("``flag``" in line for line in flagagg_tables.rules_rst(infos))


def test_rules_table_bounds_are_the_ones_the_rules_enforce(infos):
    """The table reads each rule's p_bound and check_workers; real inputs agree with both."""
    import flagagg

    rng = np.random.default_rng(0)
    by_name = {i.name: i for i in infos}
    assert by_name["krum"].min_p == {1: 5, 2: 7, 3: 9}
    assert by_name["krum"].precondition.startswith("p ≥ 2f + 3")
    # The mean does not use f, but refuses an f no rule could tolerate (issue 23).
    assert by_name["mean"].precondition.startswith("p ≥ 2f + 1")
    for info in infos:
        for f, p_min in info.min_p.items():
            rule = flagagg.get_rule(info.name, f=f)
            rule(rng.normal(1.0, 1.0, (p_min, 16)), backend="numpy")
            if p_min > 1:
                with pytest.raises(ValueError):
                    rule(rng.normal(1.0, 1.0, (p_min - 1, 16)), backend="numpy")
