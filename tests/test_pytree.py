"""Pytree inputs: per-layer results equal the stacked ones; None leaves, key order, containers."""

from __future__ import annotations

import collections
import tracemalloc
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import pytest

import flagagg
from flagagg._array import as_stack

from support.backends import has_module, make_lib
from support.rules import call

P, F = 11, 2  # Bulyan needs p >= 4f + 3
# Leaf sizes that straddle the kernels' segments (2048 columns), their
# coordinate blocks and the generic path's chunks, next to tiny biases.
SHAPES = [(5, 3, 3, 3), (5,), (300, 70), (7,), (4100,), (2, 2), (1,)]


def stacked(p=P, f=F, seed=0, dtype="float32", offset=0.0, nan_row=False):
    """A (p, n) float stack: p - f honest rows around a common point, f reversed ones."""
    rng = np.random.default_rng(seed)
    n = sum(int(np.prod(s)) for s in SHAPES)
    base = rng.normal(size=n)
    G = base + 0.5 * rng.normal(size=(p, n))
    G[p - f:] *= -10.0
    G += offset
    if nan_row:
        G[p - 1, 17] = np.nan
    return np.ascontiguousarray(G.astype(dtype))


def split(G, to=np.array):
    """Row i of G as worker i's list of per-layer arrays (separate copies, not views)."""
    offs = np.cumsum([0] + [int(np.prod(s)) for s in SHAPES])
    bounds = list(zip(offs[:-1], offs[1:], SHAPES, strict=True))
    return [[to(np.array(g[a:b]).reshape(s)) for a, b, s in bounds] for g in G]


def joined(tree, lib):
    return np.concatenate([lib.back(a).reshape(-1) for a in tree])


RULES = {
    "mean": {},
    "median": {},
    "trimmed_mean": {"f": F},
    "meamed": {"f": F},
    "phocas": {"f": F},
    "krum": {"f": F},
    "multi_krum": {"f": F},
    "bulyan": {"f": F},
    "geometric_median": {},
    "centered_clipping": {"tau": 2.0, "n_iter": 3},
    "mda": {"f": F},
    "flag": {},
    "cge": {"f": F}, "medoid": {}, "monna": {"f": F}, "caf": {"f": F}, "smea": {"f": F},
    "clipped_clustering": {"f": F}, "fltrust": {}, "aksel": {"f": F}, "dnc": {"f": F},
    "signguard": {"f": F},
}
RULES_ALL = {**RULES, "nnm+krum": {"f": F, "pre": ["nnm"]}, "arc+krum": {"f": F, "pre": ["arc"]}}

LIB_CASES = [
    pytest.param("numpy", id="numpy"),
    pytest.param("numba", id="numba",
                 marks=pytest.mark.skipif(not has_module("numba"), reason="numba missing")),
    pytest.param("torch-cpu", id="torch-cpu",
                 marks=pytest.mark.skipif(not has_module("torch"), reason="torch missing")),
    pytest.param("array_api_strict", id="array_api_strict",
                 marks=pytest.mark.skipif(not has_module("array_api_strict"),
                                          reason="array-api-strict missing")),
]


def test_every_rule_is_covered():
    assert set(RULES) == set(flagagg.available_rules())


def _rule(name, params):
    base = name.split("+")[-1]
    return flagagg.get_rule(base, **params)


@pytest.mark.parametrize("case", LIB_CASES)
@pytest.mark.parametrize("name", list(RULES_ALL))
@pytest.mark.parametrize("kind", ["plain", "offset", "nan"])
def test_per_layer_equals_stacked(case, name, kind):
    """Every rule and backend: a list of per-layer arrays gives the stacked result."""
    lib = make_lib(case)
    G = stacked(offset=50.0 if kind == "offset" else 0.0, nan_row=kind == "nan")
    rule = _rule(name, RULES_ALL[name])
    ref = lib.back(call(rule, lib.to(G), backend=lib.backend))
    trees = split(G, lib.to)
    # FLTrust's reference, where it needs one, is given in the inputs' own form.
    out = call(rule, trees, backend=lib.backend)
    assert isinstance(out, list) and len(out) == len(SHAPES)
    for a, s in zip(out, SHAPES, strict=True):
        lib.check(a, "float32")
        assert tuple(a.shape) == s
    got = joined(out, lib)
    assert np.isfinite(got).all() or name == "mean"
    scale = np.nanmax(np.abs(ref))
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * scale)


@pytest.mark.parametrize("case", LIB_CASES)
def test_per_layer_float64_and_mixed_dtypes(case):
    """float64 leaves stay float64; a float16 leaf next to float32 ones takes its own path."""
    lib = make_lib(case)
    G = stacked(dtype="float64")
    trees = split(G, lib.to)
    out = flagagg.aggregate(trees, rule="multi_krum", f=F, backend=lib.backend)
    ref = lib.back(flagagg.aggregate(lib.to(G), rule="multi_krum", f=F, backend=lib.backend))
    lib.check(out[2], "float64")
    np.testing.assert_allclose(joined(out, lib), ref, rtol=1e-10, atol=1e-10)
    if case == "array_api_strict":
        return
    mixed = [[a if j != 2 else lib.to(lib.back(a).astype(np.float16)) for j, a in enumerate(t)]
             for t in split(G.astype(np.float32), lib.to)]
    out = flagagg.aggregate(mixed, rule="median", backend=lib.backend)
    lib.check(out[2], "float16")
    lib.check(out[4], "float32")
    Gm = np.concatenate([np.stack([lib.back(t[j]).reshape(-1).astype(np.float64) for t in mixed])
                         for j in range(len(SHAPES))], axis=1)
    np.testing.assert_allclose(joined(out, lib).astype(np.float64), np.median(Gm, axis=0),
                               rtol=1e-3, atol=1e-3)


def test_non_contiguous_leaves_take_the_generic_path():
    G = stacked()
    wide = np.repeat(G[:, :, None], 2, axis=2)  # every leaf row becomes a strided view
    trees = [[wide[i, :5, 0], wide[i, 5:4105, 0]] for i in range(P)]
    assert not trees[0][0].flags.c_contiguous
    for backend in flagagg.available_backends():
        if backend in ("torch", "cupy"):
            continue
        out = flagagg.aggregate(trees, rule="krum", f=F, backend=backend)
        ref = flagagg.aggregate(G[:, :4105], rule="krum", f=F, backend=backend)
        np.testing.assert_allclose(np.concatenate(out), ref, rtol=1e-6)


@pytest.mark.skipif(not has_module("torch"), reason="torch missing")
def test_torch_device_paths_on_cpu_tensors():
    """The GPU code paths (foreach combine, chunked Gram) run on CPU tensors against numba's."""
    import torch

    from flagagg.backends import _torch

    impl = _torch.BACKEND
    G = stacked()
    leaves = [[torch.from_numpy(np.ascontiguousarray(G[i, a:b])) for i in range(P)]
              for a, b in ((0, 140), (140, 21140), (21140, 25240))]
    coef = np.linspace(-1, 1, P)
    coef[3] = 0.0
    dev = impl._combine_rows_device(coef, leaves)
    host = impl.combine_rows(coef, leaves)
    for d, h in zip(dev, host, strict=True):
        np.testing.assert_allclose(d.numpy(), h.numpy(), rtol=1e-5, atol=1e-5)
    K_generic = super(_torch.TorchBackend, impl).gram_rows(leaves)
    np.testing.assert_allclose(K_generic, impl.gram_rows(leaves), rtol=1e-10)


@pytest.mark.skipif(not has_module("torch"), reason="torch missing")
def test_torch_without_numba(monkeypatch):
    """Without numba, CPU tensors of a pytree go through the generic chunked path."""
    import torch

    from flagagg.backends import _torch

    monkeypatch.setattr(_torch, "_cpu_tables", lambda leaves: ([], list(range(len(leaves)))))
    G = stacked()
    trees = split(G, torch.from_numpy)
    for name in ("multi_krum", "median", "flag"):
        rule = _rule(name, RULES[name])
        ref = rule(torch.from_numpy(G)).numpy()
        got = np.concatenate([a.reshape(-1).numpy() for a in rule(trees)])
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


@pytest.mark.skipif(not has_module("numba"), reason="numba missing")
def test_per_layer_peak_memory_is_order_n():
    """No stacked copy: the extra memory of an aggregation is about one output, not p of them."""
    G = stacked(p=15, f=3)
    trees = split(G)
    n_bytes = G[0].nbytes
    for name in ("flag", "multi_krum", "median", "bulyan"):
        params = {"f": 3} if name in ("multi_krum", "bulyan") else {}
        rule = flagagg.get_rule(name, **params)
        rule(trees, backend="numba")  # compile outside the measurement
        tracemalloc.start()
        rule(trees, backend="numba")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 3 * n_bytes + (1 << 20), (name, peak, n_bytes)


# -- structure ------------------------------------------------------------------------------


def _workers(make, p=5):
    return [make(np.full(3, float(i)), np.full((2, 2), float(i))) for i in range(p)]


def test_none_leaves_for_every_worker_stay_none():
    trees = _workers(lambda a, b: {"frozen": None, "w": a, "layers": [None, b]})
    for name in ("median", "flag", "krum"):
        params = {"f": 1} if name == "krum" else {}
        out = flagagg.aggregate(trees, rule=name, **params)
        assert out["frozen"] is None and out["layers"][0] is None
        assert out["w"].shape == (3,) and out["layers"][1].shape == (2, 2)


def test_none_for_some_workers_names_the_leaf():
    trees = _workers(lambda a, b: {"w": a, "layers": [a, b]})
    trees[3]["layers"][1] = None
    with pytest.raises(ValueError, match=r"\['layers'\]\[1\] is None in input 3"):
        flagagg.aggregate(trees, rule="median")
    trees = _workers(lambda a, b: {"w": a, "layers": [None, b]})
    trees[2]["layers"][0] = np.zeros(3)
    with pytest.raises(ValueError, match=r"\['layers'\]\[0\] is None in input 0 but an array "
                                         r"in input 2"):
        flagagg.aggregate(trees, rule="median")


def test_dict_keys_in_any_order():
    """named_parameters()-style dicts: keys are matched by name, the output in input 0's order."""
    rng = np.random.default_rng(1)
    names = ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    shapes = {"conv.weight": (4, 3), "conv.bias": (4,), "fc.weight": (2, 4), "fc.bias": (2,)}
    trees = []
    for i in range(6):
        order = rng.permutation(names)
        trees.append({k: rng.normal(size=shapes[k]) + i for k in order})
    out = flagagg.aggregate(trees, rule="median")
    assert list(out) == list(trees[0])
    for k in names:
        np.testing.assert_array_equal(out[k], np.median([t[k] for t in trees], axis=0))
    ordered = [collections.OrderedDict(sorted(t.items(), reverse=i % 2 == 1))
               for i, t in enumerate(trees)]
    out = flagagg.aggregate(ordered, rule="median")
    assert type(out) is collections.OrderedDict and list(out) == list(ordered[0])
    np.testing.assert_array_equal(out["fc.bias"], np.median([t["fc.bias"] for t in trees], 0))


class Grads(NamedTuple):
    weight: np.ndarray
    bias: np.ndarray | None


class Params(Mapping):
    """A read-only Mapping that is not a dict."""

    def __init__(self, data):
        self._data = dict(data)

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)


class Layers(list):
    pass


def test_containers_are_rebuilt_as_their_own_type():
    trees = _workers(lambda a, b: Params({"head": Grads(a, None),
                                          "body": Layers([b, Grads(a, b)])}))
    out = flagagg.aggregate(trees, rule="median")
    assert type(out) is Params
    assert type(out["head"]) is Grads and out["head"].bias is None
    assert type(out["body"]) is Layers and type(out["body"][1]) is Grads
    np.testing.assert_array_equal(out["body"][1].bias, np.full((2, 2), 2.0))


def test_structure_and_leaf_errors():
    with pytest.raises(ValueError, match="different structure.*no leaf"):
        flagagg.aggregate([{"a": np.ones(2)}, {"b": np.ones(2)}], rule="mean")
    with pytest.raises(TypeError, match=r"unsupported leaf \['a'\] of input 1 of type str"):
        flagagg.aggregate([{"a": np.ones(2)}, {"a": "x"}], rule="mean")
    with pytest.raises(ValueError, match=r"ragged inputs: input 1\['a'\]"):
        flagagg.aggregate([{"a": np.ones(2)}, {"a": np.ones(3)}], rule="mean")


def test_stack_keeps_leaves_as_views():
    trees = split(stacked())
    stack = as_stack(trees)
    assert all(leaf.rows is not None for leaf in stack.leaves)
    assert np.shares_memory(stack.leaves[2].rows[4], trees[4][2])
    assert stack.row_leaves() is stack.row_leaves()
