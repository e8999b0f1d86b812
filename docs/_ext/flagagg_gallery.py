"""Helpers of the gallery (``sphinx_gallery_conf`` in ``conf.py``)."""

from __future__ import annotations

import importlib.util

__all__ = ["reset_torch_threads"]

_THREADS: list[int] = []


def reset_torch_threads(gallery_conf: dict, fname: str, when: str = "before") -> None:
    """Give every example torch's thread count of the build, whatever the last one set.

    The examples run in the build's process; one that calls
    ``torch.set_num_threads(1)`` (tiny models are faster on one thread) must
    not change the pages built after it.

    Parameters
    ----------
    gallery_conf : dict
        sphinx-gallery's configuration (unused).
    fname : str
        The example's file name (unused).
    when : {"before", "after"}
        Before or after the example runs.
    """
    if importlib.util.find_spec("torch") is None:
        return
    import torch  # the build imports it anyway; here before any example can change it

    if not _THREADS:
        _THREADS.append(torch.get_num_threads())
    torch.set_num_threads(_THREADS[0])
