"""The cheaper grid: cached data sets, the hand-written per-worker gradients, lockstep runs.

Every fast path here is checked against the slow, obviously correct one:
the gradient engine against ``torch.func.vmap`` of ``torch.func.grad``,
cached data against freshly generated data, lockstep runs against runs one
at a time.
"""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from flagagg import sim  # noqa: E402
from flagagg.training._grads import GradientEngine  # noqa: E402
from flagagg.training._replica import Replica  # noqa: E402

CASES = [
    ("digits", "logreg", {}),
    ("digits", "mlp", {"hidden": 17}),
    ("breast_cancer", "mlp", {"hidden": 8}),
]
try:
    import mnist1d  # noqa: F401

    CASES += [("mnist1d", "cnn1d", {"channels": (25, 25, 25)}),
              ("mnist1d", "cnn1d", {"channels": (4, 6)}),
              ("mnist1d", "mlp", {"hidden": 9})]
except ImportError:  # pragma: no cover - the sim extra without mnist1d
    pass


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = {}
    for name in {c[0] for c in CASES}:
        kw = {"n_samples": 600, "cache": cache} if name == "mnist1d" else {}
        out[name] = sim.load_dataset(name, **kw)
    return out


def _vmap_reference(rep, flat, xb, yb):
    return rep._per_worker_vmap(flat, xb, yb, rep.shapes)


@pytest.mark.parametrize(("name", "model", "params"), CASES)
def test_engine_matches_vmap_of_grad(datasets, name, model, params):
    ds = datasets[name]
    rep = Replica(ds, workers=7, f=0, seed=3, model=model, model_params=params)
    assert rep._engine.supported
    gen = torch.Generator().manual_seed(0)
    flat = rep.initial_parameters() + 0.05 * torch.randn(rep.n_params, generator=gen)
    idx = torch.from_numpy(rep.draw_batches(11))
    xb, yb = rep.X_train[idx], rep.y_train[idx]
    got = rep._per_worker(flat, xb, yb, rep.shapes)
    want = _vmap_reference(rep, flat, xb, yb)
    assert got.shape == want.shape == (7, rep.n_params) and got.dtype == torch.float32
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("offset", [1e3, 1e30])
def test_engine_matches_vmap_on_hostile_parameters(datasets, offset):
    """Huge weights: the logits overflow the same way (inf/NaN where vmap has them)."""
    ds = datasets["digits"]
    rep = Replica(ds, workers=4, f=0, seed=1, model="mlp", model_params={"hidden": 5})
    flat = rep.initial_parameters() * offset
    idx = torch.from_numpy(rep.draw_batches(6))
    xb, yb = rep.X_train[idx], rep.y_train[idx]
    got = rep._per_worker(flat, xb, yb, rep.shapes)
    want = _vmap_reference(rep, flat, xb, yb)
    np.testing.assert_array_equal(torch.isfinite(got).numpy(), torch.isfinite(want).numpy())
    ok = torch.isfinite(want)
    np.testing.assert_allclose(got[ok].numpy(), want[ok].numpy(), rtol=1e-4,
                               atol=1e-5 * float(want[ok].abs().max()))


def test_engine_declines_models_it_does_not_implement(datasets):
    """The image CNN (max-pooling) keeps the vmap path, and still gives its gradients."""
    ds = datasets["digits"]
    rep = Replica(ds, workers=3, f=0, seed=0, model="cnn")
    assert not rep._engine.supported
    flat = rep.initial_parameters()
    idx = torch.from_numpy(rep.draw_batches(4))
    xb, yb = rep.X_train[idx], rep.y_train[idx]
    torch.testing.assert_close(rep._per_worker(flat, xb, yb, rep.shapes),
                               _vmap_reference(rep, flat, xb, yb))
    assert not GradientEngine(torch.nn.Linear(3, 2), []).supported


def test_engine_declines_a_linear_layer_over_a_convolutions_positions():
    """A Linear right after a Conv1d acts on each channel's positions, which the
    engine's flat layout does not compute: it declines (vmap computes it)."""
    from torch import nn

    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Linear(38, 10))
    assert not GradientEngine(model, []).supported
    ok = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(76, 10))
    assert GradientEngine(ok, []).supported


def test_engine_says_which_inputs_its_first_layer_needs(datasets):
    """Inputs of the wrong rank for the first layer: flagagg's error, naming the shape."""
    from torch import nn

    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(76, 10))
    shapes = [(n, p.shape, p.numel()) for n, p in conv.named_parameters()]
    flat = torch.zeros(1, sum(s for _, _, s in shapes))
    y = torch.zeros(1, 2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"convolution needs \(channels, length\) inputs"):
        GradientEngine(conv, shapes)(flat, torch.zeros(1, 2, 4, 40), y)
    lin = nn.Sequential(nn.Linear(40, 10))
    shapes = [(n, p.shape, p.numel()) for n, p in lin.named_parameters()]
    flat = torch.zeros(1, sum(s for _, _, s in shapes))
    with pytest.raises(ValueError, match="first linear layer needs flat inputs"):
        GradientEngine(lin, shapes)(flat, torch.zeros(1, 2, 4, 1, 40), y)


@pytest.mark.parametrize(("name", "model", "params"), CASES)
def test_lockstep_runs_give_each_run_its_own_gradients_bit_for_bit(datasets, name, model,
                                                                    params):
    """R runs stacked on a run axis: each run's rows are those of the run alone."""
    ds = datasets[name]
    reps = [Replica(ds, workers=5, f=0, seed=s, model=model, model_params=params)
            for s in range(3)]
    flats = torch.stack([r.initial_parameters() for r in reps])
    xs, ys = [], []
    for r in reps:
        idx = torch.from_numpy(r.draw_batches(8))
        xs.append(r.X_train[idx])
        ys.append(r.y_train[idx])
    engine = reps[0]._engine
    together = engine(flats, torch.stack(xs), torch.stack(ys))
    for i in range(3):
        alone = engine(flats[i : i + 1], xs[i][None], ys[i][None])[0]
        assert torch.equal(together[i], alone)


@pytest.mark.parametrize(("name", "model", "params"), CASES)
def test_a_workers_gradient_does_not_depend_on_the_workers_beside_it(datasets, name, model,
                                                                     params):
    """Every subset of the workers, a lone worker included, and lockstep runs of one
    worker each: each worker's row is its row of the full computation, bit for bit
    (the simulator skips rows, and a distributed worker computes its own row alone)."""
    ds = datasets[name]
    reps = [Replica(ds, workers=6, f=0, seed=s, model=model, model_params=params)
            for s in range(2)]
    engine = reps[0]._engine
    gen = torch.Generator().manual_seed(4)
    flats = torch.stack([r.initial_parameters() for r in reps])
    flats = flats + 0.05 * torch.randn(flats.shape, generator=gen)
    batches = [torch.from_numpy(r.draw_batches(8)) for r in reps]
    xs = torch.stack([r.X_train[i] for r, i in zip(reps, batches, strict=True)])
    ys = torch.stack([r.y_train[i] for r, i in zip(reps, batches, strict=True)])
    full = engine(flats[:1], xs[:1], ys[:1])[0]
    for rows in ([0], [5], [2, 3], [1, 4, 5], [0, 1, 2, 3, 4]):
        got = engine(flats[:1], xs[:1, rows], ys[:1, rows])[0]
        assert torch.equal(got, full[rows]), rows
    both = engine(flats, xs[:, [3]], ys[:, [3]])
    assert torch.equal(both[0, 0], full[3])
    assert torch.equal(both[1, 0], engine(flats[1:], xs[1:], ys[1:])[0, 3])


@pytest.mark.parametrize(("name", "model", "params"), CASES)
def test_engine_scratch_arrays_carry_nothing_between_calls(datasets, name, model, params):
    """The kept padded activations and col2im arrays: a call after calls with other
    parameters, data and batch sizes gives what a fresh engine gives, bit for bit,
    and returns a new array that later calls do not overwrite."""
    ds = datasets[name]
    rep = Replica(ds, workers=5, f=0, seed=2, model=model, model_params=params)
    gen = torch.Generator().manual_seed(1)
    calls = []
    for batch in (8, 8, 3, 8):
        flat = rep.initial_parameters() + 0.1 * torch.randn(rep.n_params, generator=gen)
        idx = torch.from_numpy(rep.draw_batches(batch))
        calls.append((flat, rep.X_train[idx], rep.y_train[idx]))
    outs = [rep._engine(f[None], x[None], y[None])[0] for f, x, y in calls]
    kept = [o.clone() for o in outs]
    for (f, x, y), out, was in zip(calls, outs, kept, strict=True):
        fresh = GradientEngine(rep.net, rep.shapes)(f[None], x[None], y[None])[0]
        assert torch.equal(out, fresh)
        assert torch.equal(out, was)  # not overwritten by the calls after it
    # huge activations once, then ordinary ones: nothing of the first stays behind
    f, x, y = calls[0]
    rep._engine((f * 1e30)[None], x[None], y[None])
    again = rep._engine(f[None], x[None], y[None])[0]
    assert torch.equal(again, kept[0])


# --------------------------------------------------------------------------
# the data set cache

def test_mnist1d_cache_gives_the_generated_data(tmp_path, monkeypatch):
    pytest.importorskip("mnist1d")
    import mnist1d.data

    calls = []
    real = mnist1d.data.make_dataset

    def counting(args):
        calls.append(args.num_samples)
        return real(args)

    monkeypatch.setattr(mnist1d.data, "make_dataset", counting)
    fresh = sim.load_dataset("mnist1d", n_samples=120, cache=False)
    first = sim.load_dataset("mnist1d", n_samples=120, cache=tmp_path)
    again = sim.load_dataset("mnist1d", n_samples=120, cache=tmp_path)
    other = sim.load_dataset("mnist1d", n_samples=140, cache=tmp_path)
    # generated without a cache, once for the cache, and once for another size
    assert calls == [120, 120, 140]
    for d in (first, again):
        for key in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test"):
            np.testing.assert_array_equal(getattr(d, key), getattr(fresh, key))
    assert len(other.y_test) == 28
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.startswith("mnist1d-") and f.endswith(".npz")
                                   for f in files)


def test_mnist1d_cache_survives_a_corrupt_file(tmp_path):
    pytest.importorskip("mnist1d")
    sim.load_dataset("mnist1d", n_samples=100, cache=tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not an npz")
    d = sim.load_dataset("mnist1d", n_samples=100, cache=tmp_path)
    ref = sim.load_dataset("mnist1d", n_samples=100, cache=False)
    np.testing.assert_array_equal(d.X_train, ref.X_train)
    with np.load(path) as z:  # rewritten whole
        assert int(z["n"]) == 4


def test_cache_dir_from_the_environment(tmp_path, monkeypatch):
    from flagagg.training._data import cache_dir

    monkeypatch.setenv("FLAGAGG_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.setenv("FLAGAGG_CACHE_DIR", "")
    assert cache_dir() is None
    monkeypatch.delenv("FLAGAGG_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "flagagg"
    assert cache_dir(False) is None
    assert cache_dir(tmp_path) == tmp_path
    with pytest.raises(TypeError, match="cache must be"):
        cache_dir(3)


def _load_in_child(folder, n, queue):
    d = sim.load_dataset("mnist1d", n_samples=n, cache=folder)
    queue.put(float(d.X_train.astype(np.float64).sum()))


def test_mnist1d_cache_is_safe_when_processes_race(tmp_path):
    """Four processes fill one cache at once: all read whole, equal arrays."""
    pytest.importorskip("mnist1d")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(str(tmp_path), 150, queue))
             for _ in range(4)]
    env = os.environ.get("PYTHONPATH")
    assert env is None or env  # the children import this flagagg (spawn inherits it)
    for p in procs:
        p.start()
    sums = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ref = float(sim.load_dataset("mnist1d", n_samples=150, cache=False).X_train
                .astype(np.float64).sum())
    assert sums == [ref] * 4
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] != []
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(("k", "s", "pad"), [(2, 3, 1), (3, 3, 0), (4, 2, 2), (1, 1, 0),
                                             (5, 1, 2)])
def test_engine_convolutions_of_any_kernel_stride_and_padding_match_vmap(k, s, pad):
    """Kernels shorter than, equal to and longer than the stride: col2im writes the
    taps that cover a position first and adds the others, and zeroes the rest."""
    from torch import nn
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(k * 10 + s)
    net = nn.Sequential(nn.Conv1d(2, 3, 3, stride=1, padding=1), nn.ReLU(),
                        nn.Conv1d(3, 4, k, stride=s, padding=pad), nn.ReLU(),
                        nn.Conv1d(4, 3, 2, stride=1, padding=1, bias=False), nn.ReLU(),
                        nn.Flatten(), nn.LazyLinear(5))
    net(torch.zeros(1, 2, 17))  # materialise the lazy layer
    shapes = [(n, p.shape, p.numel()) for n, p in net.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    engine = GradientEngine(net, shapes)
    assert engine.supported
    p_, B = 3, 4
    gen = torch.Generator().manual_seed(5)
    xb = torch.randn(p_, B, 2, 17, generator=gen)
    yb = torch.randint(0, 5, (p_, B), generator=gen)

    def loss(flat, x, y):
        params, start = {}, 0
        for name, shape, size in shapes:
            params[name] = flat[start : start + size].view(shape)
            start += size
        return torch.nn.functional.cross_entropy(functional_call(net, params, (x,)), y)

    want = vmap(grad(loss), in_dims=(None, 0, 0))(flat, xb, yb)
    for _ in range(2):  # the second call reuses the kept arrays
        got = engine(flat[None], xb[None], yb[None])[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# lockstep runs: simulate_lockstep and the grid executors

from flagagg.sim import _experiment  # noqa: E402
from flagagg.sim._cluster import simulate_lockstep  # noqa: E402


def _same_result(a, b):
    """Two TrainResults equal bit for bit (all but the time)."""
    assert a.rounds == b.rounds and a.accuracy == b.accuracy
    assert (a.diverged, a.diverged_round, a.faulty) == (b.diverged, b.diverged_round, b.faulty)
    np.testing.assert_array_equal(a.parameters, b.parameters)


def _lockstep_cases():
    cases = [("digits", "mlp", {"hidden": 9}), ("digits", "cnn", {"channels": (3, 4)})]
    if any(c[0] == "mnist1d" for c in CASES):
        cases.append(("mnist1d", "cnn1d", {"channels": (6, 6, 6)}))
    return cases


@pytest.mark.parametrize(("name", "model", "params"), _lockstep_cases())
def test_simulate_lockstep_equals_simulate_bit_for_bit(datasets, name, model, params):
    """Each run of a lockstep group is the run alone, bit for bit: an omniscient attack
    (reads the honest rows), a data attack, FLTrust's root gradient, a defence-aware
    attack, worker momentum, and a run that diverges mid-group (it leaves the stack;
    the others go on). The ``cnn`` has no engine: its runs are computed one by one."""
    if name == "digits":
        ds = datasets.get("digits") or sim.load_dataset("digits")
    else:
        ds = datasets[name]
    common = dict(workers=6, model=model, model_params=params, rounds=12, eval_every=4,
                  batch_size=8, worker_momentum=0.9)
    runs = [dict(rule="mean", f=2, attack="little_is_enough", seed=0, lr=0.05),
            dict(rule="fltrust", f=2, attack="little_is_enough", seed=1, lr=0.05),
            dict(rule="median", f=1, attack="label_flip", seed=2, lr=0.05,
                 evaluate_on="val"),
            dict(rule="mean", f=0, seed=3, lr=1e4),  # diverges after a few rounds
            dict(rule="trimmed_mean", f=2, attack="optimal_little_is_enough", seed=4,
                 lr=0.05)]
    order = []
    got = simulate_lockstep(ds, runs, **common,
                            on_done=lambda i, r, cpu: order.append((i, r, cpu)))
    assert len(order) == len(runs)
    for spec, res in zip(runs, got, strict=True):
        _same_result(res, sim.simulate(ds, **spec, **common))
    assert got[3].diverged and got[3].diverged_round < common["rounds"]
    assert not any(r.diverged for i, r in enumerate(got) if i != 3)
    # the diverged run is handed over the moment it stops, before the others finish
    assert order[0][0] == 3 and order[0][1] is got[3]
    assert all(cpu > 0 and r.seconds > 0 for _, r, cpu in order)


def test_simulate_lockstep_argument_errors(datasets):
    ds = datasets.get("digits") or sim.load_dataset("digits")
    with pytest.raises(ValueError, match="at least one run"):
        simulate_lockstep(ds, [])
    with pytest.raises(TypeError, match="cannot set per run: workers"):
        simulate_lockstep(ds, [{"seed": 0, "workers": 3}])
    with pytest.raises(TypeError, match=r"runs\[0\] must be a dict"):
        simulate_lockstep(ds, [("mean", 0)])
    with pytest.raises(ValueError, match="need 0 <= f < workers"):
        simulate_lockstep(ds, [{"f": 0}, {"f": 9}], workers=5)


def _grid_config(**optimizer):
    model = ({"model": "cnn1d", "channels": [4, 4]} if any(c[0] == "mnist1d" for c in CASES)
             else {"model": "mlp", "hidden": 9})
    data = ({"dataset": "mnist1d", "n_samples": 600} if model["model"] == "cnn1d"
            else {"dataset": "digits"})
    return sim.parse_config({
        "experiment": {"name": "lock", "rounds": 8, "seeds": [0, 1, 2], "eval_every": 2},
        "data": data, "cluster": {"workers": 6, "f": 2},
        "model": model, "optimizer": {"lr": 0.05, "worker_momentum": 0.9, **optimizer},
        # FLTrust (root data) with an omniscient attack, a coordinate rule with a data
        # attack, and a learning rate that diverges for some runs
        "rules": {"fltrust": {}, "median": {}, "mean": {"lr": 1e4}},
        "attacks": {"little_is_enough": {}, "label_flip": {}},
    })


@pytest.fixture
def engine_calls(monkeypatch):
    """The number of runs of every gradient engine call."""
    calls = []
    real = GradientEngine.__call__

    def counting(self, flats, xb, yb):
        calls.append(int(flats.shape[0]))
        return real(self, flats, xb, yb)

    monkeypatch.setattr(GradientEngine, "__call__", counting)
    return calls


def test_lockstep_grid_equals_one_at_a_time(tmp_path, monkeypatch, engine_calls):
    """A grid stepped in lockstep groups gives the curves of runs one at a time, bit
    for bit, and does step them together (counted engine calls: one per round per
    group of 3 seeds, against one per round per run)."""
    monkeypatch.setenv("FLAGAGG_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _grid_config()
    alone = sim.run_experiment(cfg, store=False, progress=False, lockstep=1)
    # one call per round of every run (the diverged ones stop early)
    stepped = sum(r["diverged_round"] or cfg.rounds for r in alone.runs)
    assert set(engine_calls) == {1} and len(engine_calls) == stepped
    engine_calls.clear()
    store = tmp_path / "store"
    together = sim.run_experiment(cfg, store=store, progress=False, lockstep=3)
    assert alone.curves == together.curves
    strip = ("seconds", "cpu_seconds")
    assert ([{k: v for k, v in r.items() if k not in strip} for r in alone.runs]
            == [{k: v for k, v in r.items() if k not in strip} for r in together.runs])
    assert any(r["diverged"] for r in together.runs)  # a run left its group early
    # 6 groups of 3 seeds: every round of every run, in at most 6 calls a round
    assert sum(engine_calls) == stepped and max(engine_calls) == 3
    assert engine_calls.count(3) >= 5 * cfg.rounds and len(engine_calls) <= 6 * cfg.rounds
    # every run has its own record in the store, under the key of a run alone
    import json

    records = [json.loads(p.read_text()) for p in store.glob("*.json")]
    assert len(records) == 18 and {r["result"]["lockstep"] for r in records} == {3}
    keys = {_experiment.run_key(_experiment.run_settings(cfg, t))
            for t in _experiment._grid(cfg, cfg.seeds, "test")}
    assert {r["key"] for r in records} == keys


def test_lockstep_grid_on_processes_steps_groups(tmp_path, monkeypatch):
    """``--jobs 2``: each process takes a group (3 runs when there are enough groups
    for both, fewer when there are not), with the serial results."""
    monkeypatch.setenv("FLAGAGG_CACHE_DIR", str(tmp_path / "cache"))
    import dataclasses
    import json

    full = _grid_config()
    cfg = dataclasses.replace(full, rules=full.rules[:1], attacks=full.attacks[:1])
    serial = sim.run_experiment(cfg, store=False, progress=False, lockstep=1)
    pooled = sim.run_experiment(cfg, store=tmp_path / "s", progress=False, jobs=2,
                                lockstep=3)
    assert serial.curves == pooled.curves
    sizes = [json.loads(p.read_text())["result"]["lockstep"]
             for p in (tmp_path / "s").glob("*.json")]
    # 3 runs for 2 processes: groups of 2 and 1
    assert sorted(sizes) == [1, 2, 2]


@pytest.mark.parametrize(("n", "lockstep", "at_once", "sizes"),
                         [(18, 3, 1, [3] * 6), (7, 3, 1, [3, 3, 1]), (6, 3, 4, [2, 2, 2]),
                          (6, 1, 1, [1] * 6), (5, 4, None, [4, 1]), (0, 3, 1, [])])
def test_lockstep_groups(n, lockstep, at_once, sizes):
    groups = _experiment._groups(n, lockstep, at_once)
    assert [len(g) for g in groups] == sizes
    assert [i for g in groups for i in g] == list(range(n))


def test_lockstep_argument_is_checked():
    with pytest.raises(ValueError, match="lockstep must be an int >= 1"):
        sim.run_experiment(_grid_config(), lockstep=0, store=False, progress=False)


# --------------------------------------------------------------------------
# one CPU per run: PyTorch and the BLAS on one thread


def _blas_threads():
    from threadpoolctl import threadpool_info

    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def test_grid_runs_use_one_blas_thread_and_restore_it(monkeypatch):
    """NNM before a coordinate-wise rule materialises a (15, 15) x (15, n) product:
    OpenBLAS spreads it over every core, which cost a round 15 ms of CPU on a busy
    machine. The grid's runs run with one BLAS thread (and one PyTorch thread);
    the caller's settings are back afterwards."""
    pytest.importorskip("threadpoolctl")
    before_blas, before_torch = _blas_threads(), torch.get_num_threads()
    seen = []
    real = _experiment._run_group

    def spying(config, tasks, on_done=None):
        seen.append((_blas_threads(), torch.get_num_threads()))
        return real(config, tasks, on_done)

    monkeypatch.setattr(_experiment, "_run_group", spying)
    cfg = sim.parse_config({
        "experiment": {"name": "blas", "rounds": 2, "seeds": [0, 1], "eval_every": 2},
        "data": {"dataset": "digits"}, "cluster": {"workers": 5, "f": 1},
        "rules": {"nnm-median": {"rule": "median", "params": {"pre": ["nnm"]}}},
        "attacks": {"none": {}},
    })
    sim.run_experiment(cfg, store=False, progress=False)
    assert seen and all(blas <= {1} and t == 1 for blas, t in seen)
    assert _blas_threads() == before_blas and torch.get_num_threads() == before_torch


def test_grid_runs_leave_the_processes_objects_out_of_gc_passes_and_restore_it(monkeypatch):
    """A grid's runs happen with the objects alive at its start frozen (no full
    garbage-collector pass walks PyTorch's 170,000 objects again); the freeze is
    undone after, and a process that froze objects itself keeps its freeze."""
    import gc

    from flagagg.sim import _experiment

    seen = []
    real = _experiment._run_group

    def spying(config, tasks, on_done=None):
        seen.append(gc.get_freeze_count())
        garbage = []
        garbage.append(garbage)  # a cycle made during the run is still collected
        del garbage
        assert gc.collect() >= 1
        return real(config, tasks, on_done)

    monkeypatch.setattr(_experiment, "_run_group", spying)
    cfg = sim.parse_config({
        "experiment": {"name": "gc", "rounds": 2, "seeds": [0], "eval_every": 2},
        "data": {"dataset": "digits"}, "cluster": {"workers": 4, "f": 1},
        "rules": {"mean": {}}, "attacks": {"none": {}},
    })
    before = gc.get_freeze_count()
    assert before == 0
    sim.run_experiment(cfg, store=False, progress=False)
    assert seen and all(n > 0 for n in seen)
    assert gc.get_freeze_count() == 0
    gc.freeze()  # the process's own freeze: left as it is
    try:
        seen.clear()
        sim.run_experiment(cfg, store=False, progress=False)
        # still frozen after (the count only drops as frozen objects die)
        assert len(seen) == 1 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_nnm_before_a_coordinate_rule_on_one_blas_thread_is_repeatable_and_close():
    """The thread limit changes the cost, not the answer: on one BLAS thread the
    aggregate is the same on every call, and within float32 rounding of the
    multi-threaded one (OpenBLAS 0.3.31 splits the sums of NNM's (15, 15) x (15, n)
    product over its threads, so the last bits may differ), also with a hostile row."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import flagagg

    rng = np.random.default_rng(3)
    G = rng.standard_normal((15, 5210)).astype(np.float32) + 1e3
    G[4] *= 1e30  # one hostile row far away
    rule = flagagg.get_rule("median", f=3, pre=["nnm"])
    many = rule(G, backend="numpy")
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        one = rule(G, backend="numpy")
        again = rule(G, backend="numpy")
    np.testing.assert_array_equal(one, again)
    assert np.isfinite(one).all() and np.abs(one).max() < 2e3  # the hostile row is out
    np.testing.assert_allclose(one, many, rtol=4 * np.finfo(np.float32).eps, atol=0)


def test_cli_lockstep_option(tmp_path, capsys):
    """``--lockstep R`` reaches the grid (the stored runs say their group's size);
    0 is refused in flagagg's words before anything runs."""
    import json

    from flagagg.cli import main as cli_main

    cfg = sim.parse_config({
        "experiment": {"name": "cli", "rounds": 2, "seeds": [0, 1], "eval_every": 2},
        "data": {"dataset": "digits"}, "cluster": {"workers": 5, "f": 1},
        "rules": {"mean": {}}, "attacks": {"none": {}},
    })
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    out = tmp_path / "out"
    assert cli_main(["experiment", str(path), "--lockstep", "0", "--output", str(out)]) == 2
    assert "--lockstep must be >= 1: got 0" in capsys.readouterr().err
    assert not out.exists()
    assert cli_main(["experiment", str(path), "--lockstep", "2", "--output", str(out),
                     "--no-plots", "--quiet"]) == 0
    sizes = [json.loads(p.read_text())["result"]["lockstep"]
             for p in (out / "store").glob("*.json")]
    assert sizes == [2, 2]
