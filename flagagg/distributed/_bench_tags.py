"""What the per-frame HMAC costs: round times with frame tags on and off, and per message.

Run ``python -m flagagg.distributed._bench_tags`` (``--help`` for the
options). For each model (the demo's softmax regression and a 4096-unit
MLP on the same data) and each number of workers, it trains short runs on
local processes over the tcp transport, alternating tags on and off (on,
off, off, on, ...), and reports the median round time of each run (the
round's wall time less its evaluation, first rounds left out as warm-up),
the median over the repetitions and their spread, and the ratio. It also
times, in this process alone, what one frame's tag costs each side.

The "off" runs set ``FLAGAGG_INSECURE_NO_FRAME_TAGS_FOR_BENCHMARKS=1``
(see :func:`flagagg.distributed._protocol.frame_tags_enabled`) in every
process of the run, on loopback; nothing else differs.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "message_costs", "round_times"]


def _config(model):
    from ..training._config import load_config

    config = load_config("demo")
    if model == "mlp4096":
        config = config.replace(model="mlp", hidden=4096)
    return config


def round_times(model, workers, tags, *, rounds=40, warmup=5):
    """Median round time of one run, in seconds, its evaluations excluded.

    Parameters
    ----------
    model : {"demo", "mlp4096"}
        The demo's softmax regression, or an MLP with 4096 hidden units.
    workers : int
        Number of worker processes.
    tags : bool
        Whether frames are tagged (False sets the measurement-only variable).
    rounds, warmup : int
        Rounds of the run, and how many first ones are left out.

    Returns
    -------
    seconds : float
    """
    from . import _protocol
    from ._launch import launch
    from ._settings import make_spec

    spec = make_spec(_config(model), rule="mean", attack="none", f=0, workers=workers,
                     rounds=rounds, eval_every=rounds, round_timeout=30, connect_timeout=120)
    old = os.environ.get(_protocol.NO_FRAME_TAGS_VARIABLE)
    if tags:
        os.environ.pop(_protocol.NO_FRAME_TAGS_VARIABLE, None)
    else:
        os.environ[_protocol.NO_FRAME_TAGS_VARIABLE] = "1"
    try:
        with tempfile.TemporaryDirectory(prefix="flagagg-bench-tags-") as tmp:
            status = launch(spec, output=Path(tmp, "out"), quiet=True, timeout=600)
            if status != 0:
                raise RuntimeError(f"the run exited with status {status}")
            with open(Path(tmp, "out", "rounds.csv"), newline="") as fh:
                rows = list(csv.DictReader(fh))
    finally:
        if old is None:
            os.environ.pop(_protocol.NO_FRAME_TAGS_VARIABLE, None)
        else:
            os.environ[_protocol.NO_FRAME_TAGS_VARIABLE] = old
    times = [float(r["round_s"]) - float(r["eval_s"] or 0) for r in rows
             if int(r["round"]) > warmup]
    return statistics.median(times)


def message_costs(n_params, repeats=50):
    """Microseconds one frame of ``n_params`` float32 values costs: (tag it, check it).

    Parameters
    ----------
    n_params : int
        Values in the frame.
    repeats : int, default=50
        Timings of each; the best is kept.

    Returns
    -------
    tag_us, check_us : float

    The sender's cost is hashing the payload and the HMAC; the receiver's is
    :class:`FrameReader`'s hashing and check, measured as the difference
    between reading the frame with tags on and with them off.
    """
    from . import _protocol as pr

    payload = np.random.default_rng(0).standard_normal(n_params).astype(np.float32)
    key = bytes(32)

    def best(fn):
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return min(out) * 1e6

    def frames(enabled):
        sealer = pr.Sealer(key, pr.FROM_WORKER)
        sealer.enabled = enabled
        head, view = pr.encode_tensor(pr.Kind.GRAD, payload)
        data = bytes(head) + bytes(view) + sealer.tag(head, view)

        def read():
            reader = pr.FrameReader(8 * n_params, {pr.Kind.GRAD}, key=key,
                                    direction=pr.FROM_WORKER)
            reader._opener.enabled = enabled
            reader.feed(data)
        return sealer, head, view, read

    sealer, head, view, read_on = frames(True)
    tag_us = best(lambda: sealer.tag(head, view))
    _, _, _, read_off = frames(False)
    check_us = best(read_on) - best(read_off)
    return tag_us, check_us


def main(argv=None):
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(prog="python -m flagagg.distributed._bench_tags",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,mlp4096")
    parser.add_argument("--workers", default="4,15")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs with tags on and with tags off per cell (default: 3)")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    print(f"load average at start: {os.getloadavg()}")
    print("per message, in isolation (microseconds, best of 50):")
    for model, n in (("demo", 650), ("mlp4096", 64 * 4096 + 4096 + 4096 * 10 + 10)):
        tag_us, check_us = message_costs(n)
        print(f"  {model:8s} {n:>7d} params ({4 * n / 1e6:.2f} MB): tag {tag_us:8.1f} us, "
              f"check {check_us:8.1f} us")
    print("model     p  round ms, tags on (runs)      tags off (runs)      on/off")
    for model in args.models.split(","):
        for p in (int(x) for x in args.workers.split(",")):
            on, off = [], []
            for k in range(args.repeats):
                # on, off, off, on, ...: a drift in the machine's load hits both alike
                for tags in ((True, False) if k % 2 == 0 else (False, True)):
                    (on if tags else off).append(round_times(model, p, tags, rounds=args.rounds))
            m_on, m_off = statistics.median(on), statistics.median(off)
            runs_on = " ".join(f"{1e3 * x:.1f}" for x in on)
            runs_off = " ".join(f"{1e3 * x:.1f}" for x in off)
            print(f"{model:8s} {p:2d}  {1e3 * m_on:6.1f} ({runs_on})  {1e3 * m_off:6.1f} "
                  f"({runs_off})  {m_on / m_off:.3f}   load {os.getloadavg()[0]:.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
