"""The peers' attacks (issue 24, item 3): Fang et al. on Krum and the trimmed mean
(full and partial knowledge), small perturbation and full-gradient negation as the
``krum`` package defines them.

Each is checked against its defining property on a synthetic stack and against a
slow, obviously correct reference where the attack computes something exact.
"""

import math

import numpy as np
import pytest

import flagagg
from flagagg import attacks
from flagagg.attacks import available_attacks, get_attack

torch = pytest.importorskip("torch")

PEER_ATTACKS = ["fang_trimmed_mean", "fang_trimmed_mean_partial", "fang_krum",
                "fang_krum_partial", "full_gradient_negation", "small_perturbation"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.fixture
def honest():
    # a shared drift plus noise: the honest mean has a direction and a sign pattern
    rng = np.random.default_rng(11)
    return rng.normal(size=(12, 50)) + 0.4


@pytest.fixture
def own():
    return np.random.default_rng(12).normal(size=(3, 50)) + 0.4


def _bind(attack, rule="krum", f=3):
    if attack.defence_aware:
        return attack.with_rule(lambda rows: flagagg.aggregate(rows, rule, f=f))
    return attack


# --------------------------------------------------------------------------
# library, device, dtype


@pytest.mark.parametrize("name", PEER_ATTACKS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("device", DEVICES)
def test_rows_follow_input_library_device_dtype(name, dtype, device, honest, own):
    H = torch.as_tensor(honest.astype(dtype), device=device)
    O = torch.as_tensor(own.astype(dtype), device=device)  # noqa: E741
    attack = get_attack(name)
    if attack.defence_aware:
        attack = attack.with_rule(lambda rows: rows.median(dim=0).values)
    out = attack(H, 3, rng=0, own=O)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == H.dtype and out.device == H.device and tuple(out.shape) == (3, 50)
    assert torch.isfinite(out).all()
    # NumPy in, NumPy out, same dtype; same rows for the same seed in both libraries
    attack_np = get_attack(name)
    if attack_np.defence_aware:
        attack_np = attack_np.with_rule(lambda rows: np.median(rows, axis=0))
    out_np = attack_np(honest.astype(dtype), 3, rng=0, own=own.astype(dtype))
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.dtype(dtype)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(out.cpu().numpy(), out_np, rtol=tol, atol=tol)


def test_registry_and_knowledge_model():
    names = set(available_attacks("gradient"))
    assert set(PEER_ATTACKS) <= names
    # full knowledge reads the honest rows; partial knowledge only its own gradients
    assert get_attack("fang_krum").omniscient and get_attack("fang_trimmed_mean").omniscient
    assert not get_attack("fang_krum_partial").omniscient
    assert not get_attack("fang_trimmed_mean_partial").omniscient
    assert get_attack("small_perturbation").defence_aware
    assert not get_attack("fang_krum").defence_aware
    assert attacks.attack_parameters("full_gradient_negation") == {"kappa": 100.0}
    assert "rule" not in attacks.attack_parameters("small_perturbation")


def test_bad_inputs_are_explained(honest):
    with pytest.raises(ValueError, match="partial-knowledge.*own"):
        attacks.fang_krum_partial(honest, 3)
    with pytest.raises(ValueError, match="partial-knowledge.*own"):
        attacks.fang_trimmed_mean_partial(honest, 3)
    with pytest.raises(ValueError, match="need b > 1 for fang_trimmed_mean"):
        attacks.fang_trimmed_mean(honest, 3, b=1.0)
    with pytest.raises(ValueError, match="need threshold > 0 for fang_krum"):
        attacks.fang_krum(honest, 3, threshold=0.0)
    with pytest.raises(ValueError, match="need kappa >= 0 for full_gradient_negation"):
        attacks.full_gradient_negation(honest, 3, kappa=-1.0)
    with pytest.raises(ValueError, match="calls the rule under test"):
        attacks.small_perturbation(honest, 3)
    with pytest.raises(ValueError, match="norm must be"):
        attacks.small_perturbation(honest, 3, rule=np.mean, norm="l1")
    with pytest.raises(ValueError, match="honest row"):
        attacks.fang_krum(honest[:0], 3)
    # one convention (flagagg._validation): TypeError for a wrong type
    with pytest.raises(TypeError, match="b must be a real number for fang_trimmed_mean"):
        attacks.fang_trimmed_mean(honest, 3, b="2")
    with pytest.raises(TypeError, match="eps must be a real number for fang_krum_partial"):
        attacks.fang_krum_partial(honest, 3, eps=None, own=honest[:3])
    with pytest.raises(TypeError, match="steps must be an integer for small_perturbation"):
        attacks.small_perturbation(honest, 3, rule=np.mean, steps=2.5)
    with pytest.raises(ValueError, match="need threshold <= 1 for small_perturbation"):
        attacks.small_perturbation(honest, 3, rule=np.mean, threshold=1.5)


# --------------------------------------------------------------------------
# Fang et al. on the trimmed mean


def _fang_trim_reference(H, f, b, u):
    """The paper's rule, one coordinate and one row at a time, with the uniform draws u."""
    n = H.shape[1]
    rows = np.empty((f, n))
    for j in range(n):
        col = H[:, j]
        s = np.sign(col.mean())
        for i in range(f):
            if s > 0:  # the honest gradient is positive: go below the smallest
                lo = col.min()
                a, c = (lo / b, lo) if lo > 0 else (b * lo, lo)
                rows[i, j] = c + u[i, j] * (a - c)
            elif s < 0:
                hi = col.max()
                a, c = (hi, b * hi) if hi > 0 else (hi, hi / b)
                rows[i, j] = a + u[i, j] * (c - a)
            else:
                rows[i, j] = col.min()
    return rows


def test_fang_trimmed_mean_matches_reference_and_lies_beyond_the_extremes(honest):
    rows = attacks.fang_trimmed_mean(honest, 3, rng=5, b=2.0)
    u = np.random.default_rng(5).random((3, 50))
    np.testing.assert_allclose(rows, _fang_trim_reference(honest, 3, 2.0, u), rtol=1e-13)
    s = np.sign(honest.mean(axis=0))
    assert np.all(rows[:, s > 0] <= honest.min(axis=0)[s > 0])
    assert np.all(rows[:, s < 0] >= honest.max(axis=0)[s < 0])
    # rows differ (drawn per faulty worker, as in the paper)
    assert not np.allclose(rows[0], rows[1])


def test_fang_trimmed_mean_pulls_the_trimmed_mean_against_the_mean(honest):
    mu = honest.mean(axis=0)
    clean = flagagg.aggregate(np.vstack([honest, honest[:3]]), "trimmed_mean", f=3)
    X = np.vstack([honest, attacks.fang_trimmed_mean(honest, 3, rng=0)])
    attacked = flagagg.aggregate(X, "trimmed_mean", f=3)
    # every coordinate moves against the honest mean's sign
    assert np.all(np.sign(mu) * (attacked - clean) < 0)
    # and more than A Little Is Enough moves it
    lie = flagagg.aggregate(np.vstack([honest, attacks.little_is_enough(honest, 3)]),
                            "trimmed_mean", f=3)
    assert np.linalg.norm(attacked - mu) > np.linalg.norm(lie - mu)


def test_fang_trimmed_mean_partial_uses_only_own_gradients(honest, own):
    rows = attacks.fang_trimmed_mean_partial(honest, 3, rng=4, own=own)
    rows_other = attacks.fang_trimmed_mean_partial(honest + 100.0, 3, rng=4, own=own)
    np.testing.assert_array_equal(rows, rows_other)
    mu, sd = own.mean(axis=0), own.std(axis=0)
    s = np.sign(mu)
    dev = (rows - mu) * s / sd  # in estimated standard deviations, against the mean's sign
    assert np.all(dev <= -3.0 + 1e-9) and np.all(dev >= -4.0 - 1e-9)


# --------------------------------------------------------------------------
# Fang et al. on Krum


def _krum_pick(X, f):
    res = flagagg.aggregate(X, "krum", f=f, backend="numpy", return_result=True)
    return res.selected[0]


def test_fang_krum_makes_krum_pick_a_faulty_row(honest):
    f = 3
    rows = attacks.fang_krum(honest, f)
    X = np.vstack([honest, rows])
    assert _krum_pick(X, f) >= honest.shape[0]
    # the row goes against the honest direction in every coordinate
    s = np.sign(honest.mean(axis=0))
    lam = -rows[0] @ s / (s @ s)
    assert lam > 0
    np.testing.assert_allclose(rows, np.tile(-lam * s, (f, 1)), rtol=1e-12)
    out = flagagg.aggregate(X, "krum", f=f)
    assert out @ honest.mean(axis=0) < 0


@pytest.mark.parametrize("offset", [0.0, -0.3, 1e8])
def test_fang_krum_lambda_is_the_largest_of_the_halving_sequence(honest, offset):
    """Slow reference: the halving sequence from the paper's bound, Krum run on every candidate.

    Also at an offset (1e8: the rows' distances must not cancel in a Gram form).
    """
    honest = honest + offset
    f, n = 3, honest.shape[1]
    p = honest.shape[0] + f
    s = np.sign(honest.mean(axis=0))
    D = np.linalg.norm(honest[:, None] - honest[None], axis=2)
    near = np.sort(D + np.diag(np.full(len(honest), np.inf)), axis=1)[:, : p - f - 2]
    lam = near.sum(axis=1).min() / ((p - 2 * f - 1) * math.sqrt(n)) \
        + np.linalg.norm(honest, axis=1).max() / math.sqrt(n)
    while lam >= 1e-5:
        X = np.vstack([honest, np.tile(-lam * s, (f, 1))])
        if _krum_pick(X, f) >= len(honest):
            break
        lam /= 2
    np.testing.assert_allclose(attacks.fang_krum(honest, f)[0], -lam * s, rtol=1e-12)


def test_fang_krum_eps_spreads_the_copies_within_the_ball(honest):
    rows = attacks.fang_krum(honest, 3, eps=0.01, rng=0)
    d = np.linalg.norm(rows[1:] - rows[0], axis=1)
    assert np.all(d > 0) and np.all(d <= 0.01 + 1e-12)


def test_fang_krum_partial_from_own_gradients_turns_krum(honest, own):
    f = 3
    rows = attacks.fang_krum_partial(honest, f, own=own)
    s = np.sign(own.mean(axis=0))
    lam = -rows[0] @ s / (s @ s)
    assert lam > 0
    np.testing.assert_allclose(rows, np.tile(-lam * s, (f, 1)), rtol=1e-12)
    # it never reads the honest rows
    np.testing.assert_array_equal(rows, attacks.fang_krum_partial(honest * 7.0, f, own=own))
    # the attacker's own Krum (its gradients stand for the honest ones, every other row a
    # neighbour: min(p - f - 2, 2f - 1) of them) picks the crafted row at lam, and did not
    # at 2 lam (lam is the first success of the halving)
    p = honest.shape[0] + f
    k = min(p - f - 2, 2 * f - 1)

    def picks(scale):
        X = np.vstack([own, np.tile(-scale * s, (f, 1))])
        D2 = ((X[:, None] - X[None]) ** 2).sum(axis=2)
        np.fill_diagonal(D2, np.inf)
        return int(np.argmin(np.sort(D2, axis=1)[:, :k].sum(axis=1))) >= f

    # the paper's bound, from the own gradients (each has f - 1 others to count)
    n = own.shape[1]
    D = np.linalg.norm(own[:, None] - own[None], axis=2)
    near = np.sort(D + np.diag(np.full(f, np.inf)), axis=1)[:, : f - 1]
    lam0 = near.sum(axis=1).min() / ((p - 2 * f - 1) * math.sqrt(n)) \
        + np.linalg.norm(own, axis=1).max() / math.sqrt(n)
    assert picks(lam)
    assert lam == pytest.approx(lam0, rel=1e-12) or not picks(2 * lam)


def test_fang_krum_partial_with_one_attacker_ends_at_the_threshold(honest, own):
    """f = 1: two rows equally apart, Krum's tie goes to the own row; lam halves to the end."""
    rows = attacks.fang_krum_partial(honest, 1, own=own[:1], threshold=1e-3)
    s = np.sign(own[0])
    lam = -rows[0] @ s / (s @ s)
    assert 0 < lam < 1e-3
    np.testing.assert_allclose(rows[0], -lam * s)


# --------------------------------------------------------------------------
# krum package's attacks


def test_full_gradient_negation_is_minus_kappa_mean(honest):
    rows = attacks.full_gradient_negation(honest, 2, kappa=100.0)
    np.testing.assert_allclose(rows, np.tile(-100.0 * honest.mean(axis=0), (2, 1)))
    assert get_attack("full_gradient_negation")(honest, 1).shape == (1, 50)


def _moved(rule, honest, f, gamma, e, sigma):
    mu = honest.mean(axis=0)
    base = rule(np.vstack([honest, np.tile(mu, (f, 1))]))
    out = rule(np.vstack([honest, np.tile(mu + gamma * sigma * e, (f, 1))]))
    return (out - base) @ e


@pytest.mark.parametrize("rule_name", ["krum", "median", "trimmed_mean"])
def test_small_perturbation_finds_the_selection_boundary(honest, rule_name):
    f = 3
    p = honest.shape[0] + f

    def rule(rows):
        return flagagg.aggregate(rows, rule_name, f=f, backend="numpy")

    rows = attacks.small_perturbation(honest, f, rule=rule)
    mu, sd = honest.mean(axis=0), honest.std(axis=0)
    j = int(np.argmax(sd))
    delta = rows[0] - mu
    # only the coordinate of the largest honest spread is moved
    assert np.count_nonzero(delta) == 1 and delta[j] > 0
    e = np.zeros(50)
    e[j] = 1.0
    gamma = delta[j] / sd[j]

    def selected(g):
        return _moved(rule, honest, f, g, e, sd[j]) >= 0.5 * f * g * sd[j] / p

    assert selected(gamma)
    assert not selected(gamma * 1.01 + 1e-4)
    if rule_name == "krum":
        # Krum's output is the attacker's row
        np.testing.assert_allclose(rule(np.vstack([honest, rows])), rows[0])


def test_small_perturbation_linf_moves_every_coordinate(honest):
    rows = attacks.small_perturbation(honest, 3, norm="linf",
                                      rule=lambda r: flagagg.aggregate(r, "krum", f=3))
    delta = rows[0] - honest.mean(axis=0)
    assert np.all(delta > 0)
    np.testing.assert_allclose(delta, delta[0])
