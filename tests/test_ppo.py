"""Tests of PPO (agents/ppo.py) and the on-policy rollout machinery (rl/rollouts.py)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.ppo import PPO, PPOConfig, RunningMoments
from envs import registry
from envs.jax_env import GymnasiumFace, JaxEnv, StepResult
from rl.checkpoint import CheckpointMismatch
from rl.logging import read_metrics
from rl.rollouts import (
    HostCollector,
    JaxEnvSpec,
    TRAIN_STREAM,
    OnPolicyConfig,
    Rollout,
    collect_segments,
    derived_seed,
    gae,
    init_segment_runner,
    train_on_policy,
    unit_action_map,
)


class DriftCore(JaxEnv):
    """Toy JAX env: a point on a line moved by the action; reward −x²; terminated when |x| > 1,
    truncated after ``horizon`` steps. Observation (x, t / horizon)."""

    def __init__(self, horizon: int = 3) -> None:
        self.horizon = horizon

    def default_params(self):
        return {"speed": jnp.asarray(0.3, jnp.float32)}

    def reset(self, key, params):
        x = jax.random.uniform(key, (), jnp.float32, -0.5, 0.5)
        state = {"x": x, "t": jnp.zeros((), jnp.int32)}
        return self._obs(state), state

    def step(self, key, state, action, params):
        x = state["x"] + params["speed"] * jnp.clip(action.reshape(()), -1.0, 1.0)
        t = state["t"] + 1
        new_state = {"x": x, "t": t}
        terminated = jnp.abs(x) > 1.0
        truncated = jnp.logical_and(t >= self.horizon, ~terminated)
        return StepResult(self._obs(new_state), new_state, -(x**2), terminated, truncated, {})

    def _obs(self, state):
        return jnp.stack([state["x"], state["t"].astype(jnp.float32) / self.horizon])

    def observation_space(self, params):
        return gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)

    def action_space(self, params):
        return gym.spaces.Box(-1.0, 1.0, (1,), np.float32)


def random_rollout(key, num_envs, num_steps, observation_dim, action_space) -> Rollout:
    keys = jax.random.split(key, 4)
    shape = (num_envs, num_steps)
    if isinstance(action_space, gym.spaces.Discrete):
        actions = jax.random.randint(keys[0], shape, 0, action_space.n)
        log_probs = jnp.full(shape, -np.log(action_space.n), jnp.float32)
    else:
        actions = jax.random.normal(keys[0], shape + action_space.shape)
        log_probs = -0.5 * (actions**2).sum(-1) - 0.5 * action_space.shape[0] * np.log(2 * np.pi)
    observations = jax.random.normal(keys[1], shape + (observation_dim,))
    return Rollout(
        observations=observations,
        actions=actions,
        log_probs=log_probs,
        rewards=jax.random.normal(keys[2], shape),
        terminated=jax.random.bernoulli(keys[3], 0.05, shape),
        truncated=jnp.zeros(shape, bool),
        valid=jnp.ones(shape, bool),
        next_observations=jnp.roll(observations, -1, axis=1),
    )


# ----------------------------------------------------------------------------- GAE


def test_gae_hand_computed_with_truncation_and_termination():
    # Episode A = steps 0-1, truncated at 1 (V of its true final observation is 10, bootstrapped);
    # episode B = steps 2-3, terminated at 3 (next value 99 must be ignored); episode C = step 4,
    # cut by the rollout end (bootstraps from 3). gamma 0.9, lambda 0.8 (gamma*lambda = 0.72):
    # A4 = 5 + 0.9*3 - 2.5 = 5.2;  A3 = 4 - 2 = 2;  A2 = (3 + 0.9*2 - 1.5) + 0.72*2 = 4.74
    # A1 = 2 + 0.9*10 - 1 = 10;     A0 = (1 + 0.9*1 - 0.5) + 0.72*10 = 8.6
    rewards = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
    values = jnp.array([0.5, 1.0, 1.5, 2.0, 2.5])
    next_values = jnp.array([1.0, 10.0, 2.0, 99.0, 3.0])
    terminated = jnp.array([False, False, False, True, False])
    truncated = jnp.array([False, True, False, False, False])
    advantages, targets = gae(rewards, values, next_values, terminated, truncated, 0.9, 0.8)
    np.testing.assert_allclose(advantages, [8.6, 10.0, 4.74, 2.0, 5.2], rtol=1e-6)
    np.testing.assert_allclose(targets, [9.1, 11.0, 6.24, 4.0, 7.7], rtol=1e-6)
    # Extra batch axes are independent columns.
    stacked = gae(*(jnp.stack([x, x], axis=1) for x in (rewards, values, next_values, terminated, truncated)), 0.9, 0.8)[0]
    np.testing.assert_allclose(stacked[:, 1], advantages, rtol=1e-6)


def test_host_segments_keep_true_final_observation_at_truncation():
    make_env = registry.env_factory("CartPole-v1", max_episode_steps=5)
    collector = HostCollector(make_env, [0], num_envs=2)
    collector.restart_segments(0)
    first_observations = collector.observations.copy()
    actions = np.zeros((1, 2, 12), np.int32)  # always push left: CartPole survives >5 steps

    def policy(observations, t):
        return actions[:, :, t], np.zeros((1, 2), np.float32)

    data, steps, finished = collector.collect_segments(policy, 12, np.array([True]))
    assert data["truncated"][0, :, 4].all() and not data["terminated"][0, :, 4].any()
    assert not data["valid"][0, :, 5].any(), "the reset step of next-step autoreset must be invalid"
    assert data["valid"][0, :, 6].all() and data["truncated"][0, :, 10].all()
    assert steps[0] == 2 * 12 and data["valid"].sum() == 2 * 10 and finished[0] == [5.0, 5.0, 5.0, 5.0]
    # The truncated step's next observation is the true final one (replayed in a fresh env), not
    # the reset observation that follows.
    replay = make_env()
    observation, _ = replay.reset(seed=derived_seed(0, TRAIN_STREAM, 0, 0))
    np.testing.assert_allclose(observation, first_observations[0, 0], rtol=1e-6)
    for _ in range(5):
        final, *_ = replay.step(0)
    np.testing.assert_allclose(data["next_observations"][0, 0, 4], final, rtol=1e-6)
    assert not np.allclose(data["next_observations"][0, 0, 4], data["next_observations"][0, 0, 5])
    np.testing.assert_allclose(data["observations"][0, 0, 6], data["next_observations"][0, 0, 5])
    collector.close()


def test_jax_segments_keep_true_final_observation_at_truncation():
    core = DriftCore(horizon=3)
    params = core.default_params()
    space = core.action_space(params)
    agent = PPO.create(jax.random.PRNGKey(0), core.observation_space(params), space, PPOConfig(num_envs=4, num_steps=7))
    runner = init_segment_runner(core, params, jax.random.PRNGKey(1), 4)
    action_map = unit_action_map(space)
    runner, rollout, stats = jax.jit(lambda a, r: collect_segments(a, core, params, r, jax.random.PRNGKey(2), 7, action_map))(agent, runner)
    assert rollout.observations.shape == (4, 7, 2)
    ended = np.asarray(rollout.truncated | rollout.terminated)
    truncated = np.asarray(rollout.truncated)
    assert truncated[:, 2].any()
    rows, cols = np.nonzero(truncated[:, :-1])
    # At a truncation the stored next observation is the final state (t/H = 1); the next row
    # starts a new episode (t = 0).
    np.testing.assert_allclose(np.asarray(rollout.next_observations)[rows, cols, 1], 1.0)
    np.testing.assert_allclose(np.asarray(rollout.observations)[rows, cols + 1, 1], 0.0)
    not_ended = ~ended[:, :-1]
    np.testing.assert_allclose(
        np.asarray(rollout.next_observations)[:, :-1][not_ended], np.asarray(rollout.observations)[:, 1:][not_ended]
    )
    assert int(stats["env_steps"]) == 28 and int(stats["episodes"]) == ended.sum()


# ----------------------------------------------------------------------------- agent


def test_running_moments_match_numpy():
    values = np.random.default_rng(0).normal(3.0, 2.0, size=(300, 3)).astype(np.float32)
    weights = np.ones(300, np.float32)
    weights[250:] = 0.0
    moments = RunningMoments.create((3,))
    moments = moments.update(jnp.asarray(values[:100]), jnp.asarray(weights[:100]))
    moments = moments.update(jnp.asarray(values[100:]), jnp.asarray(weights[100:]))
    np.testing.assert_allclose(moments.mean, values[:250].mean(0), rtol=1e-4)
    np.testing.assert_allclose(moments.var, values[:250].var(0), rtol=1e-3)


@pytest.mark.parametrize(
    "action_space,distribution,full_update",
    [(gym.spaces.Discrete(3), "clipped", True), (gym.spaces.Box(-1.0, 1.0, (2,), np.float32), "clipped", False), (gym.spaces.Box(-1.0, 1.0, (2,), np.float32), "tanh", False)],
    ids=["discrete", "continuous-clipped", "continuous-tanh"],
)
def test_update_is_finite_and_starts_on_policy(action_space, distribution, full_update):
    # The continuous-clipped update runs in the JAX-env training test below; here its loss only.
    observation_space = gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)
    config = PPOConfig(num_envs=4, num_steps=16, num_minibatches=2, update_epochs=1, continuous_distribution=distribution, normalize_rewards=True)
    agent = PPO.create(jax.random.PRNGKey(0), observation_space, action_space, config)
    rollout = random_rollout(jax.random.PRNGKey(1), 4, 16, 5, action_space)
    # Behaviour log-probabilities from the agent itself: the first minibatch is exactly on-policy.
    actions, log_probs = jax.jit(jax.vmap(agent.explore))(rollout.observations, jax.random.split(jax.random.PRNGKey(2), 4))
    rollout = rollout.replace(actions=actions, log_probs=log_probs)
    minibatch = {
        "observations": rollout.observations.reshape(64, 5),
        "actions": actions.reshape(64, *actions.shape[2:]),
        "log_probs": log_probs.reshape(64),
        "advantages": jnp.ones(64),
        "targets": jnp.zeros(64),
        "old_values": jnp.zeros(64),
        "valid": jnp.ones(64),
    }
    loss, loss_metrics = jax.jit(lambda a, m: a.loss(a.state.params, {**m, "observations": a.normalize(m["observations"])}, 0.2))(agent, minibatch)
    assert np.isfinite(float(loss))
    assert abs(float(loss_metrics["approx_kl"])) < 1e-6 and float(loss_metrics["clip_fraction"]) == 0.0
    env_actions = jax.jit(agent.act)(rollout.observations[0], jax.random.PRNGKey(3))
    assert np.all(np.isfinite(np.asarray(env_actions)))
    if isinstance(action_space, gym.spaces.Box):
        assert np.all(np.abs(np.asarray(env_actions)) <= 1.0)
    if not full_update:
        return
    new_agent, metrics = jax.jit(PPO.update)(agent, rollout)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_agent.state.params, agent.state.params)
    assert any(jax.tree.leaves(changed))
    assert int(new_agent.state.step) == 2


def test_config_checks():
    with pytest.raises(ValueError, match="num_minibatches"):
        PPOConfig(num_envs=3, num_steps=5, num_minibatches=2)
    with pytest.raises(ValueError, match="schedule_iterations"):
        space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        PPO.create(jax.random.PRNGKey(0), space, space, PPOConfig(lr_schedule="linear"))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        PPO.create(jax.random.PRNGKey(0), gym.spaces.Box(-1.0, 1.0, (1,), np.float32), gym.spaces.Box(-2.0, 2.0, (1,)), PPOConfig())


def test_train_on_jax_env_is_jitted_logs_rows_and_resumes_exactly(tmp_path):
    core = DriftCore(horizon=10)
    params = core.default_params()
    config = PPOConfig(num_envs=8, num_steps=10, num_minibatches=2, update_epochs=2, learning_rate=3e-3)
    create = lambda key: PPO.create(key, core.observation_space(params), core.action_space(params), config)  # noqa: E731
    schedule = OnPolicyConfig(total_steps=1600, eval_interval=800, eval_episodes=4, log_interval=400, max_episode_steps=10, checkpoint_every=10)
    spec = JaxEnvSpec(core, params)
    agent, evaluations = train_on_policy(create, schedule, [0, 1], tmp_path / "a", jax_env=spec, progress=False)
    assert [(row["step"], row["seed"]) for row in evaluations] == [(800, 0), (800, 1), (1600, 0), (1600, 1)]
    rows = read_metrics(tmp_path / "a")
    train_rows = [row for row in rows if row["phase"] == "train"]
    assert train_rows and all(np.isfinite(row["policy_loss"]) for row in train_rows)
    assert all(np.isfinite(row["eval_return"]) and row["eval_return"] <= 0 for row in evaluations)
    assert (tmp_path / "a" / "metrics.csv").exists()
    assert int(agent.state.step[0]) == 20 * 2 * 2
    # Kill after iteration 12 (last checkpoint at 10), resume: the same agent, env states and rows.
    train_on_policy(create, schedule, [0, 1], tmp_path / "b", jax_env=spec, progress=False, stop_at_iteration=12)
    resumed, resumed_evaluations = train_on_policy(create, schedule, [0, 1], tmp_path / "b", jax_env=spec, progress=False, resume=True)
    for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(agent)):
        np.testing.assert_array_equal(got, want)
    assert resumed_evaluations == [row for row in evaluations if row["step"] == 1600]
    strip = lambda row: {k: v for k, v in row.items() if k != "steps_per_s"}  # noqa: E731
    assert [strip(row) for row in read_metrics(tmp_path / "b")] == [strip(row) for row in rows]
    # Those checkpoints hold device env state: resuming them through a host env is refused by name.
    host_env = lambda: GymnasiumFace(core, params)  # noqa: E731
    with pytest.raises(CheckpointMismatch, match="stepping on the device"):
        train_on_policy(create, schedule, [0, 1], tmp_path / "b", make_env=host_env, progress=False, resume=True)


# ----------------------------------------------------------------------------- learning (slow)


def _final_returns(preset: str, seeds, tmp_path, budget: int) -> list[float]:
    """Last evaluation return at or below ``budget`` env steps, per seed."""
    from experiments.on_policy import train_preset

    _, evaluations = train_preset(preset, seeds=seeds, run_dir=tmp_path / preset)
    finals = []
    for seed in seeds:
        rows = [row for row in evaluations if row["seed"] == seed and row["env_steps"] <= budget]
        print(preset, "seed", seed, [(row["env_steps"], round(row["eval_return"], 1)) for row in rows])
        finals.append(rows[-1]["eval_return"])
    return finals


@pytest.mark.slow
def test_ppo_solves_cartpole_within_100k_steps(tmp_path):
    finals = _final_returns("ppo_cartpole", [0, 1, 2], tmp_path, 100_000)
    assert all(value >= 475 for value in finals), finals


@pytest.mark.slow
def test_ppo_pendulum_within_1m_steps(tmp_path):
    finals = _final_returns("ppo_pendulum", [0, 1, 2], tmp_path, 1_000_000)
    assert all(value >= -300 for value in finals), finals
