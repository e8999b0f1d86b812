"""Results of a distributed run, in the experiments' tidy format plus per-round tables.

Nothing is lost when the server dies. :class:`RunLog` appends every round's
records to the run folder as the run goes (``rounds.csv``, ``workers.csv``,
``events.jsonl``, and ``progress.jsonl``, the typed record a resumed run
continues from), flushed every round and fsynced with every checkpoint.
:func:`write_results` writes the final files each to a temporary name,
fsyncs and renames it, and writes ``train.json`` last, after removing the
one of an earlier attempt first: a folder holding ``train.json`` holds the
complete results of that run, a folder without it a run in progress or cut
short, never a mix. A folder holding another run is moved aside
(``FOLDER.previous-N``), never written into.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import time
from pathlib import Path

from ..training._results import Results
from ._settings import spec_to_dict

__all__ = ["RunLog", "fsync_dir", "write_atomic", "write_results"]

MARKER = "run.json"
PROGRESS = "progress.jsonl"


def _cell(value):
    """A CSV cell: lists as space-separated values, None as empty."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value


def fsync_dir(folder):
    """Make a rename or a new file in ``folder`` durable (where the OS allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. Windows cannot fsync a directory
    finally:
        os.close(fd)


def write_atomic(path, data):
    """Write ``data`` (str or bytes) to ``path`` through a temporary file, fsync, rename.

    A reader sees the old file or the new one, whole, never a truncated one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def _csv_text(rows, header=True):
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        if header:
            writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def _write_csv(path, rows):
    return write_atomic(path, _csv_text(rows))


def _key(spec, lr):
    return {"f": spec.f, "rule": spec.rule, "attack": spec.attack, "seed": spec.seed, "lr": lr}


def _json_line(obj):
    return json.dumps(obj, separators=(",", ":"), allow_nan=True, default=str) + "\n"


def _read_lines(path):
    """The complete JSON lines of ``path`` (a line cut short by a crash is dropped)."""
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return out
    for line in text.split("\n"):
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def move_aside(folder, log=print):
    """Rename ``folder`` to a free ``FOLDER.previous-N``; return the new path."""
    folder = Path(folder)
    for i in range(1, 10_000):
        target = folder.with_name(f"{folder.name}.previous-{i}")
        if not target.exists():
            os.rename(folder, target)
            log(f"server: {folder} held another run; moved it to {target}")
            return target
    raise RuntimeError(f"cannot move {folder} aside: clean up its .previous-N copies")


class RunLog:
    """The records of a run, appended to its folder round by round.

    Parameters
    ----------
    folder : str or path-like
        The run folder. One that holds another run (a different
        fingerprint, or any run unless ``resuming``) is moved aside first.
    spec : RunSpec
        The run.
    lr : float
        Its learning rate (a key column of the tables).
    resuming : bool, default=False
        Whether the run resumes from a checkpoint: then the records of the
        same run already in ``folder`` are kept up to the checkpoint's round.
    log : callable, default=print
        Where a move aside is reported.
    """

    def __init__(self, folder, spec, lr, *, resuming=False, log=print):
        self.folder = Path(folder)
        self.key = _key(spec, lr)
        marker = self.folder / MARKER
        same = False
        if marker.exists():
            try:
                same = json.loads(marker.read_text(encoding="utf-8")).get("fingerprint") \
                    == spec.fingerprint()
            except ValueError:
                same = False
        self.entries = []
        if self.folder.exists() and any(self.folder.iterdir()) and not (resuming and same):
            move_aside(self.folder, log)
        elif resuming and same:
            self.entries = _read_lines(self.folder / PROGRESS)
            # the results of an earlier end are replaced by this run's
            with_results = self.folder / "train.json"
            if with_results.exists():
                os.unlink(with_results)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, json.dumps({"fingerprint": spec.fingerprint(),
                                         "started": time.time(), "spec": spec_to_dict(spec)},
                                        default=str))
        fsync_dir(self.folder)
        self.files = None
        self.header_written = {"rounds.csv": False, "workers.csv": False}

    def earlier(self, start_round):
        """Records of rounds before ``start_round`` kept from an earlier attempt.

        Also rewrites the files to hold just those, and opens them for
        appending; call once, before the first round.

        Returns
        -------
        earlier : dict
            ``rounds``, ``workers``, ``curve`` and ``events`` lists.
        """
        kept = [e for e in self.entries if e.get("round", 0) < start_round]
        out = {"rounds": [], "workers": [], "curve": [], "events": []}
        for e in kept:
            if e.get("row") is not None:
                out["rounds"].append(e["row"])
            out["workers"].extend(e.get("workers") or [])
            if e.get("curve") is not None:
                out["curve"].append(tuple(e["curve"]))
            out["events"].extend(e.get("events") or [])
        write_atomic(self.folder / PROGRESS, "".join(_json_line(e) for e in kept))
        rounds = [{**self.key, **r} for r in out["rounds"]]
        workers = [{**self.key, **r} for r in out["workers"]]
        write_atomic(self.folder / "rounds.csv", _csv_text(rounds))
        write_atomic(self.folder / "workers.csv", _csv_text(workers))
        write_atomic(self.folder / "events.jsonl", "".join(_json_line(e) for e in out["events"]))
        self.header_written = {"rounds.csv": bool(rounds), "workers.csv": bool(workers)}
        self.files = {name: open(self.folder / name, "a", encoding="utf-8", newline="")
                      for name in (PROGRESS, "rounds.csv", "workers.csv", "events.jsonl")}
        fsync_dir(self.folder)
        return out

    def write_round(self, row, workers, events, curve):
        """Append one round's records (``row`` None: events only) and flush them."""
        if self.files is None:
            self.earlier(0)
        t = row["round"] if row is not None else (curve[0] if curve is not None else None)
        entry = {"round": t if t is not None else -1, "row": row, "workers": workers,
                 "events": events, "curve": None if curve is None else list(curve)}
        # one write per file and round, so that a crash cuts at most the last line
        self.files[PROGRESS].write(_json_line(entry))
        if row is not None:
            for name, rows in (("rounds.csv", [row]), ("workers.csv", workers)):
                if rows:
                    self.files[name].write(_csv_text([{**self.key, **r} for r in rows],
                                                     header=not self.header_written[name]))
                    self.header_written[name] = True
        if events:
            self.files["events.jsonl"].write("".join(_json_line(e) for e in events))
        for fh in self.files.values():
            fh.flush()

    def sync(self):
        """Make everything appended so far durable (fsync)."""
        for fh in (self.files or {}).values():
            fh.flush()
            os.fsync(fh.fileno())

    def close(self):
        """Sync and close the files."""
        if self.files is not None:
            self.sync()
            for fh in self.files.values():
                fh.close()
            self.files = None


def write_results(folder, spec, record, lr):
    """Write a run's results.

    The experiments' files (``runs.csv``, ``curves.csv``, ``summary.csv``,
    ``worst_case.csv``, ``results.json``, ``table.txt``, see
    :class:`flagagg.sim.Results`) for the one run, and

    ``rounds.csv``
        one row per round: gradients used, missing / excluded workers,
        seconds waiting, computing, communicating, aggregating, bytes moved,
        accuracy where evaluated;
    ``workers.csv``
        one row per round and worker: status (ok, missing, excluded) and why,
        compute and communication seconds, bytes, the rule's diagnostics
        (reconstruction ratio, coefficient, left out by the rule, influence,
        cosine with the aggregate, verdict, suspect);
    ``train.json``
        the run's settings, the workers' processes and every event.

    Parameters
    ----------
    folder : str or path-like
        Created if needed.
    spec : RunSpec
        The run.
    record : dict
        What :meth:`Server.run` returned.
    lr : float
        The learning rate trained with.

    Returns
    -------
    paths : list of pathlib.Path
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = spec.config
    key = _key(spec, lr)
    run = {
        "experiment": config.name, "dataset": config.dataset, "model": config.model,
        "workers": config.workers, **key, "split": "test",
        "final_accuracy": record["final_accuracy"],
        "diverged": record["diverged_round"] is not None,
        "diverged_round": record["diverged_round"], "seconds": round(record["seconds"], 4),
    }
    curves = [{**key, "round": t, "accuracy": a} for t, a in record["curve"]]
    results = Results(config=config, runs=[run], curves=curves, split="test",
                      seconds=record["seconds"])
    # train.json says "these results are complete": it goes first and comes back last
    done = folder / "train.json"
    if done.exists():
        os.unlink(done)
        fsync_dir(folder)
    staging = folder / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    paths = []
    for made in results.save(staging, plots=False):
        made = Path(made)
        with open(made, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(made, folder / made.name)
        paths.append(folder / made.name)
    shutil.rmtree(staging, ignore_errors=True)
    paths.append(_write_csv(folder / "rounds.csv", [{**key, **r} for r in record["rounds"]]))
    paths.append(_write_csv(folder / "workers.csv", [{**key, **r} for r in record["workers"]]))
    doc = {
        "spec": spec_to_dict(spec), "key": key, "run": run, "status": record["status"],
        "start_round": record["start_round"], "server_address": record["address"],
        "transport": record["transport"],
        "byzantine": record["byzantine"],
        "min_gradients": record.get("floor"),
        "left_out_by_quorum": {str(w): k for w, k in
                               sorted(record.get("left_out_by_quorum", {}).items())},
        "processes": {str(w): info for w, info in sorted(record["info"].items())},
        "events": record["events"], "rounds": record["rounds"], "workers": record["workers"],
    }
    fsync_dir(folder)
    paths.append(write_atomic(done, json.dumps(doc, indent=1, allow_nan=True, default=str)))
    fsync_dir(folder)
    return paths
