"""Page layout of the flagagg docs: one table of contents per page.

The theme's right column is each page's table of contents. A page that
carries its own ``.. contents::`` box would list its sections twice, so
such a page gets no right column (its box stays where its author put it).
"""

from __future__ import annotations

from docutils import nodes

__all__ = ["has_contents_box", "setup"]


def has_contents_box(doctree: nodes.document | None) -> bool:
    """Whether the page holds a ``contents`` directive's table of contents.

    Parameters
    ----------
    doctree : docutils.nodes.document or None

    Returns
    -------
    bool
    """
    if doctree is None:
        return False
    return any("contents" in topic["classes"] for topic in doctree.findall(nodes.topic))


def _page_context(app, pagename, templatename, context, doctree) -> None:
    # runs after the theme's own handler (priority 500), which fills the list
    if has_contents_box(doctree):
        context["secondary_sidebar_items"] = []


def setup(app) -> dict:
    """Register the page-context handler.

    Parameters
    ----------
    app : sphinx.application.Sphinx

    Returns
    -------
    metadata : dict
    """
    app.connect("html-page-context", _page_context, priority=900)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
