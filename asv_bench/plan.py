"""Print what an asv run of this tier will measure: one line per benchmark class.

Run by ``make asv`` / ``make asv-full`` before asv starts; reads
``FLAGAGG_ASV_TIER`` like the suite does. Each line gives the class, its
parameter sets and benchmarks, and the backends left out here with the reason
(library not installed, no CUDA device): those get no parameter sets at all,
so asv prints nothing for them.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import pkgutil
import sys
from pathlib import Path

PREFIXES = ("time_", "peakmem_", "track_", "mem_")


def main() -> int:
    """Print the plan; return 0."""
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    common = importlib.import_module("benchmarks.common")
    total = 0
    lines = []
    for info in sorted(pkgutil.iter_modules([str(here / "benchmarks")]), key=lambda m: m.name):
        module = importlib.import_module(f"benchmarks.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            methods = [m for m in dir(cls) if m.startswith(PREFIXES)]
            if not methods:
                continue
            params = getattr(cls, "params", None)
            # asv's convention: no params is one set; a flat list is one axis
            if not params:
                params = []
            elif not isinstance(params[0], (list, tuple)):
                params = [params]
            sets = len(list(itertools.product(*params)))
            total += sets * len(methods)
            line = f"  {info.name}.{name}: {sets} parameter sets x {len(methods)} benchmarks"
            if "backend" in getattr(cls, "param_names", ())[:1]:
                full, quick = _backend_axis(cls, common)
                gone = common.left_out(full, quick)
                note = ("; left out: " + ", ".join(f"{s} ({why})" for s, why in gone.items())
                        if gone else "")
                line += f", backends {', '.join(params[0])}{note}"
            lines.append(line)
    print(f"asv tier {common.TIER}: {total} benchmark runs")
    print("\n".join(lines))
    return 0


def _backend_axis(cls, common):
    """The (full, quick) backend lists a class was parametrised from (see its source)."""
    axis = getattr(cls, "backend_axis", None)
    return axis if axis is not None else (common.ALL_BACKENDS, None)


if __name__ == "__main__":
    sys.exit(main())
