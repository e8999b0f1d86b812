"""The simulated cluster, datasets, configs, experiment grids and tuning."""

import copy
import gzip
import pickle
import struct
from importlib import resources

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import flagagg  # noqa: E402
from flagagg import sim  # noqa: E402
from flagagg.cli import main as cli_main  # noqa: E402
from flagagg.sim import ConfigError, parse_config  # noqa: E402
from flagagg.training._config import tomllib  # noqa: E402  (tomli on Python 3.10)


@pytest.fixture(scope="module")
def digits():
    return sim.load_dataset("digits")


def _config(**sections):
    """A small valid config dict; keyword arguments replace whole sections."""
    base = {
        "experiment": {"name": "tiny", "rounds": 40, "seeds": [0, 1],
                       "validation_seeds": [100], "eval_every": 10},
        "data": {"dataset": "digits"},
        "cluster": {"workers": 7, "f": [2]},
        "rules": {"mean": {"lr": 0.1}, "flag": {"lr": 0.1}},
        "attacks": {"none": {}, "reverse": {"params": {"scale": -10.0}}},
    }
    base.update(sections)
    return base


# --------------------------------------------------------------------------
# data


def test_datasets_split_and_standardise(digits):
    assert digits.input_shape == (1, 8, 8) and digits.n_classes == 10
    total = len(digits.y_train) + len(digits.y_val) + len(digits.y_test)
    assert total == 1797
    assert len(digits.y_test) == pytest.approx(0.25 * 1797, abs=10)
    assert digits.X_train.dtype == np.float32 and digits.y_train.dtype == np.int64
    assert abs(float(digits.X_train.mean())) < 1e-4
    bc = sim.load_dataset("breast_cancer")
    assert bc.input_shape == (30,) and bc.n_classes == 2
    np.testing.assert_allclose(bc.X_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(bc.X_train.std(axis=0), 1, atol=1e-4)
    syn = sim.load_dataset("synthetic", n_samples=300, n_features=6, n_classes=3)
    assert syn.input_shape == (6,) and syn.n_classes == 3
    # the split depends on split_seed only
    again = sim.load_dataset("digits")
    np.testing.assert_array_equal(again.X_test, digits.X_test)


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_mnist_from_local_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for stem, shape in (("train-images-idx3-ubyte", (60, 28, 28)),
                        ("train-labels-idx1-ubyte", (60,)),
                        ("t10k-images-idx3-ubyte", (20, 28, 28)),
                        ("t10k-labels-idx1-ubyte", (20,))):
        high = 10 if "labels" in stem else 256
        data = rng.integers(0, high, size=shape)
        if "labels" in stem:
            data[:10] = np.arange(10)  # every class present
        _write_idx(tmp_path / f"{stem}.gz", data)
    ds = sim.load_dataset("mnist", path=tmp_path)
    assert ds.input_shape == (1, 28, 28) and ds.n_classes == 10
    assert len(ds.y_test) == 20 and len(ds.y_train) + len(ds.y_val) == 60


def test_cifar10_from_local_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(20, 3072), dtype=np.uint8),
                 b"labels": list(range(10)) * 2}
        (folder / name).write_bytes(pickle.dumps(batch))
    ds = sim.load_dataset("cifar10", path=tmp_path)
    assert ds.input_shape == (3, 32, 32) and ds.n_classes == 10
    assert len(ds.y_test) == 20 and len(ds.y_train) + len(ds.y_val) == 100


def test_local_datasets_are_never_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        sim.load_dataset("mnist", path=tmp_path)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        sim.load_dataset("cifar10", path=tmp_path)
    with pytest.raises(ValueError, match="needs a path"):
        sim.load_dataset("cifar10")


def test_partitions_cover_every_sample_once(digits):
    y = digits.y_train
    iid = sim.partition(y, 15, rng=0)
    assert sorted(np.concatenate(iid).tolist()) == list(range(len(y)))
    assert max(map(len, iid)) - min(map(len, iid)) <= 1
    non_iid = sim.partition(y, 15, rng=0, method="dirichlet", alpha=0.1, min_size=5)
    assert sorted(np.concatenate(non_iid).tolist()) == list(range(len(y)))
    assert min(map(len, non_iid)) >= 5

    def classes_per_worker(shards, share=0.05):
        # classes holding more than `share` of a worker's samples
        return np.mean([(np.bincount(y[s], minlength=10) > share * len(s)).sum()
                        for s in shards])

    assert classes_per_worker(non_iid) < 5 < classes_per_worker(iid)
    with pytest.raises(ValueError, match="partition method"):
        sim.partition(y, 3, rng=0, method="shards")


def test_models():
    x = torch.zeros(4, 1, 8, 8)
    for name in (m for m in sim.MODELS if m != "cnn1d"):  # cnn1d: tests/test_mnist1d.py
        model = sim.init_parameters(sim.make_model(name, (1, 8, 8), 10), 0)
        assert model(x).shape == (4, 10)
    a = sim.init_parameters(sim.make_model("mlp", (64,), 10), 3)
    b = sim.init_parameters(sim.make_model("mlp", (64,), 10), 3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
        # PyTorch's default bound 1/sqrt(fan_in); both layers have fan_in 64
        assert float(pa.detach().abs().max()) <= 1 / 8
    with pytest.raises(ValueError, match="cnn.*needs images"):
        sim.make_model("cnn", (30,), 2)


# --------------------------------------------------------------------------
# the simulated cluster


def test_runs_repeat_bit_for_bit(digits):
    kw = dict(f=2, workers=7, rounds=15, lr=0.1, eval_every=5, seed=3)
    for rule, attack in (("flag", "random"), ("mean", "distorted_data"),
                         ("flag", "little_is_enough")):
        a = sim.simulate(digits, rule, attack=attack, **kw)
        b = sim.simulate(digits, rule, attack=attack, **kw)
        np.testing.assert_array_equal(a.parameters, b.parameters)
        assert a.accuracy == b.accuracy and a.faulty == b.faulty
    c = sim.simulate(digits, "flag", attack="random", **{**kw, "seed": 4})
    assert not np.array_equal(a.parameters, c.parameters)


def test_seed_fixes_everything_but_the_rule_and_attack(digits):
    # the initial model is the same for every rule and attack of a seed
    kw = dict(f=2, workers=7, rounds=10, eval_every=5, seed=1)
    a = sim.simulate(digits, "mean", attack="none", **kw)
    b = sim.simulate(digits, "flag", attack="reverse", **kw)
    assert a.accuracy[0] == b.accuracy[0]
    assert a.faulty == b.faulty and len(a.faulty) == 2


def test_nan_rows_reach_the_rule_as_they_are(digits):
    seen = []

    def spy(G):
        seen.append(np.isnan(G).all(axis=1).sum())
        return np.nanmedian(G, axis=0)

    res = sim.simulate(digits, spy, f=2, workers=7, attack="nan", rounds=3, eval_every=1)
    assert seen == [2, 2, 2] and not res.diverged
    # the mean excludes the NaN rows (one NaN policy for every rule) ...
    mean = sim.simulate(digits, "mean", f=2, workers=7, attack="nan", rounds=5, eval_every=1)
    assert not mean.diverged and mean.final_accuracy > 0.2
    # ... and a rule that lets NaN through diverges at once, reported as such
    bad = sim.simulate(digits, lambda G: G.mean(axis=0), f=2, workers=7, attack="nan",
                       rounds=5, eval_every=1)
    assert bad.diverged and bad.diverged_round == 1 and bad.final_accuracy == 0.0
    assert bad.rounds == (0, 1, 2, 3, 4, 5)


def test_data_faults_change_only_faulty_workers_batches(digits):
    batches = []

    def spy(G):
        batches.append(G.copy())
        return G.mean(axis=0)

    kw = dict(f=2, workers=7, rounds=2, eval_every=1, seed=0)
    clean = sim.simulate(digits, spy, attack="none", **kw)
    sim.simulate(digits, spy, attack="label_flip", **kw)
    G_clean, G_flip = batches[0], batches[2]
    faulty = np.array(clean.faulty)
    honest = np.setdiff1d(np.arange(7), faulty)
    np.testing.assert_array_equal(G_clean[honest], G_flip[honest])
    assert not np.allclose(G_clean[faulty], G_flip[faulty])


def test_simulate_argument_errors(digits):
    with pytest.raises(ValueError, match="0 <= f < workers"):
        sim.simulate(digits, "mean", f=7, workers=7)
    with pytest.raises(ValueError, match="rule 'nope' is not available"):
        sim.simulate(digits, "nope")
    with pytest.raises(ValueError, match="unknown attack"):
        sim.simulate(digits, "mean", attack="nope")


# --------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("change, message", [
    (lambda c: c["cluster"].update(worker=7), r"unknown key 'worker' in \[cluster\].*workers"),
    (lambda c: c["cluster"].update(workers="7"), r"\[cluster\] workers must be an integer"),
    (lambda c: c["cluster"].update(f=[2, 7]), "f = .* >= workers"),
    (lambda c: c["experiment"].update(seeds=[0, 100]), "share .*100.*disjoint"),
    (lambda c: c["experiment"].update(rounds=0), r"rounds must be an integer >= 1"),
    (lambda c: c["data"].update(dataset="mnist"), "needs path"),
    (lambda c: c["data"].update(dataset="imagenet"), "dataset must be one of"),
    (lambda c: c.update(model={"model": "cnn"}, data={"dataset": "breast_cancer"}),
     "'cnn' needs image data"),
    (lambda c: c["rules"].update(nope={}), r"\[rules.nope\] rule 'nope' is not available"),
    (lambda c: c["rules"].update(flag={"params": {"r": 0}}), r"\[rules.flag\] cannot be built"),
    (lambda c: c["rules"].update(mean={"params": {"f": 1}}), "f comes from"),
    (lambda c: c["rules"].update(mean={"learning_rate": 1}), "did you mean 'lr_grid'|lr"),
    (lambda c: c["attacks"].update(x={"attack": "gausian"}), "unknown attack 'gausian'"),
    (lambda c: c["attacks"].update(reverse={"params": {"eps": 1}}), "no parameter 'eps'"),
    # 2f >= p: every rule refuses it now (issue 23), before ALIE's z formula would.
    (lambda c: c.update(cluster={"workers": 7, "f": [4]}, attacks={"little_is_enough": {}}),
     r"pass z explicitly|need p >= 2f \+ 1 for mean: got p=7, f=4"),
    (lambda c: c.update(rules={}), "no rules"),
    (lambda c: c.update(optimiser={}), "unknown key 'optimiser'.*did you mean 'optimizer'"),
])
def test_config_errors_say_where_and_what(change, message):
    data = copy.deepcopy(_config())
    change(data)
    with pytest.raises(ConfigError, match=message):
        parse_config(data, source="my.toml")


def test_config_file_and_shipped_configs(tmp_path):
    assert "demo" in sim.available_configs()
    path = tmp_path / "bad.toml"
    path.write_text("[cluster\nworkers = 3\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        sim.load_config(path)
    with pytest.raises(FileNotFoundError, match="not a shipped config"):
        sim.load_config(tmp_path / "missing.toml")
    # the shipped configs are valid for the rules this flagagg has
    for name in sim.available_configs():
        text = resources.files("flagagg.sim").joinpath("configs", f"{name}.toml").read_text()
        raw = tomllib.loads(text)
        have = [k for k, v in raw["rules"].items()
                if v.get("rule", k) in flagagg.available_rules()]
        cfg = sim.load_config(name, rules=have)
        assert cfg.rules and cfg.attacks
    with pytest.raises(ConfigError, match=r"no \[rules.nope\] to select"):
        sim.load_config("demo", rules=["nope"])


def test_config_round_trips_through_toml(tmp_path):
    cfg = parse_config(_config(rules={"mean": {"lr": 0.3, "lr_grid": [0.1, 0.3]},
                                      "flag-1": {"rule": "flag", "params": {"max_iter": 1}}}))
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml("a header"))
    again = sim.load_config(path)
    assert again.to_dict() == cfg.to_dict()
    assert again.rule("flag-1").params == {"max_iter": 1}
    assert again.lr_of("mean") == 0.3 and again.lr_of("flag-1") == cfg.lr


# --------------------------------------------------------------------------
# experiments and tuning


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return sim.run_experiment(_config(), output=out, progress=False), out


def test_tiny_grid_end_to_end(tiny_results):
    results, out = tiny_results
    assert len(results.runs) == 2 * 2 * 2
    for name in ("runs.csv", "curves.csv", "summary.csv", "worst_case.csv", "results.json",
                 "table.txt", "curves_f2.png", "worst_case_f2.png"):
        assert (out / name).stat().st_size > 0, name
    table = results.table()
    assert "worst case" in table and "flag" in table and "reverse" in table
    by = {(s["rule"], s["attack"]): s for s in results.summary()}
    # the paper's reversed gradients ruin the mean; FA shrugs them off
    assert by[("mean", "reverse")]["mean"] < by[("mean", "none")]["mean"] - 0.5
    assert by[("flag", "reverse")]["mean"] > 0.8
    worst = {w["rule"]: w for w in results.worst_case()}
    assert worst["mean"]["worst_attack"] == "reverse"
    assert worst["flag"]["worst"] > worst["mean"]["worst"]


def test_summary_statistics():
    cfg = parse_config(_config())
    runs = [{"f": 2, "rule": r, "attack": a, "seed": s, "lr": 0.1, "final_accuracy": acc,
             "diverged": False}
            for r, a, s, acc in [("mean", "none", 0, 0.9), ("mean", "none", 1, 0.8),
                                 ("mean", "reverse", 0, 0.1), ("mean", "reverse", 1, 0.3),
                                 ("flag", "none", 0, 0.9), ("flag", "none", 1, 0.9),
                                 ("flag", "reverse", 0, 0.85), ("flag", "reverse", 1, 0.75)]]
    res = sim.Results(cfg, runs)
    cell = next(s for s in res.summary() if (s["rule"], s["attack"]) == ("mean", "reverse"))
    assert cell["mean"] == pytest.approx(0.2) and cell["std"] == pytest.approx(np.std([.1, .3],
                                                                                     ddof=1))
    best, other = res.worst_case()
    assert best["rule"] == "flag" and best["worst"] == pytest.approx(0.8)
    assert best["worst_attack"] == "reverse" and best["within_spread"]
    assert other["rule"] == "mean" and not other["within_spread"]


def test_tune_picks_by_worst_case_on_validation(tmp_path):
    cfg = parse_config(_config(rules={"mean": {}}, attacks={"none": {}},
                               experiment={"rounds": 20, "validation_seeds": [100]}))
    result = sim.tune(cfg, lr_grid=[1e-4, 0.1], progress=False)
    assert {r["split"] for r in result.results.runs} == {"val"}
    assert {r["seed"] for r in result.results.runs} == {100}
    assert result.best == {"mean": 0.1}  # 1e-4 barely moves the model
    assert result.config.lr_of("mean") == 0.1
    assert "mean" in result.table() and "lr = 0.1" in result.snippet()
    assert result.at_grid_edge() == ["mean"] and "edge of the grid" in result.table()


def test_cli(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(parse_config(_config()).to_toml())
    assert cli_main(["experiment", str(path), "--check"]) == 0
    assert "8 runs" in capsys.readouterr().out
    out = tmp_path / "demo"
    code = cli_main(["demo", "--rules", "mean", "--attacks", "none", "--seeds", "0",
                     "--rounds", "5", "--output", str(out), "--quiet", "--no-plots"])
    assert code == 0
    assert "worst case" in capsys.readouterr().out
    assert (out / "table.txt").exists()
    assert cli_main(["experiment", str(tmp_path / "nope.toml")]) == 2
    assert "not a shipped config" in capsys.readouterr().err


# --------------------------------------------------------------------------
# one interface through the simulator and the command line


def test_simulate_passes_f_to_pre_aggregation_of_any_rule(digits):
    res = sim.simulate(digits, "flag", f=2, workers=7, attack="reverse", rounds=3,
                       eval_every=3, rule_params={"pre": ["nnm"]})
    assert not res.diverged and len(res.accuracy) == 2


def test_check_rejects_a_grid_that_cannot_run(tmp_path, capsys):
    import tomli_w

    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps(_config(cluster={"workers": 5, "f": [2]},
                                          rules={"krum": {}})))
    assert cli_main(["experiment", str(path), "--check"]) == 2
    assert "need p >= 2f + 3 for krum: got p=5, f=2" in capsys.readouterr().err
    # behind pre-aggregation, the rule is checked on the steps' outputs
    with pytest.raises(ConfigError, match=r"krum sees the 3 outputs of bucketing on p=5"):
        parse_config(_config(cluster={"workers": 5, "f": [1]},
                             rules={"krum": {"params": {"pre": [["bucketing", {"s": 2}]]}}}))


def test_one_seed_table_has_no_spread_and_no_top_group(digits, tmp_path):
    cfg = parse_config(_config(experiment={"name": "one", "rounds": 3, "seeds": [0],
                                           "validation_seeds": [100], "eval_every": 3}))
    results = sim.run_experiment(cfg, output=None, plots=False, progress=False)
    table = results.table()
    assert "±" not in table and " *" not in table and "one seed (0), no spread" in table


def test_cli_without_command_prints_help_and_has_a_version(capsys):
    assert cli_main([]) == 0
    out = capsys.readouterr().out
    assert "usage: flagagg" in out and "experiment" in out
    with pytest.raises(SystemExit) as exc:
        cli_main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"flagagg {flagagg.__version__}"


def test_shipped_config_shows_nnm_before_flag():
    cfg = sim.load_config("fa_ablation")
    assert cfg.rule("nnm-flag").params == {"pre": ["nnm"]}


def test_all_gradients_overflowing_is_divergence_not_an_error(digits, monkeypatch):
    # every gradient non-finite (a model blowing up): the mean has nothing
    # finite to aggregate and raises, which the run reports as divergence
    from flagagg.training import _replica

    real = _replica.Replica.gradients

    def overflowing(self, *args, **kwargs):
        return real(self, *args, **kwargs) * float("inf")

    monkeypatch.setattr(_replica.Replica, "gradients", overflowing)
    res = sim.simulate(digits, "mean", f=0, workers=5, attack="none", rounds=3, eval_every=1)
    assert res.diverged and res.diverged_round == 1 and res.final_accuracy == 0.0


def test_simulate_runs_on_one_thread_and_gives_the_users_threads_back():
    """PyTorch's and NumPy's BLAS threads are 1 while the run trains, the user's after it."""
    import torch
    from threadpoolctl import threadpool_info

    seen = []

    def mean_and_note(G):
        blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
        seen.append((torch.get_num_threads(), blas))
        return np.mean(G, axis=0)

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sim.simulate("digits", mean_and_note, workers=4, rounds=2)
        assert seen and all(t == 1 and all(b == 1 for b in blas) for t, blas in seen)
        assert torch.get_num_threads() == 2
        seen.clear()
        sim.simulate("digits", mean_and_note, workers=4, rounds=2, threads=None)
        assert seen and all(t == 2 for t, _ in seen)
        with pytest.raises(ValueError, match="threads >= 1"):
            sim.simulate("digits", workers=4, rounds=2, threads=0)
    finally:
        torch.set_num_threads(saved)
