"""Sphinx configuration of the flagagg documentation.

Build with ``make docs`` (warnings are errors). The build runs flagagg: the
guides' code blocks, the plots, the rule, attack and backend support tables
are computed from the installed package (see ``_ext/``). It needs no network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("MPLBACKEND", "Agg")

import flagagg  # noqa: E402 - after the path set-up

project = "flagagg"
author = "The flagagg developers"
copyright = "the flagagg developers"  # noqa: A001 - Sphinx's name
release = flagagg.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.viewcode",
    "numpydoc",
    "matplotlib.sphinxext.plot_directive",
    "sphinxcontrib.programoutput",
    "flagagg_sphinx",
    "flagagg_math",
    "flagagg_layout",
    "sphinx_gallery.gen_gallery",
]

root_doc = "index"
exclude_patterns = ["_build", "_generated_*.rst", "gallery"]
templates_path = ["_templates"]
html_static_path = ["_static"]
# `make asv-publish` writes asv's HTML report to asv_bench/.asv/published/asv;
# when it is there, the build copies it in as asv/ (benchmarks.rst links it).
# The build itself never runs asv.
_ASV_PUBLISHED = HERE.parent / "asv_bench" / ".asv" / "published"
html_extra_path = [str(_ASV_PUBLISHED)] if (_ASV_PUBLISHED / "asv" / "index.html").is_file() else []
default_role = "code"
nitpicky = False

# -- HTML --------------------------------------------------------------------
# Layout: the left column lists every guide (sidebar-site-nav.html; the
# theme's "Section Navigation" is empty on a site whose guides have no
# sub-pages), the right column is the page's one table of contents
# (flagagg_layout drops it on pages that carry their own ``contents`` box),
# and the header holds only the search and the theme switch, since the left
# column already lists the pages.
html_theme = "pydata_sphinx_theme"
html_title = f"flagagg {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "navbar_center": [],
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": [],
}
html_sidebars = {"**": ["sidebar-site-nav"], "search": [], "genindex": []}
html_show_sourcelink = False
html_copy_source = False

# -- API reference -------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "none"
autodoc_mock_imports: list[str] = []
# numpydoc renders the Parameters / Returns / Attributes sections; autodoc
# member lists would repeat the attributes of the result dataclasses.
numpydoc_show_class_members = False
numpydoc_show_inherited_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

# -- matplotlib plot directive --------------------------------------------------
plot_include_source = True
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]
plot_rcparams = {"figure.autolayout": False, "savefig.bbox": "tight"}
plot_pre_code = "import numpy as np\nimport matplotlib.pyplot as plt\n"

# -- Gallery of worked examples (sphinx-gallery) -------------------------------
# docs/gallery/*.py run while the docs are built; their printed output and
# every figure they draw appear on the page (docs/auto_examples/, generated).
# A script that raises fails the build.
sphinx_gallery_conf = {
    "examples_dirs": ["gallery"],
    "gallery_dirs": ["auto_examples"],
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"/_",
    "within_subsection_order": "FileNameSortKey",
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "capture_repr": ("_repr_html_",),
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib", "flagagg_gallery.reset_torch_threads"),
    "reset_modules_order": "both",
    "show_memory": False,
    "min_reported_time": 1,
    # its page of execution times loads jQuery and DataTables from CDNs
    "write_computation_times": False,
    "line_numbers": False,
    "plot_gallery": "True",
}

# No intersphinx: the build must not need the network.
