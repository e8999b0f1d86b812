"""flagagg.torch: per-worker gradients aggregated into .grad, an optimizer steps on them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flagagg  # noqa: E402
import flagagg.torch as fat  # noqa: E402


def _net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    net.add_module("frozen", torch.nn.Linear(2, 2))
    for q in net.frozen.parameters():
        q.requires_grad_(False)
    net.add_module("unused", torch.nn.Linear(2, 2))  # never in forward: grad stays None
    return net


def _forward(net, x):
    return net[2](net[1](net[0](x)))


def _worker_grads(net, p=7, bad=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = []
    for i in range(p):
        net.zero_grad(set_to_none=True)
        x = torch.randn(16, 6, generator=g)
        loss = _forward(net, x).pow(2).mean()
        loss.backward()
        d = fat.collect_grads(net)
        if i >= p - bad:
            d = {k: None if v is None else -10 * v for k, v in d.items()}
        # named_parameters()-style dicts, keys in a different order per worker
        keys = list(d)
        grads.append({k: d[k] for k in (keys if i % 2 else keys[::-1])})
    return grads


def test_collect_grads_names_and_none():
    net = _net()
    grads = _worker_grads(net, p=1, bad=0)[0]
    assert "frozen.weight" not in grads  # not requiring grad: not a parameter to aggregate
    assert grads["unused.weight"] is None and grads["0.weight"] is not None


@pytest.mark.parametrize("rule, params", [("flag", {}), ("multi_krum", {"f": 2}),
                                          ("median", {})])
def test_aggregate_grads_writes_grad_and_optimizer_steps(rule, params):
    net = _net()
    grads = _worker_grads(net)
    ref = flagagg.aggregate([{k: grads[i][k] for k in grads[0]} for i in range(len(grads))],
                            rule=rule, **params)
    net.zero_grad(set_to_none=False)
    net.unused.weight.grad = torch.ones(2, 2)  # no worker has a gradient here: reset to None
    before = {n: q.detach().clone() for n, q in net.named_parameters()}
    kept = net[0].weight.grad
    res = fat.aggregate_grads(net, grads, rule, **params)
    assert res.aggregate is not None
    assert net[0].weight.grad is kept  # written in place
    for n, q in net.named_parameters():
        if not q.requires_grad:
            continue
        if ref[n] is None:
            assert q.grad is None, n
        else:
            assert q.grad.dtype == q.dtype and q.grad.shape == q.shape
            torch.testing.assert_close(q.grad, ref[n])
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    moved = (net[0].weight - before["0.weight"]).abs().max().item()
    assert moved > 0
    torch.testing.assert_close(net.unused.weight, before["unused.weight"])


def test_robust_grad_points_the_honest_way():
    net = _net()
    grads = _worker_grads(net, p=7, bad=2)
    names = [n for n, q in net.named_parameters() if q.requires_grad
             and grads[0][n] is not None]
    honest = torch.cat([torch.stack([g[k] for g in grads[:5]]).mean(0).reshape(-1)
                        for k in names])
    fat.aggregate_grads(net, grads, "multi_krum", f=2)
    agg = torch.cat([q.grad.reshape(-1) for q in net.parameters() if q.grad is not None])
    assert torch.nn.functional.cosine_similarity(agg, honest, dim=0) > 0.9
    mean = fat.aggregate_grads(net, grads, "mean")
    assert mean.coefficients is not None
    agg = torch.cat([q.grad.reshape(-1) for q in net.parameters() if q.grad is not None])
    assert torch.nn.functional.cosine_similarity(agg, honest, dim=0) < 0


def test_float64_and_list_inputs():
    net = _net().double()
    params = [q for q in net.parameters() if q.requires_grad]
    rng = np.random.default_rng(0)
    grads = [[torch.from_numpy(rng.normal(size=tuple(q.shape))) for q in params]
             for _ in range(5)]
    fat.aggregate_grads(params, grads, "median")
    for j, q in enumerate(params):
        assert q.grad.dtype == torch.float64
        np.testing.assert_array_equal(q.grad.numpy(),
                                      np.median([g[j].numpy() for g in grads], axis=0))


def test_mismatched_gradient_sets():
    net = _net()
    grads = _worker_grads(net, p=3, bad=0)
    del grads[1]["0.bias"]
    with pytest.raises(ValueError, match=r"gradient set 1 does not match.*0\.bias"):
        fat.aggregate_grads(net, grads, "median")
    grads = _worker_grads(net, p=3, bad=0)
    grads[2]["0.bias"] = None
    with pytest.raises(ValueError, match=r"\['0\.bias'\] is None in input 2"):
        fat.aggregate_grads(net, grads, "median")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gradients_stay_on_the_gpu():
    net = _net().cuda()
    grads = [{k: None if v is None else v.cuda() for k, v in g.items()}
             for g in _worker_grads(_net())]
    fat.aggregate_grads(net, grads, "flag")
    assert net[0].weight.grad.device.type == "cuda"


def test_import_flagagg_does_not_import_flagagg_torch():
    code = "import sys, flagagg; print('flagagg.torch' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_parameters_instead_of_gradients_are_refused():
    import flagagg.torch as fat

    model = torch.nn.Linear(3, 2)
    params = dict(model.named_parameters())
    with pytest.raises(TypeError, match="is a parameter .* not a gradient"):
        fat.aggregate_grads(model, [params] * 4, "mean")
    with pytest.raises(TypeError, match="not a gradient"):
        fat.aggregate_grads(model, [list(model.parameters())] * 4, "median")
    # A leaf that requires grad (a parameter copy) is no gradient either.
    leafs = {n: q.detach().clone().requires_grad_() for n, q in params.items()}
    with pytest.raises(TypeError, match="not a gradient"):
        fat.aggregate_grads(model, [leafs] * 4, "flag")
    # Real gradients go through.
    torch.nn.functional.mse_loss(model(torch.ones(5, 3)), torch.zeros(5, 2)).backward()
    fat.aggregate_grads(model, [fat.collect_grads(model)] * 4, "mean")
