"""The guides' code runs: every executable block of docs/*.rst, and the generated tables.

The docs build (``make docs``) executes the same blocks with the same helper
(``docs/_ext/docblocks.py``); running them here makes ``make test`` fail as
soon as a guide stops matching the code, without building the HTML.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

# benchmark / docs / packaging smoke: out of `pytest -m "not tooling"` (make test runs it)
pytestmark = pytest.mark.tooling

DOCS = Path(__file__).resolve().parents[1] / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import docblocks  # noqa: E402 - the docs' own helper, found through the path above

from support.rules import call  # noqa: E402

PAGES = sorted(
    p for p in DOCS.rglob("*.rst")
    if not ({"_build", "generated", "_templates", "auto_examples"}
            & set(p.relative_to(DOCS).parts))
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
    # FLTrust trusts the server's reference, not a majority; DnC states its missing bound.
    assert by_name["fltrust"].precondition.startswith("p ≥ f + 1")
    assert by_name["dnc"].precondition.endswith(
        "breakdown: none against several Byzantine inputs far off in different directions "
        "or magnitudes")
    for info in infos:
        for f, p_min in info.min_p.items():
            rule = flagagg.get_rule(info.name, f=f)
            call(rule, rng.normal(1.0, 1.0, (p_min, 16)), backend="numpy")
            if p_min > 1:
                with pytest.raises(ValueError):
                    call(rule, rng.normal(1.0, 1.0, (p_min - 1, 16)), backend="numpy")


# -- Gallery, math, layout and the browser check (issue 29) ---------------------

GALLERY = sorted((DOCS / "gallery").glob("plot_*.py"))
# Examples that start processes (4 DDP ranks, Ray) or run 30 trainings take
# a minute or more each: the docs build runs them (a failing example fails
# it), make test runs the quick ones.
BUILD_ONLY = {"plot_ddp", "plot_flower", "plot_attacks_training"}


def test_gallery_found():
    names = {p.stem for p in GALLERY}
    assert {"plot_flag_subspace", "plot_verdicts"} | BUILD_ONLY <= names


@pytest.mark.parametrize("script", [p for p in GALLERY if p.stem not in BUILD_ONLY],
                         ids=lambda p: p.stem)
def test_gallery_example_runs(script, monkeypatch):
    """Each gallery script runs as the docs build runs it, and draws at least one figure."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(script.parent)  # where sphinx-gallery runs it
    plt.close("all")
    threads = torch.get_num_threads()  # an example may set one thread
    code = compile(script.read_text(encoding="utf-8"), str(script), "exec")
    try:
        exec(code, {"__name__": "__main__"})  # noqa: S102 - running the example is the point
        assert plt.get_fignums(), f"{script.name} drew no figure"
    finally:
        plt.close("all")
        torch.set_num_threads(threads)


def test_contents_box_found():
    """Pages with their own contents box are found, so they get no second one."""
    from docutils.core import publish_doctree
    from flagagg_layout import has_contents_box

    with_box = publish_doctree("T\n=\n\n.. contents:: On this page\n   :local:\n\n"
                               "A\n-\n\ntext\n\nB\n-\n\ntext\n")
    without = publish_doctree("T\n=\n\n.. note:: a topic-like box\n\nA\n-\n\ntext\n")
    assert has_contents_box(with_box)
    assert not has_contents_box(without)
    assert not has_contents_box(None)


def test_math_is_served_locally(tmp_path):
    """A build with flagagg_math copies MathJax into _static and loads it from there."""
    pytest.importorskip("sphinx")
    if importlib.util.find_spec("sphinx-mathjax-offline") is None:
        pytest.skip("sphinx-mathjax-offline (the docs extra) is not installed")
    from sphinx.application import Sphinx

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "conf.py").write_text(
        f"import sys\nsys.path.insert(0, {str(DOCS / '_ext')!r})\n"
        "extensions = ['flagagg_math']\n", encoding="utf-8")
    (tmp_path / "src" / "index.rst").write_text(
        "Math\n====\n\nInline :math:`\\sum_i c_i g_i` and\n\n.. math:: x^2\n",
        encoding="utf-8")
    out = tmp_path / "html"
    app = Sphinx(str(tmp_path / "src"), str(tmp_path / "src"), str(out),
                 str(tmp_path / "doctrees"), "html", status=None, warning=None,
                 warningiserror=True, freshenv=True)
    app.build()
    page = (out / "index.html").read_text(encoding="utf-8")
    assert '<script defer="defer" src="_static/mathjax/tex-svg-full.js' in page
    assert "cdn.jsdelivr" not in page and "mathjax@" not in page
    js = out / "_static" / "mathjax" / "tex-svg-full.js"
    assert js.is_file() and js.stat().st_size > 1_000_000


def test_math_refuses_a_url(tmp_path):
    """conf.py asking for MathJax from a URL is an error, not a silent network load."""
    pytest.importorskip("sphinx")
    from sphinx.application import Sphinx
    from sphinx.errors import ConfigError

    (tmp_path / "conf.py").write_text(
        f"import sys\nsys.path.insert(0, {str(DOCS / '_ext')!r})\n"
        "extensions = ['flagagg_math']\n"
        "mathjax_path = 'https://cdn.example.invalid/mathjax.js'\n", encoding="utf-8")
    (tmp_path / "index.rst").write_text("T\n=\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="offline"):
        Sphinx(str(tmp_path), str(tmp_path), str(tmp_path / "html"), str(tmp_path / "d"),
               "html", status=None, warning=None)


def _checker():
    sys.path.insert(0, str(DOCS))
    import check_browser

    return check_browser


def _measured(**changes):
    base = {
        "column": {"what": "div.bd-article-container", "over": 0, "width": 800},
        "boxes": [], "primary_sidebar_links": 12, "secondary_sidebar_links": 4,
        "contents_boxes": 0, "math": 3, "math_rendered": 3, "math_errors": 0,
        "raw_math": False, "mathjax": True, "network": [],
    }
    base.update(changes)
    return base


def test_browser_verdicts():
    """What the browser check calls broken, from measurements (no browser needed)."""
    problems = _checker().problems
    assert problems(_measured()) == []
    box = {"what": "pre", "over": 96, "scrollbar": 0, "drawn": False,
           "held_inside_article": False}
    assert "no visible scrollbar" in problems(_measured(boxes=[{**box, "overflow": "auto"}]))[0]
    plain = {**box, "overflow": "auto", "scrollbar": 15}      # the browser's own, overlay
    assert "no visible scrollbar" in problems(_measured(boxes=[plain]))[0]
    assert problems(_measured(boxes=[{**plain, "scrollbar": 10, "drawn": True}])) == []
    assert "clipped by 96px" in problems(_measured(boxes=[{**box, "overflow": "hidden"}]))[0]
    assert "spills" in problems(_measured(boxes=[{**box, "overflow": "visible"}]))[0]
    held = {**box, "overflow": "visible", "held_inside_article": True}
    assert problems(_measured(boxes=[held])) == []
    assert "wider than its column" in problems(
        _measured(column={"what": "c", "over": 40, "width": 700}))[0]
    assert "left sidebar is shown with nothing" in problems(
        _measured(primary_sidebar_links=0))[0]
    assert problems(_measured(primary_sidebar_links=None, secondary_sidebar_links=None)) == []
    assert "two tables of contents" in problems(_measured(contents_boxes=1))[0]
    assert problems(_measured(contents_boxes=1, secondary_sidebar_links=None)) == []
    assert "no MathJax" in problems(_measured(mathjax=False, math_rendered=0))[0]
    assert "1 of 3 formulas not rendered" in problems(_measured(math_rendered=2))[0]
    assert "offline" in problems(_measured(network=["https://cdn.example/x.js"]))[0]


SYNTHETIC_PAGE = """<!DOCTYPE html><html><head><style>
body {{ margin: 0; font: 14px monospace; }}
.bd-article-container {{ width: 400px; overflow-x: auto; }}
pre {{ margin: 0 0 8px; }}
#pst-primary-sidebar {{ width: 120px; min-height: 40px; }}
#drawn::-webkit-scrollbar {{ height: 10px; }}
#drawn::-webkit-scrollbar-thumb {{ background: #888; }}
</style></head><body>
<div id="pst-primary-sidebar">{sidebar}</div>
<div class="bd-article-container"><article class="bd-article">
<pre id="{pre_id}" style="overflow-x: {overflow}">{line}</pre>
<p>short text</p>
</article></div></body></html>"""


@pytest.mark.parametrize("overflow, pre_id, sidebar, expected", [
    ("hidden", "plain", "<a href='#'>Guides</a>", "clipped by"),
    ("auto", "plain", "<a href='#'>Guides</a>", "no visible scrollbar"),
    ("auto", "drawn", "", "left sidebar is shown with nothing"),
    ("auto", "drawn", "<a href='#'>Guides</a>", None),
])
def test_browser_check_in_chromium(tmp_path, overflow, pre_id, sidebar, expected):
    """The checker, in headless Chromium, on a tiny page: finds each fault, passes a good page."""
    check = _checker()
    binary = check.find_chromium()
    if binary is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    page = tmp_path / "page.html"
    page.write_text(SYNTHETIC_PAGE.format(overflow=overflow, pre_id=pre_id, sidebar=sidebar,
                                          line="x = 1  # " + "long " * 40),
                    encoding="utf-8")
    with check.Browser(binary, width=800, height=400, timeout=30) as browser:
        found = check.problems(check.measure_page(browser, page))
    if expected is None:
        assert found == []
    else:
        assert any(expected in text for text in found), found
