"""Tests of Uni-O4 (agents/uni_o4.py) and the dynamics ensemble / OPE rollouts (rl/dynamics.py).

The numbered tests pin the acceptance checks of spec ``uni_o4.md`` section 11.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents import uni_o4 as u
from agents.ppo import RunningMoments
from rl import dynamics as dyn
from rl.data import datasets
from rl.logging import read_metrics
from rl.rollouts import Rollout, gae

OBS, ACT = 3, 1

TINY = u.UniO4Config(
    value_hidden_dims=(16, 16),
    q_hidden_dims=(16, 16),
    critic_steps=50,
    critic_batch_size=32,
    bc_hidden_dims=(16, 16),
    bc_steps=50,
    bc_batch_size=32,
    improvement_steps=20,
    eval_step=5,
    improvement_batch_size=32,
    ope_horizon=8,
    ope_start_states=8,
    chunk_steps=50,
    dynamics=dyn.DynamicsConfig(ensemble_size=3, num_elites=2, hidden_dims=(16,), weight_decay=(1e-5, 1e-5), max_epochs=2,
                                batch_size=64),
    online=u.UniO4OnlineConfig(total_steps=400, num_steps=200, minibatch_size=100, update_epochs=1, eval_interval=400,
                               eval_episodes=1),
)


def synthetic_dataset(count: int = 600, seed: int = 0) -> datasets.OfflineDataset:
    """A Pendulum-shaped dataset (obs cos, sin, velocity; one action) from a toy linear system."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(-np.pi, np.pi, count)
    velocity = rng.uniform(-1, 1, count)
    actions = np.clip(-0.5 * angle[:, None] + 0.1 * rng.normal(size=(count, 1)), -1, 1)
    next_velocity = np.clip(velocity + 0.3 * actions[:, 0], -8, 8)
    next_angle = angle + 0.05 * next_velocity
    obs = np.stack([np.cos(angle), np.sin(angle), velocity], 1)
    next_obs = np.stack([np.cos(next_angle), np.sin(next_angle), next_velocity], 1)
    rewards = -(angle**2) - 0.1 * velocity**2
    truncated = np.zeros(count, bool)
    truncated[99::100] = True
    return datasets.from_arrays(obs, actions, rewards, np.zeros(count, bool), truncated, next_obs,
                                metadata={"env_id": "Pendulum-v1", "ref_min_score": -1200.0, "ref_max_score": -150.0})


def random_policies(config: u.UniO4Config, key=0, scale: float = 1.0) -> u.BCEnsemble:
    """A BC ensemble with (optionally scaled-up) random parameters."""
    bc = u.BCEnsemble.create(jax.random.PRNGKey(key), OBS, ACT, config)
    params = jax.tree.map(lambda x: x * scale, bc.state.params)
    return bc.replace(state=bc.state.replace(params=params))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One tiny end-to-end run (all offline stages, then online PPO) on the synthetic dataset; the
    other tests reuse its trained pieces (and its compiled functions)."""
    from envs import registry

    run_dir = tmp_path_factory.mktemp("uni_o4")
    summary = u.train_uni_o4(
        synthetic_dataset(), registry.env_factory("Pendulum-v1", rescale_actions=True), [0], run_dir, TINY,
        dyn.termination_fn("Pendulum-v1"), score_fn=lambda r: datasets.normalised_score(r, -1200.0, -150.0),
        offline_eval_episodes=1, progress=False,
    )
    return summary, run_dir


@pytest.fixture(scope="module")
def critics(pipeline):
    """The pipeline's trained critics and the prepared dataset arrays."""
    dataset = synthetic_dataset()
    data = u.prepare_data(dataset, u.dataset_moments(dataset, True), TINY)
    return pipeline[0]["offline_results"][0].critics, data


# ----------------------------------------------------------------------------- section 11 checks


def test_1_expectile_weights():
    loss = u.expectile_loss(jnp.array([1.0, -1.0, 2.0]), 0.7)
    np.testing.assert_allclose(loss, [0.7, 0.3, 0.7 * 4.0], rtol=1e-6)


def test_2_bc_head_ranges_and_online_head_identical(critics):
    bc = random_policies(TINY)
    observations = jax.random.normal(jax.random.PRNGKey(3), (256, OBS)) * 2.0
    params0 = jax.tree.map(lambda x: x[0], bc.state.params)
    mean, log_std = bc.net.apply({"params": params0}, observations)
    assert float(jnp.abs(mean).max()) < 1.0
    assert float(log_std.min()) > -5.0 and float(log_std.max()) < 0.0
    assert float(mean.std()) > 0.1 and float(log_std.std()) > 0.1  # the ranges are exercised, not constant
    # huge raw outputs saturate tanh in float32: the bounds then hold as closed bounds
    huge_mean, huge_log_std = bc.net.apply({"params": params0}, observations * 1e4)
    assert float(jnp.abs(huge_mean).max()) <= 1.0
    assert float(huge_log_std.min()) >= -5.0 and float(huge_log_std.max()) <= 0.0
    agent = u.online_agent(params0, critics[0].v.params,
                           RunningMoments(jnp.zeros(OBS), jnp.full(OBS, 1.0 - 1e-8), jnp.asarray(1.0)), ACT, TINY,
                           jax.random.PRNGKey(0))
    online_mean, online_log_std = agent.policy.net.apply({"params": agent.state.params["policy"]}, observations)
    np.testing.assert_array_equal(online_mean, mean)
    np.testing.assert_array_equal(online_log_std, log_std)
    actions = jnp.clip(observations[:, :ACT], -1, 1)
    np.testing.assert_allclose(
        agent.policy.distribution(agent.state.params["policy"], observations).log_prob(actions),
        u.policy_distribution(bc.net, params0, observations).log_prob(actions), rtol=1e-6,
    )


def test_3_heuristic_gradient_is_scaled_bc_and_kl_nearest_differs():
    config = dataclasses.replace(TINY, diversity_weight=0.1)
    bc = random_policies(config)
    observations = jax.random.normal(jax.random.PRNGKey(4), (64, OBS))
    actions = jax.random.uniform(jax.random.PRNGKey(5), (64, ACT), minval=-1, maxval=1)

    @jax.jit
    def gradient_and_term(params):
        def loss(p, diversity):
            return u.bc_losses(bc.net, p, observations, actions, diversity, 0.1)[0].sum()

        grads = [jax.grad(loss)(params, d) for d in ("none", "heuristic", "kl_nearest")]
        return grads, u.bc_losses(bc.net, params, observations, actions, "kl_nearest", 0.1)[1]["diversity_term"]

    (pure, heuristic, nearest), term = gradient_and_term(bc.state.params)

    for p, h in zip(jax.tree.leaves(pure), jax.tree.leaves(heuristic)):
        np.testing.assert_allclose(h, 1.1 * p, atol=1e-6, rtol=1e-5)
    difference = max(float(jnp.abs(n - 1.1 * p).max()) for p, n in zip(jax.tree.leaves(pure), jax.tree.leaves(nearest)))
    assert difference > 1e-4
    assert float(term) > 0.0


def test_4_ratios_are_one_right_after_a_replacement(critics):
    critic_state, data = critics
    state = u.Improvement.create(random_policies(TINY), jnp.full((TINY.num_policies,), -jnp.inf))
    observations = data["observations"][:64]

    @jax.jit
    def ratios_after_steps(state, keys):
        def body(state, key):
            return state.update(observations, critic_state, key)[0], None

        state, _ = jax.lax.scan(body, state, keys)
        actions = state.sample_behaviour_actions(observations, jax.random.PRNGKey(9))
        advantages = u.standardise(jax.random.normal(jax.random.PRNGKey(8), actions.shape[:2]))
        return state, state.member_losses(state.params, observations, actions, advantages, jnp.float32(0.25))[1]

    state, ratios_before = ratios_after_steps(state, jax.random.split(jax.random.PRNGKey(0), 3))
    assert float(jnp.abs(ratios_before - 1.0).max()) > 1e-4  # the policies moved away from π_k
    state, replaced = jax.jit(lambda s: s.gate(jnp.zeros((TINY.num_policies,))))(state)
    assert bool(replaced.all())
    # the first step after the replacement: new and behaviour policy coincide
    _, ratios = ratios_after_steps(state, jax.random.split(jax.random.PRNGKey(1), 0))
    np.testing.assert_allclose(ratios, 1.0, atol=1e-6)


def test_5_advantage_standardisation_per_member(critics):
    critic_state, data = critics
    state = u.Improvement.create(random_policies(TINY), jnp.zeros((TINY.num_policies,)))
    observations = data["observations"][:128]

    @jax.jit
    def standardised_advantages(state):
        actions = state.sample_behaviour_actions(observations, jax.random.PRNGKey(0))
        size, batch = actions.shape[:2]
        raw = critic_state.advantage(jnp.tile(observations, (size, 1)), actions.reshape(size * batch, -1)).reshape(size, batch)
        raw = raw * jnp.arange(1.0, size + 1.0)[:, None] + 5.0  # different scale and offset per member
        return u.standardise(raw)

    standardised = standardised_advantages(state)
    np.testing.assert_allclose(standardised.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(standardised.std(axis=1), 1.0, atol=1e-5)


def test_6_schedules():
    config = u.UniO4Config()
    assert float(u.improvement_learning_rate(config, 5000)) == pytest.approx(config.improvement_learning_rate / 2, rel=1e-6)
    assert float(u.improvement_learning_rate(config, 10_000)) == 0.0
    for step in (0, 150, 201, 5000, 9999):
        assert float(u.improvement_clip_eps(config, step)) == pytest.approx(0.25)
    parity = dataclasses.replace(config, clip_schedule="parity")
    for step in (201, 1000, 5000, 9999):
        assert float(u.improvement_clip_eps(parity, step)) == pytest.approx(0.245, rel=1e-6)
    assert float(u.improvement_clip_eps(parity, 100)) == pytest.approx(0.25 * (1 - 100 / 10_000), rel=1e-6)
    # the optimiser applies that schedule: one Adam step from zero moments at count c moves by
    # lr(c) * m_hat / (sqrt(v_hat) + eps) with the bias corrections of step c + 1
    tx = u._improvement_optimizer(config)
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.full(3, 1e-3)}
    state = jax.tree.map(lambda x: jnp.full_like(x, 5000) if x.dtype == jnp.int32 else x, tx.init(params))
    update, _ = jax.jit(tx.update)(grads, state, params)
    m_hat = 0.1 * 1e-3 / (1 - 0.9**5001)
    v_hat = 0.001 * 1e-6 / (1 - 0.999**5001)
    expected = -config.improvement_learning_rate / 2 * m_hat / (np.sqrt(v_hat) + 1e-8)
    np.testing.assert_allclose(update["w"], expected, rtol=1e-4)


class ShiftModel(flax.struct.PyTreeNode):
    """Deterministic fake dynamics: x_{t+1} = x_t + 1 plus key-dependent noise of size ``noise``."""

    noise: float = 0.0

    def step(self, observations, actions, key):
        jitter = self.noise * jax.random.normal(key, observations.shape)
        return observations + 1.0 + jitter, jnp.zeros(observations.shape[0])


def test_8_ope_reductions_with_termination():
    start = jnp.array([[0.0], [2.0], [10.0]])  # terminates when the next state exceeds 4.5
    horizon = 6

    def terminated(observations, actions, next_observations):
        return next_observations[:, 0] > 4.5

    values, visited = dyn.rollout_values(
        ShiftModel(), lambda obs: jnp.zeros((obs.shape[0], 1)), lambda obs, act: obs[:, 0] + 1.0, start,
        jax.random.PRNGKey(0), horizon, terminated,
    )
    # rollout 0 visits x = 0..4 then terminates (x = 5): h = 5 pairs; rollout 1 x = 2, 3, 4: h = 3; rollout 2 x = 10: h = 1
    np.testing.assert_array_equal(visited.sum(axis=0), [5, 3, 1])
    q = [np.arange(0, 5) + 1.0, np.arange(2, 5) + 1.0, np.array([11.0])]
    expected_sum = np.mean([v.sum() for v in q]) / horizon
    np.testing.assert_allclose(dyn.reduce_values(values, visited, "sum"), expected_sum, rtol=1e-6)
    expected_mean = np.concatenate(q).mean()
    np.testing.assert_allclose(dyn.reduce_values(values, visited, "visited_mean"), expected_mean, rtol=1e-6)


class WearModel(flax.struct.PyTreeNode):
    """Fake dynamics of a one-dimensional "health" state: every step costs ``wear × action`` health."""

    wear: float

    def step(self, observations, actions, key):
        return observations - self.wear * actions, jnp.zeros(observations.shape[0])


def test_cpu_scale_ope_horizon_ranks_an_early_fall_below_a_survivor():
    """Regression (Hopper-v5 medium): offline PPO made policies more aggressive (more value per step,
    earlier falls); the former cpu-scale OPE horizon (100) could not see the falls and ranked them
    above their BC start. A policy worth 2 per step that falls after about 150 steps must score
    below one worth 1 per step that never falls, at the horizon the benchmark uses."""
    start = jnp.full((4, 1), 1.505)

    def terminated(observations, actions, next_observations):
        return next_observations[:, 0] <= 0.0

    def score(action: float, horizon: int) -> float:
        values, visited = dyn.rollout_values(
            WearModel(0.01), lambda obs: jnp.full((obs.shape[0], 1), action), lambda obs, act: 1.0 + act[:, 0], start,
            jax.random.PRNGKey(0), horizon, terminated,
        )
        return float(dyn.reduce_values(values, visited, "sum"))

    horizon = u.cpu_scale().ope_horizon
    assert score(0.0, horizon) > score(1.0, horizon)
    assert score(1.0, 100) > score(0.0, 100)  # the short horizon inverts the ranking


def test_kl_nearest_term_is_capped():
    """Regression: the maximised KL was unbounded (Hopper-v5 medium: ~356 nats after 20k BC steps,
    then the members stopped imitating the data). Past the cap the term adds no gradient: with
    every per-sample KL above the cap, the kl_nearest gradient equals the pure BC gradient."""
    bc = random_policies(TINY)
    observations = jax.random.normal(jax.random.PRNGKey(6), (64, OBS))
    actions = jax.random.uniform(jax.random.PRNGKey(7), (64, ACT), minval=-1, maxval=1)
    cap = 1e-4

    def loss(params, diversity, kl_cap):
        return u.bc_losses(bc.net, params, observations, actions, diversity, 0.1, kl_cap)

    uncapped = float(loss(bc.state.params, "kl_nearest", jnp.inf)[1]["diversity_term"])
    capped = float(loss(bc.state.params, "kl_nearest", cap)[1]["diversity_term"])
    assert uncapped > 100 * cap and capped == pytest.approx(cap, rel=1e-5)
    pure = jax.grad(lambda p: loss(p, "none", cap)[0].sum())(bc.state.params)
    nearest = jax.grad(lambda p: loss(p, "kl_nearest", cap)[0].sum())(bc.state.params)
    for p, n in zip(jax.tree.leaves(pure), jax.tree.leaves(nearest)):
        np.testing.assert_allclose(n, p, atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def offline_run(pipeline):
    """The pipeline's offline result and its offline log rows."""
    summary, run_dir = pipeline
    return summary["offline_results"][0], read_metrics(run_dir / "offline")


def test_7_ope_deterministic_and_unchanged_member_never_replaced(offline_run):
    result, _ = offline_run
    dataset = synthetic_dataset()
    moments = u.dataset_moments(dataset, True)
    ope = u.OPE(result.model, result.critics, moments, jnp.asarray(dataset.observations[:8]), jax.random.PRNGKey(5),
                dyn.termination_fn("Pendulum-v1"), result.bc.net, TINY)
    first = np.asarray(u._ope_scores(ope, result.bc.state.params))
    second = np.asarray(u._ope_scores(ope, result.bc.state.params))
    np.testing.assert_array_equal(first, second)
    state = u.Improvement.create(result.bc, first)  # π = π_k: scoring π again gives the stored score
    state, replaced = state.gate(np.asarray(u._ope_scores(ope, state.params)))
    assert not bool(replaced.any())
    # a different model key is different model noise: the score is a function of the key
    other = np.asarray(u._ope_scores(ope.replace(key=jax.random.PRNGKey(6)), result.bc.state.params))
    assert not np.array_equal(other, first)


def test_9_replacement_only_at_eval_steps_and_on_strict_increase(offline_run):
    result, rows = offline_run
    improve = [row for row in rows if row["phase"] == "improve" and row["step"] > 0]
    assert [row["step"] for row in improve] == list(range(TINY.eval_step, TINY.improvement_steps + 1, TINY.eval_step))
    assert all(step % TINY.eval_step == 0 for step, _ in result.replacements)
    previous = result.bc_scores
    for row in improve:
        behaviour = np.array([row[f"behaviour_ope_{i}"] for i in range(TINY.num_policies)])
        current = np.array([row[f"ope_{i}"] for i in range(TINY.num_policies)])
        replaced = current > previous
        np.testing.assert_array_equal(behaviour, np.where(replaced, current, previous))
        assert row["replaced"] == int(replaced.sum())
        previous = behaviour
    # the gate in isolation: lower or equal scores never replace, strictly higher ones do
    state = u.Improvement.create(result.bc, jnp.array([1.0, 1.0, 1.0, 1.0]))
    state = state.replace(params=jax.tree.map(lambda x: x + 1.0, state.params))
    scores = jnp.array([0.5, 1.0, 1.5, 1.0 + 1e-6], jnp.float32)
    new_state, replaced = state.gate(scores)
    np.testing.assert_array_equal(replaced, [False, False, True, True])
    np.testing.assert_array_equal(new_state.behaviour_scores, jnp.where(replaced, scores, 1.0))
    kept = jax.tree.leaves(new_state.behaviour_params)[0]
    np.testing.assert_array_equal(kept[0], jax.tree.leaves(state.behaviour_params)[0][0])
    np.testing.assert_array_equal(kept[2], jax.tree.leaves(state.params)[0][2])


def test_10_online_first_update_ratios_one_and_value_clip_inactive(offline_run):
    result, _ = offline_run
    config = dataclasses.replace(TINY, online=dataclasses.replace(TINY.online, num_steps=64, minibatch_size=64, update_epochs=1))
    dataset = synthetic_dataset()
    moments = u.dataset_moments(dataset, True)
    member = jax.tree.map(lambda x: x[0], result.improvement.behaviour_params)
    agent = u.online_agent(member, result.critics.v.params, moments, ACT, config, jax.random.PRNGKey(0))
    assert agent.config.num_minibatches == 1 and agent.config.update_epochs == 1
    observations = jnp.asarray(dataset.observations[:64])[None]
    actions, log_probs = agent.explore(observations[0], jax.random.PRNGKey(1))
    rollout = Rollout(
        observations=observations, actions=actions[None], log_probs=log_probs[None],
        rewards=jnp.asarray(dataset.rewards[:64])[None], terminated=jnp.zeros((1, 64), bool),
        truncated=jnp.zeros((1, 64), bool).at[0, -1].set(True), valid=jnp.ones((1, 64), bool),
        next_observations=jnp.asarray(dataset.next_observations[:64])[None],
    )
    @jax.jit
    def update_and_unclipped_value_loss(agent, rollout):
        new_agent, metrics = agent.update(rollout)
        params = agent.state.params
        values = agent.values(params, agent.normalize(rollout.observations))
        next_values = agent.values(params, agent.normalize(rollout.next_observations))
        _, targets = gae(rollout.rewards.T, values.T, next_values.T, rollout.terminated.T, rollout.truncated.T,
                         agent.config.discount, agent.config.gae_lambda)
        return new_agent, metrics, 0.5 * jnp.mean((values - targets.T) ** 2)

    new_agent, metrics, unclipped_value_loss = update_and_unclipped_value_loss(agent, rollout)
    assert agent.config.clip_value_loss
    assert float(metrics["approx_kl"]) == pytest.approx(0.0, abs=1e-7)
    assert float(metrics["clip_fraction"]) == 0.0
    assert float(metrics["value_loss"]) == pytest.approx(float(unclipped_value_loss), rel=1e-5)
    # the offline V is the critic and the dataset statistics stay frozen
    np.testing.assert_array_equal(new_agent.observation_moments.mean, moments.mean)
    initial_values = agent.values(agent.state.params, agent.normalize(observations[0]))
    offline_values = result.critics.values(result.critics.v.params, moments.normalize(observations[0], TINY.observation_clip))
    np.testing.assert_allclose(initial_values, offline_values, rtol=1e-6)


# ----------------------------------------------------------------------------- dynamics


def test_termination_functions():
    hopper = dyn.termination_fn("Hopper-v5")
    healthy = jnp.zeros((1, 11)).at[0, 0].set(1.25)
    fallen = healthy.at[0, 0].set(0.6)
    tilted = healthy.at[0, 1].set(0.3)
    wild = healthy.at[0, 5].set(150.0)
    done = hopper(None, None, jnp.concatenate([healthy, fallen, tilted, wild]))
    np.testing.assert_array_equal(done, [False, True, True, True])
    assert not bool(dyn.termination_fn("halfcheetah-medium-v2")(None, None, jnp.ones((2, 17))).any())
    walker = dyn.termination_fn("Walker2d-v5")
    np.testing.assert_array_equal(walker(None, None, jnp.array([[1.2, 0.0], [2.5, 0.0], [1.2, 1.5]])), [False, True, True])
    with pytest.raises(ValueError, match="no model termination function"):
        dyn.termination_fn("MyLaser-v0")


def test_dynamics_step_is_reproducible_per_key(offline_run):
    result, _ = offline_run
    dataset = synthetic_dataset()
    model = result.model
    assert model.elites.shape == (TINY.dynamics.num_elites,)
    assert set(np.asarray(model.elites).tolist()) == set(np.argsort(np.asarray(model.holdout_mse))[: TINY.dynamics.num_elites].tolist())
    obs, act = jnp.asarray(dataset.observations[:5]), jnp.asarray(dataset.actions[:5])
    step = jax.jit(lambda key: model.step(obs, act, key)[0])
    first, second = step(jax.random.PRNGKey(3)), step(jax.random.PRNGKey(3))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(step(jax.random.PRNGKey(4)), first)


@pytest.mark.slow
def test_dynamics_ensemble_learns():
    dataset = synthetic_dataset()
    config = dataclasses.replace(TINY.dynamics, max_epochs=60, patience=60, learning_rate=1e-2)
    epochs: list[dict] = []
    dyn.train_dynamics(dataset.observations, dataset.actions, dataset.rewards, dataset.next_observations, config,
                       jax.random.PRNGKey(0), log=epochs.append)
    targets = np.concatenate([dataset.next_observations - dataset.observations, dataset.rewards[:, None]], 1)
    predict_the_mean = targets.var(axis=0).mean()
    # the elites end far below the error of predicting the mean (untrained: about 2x above it)
    assert epochs[-1]["holdout_mse"] < 0.2 * predict_the_mean, (epochs[-1], predict_the_mean)


# ----------------------------------------------------------------------------- config and pipeline


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="improvement_steps"):
        u.UniO4Config(improvement_steps=150, eval_step=100)
    with pytest.raises(ValueError, match="minibatch_size"):
        u.UniO4OnlineConfig(num_steps=100, minibatch_size=30)
    scaled = u.cpu_scale()
    assert scaled.critic_steps < u.UniO4Config().critic_steps and scaled.online == u.UniO4Config().online


def test_hopper_benchmark_discount_prefers_survival_to_sprinting():
    """Regression (Hopper-v5 medium): at the spec's discount 0.99 both offline and online PPO turned
    the BC policy (measured: about 1.59 reward per step for 372 steps) into one that runs faster and
    falls sooner (about 2.24 per step for 133 steps): higher 0.99-discounted return, half the
    undiscounted score. The benchmark's discount must rank the survivor first, and the critics
    and online PPO must share it (the offline V initialises the online critic)."""
    from experiments.uni_o4_hopper import Args, benchmark_config

    def discounted(reward_per_step: float, steps: int, discount: float) -> float:
        return reward_per_step * float(np.sum(discount ** np.arange(steps)))

    config = benchmark_config(Args())
    assert config.discount == config.online.discount
    assert discounted(1.59, 372, config.discount) > discounted(2.24, 133, config.discount)
    assert discounted(1.59, 372, 0.99) < discounted(2.24, 133, 0.99)  # why 0.99 failed


def test_full_pipeline_smoke_on_pendulum(pipeline):
    summary, run_dir = pipeline
    seed = summary["seeds"][0]
    assert 0 <= seed["selected"] < TINY.num_policies
    assert np.isfinite(seed["selected_return"]) and len(seed["bc_member_returns"]) == TINY.num_policies
    assert np.isfinite(seed["selected_score"]) and np.isfinite(seed["bc_best_score"])
    assert [point["step"] for point in seed["online_curve"]] == [0, TINY.online.total_steps]
    phases = {row["phase"] for row in read_metrics(run_dir / "offline")}
    assert {"critic", "bc", "dynamics", "improve", "select", "offline_eval"} <= phases
    online_rows = read_metrics(run_dir / "online")
    assert any(row.get("phase") == "eval" for row in online_rows)
    assert all(np.isfinite(row["value_loss"]) for row in online_rows if row.get("phase") == "train")


def test_o2o_run_agent_uni_o4_runs_offline_then_online(tmp_path, pipeline):
    import tyro

    from experiments.offline_to_online import RunArgs, run

    path = tmp_path / "pendulum.hdf5"
    datasets.write_d4rl_hdf5(path, synthetic_dataset())
    parsed = tyro.cli(RunArgs, args=["--dataset", str(path), "--agent", "uni_o4", "--run-dir", str(tmp_path / "run")])
    assert parsed.agent == "uni_o4"
    root = run(dataclasses.replace(parsed, uni_o4=TINY, progress=False))
    assert (root / "summary.json").is_file()
    online_evals = [row for row in read_metrics(root / "online") if row.get("phase") == "eval"]
    assert online_evals and max(row["step"] for row in online_evals) >= TINY.online.total_steps


def test_code_selection_rule_picks_best_real_return_among_top_k_by_ope():
    seen = []

    def evaluate(members):
        seen.append(list(members))
        real = {0: 5.0, 1: 9.0, 2: 7.0, 3: 100.0}
        return np.array([[real[int(m)], real[int(m)] + 1.0] for m in members])

    selected, candidates, returns = u.select_by_code_rule(np.array([3.0, 1.0, 2.0, 0.5]), 3, evaluate)
    assert seen == [[0, 2, 1]]  # member 3 is outside the top 3 by OPE, whatever its real return
    assert selected == 1 and list(candidates) == [0, 2, 1] and returns.shape == (3, 2)


def test_selection_episodes_use_their_own_reset_stream(pipeline):
    from rl.evaluation import episode_seed

    result = pipeline[0]["offline_results"][0]
    resets = []

    class RecordingPendulum:
        def __init__(self):
            import gymnasium as gym

            self.env = gym.wrappers.RescaleAction(gym.make("Pendulum-v1"), -1.0, 1.0)

        def reset(self, seed=None):
            resets.append(seed)
            return self.env.reset(seed=seed)

        def step(self, action):
            return self.env.step(action)

        def close(self):
            self.env.close()

    moments = u.dataset_moments(synthetic_dataset(), True)
    params = jax.tree.map(lambda leaf: leaf[:1], result.improvement.behaviour_params)
    for stream in (u.OFFLINE_EVAL_STREAM, u.SELECTION_EVAL_STREAM):
        u.evaluate_policies(result.bc.net, params, moments, TINY, RecordingPendulum, run_seed=0, episodes=2, stream=stream)
    reporting, selection = resets[:2], resets[2:]
    assert reporting == [episode_seed(0, u.OFFLINE_EVAL_STREAM, j) for j in range(2)]
    assert selection == [episode_seed(0, u.SELECTION_EVAL_STREAM, j) for j in range(2)]
    assert not set(reporting) & set(selection)


def test_a_uni_o4_run_gives_back_its_online_policy_replaying_its_final_evaluation(tmp_path):
    from experiments.policy import evaluate_run, load_policy, load_run_agents
    from experiments.uni_o4_hopper import run_uni_o4
    from rl.rollouts import eval_seeds

    path = datasets.write_d4rl_hdf5(tmp_path / "toy.hdf5", synthetic_dataset())
    run_uni_o4(path, "Pendulum-v1", [0], tmp_path / "run", TINY, progress=False, offline_eval_episodes=1)
    run = load_run_agents(tmp_path / "run")  # an `o2o run --agent uni_o4` root: its online stage
    assert run.kind == "uni_o4" and run.run_dir == tmp_path / "run" / "online"
    assert run.step == TINY.online.total_steps // TINY.online.num_steps  # on-policy checkpoints count iterations
    rows = [row for row in read_metrics(run.run_dir) if "eval_return" in row]
    final_round = len({row["step"] for row in rows}) - 1
    returns = evaluate_run(run, [eval_seeds(0, final_round, TINY.online.eval_episodes)])
    assert returns.mean() == pytest.approx(rows[-1]["eval_return"], rel=1e-5)
    action = load_policy(tmp_path / "run")(np.zeros(OBS, np.float32))
    assert action.shape == (ACT,) and np.all(np.abs(action) <= 2.0)
