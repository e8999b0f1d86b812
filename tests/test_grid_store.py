"""Resumable grids: the result store, --check, interrupting and resuming, Ray, progress."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from flagagg import sim  # noqa: E402
from flagagg.cli import main as cli_main  # noqa: E402
from flagagg.sim import _experiment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _config(**changes):
    base = {
        "experiment": {"name": "store", "rounds": 6, "seeds": [0, 1],
                       "validation_seeds": [100], "eval_every": 3},
        "data": {"dataset": "digits"},
        "cluster": {"workers": 7, "f": [2]},
        "rules": {"mean": {}, "median": {}},
        "attacks": {"none": {}, "reverse": {"params": {"scale": -10.0}}},
    }
    for section, value in changes.items():
        old = base.get(section, {})
        base[section] = value if section in ("rules", "attacks") else {**old, **value}
    return sim.parse_config(base)


@pytest.fixture
def counted(monkeypatch):
    """Count the runs that actually train (the serial executor runs them in-process,
    alone or in lockstep groups; a group of one runs through _run_task)."""
    calls = []
    real = _experiment._run_task
    real_group = _experiment._run_group

    def counting(config, task):
        calls.append(task)
        return real(config, task)

    def counting_group(config, tasks, on_done=None):
        if len(tasks) > 1:
            calls.extend(tasks)
        return real_group(config, tasks, on_done)

    monkeypatch.setattr(_experiment, "_run_task", counting)
    monkeypatch.setattr(_experiment, "_run_group", counting_group)
    return calls


def _strip(results):
    return ([{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")}
             for r in results.runs], results.curves)


def test_store_skips_done_runs_and_reruns_only_changed_ones(tmp_path, counted):
    store = tmp_path / "store"
    first = sim.run_experiment(_config(), store=store, progress=False)
    assert len(counted) == 8 and len(list(store.glob("*.json"))) == 8
    # everything stored: nothing runs, and the results read back are the same
    again = sim.run_experiment(_config(), store=store, progress=False)
    assert len(counted) == 8
    assert _strip(again) == _strip(first)
    # another attack parameter: only that attack's 4 runs
    sim.run_experiment(_config(attacks={"none": {}, "reverse": {"params": {"scale": -5.0}}}),
                       store=store, progress=False)
    assert len(counted) == 12
    assert {t.attack for t in counted[8:]} == {"reverse"}
    # a new seed: only its 4 runs; a renamed rule and a setting no run reads: none
    sim.run_experiment(_config(experiment={"seeds": [0, 1, 2]}), store=store, progress=False)
    assert len(counted) == 16 and {t.seed for t in counted[12:]} == {2}
    renamed = _config(rules={"avg": {"rule": "mean"}, "median": {}},
                      model={"hidden": 99}, cluster={"alpha": 0.1})
    res = sim.run_experiment(renamed, store=store, progress=False)
    assert len(counted) == 16
    assert {r["rule"] for r in res.runs} == {"avg", "median"}
    # the learning rate and the rounds are settings: they re-run
    sim.run_experiment(_config(experiment={"rounds": 7}), store=store, progress=False)
    assert len(counted) == 24


def test_changed_code_or_settings_rerun_only_what_they_change(tmp_path, counted, monkeypatch):
    """The key holds the source code's hash, not only the version string (which stays
    the same between commits), and every setting a run reads."""
    store = tmp_path / "store"
    cfg = _config(attacks={"none": {}}, experiment={"seeds": [0]})
    sim.run_experiment(cfg, store=store, progress=False)
    assert len(counted) == 2
    # worker momentum is a setting of every run
    sim.run_experiment(_config(attacks={"none": {}}, experiment={"seeds": [0]},
                               optimizer={"worker_momentum": 0.9}), store=store, progress=False)
    assert len(counted) == 4
    # one rule's learning rate: that rule's run only
    sim.run_experiment(_config(attacks={"none": {}}, experiment={"seeds": [0]},
                               rules={"mean": {}, "median": {"lr": 0.05}}),
                       store=store, progress=False)
    assert len(counted) == 5 and counted[-1].rule == "median"
    sim.run_experiment(cfg, store=store, progress=False)
    assert len(counted) == 5
    # other code under the same version string: every run again, once
    monkeypatch.setitem(_experiment._CODE, "flagagg", "0" * 32)
    sim.run_experiment(cfg, store=store, progress=False)
    assert len(counted) == 7
    sim.run_experiment(cfg, store=store, progress=False)
    assert len(counted) == 7
    # another PyTorch: again
    monkeypatch.setitem(_experiment._CODE, "versions", {"numpy": "x", "torch": "y"})
    sim.run_experiment(cfg, store=store, progress=False)
    assert len(counted) == 9


def test_source_fingerprint_follows_the_python_files(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    first = _experiment.source_fingerprint(pkg)
    assert len(first) == 32 and first == _experiment.source_fingerprint(pkg)
    # what is not source does not count
    (pkg / "README.txt").write_text("docs")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.cpython.py").write_text("cache")
    assert _experiment.source_fingerprint(pkg) == first
    # one byte of one file does
    (pkg / "sub" / "b.py").write_text("y = 3\n")
    assert _experiment.source_fingerprint(pkg) != first
    # and so does moving text from one file to another
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    assert _experiment.source_fingerprint(pkg) == first
    (pkg / "a.py").write_text("x = 1\ny")
    (pkg / "sub" / "b.py").write_text(" = 2\n")
    assert _experiment.source_fingerprint(pkg) != first
    # flagagg's own: the installed package's, computed once
    import flagagg

    assert _experiment.source_fingerprint() == _experiment.source_fingerprint(
        Path(flagagg.__file__).parent)


def test_store_records_are_whole_and_keyed_by_settings_and_version(tmp_path):
    import flagagg

    store = tmp_path / "s"
    cfg = _config(rules={"mean": {}}, attacks={"none": {}}, experiment={"seeds": [0]})
    sim.run_experiment(cfg, store=store, progress=False)
    (path,) = store.glob("*.json")
    record = json.loads(path.read_text())
    assert record["settings"]["flagagg"] == flagagg.__version__
    assert record["settings"]["source"] == _experiment.source_fingerprint()
    assert record["settings"]["libraries"]["torch"] == torch.__version__
    assert record["settings"]["rule"] == {"rule": "mean", "params": {}}
    assert record["key"] == path.stem == _experiment.run_key(record["settings"])
    assert record["result"]["cpu_seconds"] > 0
    # a torn or foreign file is not a result: the run is done again
    path.write_text("{")
    assert _experiment.ResultStore(store).get(path.stem) is None


def test_tables_and_files_come_from_the_store(tmp_path):
    cfg = _config(rules={"mean": {}}, attacks={"none": {}}, experiment={"seeds": [0]})
    out = tmp_path / "out"
    sim.run_experiment(cfg, output=out, plots=False, progress=False)
    (path,) = (out / "store").glob("*.json")
    record = json.loads(path.read_text())
    record["result"]["final_accuracy"] = 0.123456
    record["result"]["accuracy"][-1] = 0.123456
    path.write_text(json.dumps(record))
    res = sim.run_experiment(cfg, output=out, plots=False, progress=False)
    assert res.runs[0]["final_accuracy"] == 0.123456
    assert "12.3" in (out / "table.txt").read_text()


def test_check_says_done_remaining_and_cost(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(_config().to_toml())
    out = tmp_path / "out"
    assert cli_main(["experiment", str(path), "--output", str(out), "--check"]) == 0
    text = capsys.readouterr().out
    assert "8 runs" in text and "0 done" in text and "8 to run" in text
    assert "extrapolated from 6-round runs of the grid's first, middle and last" in text
    assert "CPU seconds" in text
    assert cli_main(["experiment", str(path), "--output", str(out), "--quiet", "--no-plots",
                     "--seeds", "0"]) == 0
    capsys.readouterr()
    assert cli_main(["experiment", str(path), "--output", str(out), "--check"]) == 0
    text = capsys.readouterr().out
    assert "4 done" in text and "4 to run" in text and "mean of the 4 stored runs" in text
    status = _experiment.grid_status(_config(), store=out / "store")
    assert status["done"] == 4 and status["remaining"] == 4
    assert status["cpu_seconds_remaining"] == pytest.approx(4 * status["cpu_seconds_per_run"])


def test_bad_executor_arguments_are_clear_errors(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(_config().to_toml())
    assert cli_main(["experiment", str(path), "--address", "auto"]) == 2
    assert "needs --executor ray" in capsys.readouterr().err
    with pytest.raises(ValueError, match="executor must be one of"):
        sim.run_experiment(_config(), executor="dask", store=False, progress=False)
    with pytest.raises(ValueError, match="jobs must be an int >= 1"):
        sim.run_experiment(_config(), jobs=0, store=False, progress=False)


def test_progress_bar_counts_runs_with_an_eta(tmp_path, capsys):
    cfg = _config(rules={"mean": {}}, attacks={"none": {}}, experiment={"seeds": [0, 1, 2]})
    store = tmp_path / "s"
    sim.run_experiment(cfg, store=store, progress=True, seeds=[0])
    capsys.readouterr()
    sim.run_experiment(cfg, store=store, progress=True)
    err = capsys.readouterr().err
    # the stored run counts as done from the start; the ETA is from measured runs
    assert "1/3 runs" in err and "3/3 runs" in err
    assert re.search(r"ETA \d\d:\d\d from [12] measured run", err)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize(("sig", "jobs"), [(signal.SIGTERM, 1), (signal.SIGINT, 1),
                                         (signal.SIGTERM, 2)])
def test_interrupted_grid_resumes_redoing_only_the_runs_in_flight(tmp_path, sig, jobs):
    # runs of about half a second each, so that the signal lands mid-grid
    cfg = _config(experiment={"rounds": 150, "seeds": [0, 1, 2], "eval_every": 50},
                  model={"model": "mlp", "hidden": 64})
    path = tmp_path / "grid.toml"
    path.write_text(cfg.to_toml())
    out = tmp_path / "out"
    store = out / "store"
    cmd = [sys.executable, "-m", "flagagg", "experiment", str(path), "--output", str(out),
           "--quiet", "--no-plots", "--jobs", str(jobs)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(list(store.glob("*.json"))) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the grid stored no runs"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.glob("*.json")}
    assert 3 <= len(before) < 12
    assert f"{len(before)} of 12 runs done in {store}" in err
    # each process steps a group of up to 3 runs (the seeds of a cell) in lockstep:
    # what it loses is the unfinished runs of the groups in flight
    lost = int(re.search(r"(\d+) run\(s\) in flight were lost", err).group(1))
    assert 1 <= lost <= min(3 * jobs, 12 - len(before))
    assert "Traceback" not in err
    command = re.search(r"resume with: (.+)", err).group(1)
    assert command.startswith("flagagg experiment ") and "--output" in command
    assert not list(store.glob("*.tmp"))
    # resume with the printed command (as `python -m flagagg`)
    argv = [sys.executable, "-m", "flagagg", *command.split()[1:]]
    done = subprocess.run(argv, env=_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert (f"{len(before)} of 12 runs are stored in {store} already: running the other "
            f"{12 - len(before)}") in done.stdout
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.glob("*.json")}
    assert len(after) == 12
    # no finished run was redone: their records are untouched
    assert {k: after[k] for k in before} == before
    # and the resumed grid equals one run without interruption
    fresh = sim.run_experiment(cfg, store=False, progress=False)
    resumed = sim.run_experiment(cfg, store=store, progress=False)
    assert _strip(resumed) == _strip(fresh)


def test_local_processes_give_the_serial_results(tmp_path):
    cfg = _config()
    serial = sim.run_experiment(cfg, store=False, progress=False)
    pooled = sim.run_experiment(cfg, store=tmp_path / "s", progress=False, jobs=2)
    assert _strip(pooled) == _strip(serial)


# Ray's tip on GPU variables concerns no CPU-only grid: it is not shown to the user
@pytest.mark.filterwarnings("error::FutureWarning")
def test_ray_executor_on_loopback_gives_the_serial_results(tmp_path, capsys, monkeypatch):
    """``--executor ray`` starts a private Ray on loopback; the runs equal serial ones."""
    pytest.importorskip("ray")
    cfg = _config()
    serial = sim.run_experiment(cfg, store=False, progress=False)
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    out = tmp_path / "out"
    # the Ray workers import this flagagg through the inherited PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    assert cli_main(["experiment", str(path), "--output", str(out), "--no-plots", "--quiet",
                     "--executor", "ray", "--jobs", "2"]) == 0
    import ray

    assert not ray.is_initialized()  # the private Ray is shut down
    on_ray = sim.run_experiment(cfg, store=out / "store", progress=False)
    assert _strip(on_ray) == _strip(serial)
    assert len(list((out / "store").glob("*.json"))) == 8
    assert "worst case" in capsys.readouterr().out
