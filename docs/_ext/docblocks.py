"""Executable code blocks of the guides: find them, decide whether they run, run them.

The guides mark code that must run with the ``exec-code`` directive (and
figures with matplotlib's ``plot`` directive)::

    .. exec-code::
       :requires: torch

       import torch
       print(torch.ones(2))

This module has no Sphinx dependency: the Sphinx extension
(:mod:`flagagg_sphinx`) runs the blocks while building the HTML, and
``tests/test_docs.py`` runs the same blocks under pytest, so a guide whose
code stops working fails ``make test`` as well as ``make docs``.

Blocks of one page share a namespace and run in order, like a notebook.
Options:

``:requires: mod1, mod2``
    Run only when these modules are importable; otherwise the page shows the
    code with a note (and the test is skipped).
``:gpu:``
    Needs a CUDA device; runs only where ``torch.cuda.is_available()``.
``:hide-output:``
    Run, but do not show what the block printed.

``.. command-output:: flagagg ARGS`` (or ``python SCRIPT ARGS``, a script
next to the page) is sphinxcontrib-programoutput's directive, which runs the
command while the docs are built and shows it with its output
(:mod:`flagagg_sphinx` adds the ``:requires:`` option). Under pytest,
:func:`run_command` runs the same commands (``flagagg`` in-process, which
saves an interpreter start per command); a non-zero exit status is an error
in both.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Block", "extract_blocks", "page_blocks", "run_block", "run_command", "skip_reason"]

DIRECTIVES = ("exec-code", "plot", "command-output")
_START = re.compile(r"^(?P<indent>[ \t]*)\.\. (?P<name>[\w-]+)::[ \t]*(?P<arg>.*)$")
_OPTION = re.compile(r"^:(?P<key>[\w-]+):[ \t]*(?P<value>.*)$")


@dataclass
class Block:
    """One executable block of a page.

    Attributes
    ----------
    directive : str
        ``"exec-code"``, ``"plot"`` or ``"command-output"``.
    argument : str
        The directive's argument (the command of ``command-output``, the
        script of a ``plot`` that names one), else ``""``.
    code : str
        The code, dedented.
    lineno : int
        Line of the directive in the source file (1-based).
    code_lineno : int
        Line of the first line of code (1-based), for tracebacks.
    options : dict
        The directive's options.
    """

    directive: str
    argument: str
    code: str
    lineno: int
    code_lineno: int
    options: dict = field(default_factory=dict)

    @property
    def requires(self) -> list[str]:
        """Modules the block needs."""
        raw = self.options.get("requires", "")
        return [m.strip() for m in raw.split(",") if m.strip()]

    @property
    def gpu(self) -> bool:
        """Whether the block needs a CUDA device."""
        return "gpu" in self.options


def extract_blocks(text: str, directives: tuple[str, ...] = DIRECTIVES) -> list[Block]:
    """Find the executable blocks in reStructuredText source.

    Parameters
    ----------
    text : str
        The page source.
    directives : tuple of str, default=("exec-code", "plot", "command-output")
        Directives to return. Arguments go to ``Block.argument``.

    Returns
    -------
    blocks : list of Block
        In page order.
    """
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = _START.match(lines[i])
        if not m or m.group("name") not in directives:
            i += 1
            continue
        indent = len(m.group("indent").expandtabs())
        start = i
        i += 1
        options = {}
        # options: lines indented deeper than the directive, before the first blank line
        while i < len(lines) and lines[i].strip() and _indent(lines[i]) > indent:
            o = _OPTION.match(lines[i].strip())
            if not o:
                break
            options[o.group("key")] = o.group("value").strip()
            i += 1
        body = []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
            body.append(lines[i])
            i += 1
        first = i - len(body)
        while body and not body[0].strip():
            body.pop(0)
            first += 1
        while body and not body[-1].strip():
            body.pop()
        blocks.append(Block(m.group("name"), m.group("arg").strip(), _dedent(body),
                            start + 1, first + 1, options))
    return blocks


def _indent(line: str) -> int:
    return len(line.expandtabs()) - len(line.expandtabs().lstrip())


def _dedent(lines: list[str]) -> str:
    body = [ln.expandtabs() for ln in lines]
    width = min((_indent(ln) for ln in body if ln.strip()), default=0)
    return "\n".join(ln[width:] for ln in body).strip("\n")


def page_blocks(path: str | os.PathLike) -> list[Block]:
    """Read a page and return its executable blocks."""
    return extract_blocks(Path(path).read_text(encoding="utf-8"))


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def skip_reason(block: Block) -> str | None:
    """Why ``block`` cannot run here, or ``None`` when it can.

    Returns
    -------
    reason : str or None
        E.g. ``"needs torch, which is not available"``.
    """
    missing = [m for m in block.requires if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} " \
               "not available"
    if block.gpu and not _cuda():
        return "needs a CUDA GPU, and none was available"
    return None


def run_block(block: Block, namespace: dict, *, filename: str = "<docs>") -> str:
    """Execute ``block`` in ``namespace`` and return what it printed.

    Parameters
    ----------
    block : Block
        The block; its code is compiled with ``filename`` and its line number
        so that tracebacks point into the page.
    namespace : dict
        Globals shared by the blocks of one page.
    filename : str, optional
        Page path for tracebacks.

    Returns
    -------
    output : str
        Captured standard output and standard error.

    Raises
    ------
    Exception
        Whatever the code raises.
    """
    # Offset the code so that traceback line numbers are those of the page.
    code = compile("\n" * (block.code_lineno - 1) + block.code, filename, "exec")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        exec(code, namespace)  # noqa: S102 - running the guides is the point
    return buf.getvalue()


def command_argv(command: str, page_dir: str | os.PathLike = ".") -> list[str]:
    """The argv that runs a ``command-output`` command with this interpreter.

    Parameters
    ----------
    command : str
        ``"flagagg ARGS"`` (run as ``python -m flagagg ARGS``) or
        ``"python SCRIPT ARGS"`` with ``SCRIPT`` relative to the page.
    page_dir : str or path-like, default="."
        Folder of the page, to find scripts.

    Returns
    -------
    argv : list of str
        Starting with :data:`sys.executable`, so that the flagagg of the
        running interpreter is used whatever is on ``PATH``.
    """
    words = shlex.split(command)
    if words and words[0] == "flagagg":
        return [sys.executable, "-m", "flagagg", *words[1:]]
    if len(words) >= 2 and words[0] == "python":
        return [sys.executable, str(Path(page_dir, words[1]).resolve()), *words[2:]]
    raise ValueError(
        f"command-output runs `flagagg ...` or `python SCRIPT ...` commands: got {command!r}"
    )


def run_command(block: Block, cwd: str | os.PathLike, *, page_dir: str | os.PathLike = ".",
                timeout: float = 300) -> str:
    """Run a ``command-output`` block in ``cwd`` and return what it printed.

    Parameters
    ----------
    block : Block
        The block; ``block.argument`` is the command.
    cwd : str or path-like
        Folder to run in (a scratch folder: commands may write files).
    page_dir : str or path-like, default="."
        Folder of the page, against which script paths are resolved.
    timeout : float, default=300
        Seconds before the command is killed.

    Returns
    -------
    output : str
        Standard output followed by standard error.

    Raises
    ------
    RuntimeError
        If the command exits with a non-zero status (its output is in the
        message).
    """
    argv = command_argv(block.argument, page_dir)
    if argv[1:3] == ["-m", "flagagg"]:
        return _run_cli_in_process(argv[3:], cwd)
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{block.argument}` exited with status {proc.returncode}:\n{output}"
        )
    return output


def _run_cli_in_process(args: list[str], cwd: str | os.PathLike) -> str:
    """Run ``flagagg ARGS`` through :func:`flagagg.cli.main` (what ``python -m flagagg`` calls).

    In-process saves starting an interpreter and importing torch per command.
    """
    from flagagg.cli import main

    buf = io.StringIO()
    old = os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                status = main(list(args))
            except SystemExit as exc:  # argparse's --help and usage errors
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(old)
    output = buf.getvalue()
    if status:
        raise RuntimeError(f"`flagagg {' '.join(args)}` exited with status {status}:\n{output}")
    return output
