"""Tests of agents/bandits.py: the update rules of specs/solver_bandit.md section 4 on hand-checked
cases, the section 9 checks 5–7, and (slow) the learning ratios of check 9."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from agents import bandits as B


def _tsallis(loss_estimates, scale, round_, normalisation="exact", loss_sum=0.0):
    config = B.TsallisINFConfig(num_arms=len(loss_estimates), normalisation=normalisation)
    with B.float64_scope():
        return B.TsallisINF(jnp.asarray(loss_estimates, jnp.float64), jnp.float64(scale), jnp.int32(round_), jnp.float64(loss_sum), config)


@pytest.mark.parametrize("normalisation", ["exact", "reference"])
def test_tsallis_first_round_is_uniform(normalisation):
    learner = B.TsallisINF.create(jax.random.PRNGKey(0), B.TsallisINFConfig(normalisation=normalisation))
    dist = learner.distribution()
    np.testing.assert_allclose(np.asarray(dist.sampling), 0.05, atol=1e-12)
    assert abs(np.sum(np.asarray(dist.weights)) - 1.0) < 1e-9


def test_tsallis_exact_normaliser_hand_case():
    """u = (0, 2, 5), η = 2/√4 = 1: x solves Σ 4/(u_i − x)² = 1 left of min u."""
    learner = _tsallis([0.0, 2.0, 5.0], 1.0, 4)
    dist = learner.distribution()
    root = scipy.optimize.brentq(lambda x: sum(4.0 / (u - x) ** 2 for u in (0.0, 2.0, 5.0)) - 1.0, -10.0, -1e-9)
    assert float(dist.normaliser) == pytest.approx(root, abs=1e-10) and float(dist.normaliser) < 0.0
    expected = np.array([4.0 / (u - root) ** 2 for u in (0.0, 2.0, 5.0)])
    np.testing.assert_allclose(np.asarray(dist.sampling), expected, rtol=1e-9)
    assert abs(np.sum(np.asarray(dist.weights)) - 1.0) < 1e-12 and int(dist.newton_steps) < 100


def test_tsallis_reference_normaliser_is_20_newton_steps_from_minus_one():
    estimates, scale, round_ = np.array([3.0, 40.0, 7.0, 0.5]), 2.0, 9
    eta = 2.0 / math.sqrt(round_)
    u = estimates / scale
    x = -1.0
    for _ in range(20):
        p = 4.0 * (eta * (u - x)) ** -2.0
        x_next = x - (p.sum() - 1.0) / (eta * np.sum(p**1.5))
        x_of_p, x = x, x_next
    learner = _tsallis(estimates, scale, round_, "reference")
    dist = learner.distribution()
    np.testing.assert_allclose(np.asarray(dist.weights), p, rtol=1e-12)
    assert float(dist.normaliser) == pytest.approx(x_of_p, rel=1e-12) and int(dist.newton_steps) == 20
    np.testing.assert_allclose(np.asarray(dist.sampling), p / p.sum(), rtol=1e-12)
    # The estimator divides by the *unnormalised* p of the played arm.
    updated, metrics = learner.update(0.0, 2, 11.0)
    assert float(metrics["played_probability"]) == pytest.approx(p[2], rel=1e-12)
    np.testing.assert_allclose(np.asarray(updated.loss_estimates), estimates + np.eye(4)[2] * 10.0 / p[2], rtol=1e-12)


def test_tsallis_reference_overshoot_departs_from_one():
    """A late-round state: the reference's first Newton step from x = −1 overshoots past min u and
    settles on a spurious point (Σp ≫ 1, p still positive); the exact normaliser stays left of min u."""
    estimates = [40.0, 55.0, 70.0, 90.0]
    dist = _tsallis(estimates, 1.0, 200, "reference").distribution()
    assert bool(dist.valid) and np.sum(np.asarray(dist.weights)) > 1e6 and float(dist.normaliser) > 40.0
    exact = _tsallis(estimates, 1.0, 200, "exact").distribution()
    assert abs(np.sum(np.asarray(exact.weights)) - 1.0) < 1e-12 and float(exact.normaliser) < 40.0


@pytest.mark.parametrize("normalisation", ["exact", "reference"])
def test_tsallis_update_changes_only_the_played_arm(normalisation):
    learner = _tsallis([1.0, 6.0, 2.0], 3.0, 3, normalisation, loss_sum=20.0)
    dist = learner.distribution()
    probability = float(dist.sampling[1] if normalisation == "exact" else dist.weights[1])
    updated, _ = learner.update(0.0, 1, 9.0)
    np.testing.assert_allclose(np.asarray(updated.loss_estimates), [1.0, 6.0 + 8.0 / probability, 2.0], rtol=1e-12)
    assert float(updated.loss_scale) == pytest.approx((20.0 + 9.0) / 3 - 1.0)  # s = mean(ℓ_1..ℓ_t) − 1
    assert int(updated.round) == 4 and float(updated.loss_sum) == 29.0


def test_tsallis_invalid_probabilities():
    """NaN estimates: sample uniformly; exact keeps 1/d, the reference keeps the invalid p_I."""
    exact = _tsallis([np.nan, 1.0, 2.0], 1.0, 2, "exact")
    reference = _tsallis([np.nan, 1.0, 2.0], 1.0, 2, "reference")
    for learner in (exact, reference):
        dist = learner.distribution()
        assert not bool(dist.valid)
        np.testing.assert_allclose(np.asarray(dist.sampling), 1.0 / 3.0)
    assert float(exact.update(0.0, 0, 5.0)[1]["played_probability"]) == pytest.approx(1.0 / 3.0)
    assert math.isnan(float(reference.update(0.0, 0, 5.0)[1]["played_probability"]))


def test_tsallis_exact_invariants_in_every_round():
    """Check 5: |Σp − 1| < 1e-9 and x < min u in every round of a 600-round run."""
    rng = np.random.default_rng(0)
    table = rng.integers(20, 400, size=(600, 20)).astype(np.float64)
    with B.float64_scope():
        learner = B.TsallisINF.create(jax.random.PRNGKey(0))
        _, result = jax.jit(B.run_on_cost_table)(learner, jnp.zeros(600), jnp.asarray(table), jax.random.PRNGKey(1))
    metrics = {name: np.asarray(value) for name, value in result.metrics.items()}
    assert metrics["probability_sum_error"].max() < 1e-9
    assert metrics["normaliser_gap"].min() > 0.0 and metrics["valid"].all()
    np.testing.assert_array_equal(np.asarray(result.costs), table[np.arange(600), np.asarray(result.arms)])


def test_tsallis_cb_bins_and_update_isolation():
    """Check 6: centres (−0.07, 0.09, 0.25, 0.41, 0.57); nearest centre, first on ties; one bin updates."""
    learner = B.TsallisINFCB.create(jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(learner.bin_centres()), [-0.07, 0.09, 0.25, 0.41, 0.57], atol=1e-12)
    assert [int(learner.bin_of(c)) for c in (-0.15, 0.17, 0.1701, 0.6)] == [0, 1, 2, 4]
    updated, metrics = learner.update(0.3, 4, 50.0)
    assert int(metrics["bin"]) == 2
    rounds = np.asarray(updated.bins.round)
    assert rounds.tolist() == [1, 1, 2, 1, 1]
    estimates = np.asarray(updated.bins.loss_estimates)
    assert estimates[2, 4] == pytest.approx(49.0 / 0.05) and np.abs(estimates).sum() == pytest.approx(49.0 / 0.05)


def test_chebcb_round_one_reference_lipschitz():
    """Check 7: N = 13.167, scale = 13.167·ℓ_1, η = 106.08 when no box constraint is needed."""
    learner = B.ChebCB.create(jax.random.PRNGKey(0), B.ChebCBConfig(lipschitz="reference"))
    np.testing.assert_allclose(np.asarray(learner.probabilities(0.1)), 0.05, atol=1e-15)
    updated, metrics = learner.update(0.1, 3, 57.0)
    assert float(metrics["n_factor"]) == pytest.approx(2.0 + 4.0 * (1.0 + math.log(6)), rel=1e-12)
    assert float(metrics["n_factor"]) == pytest.approx(13.167, abs=1e-3)
    assert float(updated.scale) == pytest.approx(13.167037876 * 57.0, rel=1e-9)
    assert float(metrics["resnorm"]) == 0.0 and float(updated.eta) == pytest.approx(106.08, abs=0.01)
    # The unconstrained min-norm fit of one row: θ = φ y/‖φ‖².
    features = np.asarray(learner.features(0.1))
    expected = features * (56.0 / float(updated.scale)) / features.dot(features)
    theta = np.asarray(updated.theta)
    np.testing.assert_allclose(theta[3], expected, rtol=1e-9)
    assert np.abs(theta).sum() == pytest.approx(np.abs(expected).sum())


def test_chebcb_round_one_observed_lipschitz():
    """Check 7: N = 2, scale = 2ℓ_1, θ_I = ((ℓ_1 − 1)/(2ℓ_1), 0, …, 0), η = 2√80."""
    learner = B.ChebCB.create(jax.random.PRNGKey(0), B.ChebCBConfig(lipschitz="observed"))
    updated, metrics = learner.update(0.3, 7, 41.0)
    assert float(metrics["n_factor"]) == 2.0 and float(updated.scale) == 82.0
    np.testing.assert_allclose(np.asarray(updated.theta)[7], [40.0 / 82.0, 0, 0, 0, 0, 0], atol=1e-15)
    assert float(updated.eta) == pytest.approx(2.0 * math.sqrt(80.0), rel=1e-12)


def test_chebcb_inverse_gap_weighting():
    learner = B.ChebCB.create(jax.random.PRNGKey(0), B.ChebCBConfig(num_arms=3, num_features=2))
    with B.float64_scope():
        learner = learner.replace(theta=jnp.asarray([[0.3, 0.0], [0.1, 0.0], [0.1, 0.0]], jnp.float64), eta=jnp.float64(10.0))
    p = np.asarray(learner.probabilities(0.0))
    # Arms 1 and 2 tie at the minimum: the first (arm 1) is i*; p_i = 1/(d + η·gap) for the others.
    np.testing.assert_allclose(p, [1.0 / (3 + 10 * 0.2), 1.0 - 1.0 / 5.0 - 1.0 / 3.0, 1.0 / 3.0], rtol=1e-12)
    assert int(learner.act(0.0, jax.random.PRNGKey(0), deterministic=True)) == 1


class HistoryChebCB:
    """Spec 4.3 written directly over the stored history (numpy + scipy), as an independent oracle."""

    def __init__(self, d, m, low, high, horizon, lipschitz):
        self.d, self.m, self.low, self.width, self.horizon, self.lipschitz = d, m, low, high - low, horizon, lipschitz
        self.theta = np.zeros((d, m))
        self.eta, self.scale, self.t = 0.0, 0.0, 1
        self.features, self.arms, self.losses, self.predictions = [], [], [], []

    def phi(self, context):
        z = 2.0 * (context - self.low) / self.width - 1.0
        return np.polynomial.chebyshev.chebvander(z, self.m - 1)[0]

    def update(self, context, arm, loss):
        phi = self.phi(context)
        self.predictions.append(float(self.theta[arm] @ phi))
        self.features.append(phi)
        self.arms.append(arm)
        self.losses.append(loss)
        losses = np.array(self.losses)
        history_min = losses.min() if (self.lipschitz == "observed" or self.t >= self.horizon) else 0.0
        big_k = losses.max()
        lip = (big_k - history_min) / self.width
        n_factor = 2.0 + 4.0 * self.width * lip / big_k * (1.0 + math.log(self.m))
        changed = self.scale != big_k * n_factor
        self.scale = big_k * n_factor
        upper = np.array([1.0 / n_factor] + [2.0 * self.width * lip / self.scale / j for j in range(1, self.m)])
        resnorm = 0.0
        for i in range(self.d):
            rows = [s for s, a in enumerate(self.arms) if a == i]
            if not rows or not (changed or i == arm):
                continue
            matrix = np.stack([self.features[s] for s in rows])
            target = (losses[rows] - 1.0) / self.scale
            theta = np.linalg.lstsq(matrix, target, rcond=None)[0]
            if np.any(np.abs(theta) > upper):
                fit = scipy.optimize.lsq_linear(matrix, target, bounds=(-upper, upper + 1e-300), method="bvls", tol=1e-15)
                theta, resnorm = fit.x, float(np.sum((matrix @ fit.x - target) ** 2))
            self.theta[i] = theta
        alpha = (math.pi + 2.0 / math.pi * math.log(2 * self.m + 1)) / (2.0 * self.scale * (self.m + 1)) * self.width * lip
        squared_error = np.sum((np.array(self.predictions) - losses / self.scale) ** 2)
        self.eta = 2.0 * self.t * math.sqrt(self.d * self.t / (squared_error - resnorm + 2.0 * alpha**2 * self.t))
        self.t += 1


@pytest.mark.parametrize("lipschitz", ["reference", "observed"])
def test_chebcb_sufficient_statistics_match_history_oracle(lipschitz):
    """The QR-based state gives the same θ and η as refitting on the stored history (40 rounds)."""
    d, m, low, high, horizon = 4, 4, -0.15, 0.65, 40
    rng = np.random.default_rng(1)
    contexts = -0.15 + 0.6 * rng.beta(0.5, 1.5, horizon)
    arms = rng.integers(0, d, horizon)
    losses = np.round(30 + 200 * (contexts + 0.2) ** 2 * (1 + arms) + rng.integers(0, 5, horizon)).astype(float)
    oracle = HistoryChebCB(d, m, low, high, horizon, lipschitz)
    config = B.ChebCBConfig(num_arms=d, num_features=m, context_low=low, context_high=high, horizon=horizon, lipschitz=lipschitz)
    learner = B.ChebCB.create(jax.random.PRNGKey(0), config)
    update = jax.jit(lambda learner, c, a, l: learner.update(c, a, l)[0])
    for context, arm, loss in zip(contexts, arms, losses):
        oracle.update(context, int(arm), loss)
        with B.float64_scope():
            learner = update(learner, jnp.float64(context), jnp.int32(arm), jnp.float64(loss))
        np.testing.assert_allclose(np.asarray(learner.theta), oracle.theta, rtol=1e-6, atol=1e-9)
        assert float(learner.eta) == pytest.approx(oracle.eta, rel=1e-6)
        assert float(learner.scale) == pytest.approx(oracle.scale, rel=1e-12)


def test_box_least_squares_matches_scipy_bvls():
    rng = np.random.default_rng(0)
    solve = jax.jit(B.box_least_squares)
    for trial in range(40):
        rows = int(rng.integers(1, 9))
        if trial % 2:
            matrix = np.polynomial.chebyshev.chebvander(rng.uniform(-0.9, -0.3, rows), 5)  # ill-conditioned
        else:
            matrix = rng.standard_normal((rows, 6))
        target = rng.standard_normal(rows)
        upper = rng.uniform(0.0, 0.5, 6) * (rng.random(6) > 0.2)
        with B.float64_scope():
            x = np.asarray(solve(jnp.asarray(matrix), jnp.asarray(target), jnp.asarray(-upper), jnp.asarray(upper)))
        reference = scipy.optimize.lsq_linear(matrix, target, bounds=(-upper, upper + 1e-300), method="bvls", tol=1e-15).x
        assert np.all(np.abs(x) <= upper + 1e-12)
        objective, best = np.sum((matrix @ x - target) ** 2), np.sum((matrix @ reference - target) ** 2)
        assert objective <= best + 1e-10 * (1.0 + best)


@pytest.mark.parametrize("kind", ["tsallis", "tsallis_cb", "chebcb"])
def test_scan_and_vmap_match_the_python_loop(kind):
    """run_on_cost_table (one scan, vmapped over runs) = act/update called round by round."""
    rounds, runs = 30, 3
    rng = np.random.default_rng(2)
    contexts = rng.uniform(-0.15, 0.45, (runs, rounds))
    tables = rng.integers(10, 300, (runs, rounds, 20)).astype(np.float64)
    make = {
        "tsallis": lambda key: B.TsallisINF.create(key),
        "tsallis_cb": lambda key: B.TsallisINFCB.create(key),
        "chebcb": lambda key: B.ChebCB.create(key, B.ChebCBConfig(horizon=rounds)),
    }[kind]
    keys = jax.random.split(jax.random.PRNGKey(3), runs)
    with B.float64_scope():
        batched = jax.jit(jax.vmap(lambda c, t, k: B.run_on_cost_table(make(k), c, t, k)[1].arms))(
            jnp.asarray(contexts), jnp.asarray(tables), keys
        )
        act = jax.jit(lambda learner, c, k: learner.act(c, k))
        update = jax.jit(lambda learner, c, a, l: learner.update(c, a, l)[0])
        learner, key = make(keys[0]), keys[0]
        arms = []
        for t in range(rounds):
            key, act_key = jax.random.split(key)
            arm = act(learner, jnp.float64(contexts[0, t]), act_key)
            learner = update(learner, jnp.float64(contexts[0, t]), arm, jnp.float64(tables[0, t, int(arm)]))
            arms.append(int(arm))
    assert np.asarray(batched)[0].tolist() == arms
    assert len(jax.tree.leaves(learner)) > 0 and not any(isinstance(leaf, B.ChebCBConfig) for leaf in jax.tree.leaves(learner))


def test_comparators():
    table = np.array([[5, 3, 9], [1, 4, 2], [7, 3, 8]])
    arm, costs = B.best_fixed_arm(table)
    assert int(arm) == 1 and np.asarray(costs).tolist() == [3, 4, 3]
    assert np.asarray(B.per_instance_best_costs(table)).tolist() == [3, 1, 3]
    assert np.asarray(B.fixed_arm_costs(table, 2)).tolist() == [9, 2, 8]
    batched_arm, _ = B.best_fixed_arm(np.stack([table, table[:, ::-1]]))
    assert np.asarray(batched_arm).tolist() == [1, 1]


def test_configs_reject_nonsense():
    with pytest.raises(ValueError, match="normalisation"):
        B.TsallisINFConfig(normalisation="approximate")
    with pytest.raises(ValueError, match="lipschitz"):
        B.ChebCBConfig(lipschitz="global")
    with pytest.raises(ValueError, match="context_high"):
        B.TsallisINFCBConfig(context_low=1.0, context_high=0.0)


@pytest.mark.slow
def test_learning_ratios_on_reference_instances():
    """Check 9 over 10 runs × 5,000 instances: Tsallis-INF / best fixed and ChebCB / instance-optimal
    in [1.05, 1.30], and ChebCB beats the best fixed ω, on both distributions."""
    from experiments import solver_bandits

    args = solver_bandits.Args(runs=10, T=5000, learners=("Tsallis-INF", "ChebCB"))
    for distribution in ("high", "low"):
        results, _ = solver_bandits.evaluate_distribution(distribution, args)
        rows = {row["method"]: row for row in solver_bandits.summarise(distribution, results)}
        assert 1.05 <= rows["Tsallis-INF"]["ratio_to_best_fixed"] <= 1.30
        assert 1.05 <= rows["ChebCB"]["ratio_to_instance_optimal"] <= 1.30
        assert rows["ChebCB"]["total_iterations"] < rows["best fixed ω (hindsight)"]["total_iterations"]
