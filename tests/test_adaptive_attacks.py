"""Adaptive attacks: Min-Max, Min-Sum and the optimal (defence-aware) ALIE and IPM.

Each search is checked against a slow reference: a fine grid over the
attacker's parameter, or the closed-form optimum where one exists.
"""

import math

import numpy as np
import pytest

import flagagg
from flagagg import attacks, sim
from flagagg.attacks import get_attack

torch = pytest.importorskip("torch")

PERTURBATIONS = ["std", "sign", "unit"]


@pytest.fixture
def honest():
    # a shared drift plus noise, so that the honest mean has a direction
    rng = np.random.default_rng(3)
    return rng.normal(size=(12, 30)) + 0.5


def _direction(H, kind):
    mu = H.mean(axis=0)
    if kind == "std":
        return -H.std(axis=0)
    if kind == "sign":
        return -np.sign(mu)
    return -mu / np.linalg.norm(mu)


def _gamma_of(row, H, kind):
    """gamma such that row = mean + gamma * p (least squares, exact here)."""
    p = _direction(H, kind)
    return float(np.dot(row - H.mean(axis=0), p) / np.dot(p, p))


def _max_dist(x, H):
    return max(np.linalg.norm(x - h) for h in H)


def _honest_max_dist(H):
    return max(np.linalg.norm(a - b) for a in H for b in H)


def _sum_sq(x, H):
    return sum(np.linalg.norm(x - h) ** 2 for h in H)


def _honest_max_sum_sq(H):
    return max(_sum_sq(h, H) for h in H)


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_min_max_constraint_and_no_better_gamma_on_a_grid(honest, kind):
    rows = attacks.min_max(honest, 3, perturbation=kind)
    assert rows.shape == (3, 30)
    np.testing.assert_array_equal(rows, np.broadcast_to(rows[0], rows.shape))
    bound = _honest_max_dist(honest)
    assert _max_dist(rows[0], honest) <= bound * (1 + 1e-12)
    gamma = _gamma_of(rows[0], honest, kind)
    assert gamma > 0
    mu, p = honest.mean(axis=0), _direction(honest, kind)
    # the slow reference: every gamma on a fine grid above the one found breaks the constraint
    grid = np.linspace(0.0, 3.0 * gamma, 3001)
    feasible = [g for g in grid if _max_dist(mu + g * p, honest) <= bound]
    assert max(feasible) <= gamma * (1 + 1e-6)
    # and the exact optimum (largest root over the honest rows) agrees to the bisection's width
    d = mu[None, :] - honest
    a, b, c = p @ p, d @ p, (d * d).sum(axis=1) - bound**2
    exact = float(np.min((-b + np.sqrt(b * b - a * c)) / a))
    assert gamma == pytest.approx(exact, rel=1e-7)


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_min_sum_constraint_and_closed_form(honest, kind):
    rows = attacks.min_sum(honest, 2, perturbation=kind)
    bound = _honest_max_sum_sq(honest)
    assert _sum_sq(rows[0], honest) <= bound * (1 + 1e-12)
    gamma = _gamma_of(rows[0], honest, kind)
    mu, p = honest.mean(axis=0), _direction(honest, kind)
    grid = np.linspace(0.0, 3.0 * gamma, 3001)
    feasible = [g for g in grid if _sum_sq(mu + g * p, honest) <= bound]
    assert max(feasible) <= gamma * (1 + 1e-6)
    # the deviations from the mean sum to zero, so the constraint is quadratic in gamma alone
    s0 = _sum_sq(mu, honest)
    exact = math.sqrt((bound - s0) / (len(honest) * (p @ p)))
    assert gamma == pytest.approx(exact, rel=1e-7)


@pytest.mark.parametrize("name", ["min_max", "min_sum"])
def test_shejwalkar_attacks_are_deterministic_and_follow_the_input(name, honest):
    a = get_attack(name)
    first = a(honest, 3, rng=0)
    np.testing.assert_array_equal(first, a(honest, 3, rng=123))
    t = a(torch.from_numpy(honest.astype(np.float32)), 3, rng=0)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), first, rtol=1e-4, atol=1e-5)
    # far from the origin the distances are still exact differences
    np.testing.assert_allclose(a(honest + 1e6, 3) - 1e6, first, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["min_max", "min_sum"])
def test_shejwalkar_attacks_on_degenerate_rows(name):
    same = np.ones((5, 4))
    # no spread: every gamma is feasible with p = -std = 0, the search stops at its cap
    np.testing.assert_array_equal(get_attack(name)(same, 2), np.ones((2, 4)))
    zero = np.zeros((5, 4))
    np.testing.assert_array_equal(get_attack(name, perturbation="unit")(zero, 2), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="perturbation"):
        get_attack(name, perturbation="nope")(same, 2)
    with pytest.raises(ValueError, match="steps"):
        get_attack(name, steps=-1)(same, 2)
    with pytest.raises(ValueError, match="honest row"):
        get_attack(name)(same[:0], 2)


def _damage(rule, honest, rows):
    return float(np.linalg.norm(rule(np.concatenate([honest, rows])) - honest.mean(axis=0)))


class _Counting:
    def __init__(self, rule):
        self.rule, self.calls, self.seen = rule, 0, []

    def __call__(self, rows):
        self.calls += 1
        out = self.rule(rows)
        self.seen.append((rows[-1].copy(), out))
        return out


OPTIMAL = ["optimal_little_is_enough", "optimal_fall_of_empires"]


@pytest.mark.parametrize("name", OPTIMAL)
@pytest.mark.parametrize("rule_name", ["median", "trimmed_mean", "multi_krum"])
def test_optimal_attacks_pick_the_best_candidate_within_their_budget(name, rule_name, honest):
    f = 3
    rule = flagagg.get_rule(rule_name, f=f) if rule_name != "median" else flagagg.get_rule("median")
    counting = _Counting(rule)
    attack = get_attack(name).with_rule(counting)
    rows = attack(honest, f, rng=0)
    params = attacks.attack_parameters(name)
    assert 0 < counting.calls <= params["points"] + params["refine"]
    # the rows sent are the evaluated candidate that did the most damage
    mu = honest.mean(axis=0)
    best = max(float(np.linalg.norm(out - mu)) for _, out in counting.seen)
    assert _damage(rule, honest, rows) == pytest.approx(best, rel=1e-12)
    # deterministic, whatever the attack stream
    np.testing.assert_array_equal(rows, get_attack(name).with_rule(rule)(honest, f, rng=99))


def test_optimal_alie_against_a_fine_grid(honest):
    """The slow reference: z on a fine grid does barely better than the bounded search."""
    f, rule = 3, flagagg.get_rule("trimmed_mean", f=3)
    mu, sd = honest.mean(axis=0), honest.std(axis=0)
    rows = attacks.optimal_little_is_enough(honest, f, rule=rule)
    reference = max(_damage(rule, honest, np.tile(mu - z * sd, (f, 1)))
                    for z in np.linspace(0.0, 10.0, 2001))
    assert _damage(rule, honest, rows) >= 0.99 * reference


@pytest.mark.parametrize("rule_name", ["median", "trimmed_mean", "geometric_median", "flag"])
def test_optimal_variants_do_at_least_the_fixed_ones_damage(rule_name, honest):
    f = 3
    p = len(honest) + f
    kwargs = {"f": f} if rule_name == "trimmed_mean" else {}
    rule = flagagg.get_rule(rule_name, **kwargs)
    z = attacks.little_is_enough_z(p, f)
    fixed_lie = _damage(rule, honest, attacks.little_is_enough(honest, f, z=z))
    best_lie = _damage(rule, honest, attacks.optimal_little_is_enough(honest, f, rule=rule))
    assert best_lie >= fixed_lie
    for eps in (0.1, 1.0, 10.0):
        fixed = _damage(rule, honest, attacks.fall_of_empires(honest, f, eps=eps))
        best = _damage(rule, honest, attacks.optimal_fall_of_empires(honest, f, rule=rule))
        # the grid holds 0.1, 1 and 10 (every third of a decade from 0.01 to 100)
        assert best >= fixed * (1 - 1e-12)


def test_optimal_attacks_need_the_rule(honest):
    for name in OPTIMAL:
        attack = get_attack(name)
        assert attack.defence_aware and attack.omniscient
        assert "rule" not in attacks.attack_parameters(name)
        with pytest.raises(ValueError, match="with_rule"):
            attack(honest, 3)
        with pytest.raises(TypeError, match="callable"):
            attack.with_rule("median")
    with pytest.raises(TypeError, match="takes no rule"):
        get_attack("little_is_enough").with_rule(np.mean)
    with pytest.raises(ValueError, match="bounds"):
        get_attack("optimal_fall_of_empires", eps_min=0.0).with_rule(np.mean)(honest, 3)
    with pytest.raises(ValueError, match="points"):
        get_attack("optimal_little_is_enough", points=1).with_rule(np.mean)(honest, 3)


def test_optimal_attacks_survive_a_rule_that_returns_nan(honest):
    def broken(rows):
        return np.full(rows.shape[1], np.nan)

    rows = attacks.optimal_fall_of_empires(honest, 2, rule=broken)
    # every candidate scores -inf; the tie goes to the smallest eps
    np.testing.assert_allclose(rows, np.tile(-0.01 * honest.mean(axis=0), (2, 1)))


def test_optimal_attack_on_torch_rows(honest):
    H = torch.from_numpy(honest.astype(np.float32))
    rows = attacks.optimal_little_is_enough(H, 2, rule=lambda r: torch.median(r, dim=0).values)
    assert isinstance(rows, torch.Tensor) and rows.dtype == torch.float32 and rows.shape == (2, 30)


def test_simulator_binds_the_rule_and_stays_repeatable():
    sim = pytest.importorskip("flagagg.sim")
    data = sim.load_dataset("digits")
    calls = []

    def median(G):
        calls.append(G.shape)
        return np.median(G, axis=0)

    kw = dict(f=3, workers=7, rounds=3, eval_every=3, seed=1)
    a = sim.simulate(data, median, attack="optimal_little_is_enough", **kw)
    per_round = len(calls) / 3
    params = attacks.attack_parameters("optimal_little_is_enough")
    # one aggregation per round plus the attack's bounded search
    assert 2 <= per_round <= 1 + params["points"] + params["refine"]
    assert all(shape == calls[0] for shape in calls)
    b = sim.simulate(data, median, attack="optimal_little_is_enough", **kw)
    np.testing.assert_array_equal(a.parameters, b.parameters)
    for name in ("min_max", "min_sum", "optimal_fall_of_empires"):
        r = sim.simulate(data, "trimmed_mean", attack=name, **kw)
        assert 0.0 <= r.final_accuracy <= 1.0


def test_a_distributed_worker_binds_the_rule_for_defence_aware_attacks():
    # `flagagg train` workers pick attacks from the same registry as the simulator; a
    # defence-aware one must be handed the run's rule, or it could not search.
    from flagagg.distributed._settings import make_spec
    from flagagg.distributed._worker import GradientSource

    config = sim.load_config("mnist1d")
    label = next(a.label for a in config.attacks if a.attack == "optimal_little_is_enough")
    spec = make_spec(config, rule="median", attack=label, f=1, workers=4, rounds=2)
    source = GradientSource(spec, 0, "cpu")
    assert source.attack.defence_aware
    payload, _ = source.compute(1, source.replica.initial_parameters())
    assert payload.shape == (source.n_params,) and np.all(np.isfinite(payload))
