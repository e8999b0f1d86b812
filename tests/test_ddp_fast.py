"""The DDP hook's fast paths, each against the slow, obvious form (no process group needed).

- the combination written straight into a bucket buffer against the
  backend's combination and a copy, on hostile rows (NaN with weight 0,
  1e30/1e300, large offsets);
- the per-rank diagnostics formed when the state is read against the same
  functions called in the step;
- the per-bucket plans kept across steps: rebuilt when the buffer, its size
  or ``replicate_below`` change.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

from flagagg._backend_choice import select_backend  # noqa: E402
from flagagg._gram import Gram, as_gram  # noqa: E402
from flagagg.rules._result import diagnose, linear_stats  # noqa: E402
from flagagg.torch import _ddp  # noqa: E402


def _rows(dtype, m, kind):
    rng = np.random.default_rng(7)
    X = rng.normal(size=(4, m))
    if kind == "nan":  # a faulty row, weight 0: must not leak into the output
        X[2, ::3] = np.nan
    elif kind == "huge":
        X[1] *= 1e30 if dtype == torch.float32 else 1e300
    elif kind == "offset":  # values far from zero, small differences
        X += 1e6
    return torch.from_numpy(X).to(dtype)


COEFS = {"mean": [0.25, 0.25, 0.25, 0.25], "one_out": [0.4, 0.3, 0.0, 0.3],
         "signed": [1.5, -0.25, 0.0, -0.25], "zero": [0.0, 0.0, 0.0, 0.0]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["plain", "nan", "huge", "offset"])
@pytest.mark.parametrize("coef", list(COEFS))
@pytest.mark.parametrize("m", [0, 1, 1000, 70001])
def test_combine_into_a_bucket_equals_combine_and_copy(dtype, kind, coef, m):
    """Bit for bit what ``dst.copy_(impl.combine(coef, X))`` gives, into a slice of a bucket."""
    X = _rows(dtype, m, kind)
    c = np.asarray(COEFS[coef])
    if kind == "nan" and c[2] != 0:
        c = np.asarray(COEFS["one_out"])
    impl = select_backend(None, X, "torch")
    bucket = torch.full((m + 13,), 7.0, dtype=dtype)
    dst = bucket[5:5 + m]  # this rank's part of a bucket buffer: a view at an offset
    _ddp._combine_into(impl, c, X, dst)
    want = impl.combine(c, X).to(dtype)
    assert torch.equal(dst, want) or (torch.isnan(want).any()
                                      and torch.equal(torch.isnan(dst), torch.isnan(want))
                                      and torch.equal(dst[~torch.isnan(dst)],
                                                      want[~torch.isnan(want)]))
    # nothing outside the part is written
    assert torch.all(bucket[:5] == 7.0) and torch.all(bucket[5 + m:] == 7.0)
    if kind == "nan":
        assert torch.isfinite(dst).all()


@pytest.mark.parametrize("case", ["float16", "strided"])
def test_combine_into_falls_back_where_the_kernel_cannot_write(case):
    """Half precision and a strided destination go through combine and a copy: same values."""
    X = _rows(torch.float16 if case == "float16" else torch.float32, 257, "plain")
    impl = select_backend(None, X, "torch")
    c = np.asarray(COEFS["signed"])
    if case == "float16":
        dst = torch.zeros(257, dtype=torch.float16)
    else:
        dst = torch.zeros(514, dtype=torch.float32)[::2]
    _ddp._combine_into(impl, c, X, dst)
    assert torch.equal(dst, impl.combine(c, X).to(dst.dtype))


def test_numba_combine_out_is_checked_and_returned():
    from flagagg.backends._numba import NumbaBackend

    X = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32)
    c = np.array([0.5, 0.0, 0.5])
    out = np.empty(50, dtype=np.float32)
    got = NumbaBackend().combine(c, X, out=out)
    assert got is out
    np.testing.assert_array_equal(out, NumbaBackend().combine(c, X))
    for bad in (np.empty(49, np.float32), np.empty(50, np.float64),
                np.empty(100, np.float32)[::2]):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            NumbaBackend().combine(c, X, out=bad)


def _state(rule="flag"):
    import flagagg

    return _ddp.DDPHookState(flagagg.get_rule(rule), "sharded")


def _gram(scaled):
    rng = np.random.default_rng(1)
    G = rng.normal(size=30) + 0.3 * rng.normal(size=(4, 30))  # honest ranks agree
    G[3] *= -10  # a reversed, scaled rank
    if not scaled:
        return G @ G.T
    # rank 1 at 1e200: its squared norm overflows; held by its scaled form
    e = np.array([0, 700, 0, 0])
    return Gram.from_scaled(G @ G.T, e, finite=np.ones(4, dtype=bool))


@pytest.mark.parametrize("scaled", [False, True])
def test_diagnostics_are_formed_when_read_and_equal_the_eager_ones(scaled, monkeypatch):
    K = _gram(scaled)
    state = _state()
    coef = np.asarray(state.rule.solve_gram(K).coefficients, dtype=np.float64)
    want = diagnose(linear_stats(as_gram(K), coef), coef, ())
    calls = []
    real = _ddp.diagnose
    monkeypatch.setattr(_ddp, "diagnose", lambda *a: calls.append(1) or real(*a))
    _ddp._record(state, [], [], np.arange(4), coef, K, 4)
    assert calls == [] and state._influence is None  # nothing formed inside the step
    assert state.steps == 1 and state.coefficients is coef
    np.testing.assert_array_equal(state.influence, want["influence"])
    np.testing.assert_array_equal(state.cosine, want["cosine"])
    assert state.verdict == tuple(want["verdict"])
    bad = 1 if scaled else 3  # the 1e200 rank, or the reversed one
    assert bad in state.suspects and state.verdict[bad] != "trusted"
    assert calls == [1]  # formed once, then kept
    # the next step replaces them (not the first step's, kept): every rank non-finite
    why = "non-finite values (NaN or Inf)"
    _ddp._record(state, [(r, why) for r in range(4)], [], np.zeros(0, dtype=np.int64), None,
                 None, 4)
    assert state.influence is None and np.isnan(state.cosine).all()
    assert state.verdict == (f"excluded: {why}",) * 4 and state.suspects == (0, 1, 2, 3)
    assert state.steps == 2


def test_diagnostics_of_a_step_with_an_excluded_rank_match_the_eager_ones():
    """A rank left out (NaN): diagnostics of the kept ranks, the excluded one says why."""
    G = np.random.default_rng(2).normal(size=(4, 20))
    K_all = G @ G.T
    finite = np.array([True, True, False, True])
    keep = np.flatnonzero(finite)
    state = _state()
    coef = np.zeros(4)
    coef[keep] = state.rule.solve_gram(K_all[np.ix_(keep, keep)]).coefficients
    K = K_all.copy()
    K[2, :] = K[:, 2] = np.nan
    excluded = [(2, "non-finite values (NaN or Inf)")]
    _ddp._record(state, excluded, [], keep, coef, K, 4)
    want = diagnose(linear_stats(as_gram(K), coef), coef, tuple(excluded))
    np.testing.assert_array_equal(state.influence, want["influence"])
    np.testing.assert_array_equal(state.cosine, want["cosine"])
    assert state.verdict == tuple(want["verdict"])
    assert state.verdict[2].startswith("excluded")


def test_bucket_plans_are_kept_and_rebuilt_when_the_bucket_changes():
    state = _state()
    a = torch.arange(10, dtype=torch.float32)
    plan = _ddp._plan(state, 0, a, 4, 1)
    assert plan.lens is None  # 10 * 3 < replicate_below: the bucket goes whole
    assert _ddp._plan(state, 0, a, 4, 1) is plan
    state.replicate_below = 0
    sharded = _ddp._plan(state, 0, a, 4, 1)
    assert sharded is not plan and sharded.lens == [3, 3, 2, 2]
    # this rank's part and the peers' parts are views of the bucket itself
    assert sharded.own.data_ptr() == a[3:6].data_ptr() and sharded.own.numel() == 3
    assert [j for j, _ in sharded.peers] == [0, 2, 3]
    assert [v[0].data_ptr() for _, v in sharded.peers] == [a[0:3].data_ptr(),
                                                           a[6:8].data_ptr(),
                                                           a[8:10].data_ptr()]
    assert sharded.targets == [0, 2, 3]
    assert _ddp._plan(state, 0, a, 4, 1) is sharded
    b = torch.arange(10, dtype=torch.float32)  # DDP rebuilt its buckets: another buffer
    assert _ddp._plan(state, 0, b, 4, 1).own.data_ptr() == b[3:6].data_ptr()
    c = torch.arange(3, dtype=torch.float32)  # fewer elements than ranks: empty shards
    tiny = _ddp._plan(state, 0, c, 4, 3)
    assert tiny.lens == [1, 1, 1, 0] and tiny.targets == [] and len(tiny.peers) == 3


def _hostile_grams(rng, count):
    """Gram matrices the hook meets: agreeing ranks, a reversed or x100 one, duplicates,
    rank-deficient sets, magnitudes from 1e-100 to 1e100, p from 2 to 16."""
    for t in range(count):
        p = int(rng.integers(2, 17))
        n = int(rng.integers(1, 60))
        G = rng.normal(size=n) + rng.normal(size=(p, n)) * rng.uniform(1e-3, 3)
        kind = t % 8
        if kind == 1:
            G[0] *= -10
        elif kind == 2:
            G[p - 1] *= 100
        elif kind == 3:  # duplicates and near-duplicates
            G[1] = G[0]
            G[p - 1] = G[0] * (1 + 1e-13)
        elif kind == 4:  # rank-deficient: every row in a 2-d span
            G = rng.normal(size=(p, 2)) @ rng.normal(size=(2, n))
        elif kind == 5:
            G *= 1e100
        elif kind == 6:
            G *= 1e-100
        elif kind == 7:  # opposite pairs
            G[1::2] = -G[0::2][: p // 2]
        yield G @ G.T


@pytest.mark.parametrize("params", [{}, {"r": 1}, {"r": 3}, {"max_iter": 1},
                                    {"max_iter": 6, "tol": 0.0}, {"eps": 1e-3},
                                    {"rescale": "median_norm"}])
def test_lean_flag_solve_is_bit_identical_to_solve_gram(params):
    import flagagg

    rule = flagagg.get_rule("flag", **params)
    rng = np.random.default_rng(11)
    used = 0
    for K in _hostile_grams(rng, 400):
        want = np.asarray(rule.solve_gram(K).coefficients, dtype=np.float64)
        got, excluded = _ddp._solve(rule, K)
        np.testing.assert_array_equal(got, want)
        assert excluded == ()
        used += _ddp._lean_flag_applies(rule, K)
    assert used == 400  # the lean path ran on every one (not the fallback)


@pytest.mark.parametrize("case", ["lam", "reference", "no_rescale", "zero_row", "nan",
                                  "overflow", "scaled", "krum", "too_few"])
def test_solve_outside_the_lean_case_is_the_rules_own(case):
    """Every case the lean path does not cover goes to ``rule.solve_gram``, same result."""
    import flagagg

    rng = np.random.default_rng(5)
    G = rng.normal(size=30) + 0.5 * rng.normal(size=(5, 30))
    K = G @ G.T
    rule = flagagg.get_rule("flag")
    if case == "lam":
        rule = flagagg.get_rule("flag", lam=0.5)
    elif case == "reference":
        rule = flagagg.get_rule("flag", variant="reference")
    elif case == "no_rescale":
        rule = flagagg.get_rule("flag", rescale="none")
    elif case == "zero_row":
        K[2, :] = K[:, 2] = 0.0
    elif case == "nan":
        K[1, 1] = np.nan
    elif case == "overflow":
        K[0, 0] = 1e300
    elif case == "scaled":
        K = Gram.from_scaled(K, np.array([0, 600, 0, 0, 0]), finite=np.ones(5, dtype=bool))
    elif case == "krum":
        rule = flagagg.get_rule("krum", f=1)
    elif case == "too_few":  # flag with f = 2 needs p >= 5: four ranks left must fail
        rule = flagagg.get_rule("flag", f=2)
        K = K[:4, :4]
    if case == "too_few":
        with pytest.raises(ValueError, match="p >= 2f"):
            _ddp._solve(rule, K)
        return
    assert not _ddp._lean_flag_applies(rule, K)
    want = rule.solve_gram(K)
    got, excluded = _ddp._solve(rule, K)
    np.testing.assert_array_equal(got, np.asarray(want.coefficients, dtype=np.float64))
    assert excluded == tuple(want.excluded)


def test_plans_of_buckets_ddp_no_longer_has_are_dropped():
    """Three buckets, then two (DDP rebuilt them): the third's plan and buffers go."""
    state = _state()
    state.replicate_below = 0
    buckets = [torch.zeros(40), torch.zeros(40), torch.zeros(8)]
    for i, b in enumerate(buckets):
        _ddp._plan(state, i, b, 4, 0)
    _ddp._forget_buckets(state, 3)
    assert ("plan", 2) in state._scratch and ("shards", 2) in state._scratch
    _ddp._forget_buckets(state, 2)
    assert ("plan", 2) not in state._scratch and ("shards", 2) not in state._scratch
    assert ("plan", 1) in state._scratch and state._scratch["buckets"] == 2


def _failing_step_worker(rank, store, out):
    """A step whose solve fails on every rank (too few finite ranks), then ordinary steps."""
    import json

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import flagagg
    import flagagg.torch as fat

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=4)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    model = DDP(net, bucket_cap_mb=0.004)
    state, hook = fat.ddp_comm_hook("flag", f=1)  # needs 3 finite ranks of 4
    state.replicate_below = 0  # every bucket sharded: receives posted each step
    model.register_comm_hook(state, hook)
    g = torch.Generator().manual_seed(rank)
    X, y = torch.randn(16, 20, generator=g), torch.randint(0, 2, (16,), generator=g)
    res = {"errors": [], "close": [], "identical": []}
    for step in range(4):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), y)
        if step == 1 and rank >= 2:  # two NaN ranks: the rule cannot run on the two left
            loss = loss * float("nan")
        try:
            loss.backward()
        except Exception as exc:  # noqa: BLE001 - the test reads the message
            res["errors"].append((step, str(exc)[:300]))
            continue
        got = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
        ref = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(),
                                  torch.nn.Linear(64, 2))
        ref.load_state_dict(net.state_dict())
        torch.nn.functional.cross_entropy(ref(X), y).backward()
        mine = torch.cat([q.grad.reshape(-1) for q in ref.parameters()])
        every = [torch.empty_like(mine) for _ in range(4)]
        dist.all_gather(every, mine)
        want = flagagg.get_rule("flag", f=1)(torch.stack(every).double().numpy())
        outs = [torch.empty_like(got) for _ in range(4)]
        dist.all_gather(outs, got)
        res["close"].append(bool(np.allclose(got.double().numpy(), want, rtol=1e-4,
                                             atol=1e-6)))
        res["identical"].append(all(torch.equal(got, q) for q in outs))
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(res, fh)
    dist.destroy_process_group()


def test_a_step_that_fails_leaves_no_receive_behind(tmp_path):
    """The solve raises on every rank (2 finite ranks, flag with f = 1 needs 3): that
    backward fails in flagagg's words, and the next steps aggregate as the local rule."""
    import json
    import os

    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_failing_step_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")),
             nprocs=4, join=True)
    for r in range(4):
        res = json.loads((tmp_path / f"out.{r}").read_text())
        assert [s for s, _ in res["errors"]] == [1], res
        assert "p >= 2f + 1" in res["errors"][0][1], res
        assert res["close"] == [True] * 3 and res["identical"] == [True] * 3, res
