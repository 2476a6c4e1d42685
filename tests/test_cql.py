"""CQL / Cal-QL: the conservative term and the Cal-QL bound on hand-computed numbers, Monte-Carlo
returns (spec 5.4, acceptance 10 and 11), and the agent's update contract."""

import dataclasses
import math

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from agents.cql import (
    CQL,
    CalQLTransition,
    CQLConfig,
    check_same_architecture,
    conservative_gap,
    draw_members,
    offline_buffer,
    sparse_aware_monte_carlo_returns,
    transform_rewards,
)
from agents.wsrl import wsrl_config
from rl.data import replay
from rl.data.datasets import OfflineDataset
from rl.types import Transition

OBS = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
ACT = gym.spaces.Box(-1, 1, (2,), np.float32)


def tiny_config(**overrides) -> CQLConfig:
    sac = wsrl_config(actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16), num_critics=4, batch_size=8, utd_ratio=1)
    return CQLConfig(sac=sac, num_sampled_actions=3, num_backup_actions=2, **overrides)


def calql_batch(count: int, seed: int = 0) -> CalQLTransition:
    rng = np.random.default_rng(seed)
    return CalQLTransition(
        observations=jnp.asarray(rng.normal(size=(count, 3)), jnp.float32),
        actions=jnp.asarray(rng.uniform(-0.9, 0.9, (count, 2)), jnp.float32),
        rewards=jnp.asarray(rng.normal(size=count), jnp.float32),
        next_observations=jnp.asarray(rng.normal(size=(count, 3)), jnp.float32),
        terminated=jnp.asarray(rng.random(count) < 0.1),
        truncated=jnp.zeros(count, bool),
        mc_returns=jnp.asarray(rng.normal(size=count), jnp.float32),
    )


# ----------------------------------------------------------------------------- conservative term


def hand_batch():
    """One critic, two states, 10 actions of each kind, values chosen by hand."""
    rng = np.random.default_rng(3)
    q_random = rng.normal(size=(1, 2, 10)).astype(np.float32)
    q_policy = rng.normal(size=(1, 2, 10)).astype(np.float32)
    q_next = rng.normal(size=(1, 2, 10)).astype(np.float32)
    log_pi = rng.normal(size=(2, 10)).astype(np.float32)
    log_pi_next = rng.normal(size=(2, 10)).astype(np.float32)
    q_data = np.array([[0.5, -1.0]], np.float32)
    return q_data, q_random, q_policy, log_pi, q_next, log_pi_next


def test_importance_sampled_logsumexp_runs_over_exactly_30_values_without_the_dataset_action():
    action_dim = 2
    # All 30 importance-weighted values equal c: logsumexp = c + log(30) exactly (31 would give log 31).
    c = 0.7
    random_term = c + action_dim * math.log(0.5)  # Q_rand - log(0.5^|A|) = c
    q_random = np.full((1, 1, 10), random_term, np.float32)
    log_pi = np.full((1, 10), -0.2, np.float32)
    q_policy = np.full((1, 1, 10), c - 0.2, np.float32)
    q_data = np.array([[1000.0]], np.float32)  # would dominate the logsumexp if it were included
    gap, ood, _ = conservative_gap(q_data, q_random, q_policy, log_pi, q_policy, log_pi, action_dim)
    np.testing.assert_allclose(ood, [[c + math.log(30)]], rtol=1e-6)
    np.testing.assert_allclose(gap, [[c + math.log(30) - 1000.0]], rtol=1e-6)


def test_importance_sampled_term_matches_hand_computation():
    q_data, q_random, q_policy, log_pi, q_next, log_pi_next = hand_batch()
    action_dim = 3
    gap, ood, rate = conservative_gap(q_data, q_random, q_policy, log_pi, q_next, log_pi_next, action_dim, temperature=2.0)
    for state in range(2):
        values = np.concatenate(
            [q_random[0, state] - action_dim * np.log(0.5), q_policy[0, state] - log_pi[state], q_next[0, state] - log_pi_next[state]]
        )
        assert values.shape == (30,)
        expected = 2.0 * logsumexp(values / 2.0)
        np.testing.assert_allclose(ood[0, state], expected, rtol=1e-5)
        np.testing.assert_allclose(gap[0, state], expected - q_data[0, state], rtol=1e-5)
    assert float(rate) == 0.0


def test_without_importance_sampling_31_values_with_log31_subtracted():
    # All 31 values (30 sampled + the dataset action) equal c: the result is exactly c.
    c = -2.5
    same = np.full((1, 1, 10), c, np.float32)
    gap, ood, _ = conservative_gap(
        np.array([[c]], np.float32), same, same, np.zeros((1, 10)), same, np.zeros((1, 10)), 4, importance_sampling=False
    )
    np.testing.assert_allclose(ood, [[c]], atol=1e-6)
    np.testing.assert_allclose(gap, [[0.0]], atol=1e-6)
    # General values: logsumexp over the 31 raw values (log-probabilities play no part) minus log 31.
    q_data, q_random, q_policy, log_pi, q_next, log_pi_next = hand_batch()
    _, ood, _ = conservative_gap(q_data, q_random, q_policy, log_pi, q_next, log_pi_next, 3, importance_sampling=False)
    for state in range(2):
        values = np.concatenate([q_random[0, state], q_policy[0, state], q_next[0, state], [q_data[0, state]]])
        assert values.shape == (31,)
        np.testing.assert_allclose(ood[0, state], logsumexp(values) - math.log(31), rtol=1e-5)


def test_calql_bounds_policy_values_by_the_mc_return_but_not_random_ones():
    q_data, q_random, q_policy, log_pi, q_next, log_pi_next = hand_batch()
    mc = np.array([0.0, 100.0], np.float32)  # state 1: every policy value is below the bound
    gap, ood, rate = conservative_gap(q_data, q_random, q_policy, log_pi, q_next, log_pi_next, 3, mc_returns=mc)
    for state in range(2):
        bounded_policy = np.maximum(q_policy[0, state], mc[state])
        bounded_next = np.maximum(q_next[0, state], mc[state])
        values = np.concatenate(
            [q_random[0, state] - 3 * np.log(0.5), bounded_policy - log_pi[state], bounded_next - log_pi_next[state]]
        )
        np.testing.assert_allclose(ood[0, state], logsumexp(values), rtol=1e-5)
    below = np.sum(q_policy[0, 0] < 0) + np.sum(q_next[0, 0] < 0) + 20
    np.testing.assert_allclose(rate, below / 40.0, rtol=1e-6)
    # The random-action values stay unbounded unless asked for.
    _, ood_all, rate_all = conservative_gap(
        q_data, q_random, q_policy, log_pi, q_next, log_pi_next, 3, mc_returns=mc, bound_random_actions=True
    )
    assert ood_all[0, 1] > ood[0, 1]
    assert float(rate_all) > 0


def test_ensemble_subset_duplicate_rate_with_and_without_replacement():
    keys = jax.random.split(jax.random.PRNGKey(0), 100_000)
    with_replacement = jax.vmap(lambda k: draw_members(k, 10, 2, True))(keys)
    duplicates = float(jnp.mean(with_replacement[:, 0] == with_replacement[:, 1]))
    assert abs(duplicates - 0.10) < 0.01  # spec acceptance 5
    without = jax.vmap(lambda k: draw_members(k, 10, 2, False))(keys[:5000])
    assert not bool(jnp.any(without[:, 0] == without[:, 1]))
    assert draw_members(keys[0], 2, 2, False) is None


# ----------------------------------------------------------------------------- Monte-Carlo returns


def dataset_from(rewards, terminated, truncated, observations=None) -> OfflineDataset:
    count = len(rewards)
    if observations is None:
        observations = np.arange(count + 1, dtype=np.float32)[:, None]
        obs, next_obs = observations[:-1], observations[1:]
    else:
        obs, next_obs = observations
    return OfflineDataset(
        observations=obs, actions=np.zeros((count, 1), np.float32), rewards=np.asarray(rewards, np.float32),
        next_observations=next_obs, terminated=np.asarray(terminated, bool), truncated=np.asarray(truncated, bool),
    )


def test_mc_returns_stop_at_truncated_and_terminated_ends():
    gamma = 0.9
    # Episode 1: three steps, truncated (time limit); episode 2: two steps, terminated.
    data = dataset_from([1, 2, 3, 4, 5], [0, 0, 0, 0, 1], [0, 0, 1, 0, 0])
    returns = sparse_aware_monte_carlo_returns(data, gamma)
    expected = [1 + gamma * 2 + gamma**2 * 3, 2 + gamma * 3, 3, 4 + gamma * 5, 5]
    np.testing.assert_allclose(returns, expected, rtol=1e-6)


def test_mc_returns_split_at_observation_discontinuities():
    observations = np.array([[0], [1], [2]], np.float32)
    next_observations = np.array([[1], [7], [3]], np.float32)  # row 1 does not lead to row 2
    data = dataset_from([1, 1, 1], [0, 0, 0], [0, 0, 1], (observations, next_observations))
    np.testing.assert_allclose(sparse_aware_monte_carlo_returns(data, 0.5), [1.5, 1.0, 1.0])


def test_sparse_antmaze_returns_acceptance_10():
    gamma = 0.99
    failure = dataset_from([-5.0] * 4, [0] * 4, [0, 0, 0, 1])  # time-limit end, never succeeded
    np.testing.assert_allclose(sparse_aware_monte_carlo_returns(failure, gamma, -5.0), [-500.0] * 4, rtol=1e-6)
    success = dataset_from([-5.0, -5.0, 5.0], [0, 0, 1], [0, 0, 0])  # reaches the goal at T = 2
    returns = sparse_aware_monte_carlo_returns(success, gamma, -5.0)
    np.testing.assert_allclose(returns, [-5 + gamma * (-5 + gamma * 5), -5 + gamma * 5, 5.0], atol=1e-5)


def test_offline_buffer_carries_mc_returns_and_clips_actions():
    data = dataset_from([1.0, 1.0], [0, 1], [0, 0])
    data = dataclasses.replace(data, actions=np.array([[1.0], [-1.0]], np.float32))
    buffer = offline_buffer(data, discount=0.5)
    assert isinstance(buffer.data, CalQLTransition)
    np.testing.assert_allclose(buffer.data.mc_returns, [1.5, 1.0])
    assert float(jnp.max(jnp.abs(buffer.data.actions))) == pytest.approx(1 - 1e-5)
    plain = offline_buffer(data, with_mc_returns=False)
    assert type(plain.data) is Transition


def test_reward_transform_is_applied_exactly_once_acceptance_9():
    raw = dataset_from([0.0, 1.0, 0.0, 1.0], [0, 0, 0, 1], [0, 0, 0, 0])
    antmaze = transform_rewards(raw, 10.0, -5.0)
    np.testing.assert_array_equal(antmaze.rewards, [-5, 5, -5, 5])
    np.testing.assert_array_equal(raw.rewards, [0, 1, 0, 1])  # the input is not modified
    np.testing.assert_array_equal(offline_buffer(antmaze).data.rewards, [-5, 5, -5, 5])  # the buffer adds nothing
    adroit = transform_rewards(dataset_from([-1.0, 0.0], [0, 1], [0, 0]), 10.0, 5.0)
    np.testing.assert_array_equal(adroit.rewards, [-5, 5])
    kitchen = transform_rewards(dataset_from([0.0, 2.0, 4.0], [0, 0, 0], [0, 0, 1]), 1.0, -4.0)
    np.testing.assert_array_equal(kitchen.rewards, [-4, -2, 0])


# ----------------------------------------------------------------------------- agent


def test_update_is_pure_finite_and_reports_the_conservative_terms():
    agent = CQL.create(jax.random.PRNGKey(0), OBS, ACT, tiny_config(calql=True))
    batch = calql_batch(8)
    update = jax.jit(CQL.update)
    first, metrics = update(agent, batch)
    second, _ = update(agent, batch)
    for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(x, y)
    assert {"td_loss", "cql_loss", "cql_gap", "cql_ood_values", "calql_bound_rate", "actor_loss", "temperature"} <= set(metrics)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert 0.0 <= float(metrics["calql_bound_rate"]) <= 1.0
    assert not np.array_equal(first.sac.critic.params["Dense_0"]["kernel"], agent.sac.critic.params["Dense_0"]["kernel"])
    assert float(first.cql_multiplier()) == pytest.approx(1.0, rel=1e-6)  # fixed alpha: multiplier untouched


def test_calql_without_mc_returns_is_refused():
    agent = CQL.create(jax.random.PRNGKey(0), OBS, ACT, tiny_config(calql=True))
    batch = calql_batch(8)
    plain = Transition(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(Transition)})
    with pytest.raises(ValueError, match="mc_returns"):
        agent.update(plain)


def test_conservative_training_pushes_ood_values_below_dataset_values():
    agent = CQL.create(jax.random.PRNGKey(1), OBS, ACT, tiny_config(cql_alpha=5.0))
    data = calql_batch(64, seed=2)
    buffer = replay.from_items(data)
    random_actions = jax.random.uniform(jax.random.PRNGKey(9), data.actions.shape, minval=-1, maxval=1)

    def ood_margin(a):
        q_random = a.sac.q_values(a.sac.critic.params, data.observations, random_actions)
        q_data = a.sac.q_values(a.sac.critic.params, data.observations, data.actions)
        return float(jnp.mean(q_random - q_data))

    def body(carry, key):
        return carry.update(replay.sample(buffer, key, 8))

    trained, _ = jax.jit(lambda a, k: jax.lax.scan(body, a, jax.random.split(k, 150)))(agent, jax.random.PRNGKey(3))
    assert ood_margin(trained) < ood_margin(agent) - 0.1


def test_autotuned_multiplier_grows_while_the_gap_exceeds_its_target():
    agent = CQL.create(jax.random.PRNGKey(0), OBS, ACT, tiny_config(autotune_alpha=True, target_action_gap=-100.0))
    assert float(agent.cql_multiplier()) == pytest.approx(1.0, rel=1e-6)
    updated, metrics = jax.jit(CQL.update)(agent, calql_batch(8))
    assert float(updated.cql_multiplier()) > 1.0


def test_to_online_keeps_every_array_and_refuses_other_networks():
    agent = CQL.create(jax.random.PRNGKey(0), OBS, ACT, tiny_config())
    online_config = dataclasses.replace(agent.config.sac, utd_ratio=4, actor_on_full_batch=True)
    online = agent.to_online(online_config)
    for x, y in zip(jax.tree.leaves(online), jax.tree.leaves(agent.sac)):
        np.testing.assert_array_equal(x, y)
    assert online.config.utd_ratio == 4
    with pytest.raises(ValueError, match="critic_hidden_dims"):
        agent.to_online(dataclasses.replace(online_config, critic_hidden_dims=(32, 32)))
    with pytest.raises(ValueError, match="actor_layer_norm"):
        check_same_architecture(agent.config.sac, dataclasses.replace(online_config, actor_layer_norm=False))
