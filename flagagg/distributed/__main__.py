"""``python -m flagagg.distributed RUN.json``: one process of a run started by the launcher."""

from __future__ import annotations

import json
import sys

from ._node import run_node
from ._settings import spec_from_dict


def main(argv=None):
    """Run the server or a worker, as ``RANK`` says, for the run described in a JSON file."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m flagagg.distributed RUN.json (written by `flagagg train`)",
              file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as fh:
        data = json.load(fh)
    return run_node(spec_from_dict(data["spec"]), **data["node"])


if __name__ == "__main__":
    sys.exit(main())
