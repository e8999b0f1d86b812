"""The DDP communication hook on 4 gloo ranks (CPU): robustness, identical replicas, traffic."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

WORLD = 4
BAD = 3  # the rank that sends -10 times its gradient
STEPS = 30


def _data(seed, n):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    centers = torch.linspace(-1, 1, 20).reshape(1, 20)
    X = torch.randn(n, 20, generator=g) + (2 * y[:, None] - 1) * centers
    return X, y


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))


def _plain_gradient(X, y, scale=1.0, dtype=torch.float32):
    """This rank's gradient of the same model without DDP: the reference's row."""
    ref_model = _model().to(dtype)
    (scale * torch.nn.functional.cross_entropy(ref_model(X.to(dtype)), y)).backward()
    return torch.cat([q.grad.reshape(-1) for q in ref_model.parameters()])


def _wchar():
    try:
        with open("/proc/self/io") as fh:
            return int(next(line for line in fh if line.startswith("wchar")).split()[1])
    except (OSError, StopIteration):
        return -1


def _train(rank, hook, attack, nan_step=None, replicate_below=0):
    """Train a DDP replica; return accuracy, parameters, hook state, bytes written."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import flagagg.torch as fat

    model = DDP(_model(), bucket_cap_mb=0.004)  # several buckets per step
    state = None
    if hook is not None:
        rule, mode, params = hook
        # Exactly as the docs say: the hook ddp_comm_hook returns, no wrapper.
        state, inner = fat.ddp_comm_hook(rule, mode, **params)
        # 0: every bucket sharded (the traffic test counts a ring all-reduce's
        # bytes); the default sends these small buckets whole (one exchange).
        state.replicate_below = replicate_below
        model.register_comm_hook(state, inner)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    X, y = _data(100 + rank, 64 * STEPS)
    excluded = []
    before = _wchar()
    for i in range(STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[64 * i:64 * (i + 1)]),
                                                 y[64 * i:64 * (i + 1)])
        # The faults come from the data, as a user's would: the loss scaled by
        # -10 on the bad rank (its gradient reversed, x10), NaN on rank 2 once.
        if attack and rank == BAD:
            loss = -10.0 * loss
        if nan_step is not None and rank == 2 and i == nan_step:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        if state is not None:
            excluded.append([r for r, _ in state.excluded])
    written = _wchar() - before
    Xt, yt = _data(999, 2000)
    with torch.no_grad():
        acc = (model(Xt).argmax(1) == yt).float().mean().item()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return acc, flat, state, written, excluded


def _worker(rank, store, out):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD)
    results = {}
    scenarios = {
        "honest_allreduce": (None, False, None),
        "attacked_allreduce": (None, True, None),
        "attacked_sharded_flag": (("flag", "sharded", {}), True, None),
        "attacked_gather_flag": (("flag", "gather", {}), True, None),
        "attacked_sharded_median": (("median", "sharded", {}), True, None),
        "attacked_sharded_geomed": (("geometric_median", "sharded", {}), True, None),
        "nan_sharded_flag": (("flag", "sharded", {}), True, 3),
        "nan_gather_median": (("median", "gather", {}), False, 3),
        "nan_whole_buckets_flag": (("flag", "sharded", {}), True, 3),
    }
    for name, (hook, attack, nan_step) in scenarios.items():
        acc, flat, state, written, excluded = _train(
            rank, hook, attack, nan_step, replicate_below=1 << 18 if "whole" in name else 0)
        parts = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(parts, flat)
        same = all(torch.equal(parts[0], q) for q in parts[1:])
        results[name] = {
            "acc": acc, "identical": same, "finite": bool(torch.isfinite(flat).all()),
            "bytes_written": written,
            "elements_sent": None if state is None else state.elements_sent,
            "excluded": excluded,
        }
    n = sum(p.numel() for p in _model().parameters())
    results["n"] = n
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(results, fh)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("ddp")
    env = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.spawn(_worker, args=(str(tmp / "store"), str(tmp / "out")), nprocs=WORLD, join=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    runs = []
    for r in range(WORLD):
        with open(tmp / f"out.{r}") as fh:
            runs.append(json.load(fh))
    return runs


ROBUST = ["attacked_sharded_flag", "attacked_gather_flag", "attacked_sharded_median",
          "attacked_sharded_geomed", "nan_whole_buckets_flag"]


def test_hook_trains_near_honest_where_all_reduce_fails(ddp_runs):
    r = ddp_runs[0]
    honest = r["honest_allreduce"]["acc"]
    assert honest > 0.85
    assert r["attacked_allreduce"]["acc"] < honest - 0.2
    for name in ROBUST:
        assert r[name]["acc"] > honest - 0.05, (name, r[name]["acc"], honest)


def test_replicas_are_bit_identical(ddp_runs):
    for run in ddp_runs:
        for name, res in run.items():
            if name not in ("n", "attacked_allreduce"):  # that one diverges to NaN
                assert res["identical"], name


def test_nonfinite_rank_is_excluded_and_reported_on_every_rank(ddp_runs):
    for run in ddp_runs:
        for name in ("nan_sharded_flag", "nan_gather_median", "nan_whole_buckets_flag"):
            res = run[name]
            assert res["finite"]
            assert 2 in res["excluded"][3]
            assert all(2 not in ex for i, ex in enumerate(res["excluded"]) if i != 3)
            assert res["excluded"] == ddp_runs[0][name]["excluded"]


def test_bytes_sent_per_rank(ddp_runs):
    """Sharded moves what a ring all-reduce moves; gather about p/2 times that."""
    n = ddp_runs[0]["n"]
    per_step_sharded = ddp_runs[0]["attacked_sharded_flag"]["elements_sent"] / STEPS
    per_step_gather = ddp_runs[0]["attacked_gather_flag"]["elements_sent"] / STEPS
    ring = 2 * n * (WORLD - 1) / WORLD
    assert ring <= per_step_sharded <= ring + 2 * WORLD + 16
    assert per_step_gather == pytest.approx(n * (WORLD - 1), abs=WORLD)
    written = {k: np.mean([run[k]["bytes_written"] for run in ddp_runs])
               for k in ("honest_allreduce", "attacked_sharded_flag", "attacked_gather_flag")}
    print("\nper rank, per step: n =", n, "elements sent: sharded", per_step_sharded,
          "gather", per_step_gather, "ring all-reduce", ring,
          "; bytes written (/proc/self/io):", {k: v / STEPS for k, v in written.items()})
    print({k: (v["acc"], v["excluded"][:5] if v["excluded"] else None)
           for k, v in ddp_runs[0].items() if k != "n"})
    if min(written.values()) > 0:  # /proc/self/io counts socket writes on Linux
        assert written["attacked_gather_flag"] > 1.2 * written["attacked_sharded_flag"]


def _nccl_worker(rank, store, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import flagagg.torch as fat

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    results = {}
    for rule, mode in (("flag", "sharded"), ("median", "sharded"), ("median", "gather")):
        model = DDP(_model().cuda(), device_ids=[0], bucket_cap_mb=0.004)
        ref = _model().cuda()
        state, hook = fat.ddp_comm_hook(rule, mode)
        model.register_comm_hook(state, hook)
        X, y = _data(0, 64)
        for net in (model, ref):
            torch.nn.functional.cross_entropy(net(X.cuda()), y.cuda()).backward()
        # One rank: the robust aggregate of one gradient is that gradient.
        results[f"{rule}-{mode}"] = all(
            q.grad.device.type == "cuda" and torch.allclose(q.grad, r.grad, rtol=1e-5, atol=1e-6)
            for q, r in zip(model.parameters(), ref.parameters(), strict=True))
    with open(out, "w") as fh:
        json.dump(results, fh)
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(),
                    reason="no CUDA device (the NCCL path never runs on CPU-only machines)")
def test_nccl_hook_on_one_gpu(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_nccl_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=1)
    with open(tmp_path / "out") as fh:
        results = json.load(fh)
    assert all(results.values()), results


REGISTERED = [("flag", "sharded", {}), ("median", "sharded", {}), ("krum", "sharded", {"f": 0}),
              ("flag", "gather", {}), ("multi_krum", "gather", {"f": 0}),
              # every bucket sharded (the default sends these small buckets whole),
              # and the 672-element bucket whole, the 1122-element one sharded
              ("flag", "sharded", {"replicate_below": 0}),
              ("flag", "sharded", {"replicate_below": 3000})]


def _key(rule, mode, params):
    rb = params.get("replicate_below")
    return f"{rule}-{mode}" + ("" if rb is None else f"-replicate_below={rb}")
SCALED = 3  # the rank whose loss (so gradient) is scaled x100


def _register_worker(rank, store, out):
    """Register the hook exactly as documented; check the aggregate, the state, the errors."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import flagagg
    import flagagg.torch as fat

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD)
    results = {}
    X, y = _data(500 + rank, 64)
    import warnings

    caught = warnings.catch_warnings(record=True)
    record = caught.__enter__()
    warnings.simplefilter("always", FutureWarning)
    for rule, mode, params in REGISTERED:
        key = _key(rule, mode, params)
        params = dict(params)
        replicate = params.pop("replicate_below", None)
        model = DDP(_model(), bucket_cap_mb=0.004)
        state, hook = fat.ddp_comm_hook(rule, mode, **params)
        if replicate is not None:
            state.replicate_below = replicate
        model.register_comm_hook(state, hook)
        scale = 100.0 if rank == SCALED else 1.0
        # A first step, then the one checked: DDP rebuilds its buckets (here
        # 1794 elements, then 1122 + 672) after the first backward.
        (scale * torch.nn.functional.cross_entropy(model(X), y)).backward()
        model.zero_grad()
        (scale * torch.nn.functional.cross_entropy(model(X), y)).backward()
        got = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
        # The reference: this rank's plain gradient, all-gathered, aggregated by flagagg.
        mine = _plain_gradient(X, y, scale)
        every = torch.stack(_gather(mine))
        expect = torch.as_tensor(flagagg.get_rule(rule, **params)(every.double().numpy(),
                                                                  backend="numpy"))
        # Never opposite signs (influence is 0 for inputs a rule gave no weight).
        sign_ok = bool(np.all(state.influence * np.nan_to_num(state.cosine) >= 0))
        results[key] = {
            "close": bool(torch.allclose(got.double(), expect, rtol=1e-4, atol=1e-6)),
            "identical": all(torch.equal(got, q) for q in _gather(got)),
            "verdict": list(state.verdict), "suspects": list(state.suspects),
            "signs": sign_ok, "n_influence": len(state.influence),
            "paths": sorted({k[0] for k in state._scratch if k[0] in ("whole", "shards")}),
        }
    caught.__exit__(None, None, None)
    # torch 2.13 deprecates all_gather_into_tensor (and others) with a
    # FutureWarning: the hook uses the calls torch recommends.
    results["deprecated"] = sorted({str(w.message) for w in record
                                    if issubclass(w.category, FutureWarning)
                                    and "torch.distributed" in str(w.message)})
    errors = {}
    for name, (rule, mode, params) in {
        "krum_bound": ("krum", "sharded", {"f": 1}),
        "no_majority": ("flag", "sharded", {"f": 2}),
        "mode": ("bulyan", "sharded", {"f": 0}),
    }.items():
        try:
            fat.ddp_comm_hook(rule, mode, **params)
            errors[name] = None
        except Exception as exc:  # noqa: BLE001 - the test compares types and words
            errors[name] = f"{type(exc).__name__}: {exc}"
    # A rule changed after the hook was built is caught at the first backward,
    # still in flagagg's words.
    model = DDP(_model())
    state, hook = fat.ddp_comm_hook("krum", "sharded", f=0)
    state.rule = flagagg.get_rule("krum", f=1)
    state._checked = None
    model.register_comm_hook(state, hook)
    try:
        torch.nn.functional.cross_entropy(model(X), y).backward()
        errors["late"] = None
    except Exception as exc:  # noqa: BLE001
        errors["late"] = f"{type(exc).__name__}: {exc}"
    results["errors"] = errors
    results["subgroup"] = _subgroup_step(rank, X, y)
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(results, fh)
    dist.destroy_process_group()


SUBGROUP = [1, 2, 3]  # DDP over three of the four ranks: group ranks are not global ranks


def _subgroup_step(rank, X, y):
    """The sharded hook on a process group of ranks 1-3, every bucket sharded."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import flagagg
    import flagagg.torch as fat

    sub = dist.new_group(SUBGROUP)  # every rank calls it, members or not
    if rank not in SUBGROUP:
        return None
    model = DDP(_model(), bucket_cap_mb=0.004, process_group=sub)
    state, hook = fat.ddp_comm_hook("flag", "sharded", process_group=sub)
    state.replicate_below = 0
    model.register_comm_hook(state, hook)
    scale = 100.0 if rank == SCALED else 1.0
    for _ in range(2):
        model.zero_grad()
        (scale * torch.nn.functional.cross_entropy(model(X), y)).backward()
    got = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
    mine = _plain_gradient(X, y, scale)
    every = [torch.empty_like(mine) for _ in SUBGROUP]
    dist.all_gather(every, mine, group=sub)
    expect = torch.as_tensor(flagagg.get_rule("flag")(torch.stack(every).double().numpy(),
                                                      backend="numpy"))
    outs = [torch.empty_like(got) for _ in SUBGROUP]
    dist.all_gather(outs, got, group=sub)
    return {"close": bool(torch.allclose(got.double(), expect, rtol=1e-4, atol=1e-6)),
            "identical": all(torch.equal(got, q) for q in outs),
            "suspects": list(state.suspects)}


def _gather(t):
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t)
    return parts


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("ddp_registered")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_register_worker, args=(str(tmp / "store"), str(tmp / "out")), nprocs=WORLD,
             join=True)
    runs = []
    for r in range(WORLD):
        with open(tmp / f"out.{r}") as fh:
            runs.append(json.load(fh))
    return runs


@pytest.mark.parametrize("key", [_key(*r) for r in REGISTERED])
def test_hook_registers_as_documented_and_computes_the_rule(registered, key):
    """``state, hook = ddp_comm_hook(...); model.register_comm_hook(state, hook)``, no wrapper."""
    for run in registered:
        res = run[key]
        assert res["close"], key
        assert res["identical"], key
        assert res["n_influence"] == WORLD
        # The state carries the diagnostics; the x100 rank is suspect, never trusted.
        assert SCALED in res["suspects"], res
        assert res["verdict"][SCALED] != "trusted"
        assert res["signs"], res
        assert res["verdict"] == registered[0][key]["verdict"]
        if key.endswith("replicate_below=3000"):  # both kinds of bucket in one step
            assert res["paths"] == ["shards", "whole"], res
        elif key.endswith("replicate_below=0"):
            assert res["paths"] == ["shards"], res
        elif key == "flag-sharded":
            assert res["paths"] == ["whole"], res


def test_hook_on_a_subgroup_sends_to_the_groups_ranks(registered):
    """DDP over ranks 1-3: the hook's point-to-point sends address global ranks."""
    assert registered[0]["subgroup"] is None
    for rank in SUBGROUP:
        res = registered[rank]["subgroup"]
        assert res["close"] and res["identical"], res
        assert res["suspects"] == [SUBGROUP.index(SCALED)], res


def test_hook_uses_no_deprecated_collective(registered):
    assert registered[0]["deprecated"] == [], registered[0]["deprecated"]


def test_hook_configuration_errors_are_raised_when_built_in_flagaggs_words(registered):
    errors = registered[0]["errors"]
    assert errors["krum_bound"].startswith("ValueError: flagagg DDP hook on 4 ranks: need p >= "
                                           "2f + 3 for krum: got p=4, f=1"), errors
    assert errors["no_majority"].startswith("ValueError"), errors
    assert "p >= 2f + 1 for flag" in errors["no_majority"]
    assert errors["mode"].startswith("ValueError") and "mode='gather'" in errors["mode"]
    assert errors["late"] is not None and "need p >= 2f + 3 for krum" in errors["late"], errors
    assert "Unable to cast" not in errors["late"]


# One rank far beyond float64's squared range (1e200: ||g||^2 overflows), or
# at 1e30 in float32. The sharded hook must decide about it as the local rule
# does on the same gradients: keep it (the scaled Gram holds it), same output.
HUGE = {"float64": 1e200, "float32": 1e30}
HUGE_RANK = 1


def _huge_worker(rank, store, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import flagagg
    import flagagg.torch as fat

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD)
    results = {}
    X, y = _data(700 + rank, 64)
    for dtype_name, scale in HUGE.items():
        dtype = getattr(torch, dtype_name)
        for rule, replicate in (("flag", 0), ("mean", 0), ("flag", 1 << 18)):
            # Several buckets; in float32 one per parameter, so that the last
            # layer's bias (2 values) leaves two of the 4 ranks an empty shard.
            cap = 0.004 if dtype_name == "float64" else 1e-6
            model = DDP(_model().to(dtype), bucket_cap_mb=cap)
            state, hook = fat.ddp_comm_hook(rule, "sharded")
            state.replicate_below = replicate
            model.register_comm_hook(state, hook)
            s = scale if rank == HUGE_RANK else 1.0
            for _ in range(2):  # the second step runs on the rebuilt buckets
                model.zero_grad()
                (s * torch.nn.functional.cross_entropy(model(X.to(dtype)), y)).backward()
            got = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
            mine = _plain_gradient(X, y, s, dtype)
            every = torch.stack(_gather(mine))
            res = flagagg.get_rule(rule)(every.numpy(), return_result=True)
            expect = torch.as_tensor(res.aggregate)
            top = float(expect.abs().max())
            how = "shards" if replicate == 0 else "whole"
            results[f"{rule}-{dtype_name}-{how}"] = {
                "finite": bool(torch.isfinite(got).all()),
                "close": bool(torch.allclose(got.double(), expect.double(), rtol=1e-4,
                                             atol=1e-5 * top)),
                "max_abs_ratio": float(got.abs().max()) / top,
                "identical": all(torch.equal(got, q) for q in _gather(got)),
                "excluded": [list(e) for e in state.excluded],
                "local_excluded": [list(e) for e in res.excluded],
                "coef": state.coefficients.tolist(),
                "local_coef": np.asarray(res.coefficients).tolist(),
                "verdict": list(state.verdict), "local_verdict": list(res.verdict),
            }
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(results, fh)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def huge_runs(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("ddp_huge")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_huge_worker, args=(str(tmp / "store"), str(tmp / "out")), nprocs=WORLD, join=True)
    runs = []
    for r in range(WORLD):
        with open(tmp / f"out.{r}") as fh:
            runs.append(json.load(fh))
    return runs


@pytest.mark.parametrize("key", [f"{r}-{d}-{h}" for d in HUGE
                                 for r, h in (("flag", "shards"), ("mean", "shards"),
                                              ("flag", "whole"))])
def test_sharded_hook_keeps_a_huge_rank_as_the_local_rule_does(huge_runs, key):
    """1e200 in float64 (its squared norm overflows), 1e30 in float32: kept, same output."""
    for run in huge_runs:
        res = run[key]
        assert res["excluded"] == [] == res["local_excluded"], res
        assert res["finite"] and res["identical"], res
        assert res["close"], res
        np.testing.assert_allclose(res["coef"], res["local_coef"], rtol=1e-6, atol=1e-12)
        assert res["verdict"] == res["local_verdict"], res
        assert res["verdict"][HUGE_RANK] != "trusted"


def _shards(G, world):
    """Split the (p, n) array G by columns as the hook does; return each rank's (p, m) shard."""
    from flagagg.torch._ddp import _split

    cuts = np.cumsum([0, *_split(G.shape[1], world)])
    return [torch.from_numpy(np.ascontiguousarray(G[:, a:b]))
            for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def _exact_gram(G, rows):
    """Reference: the inner products of ``rows`` of G in exact rational arithmetic."""
    from fractions import Fraction

    return {(i, j): sum(Fraction(float(a)) * Fraction(float(b))
                        for a, b in zip(G[i], G[j], strict=True))
            for i in rows for j in rows}


@pytest.mark.parametrize(("world", "n"), [(1, 23), (3, 23), (4, 23), (4, 3)])
def test_partial_grams_with_extreme_rows_sum_to_the_exact_gram(world, n):
    """Per-shard exponents, combined across ranks, give the Gram exactly (vs. exact rationals).

    Rows: ordinary; 1e200 (only in some shards, zero elsewhere); 1e-200; a
    NaN in one shard only; a row of 1e300 beside ordinary values. With n = 3
    on 4 ranks one shard is empty.
    """
    from fractions import Fraction

    from flagagg._backend_choice import select_backend
    from flagagg._gram import Gram
    from flagagg.torch._ddp import _combine_grams, _shard_gram

    rng = np.random.default_rng(3)
    G = rng.normal(size=(5, n))
    G[1, : n // 2] = 0.0
    G[1] *= 1e200
    G[2] *= 1e-200
    G[3, -1] = np.nan
    G[4, 0] = 1e300
    impl = select_backend(None, torch.zeros(2), "torch")
    msgs = []
    for X in _shards(G, world):
        S, e, f = _shard_gram(impl, X)
        msgs.append(np.concatenate([S.reshape(-1), e.astype(np.float64), f.astype(np.float64)]))
    S, e, finite = _combine_grams(np.stack(msgs), G.shape[0])
    assert finite.tolist() == [True, True, True, False, True]
    K = Gram.from_scaled(S, e, finite=finite)
    exact = _exact_gram(G, (0, 1, 2, 4))
    for i in (0, 1, 2, 4):
        for j in (0, 1, 2, 4):
            want = float(exact[i, j] / Fraction(2) ** int(e[i] + e[j]))
            assert S[i, j] == pytest.approx(want, rel=1e-12, abs=1e-300), (i, j)
    assert np.isinf(K.values[1, 1]) and K.usable[1]  # kept: its scaled form is exact
