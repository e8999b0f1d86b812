r"""Math that renders with no network: MathJax served from the built site.

``sphinx.ext.mathjax`` loads MathJax from a CDN by default, so a page read
offline, behind a firewall or from a local build shows raw ``\(...\\)``.
This extension points ``mathjax_path`` at a copy of MathJax 3's
``tex-svg-full.js`` in the build's ``_static/mathjax/``: one self-contained
file (every TeX package, SVG output, so no web fonts to fetch). The file
comes from the ``sphinx-mathjax-offline`` package on PyPI (part of the
``docs`` extra), which ships MathJax's distribution; only this one file of
it is copied.

A build without the package fails with a message saying what to install:
it never falls back to the CDN.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sphinx.errors import ConfigError

__all__ = ["MATHJAX_FILE", "mathjax_source", "setup"]

# Where the page loads it from, relative to _static/.
MATHJAX_FILE = "mathjax/tex-svg-full.js"
_PACKAGE = "sphinx-mathjax-offline"  # its import name has dashes, as on PyPI


def mathjax_source() -> Path:
    """The ``tex-svg-full.js`` shipped by ``sphinx-mathjax-offline``.

    Returns
    -------
    path : pathlib.Path

    Raises
    ------
    sphinx.errors.ConfigError
        If the package is not installed or lacks the file.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "flagagg's docs render math with a local copy of MathJax from the "
            f"'{_PACKAGE}' package, which is not installed: pip install 'flagagg[docs]'"
        )
    path = Path(next(iter(spec.submodule_search_locations)), "static", MATHJAX_FILE)
    if not path.is_file():
        raise ConfigError(f"'{_PACKAGE}' is installed but has no {MATHJAX_FILE} ({path})")
    return path


def _config_inited(app, config) -> None:
    # A URL set in conf.py would load from the network again: refuse it (the
    # default, a CDN URL, is what this extension replaces).
    chosen = getattr(config, "_raw_config", {}).get("mathjax_path")
    if chosen and str(chosen).startswith(("http:", "https:", "//")):
        raise ConfigError(
            f"mathjax_path is a URL ({config.mathjax_path}); the docs must render math "
            "offline (flagagg_math serves MathJax from _static/)"
        )
    mathjax_source()  # fail at start, not after an hour of building
    config.mathjax_path = MATHJAX_FILE


def _build_finished(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir, "_static", MATHJAX_FILE)
    target.parent.mkdir(parents=True, exist_ok=True)
    source = mathjax_source()
    if not target.is_file() or target.stat().st_size != source.stat().st_size:
        target.write_bytes(source.read_bytes())


def setup(app) -> dict:
    """Serve MathJax from the built site.

    Parameters
    ----------
    app : sphinx.application.Sphinx

    Returns
    -------
    metadata : dict
    """
    app.setup_extension("sphinx.ext.mathjax")
    # after conf.py's values are read, before sphinx.ext.mathjax uses them
    app.connect("config-inited", _config_inited, priority=800)
    app.connect("build-finished", _build_finished)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
