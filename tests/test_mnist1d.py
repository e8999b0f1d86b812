"""MNIST-1D (generated offline by the mnist1d package) and the 1-D CNN."""

import random
import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mnist1d")

from flagagg import sim  # noqa: E402


@pytest.fixture(scope="module")
def small():
    return sim.load_dataset("mnist1d", n_samples=500)


def test_published_split_and_shapes(small):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = 500
    raw = make_dataset(args)
    assert small.input_shape == (1, 40) and small.n_classes == 10
    # the first 80 % train (validation carved out of it), the rest test, as published
    assert len(small.y_train) + len(small.y_val) == len(raw["y"]) == 400
    np.testing.assert_array_equal(small.y_test, raw["y_test"])
    # one channel, standardised by one affine map: recover it from the test part
    X_te = small.X_test[:, 0, :].astype(np.float64)
    a, b = np.polyfit(X_te.ravel(), raw["x_test"].ravel(), 1)
    np.testing.assert_allclose(a * X_te + b, raw["x_test"], atol=1e-5)
    # the same map sends every training and validation row to a row of the published train part
    for X, y in ((small.X_train, small.y_train), (small.X_val, small.y_val)):
        back = a * X[:, 0, :].astype(np.float64) + b
        dist = ((back[:, None, :] - raw["x"][None, :, :]) ** 2).sum(axis=2)
        nearest = dist.argmin(axis=1)
        assert dist.min(axis=1).max() < 1e-8
        np.testing.assert_array_equal(raw["y"][nearest], y)
    # the statistics are the training part's: standardised training inputs are centred
    assert small.X_train.dtype == np.float32 and abs(float(small.X_train.mean())) < 1e-5
    assert float(small.X_train.std()) == pytest.approx(1.0, abs=1e-4)


def test_loading_is_offline_repeatable_and_leaves_global_random_state(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    np.random.seed(5)  # noqa: NPY002 - the legacy global state mnist1d seeds
    random.seed(5)
    before_np, before_py = np.random.get_state()[1].copy(), random.getstate()  # noqa: NPY002
    a = sim.load_dataset("mnist1d", n_samples=100)
    np.testing.assert_array_equal(np.random.get_state()[1], before_np)  # noqa: NPY002
    assert random.getstate() == before_py
    b = sim.load_dataset("mnist1d", n_samples=100)
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)


def test_n_samples_is_checked():
    with pytest.raises(ValueError, match="n_samples"):
        sim.load_dataset("mnist1d", n_samples=5)


def test_cnn1d_shape_parameters_and_errors(small):
    net = sim.make_model("cnn1d", small.input_shape, small.n_classes, channels=(25, 25, 25))
    # the MNIST-1D paper's CNN: 25 channels, kernels 5, 3, 3, stride 2, then 125 -> 10
    assert sum(p.numel() for p in net.parameters()) == (25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) \
        + (125 * 10 + 10)
    sim.init_parameters(net, 0)
    out = net(torch.from_numpy(small.X_test[:7]))
    assert out.shape == (7, 10)
    w0 = net[0].weight.detach().clone()
    sim.init_parameters(net, 0)
    torch.testing.assert_close(net[0].weight, w0)
    bound = 1 / np.sqrt(5)
    assert float(w0.abs().max()) <= bound and float(w0.abs().max()) > 0.5 * bound
    with pytest.raises(ValueError, match=r"\(channels, length\)"):
        sim.make_model("cnn1d", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="too short"):
        sim.make_model("cnn1d", (1, 2), 10, channels=(4,))
    with pytest.raises(ValueError, match="images"):
        sim.make_model("cnn", (1, 40), 10)


def test_cnn1d_trains_in_the_simulator(small):
    kw = dict(workers=3, model="cnn1d", model_params={"channels": (8, 8)}, rounds=80,
              eval_every=80, lr=0.05)
    res = sim.simulate(small, "mean", **kw)
    assert res.parameters.size == (8 * 5 + 8) + (8 * 8 * 3 + 8) + (8 * 10 * 10 + 10)
    # 10 classes, 100 test samples: chance is about 0.1 (0.33 to 0.37 measured on seeds 0-2)
    assert res.final_accuracy > 0.25
    attacked = sim.simulate(small, "median", f=1, attack="optimal_fall_of_empires",
                            **{**kw, "rounds": 5})
    assert np.isfinite(attacked.parameters).all()


def test_config_checks_model_against_data():
    base = {"rules": {"mean": {}}, "attacks": {"none": {}}}
    with pytest.raises(sim.ConfigError, match="cnn1d.*sequence"):
        sim.parse_config({**base, "model": {"model": "cnn1d"}})
    with pytest.raises(sim.ConfigError, match="cnn"):
        sim.parse_config({**base, "data": {"dataset": "mnist1d"}, "model": {"model": "cnn"}})
    cfg = sim.parse_config({**base, "data": {"dataset": "mnist1d", "n_samples": 500},
                            "model": {"model": "cnn1d", "channels": [8, 8]}})
    assert cfg.data_kwargs()["n_samples"] == 500
    assert sim.parse_config(base).n_samples is None
