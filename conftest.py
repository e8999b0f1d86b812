"""Doctest collection over the package: skip modules whose library is missing."""

import importlib.util

collect_ignore = []
for module, library in [
    ("flagagg/backends/_cupy.py", "cupy"),
    ("flagagg/backends/_torch.py", "torch"),
    ("flagagg/backends/_numba.py", "numba"),
    ("flagagg/backends/_numba_kernels.py", "numba"),
]:
    if importlib.util.find_spec(library) is None:
        collect_ignore.append(module)
if importlib.util.find_spec("torch") is None:
    collect_ignore_glob = ["flagagg/sim/*", "flagagg/distributed/*"]
