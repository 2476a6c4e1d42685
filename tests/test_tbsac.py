"""TBSAC: trend feature extractor, the agent contract, the trend-stack wrappers and a short online
run on the orbit-correction environment."""

import functools

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.sac import SAC
from agents.tbsac import TBSAC, TBSACConfig, TrendFeatures, tbsac_online_config, trend_feature_count
from envs.jax_env import JaxEnv, StepResult
from envs.registry import make
from envs.trend import TrendStack, TrendStackCore
from rl.loops import train_online
from rl.types import Transition
from rl.update import unstack_seed

ORBIT = "o2o/OrbitCorrection-v0"
OBS = gym.spaces.Box(-10, 10, (30,), np.float32)
ACT = gym.spaces.Box(-1, 1, (10,), np.float32)
SMALL = dict(actor_hidden_dims=(32, 32), critic_hidden_dims=(32, 32), batch_size=16)


def make_agent(seed: int = 0, **overrides) -> TBSAC:
    return TBSAC.create(jax.random.PRNGKey(seed), OBS, ACT, TBSACConfig(**{**SMALL, **overrides}))


@functools.lru_cache(maxsize=None)
def two_seeds() -> TBSAC:
    """Two seeds' agents stacked on a leading axis, made once: slices of it share their static
    fields (apply functions, optimisers), so every test's jitted update reuses one compilation."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    return jax.jit(jax.vmap(lambda key: TBSAC.create(key, OBS, ACT, TBSACConfig(**SMALL))))(keys)


def random_batch(count: int, seed: int = 0) -> Transition:
    rng = np.random.default_rng(seed)
    return Transition(
        observations=jnp.asarray(rng.normal(size=(count, 30)), jnp.float32),
        actions=jnp.asarray(rng.uniform(-1, 1, (count, 10)), jnp.float32),
        rewards=jnp.asarray(rng.normal(size=count), jnp.float32),
        next_observations=jnp.asarray(rng.normal(size=(count, 30)), jnp.float32),
        terminated=jnp.asarray(rng.random(count) < 0.2),
        truncated=jnp.zeros(count, bool),
    )


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------- extractor


def test_extractor_yields_108_features_on_a_3x10_stack_for_any_leading_shape():
    extractor = TrendFeatures()
    params = extractor.init(jax.random.PRNGKey(0), jnp.zeros(30))
    assert extractor.apply(params, jnp.zeros(30)).shape == (108,)
    assert extractor.apply(params, jnp.zeros((4, 7, 30))).shape == (4, 7, 108)
    assert trend_feature_count(10, (1, 2, 3), 4) == 40 + 36 + 32 == 108
    kernels = params["params"]
    assert [kernels[f"Conv_{i}"]["kernel"].shape for i in range(3)] == [(3, 1, 1, 4), (3, 2, 1, 4), (3, 3, 1, 4)]


def test_extractor_is_height3_convolution_flattened_channel_major():
    extractor = TrendFeatures(channels=2, kernel_widths=(2,), negative_slope=0.01)
    params = extractor.init(jax.random.PRNGKey(1), jnp.zeros(15))
    stack = jax.random.normal(jax.random.PRNGKey(2), (15,))
    features = extractor.apply(params, stack)
    image = np.asarray(stack).reshape(3, 5)
    kernel = np.asarray(params["params"]["Conv_0"]["kernel"])[:, :, 0, :]  # (3, 2, channels)
    bias = np.asarray(params["params"]["Conv_0"]["bias"])
    expected = np.array([[np.sum(image[:, j : j + 2] * kernel[:, :, c]) + bias[c] for j in range(4)] for c in range(2)])
    expected = np.where(expected > 0, expected, 0.01 * expected).reshape(-1)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


def test_networks_read_trend_features_and_follow_the_spec_widths():
    # Shapes only: eval_shape traces create without compiling or running it.
    agent = jax.eval_shape(lambda key: TBSAC.create(key, OBS, ACT, TBSACConfig()), jax.random.PRNGKey(0))
    assert agent.actor.params["MLP_0"]["Dense_0"]["kernel"].shape == (108, 256)
    assert agent.actor.params["MLP_0"]["Dense_1"]["kernel"].shape == (256, 256)
    assert agent.actor.params["Dense_0"]["kernel"].shape == agent.actor.params["Dense_1"]["kernel"].shape == (256, 10)
    # Twin Q heads on [108 features, 10 actions] -> 256 -> 256 -> 1, one shared extractor.
    heads = agent.critic.params["heads"]
    assert heads["MLP_0"]["Dense_0"]["kernel"].shape == (2, 118, 256)
    assert heads["Dense_0"]["kernel"].shape == (2, 256, 1)
    assert [agent.critic.params["trend"][f"Conv_{i}"]["kernel"].shape for i in range(3)] == [
        (3, 1, 1, 4), (3, 2, 1, 4), (3, 3, 1, 4)
    ]
    q = jax.eval_shape(lambda a: a.q_values(a.critic.params, jnp.zeros((5, 30)), jnp.zeros((5, 10))), agent)
    assert q.shape == (2, 5)
    config = TBSACConfig()
    assert (config.actor_lr, config.critic_lr, config.temperature_lr, config.batch_size) == (2e-4, 2e-4, 2e-4, 256)
    assert (config.discount, config.tau, config.init_temperature, config.log_std_min, config.log_std_max) == (
        0.99, 0.005, 1.0, -20.0, 2.0
    )
    schedule = tbsac_online_config()
    assert (schedule.total_steps, schedule.warmup_steps, schedule.buffer_capacity) == (20_000, 500, 3_000)
    assert (schedule.updates_per_step, schedule.eval_interval, schedule.eval_episodes) == (1, 1_000, 5)


def test_bad_observation_sizes_and_configs_are_rejected():
    with pytest.raises(ValueError, match="multiple of 3"):
        TBSAC.create(jax.random.PRNGKey(0), gym.spaces.Box(-1, 1, (31,)), ACT, TBSACConfig(**SMALL))
    with pytest.raises(ValueError, match="narrower"):
        TBSAC.create(jax.random.PRNGKey(0), gym.spaces.Box(-1, 1, (6,)), ACT, TBSACConfig(**SMALL))
    with pytest.raises(ValueError, match="conv_channels"):
        TBSACConfig(conv_channels=0)
    with pytest.raises(ValueError, match="critic_layer_norm"):
        make_agent(critic_layer_norm=True)


# ----------------------------------------------------------------------------- agent contract


def test_update_is_pure_jittable_and_changes_every_network():
    agent = unstack_seed(two_seeds(), 0)
    batch = random_batch(16)
    first, metrics = jax.jit(TBSAC.update)(agent, batch)
    second, _ = jax.jit(TBSAC.update)(agent, batch)
    assert isinstance(first, TBSAC)
    assert leaves_equal(first, second)
    for name in ("actor", "critic"):
        before, after = getattr(agent, name).params["trend"], getattr(first, name).params["trend"]
        assert not leaves_equal(before, after), f"{name} extractor did not train"
    assert not leaves_equal(agent.target_critic_params, first.target_critic_params)
    assert all(np.isfinite(float(value)) for value in metrics.values())
    assert float(first.target_entropy()) == -10.0
    # The update logic is SAC's, inherited rather than copied.
    assert TBSAC.update is SAC.update and TBSAC.act is SAC.act and TBSAC.update_critic is SAC.update_critic


def test_vmapped_seeds_match_separate_updates():
    agents = two_seeds()
    batch = random_batch(16)
    stacked, _ = jax.jit(jax.vmap(TBSAC.update, in_axes=(0, None)))(agents, batch)
    assert not leaves_equal(unstack_seed(stacked, 0).actor.params, unstack_seed(stacked, 1).actor.params)
    for index in range(2):
        alone, _ = jax.jit(TBSAC.update)(unstack_seed(agents, index), batch)
        for x, y in zip(jax.tree.leaves(unstack_seed(stacked, index)), jax.tree.leaves(alone)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_act_is_bounded_and_deterministic_mode_ignores_the_key():
    agent = unstack_seed(two_seeds(), 0)
    act = jax.jit(TBSAC.act, static_argnames="deterministic")
    observations = 5.0 * jax.random.normal(jax.random.PRNGKey(0), (256, 30))
    sampled = act(agent, observations, jax.random.PRNGKey(1))
    assert sampled.shape == (256, 10)
    assert np.all(np.abs(np.asarray(sampled)) <= 1.0)
    assert np.std(np.asarray(sampled)) > 0.1  # a stochastic policy at initialisation
    greedy = [act(agent, observations, jax.random.PRNGKey(k), deterministic=True) for k in (0, 1)]
    np.testing.assert_array_equal(greedy[0], greedy[1])
    assert np.all(np.abs(np.asarray(greedy[0])) <= 1.0)


# ----------------------------------------------------------------------------- trend wrappers


class CountingCore(JaxEnv):
    """x_t = x_0 + sum of actions; x_0 drawn from the key; episodes of 4 steps (then truncated)."""

    def default_params(self):
        return 4

    def reset(self, key, params):
        value = jax.random.normal(key, (2,))
        return value, (value, jnp.zeros((), jnp.int32))

    def step(self, key, state, action, params):
        value, count = state
        value, count = value + action, count + 1
        return StepResult(value, (value, count), jnp.float32(1.0), jnp.array(False), count >= params, {})

    def observation_space(self, params):
        return gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)

    def action_space(self, params):
        return gym.spaces.Box(-1, 1, (2,), np.float32)


def test_trend_stack_wrapper_builds_previous_change_change_value_across_resets():
    env = TrendStack(gym.make("Pendulum-v1"))
    assert env.observation_space.shape == (9,)
    np.testing.assert_allclose(env.observation_space.high[6:], [1, 1, 8])
    np.testing.assert_allclose(env.observation_space.high[:3], [2, 2, 16])
    for episode_seed in (0, 1):
        stacked, _ = env.reset(seed=episode_seed)
        raw = [env.unwrapped._get_obs().astype(np.float32)]
        np.testing.assert_array_equal(stacked, np.concatenate([np.zeros(6), raw[0]]))
        stacks = [stacked]
        for action in (-2.0, 1.0, 2.0):
            stacked, reward, terminated, truncated, _ = env.step(np.array([action], np.float32))
            raw.append(env.unwrapped._get_obs().astype(np.float32))
            stacks.append(stacked)
            assert stacked.dtype == np.float32 and not terminated and not truncated
        for t in range(1, 4):
            previous_change = raw[t - 1] - raw[t - 2] if t >= 2 else np.zeros(3)
            expected = np.concatenate([previous_change, raw[t] - raw[t - 1], raw[t]])
            np.testing.assert_allclose(stacks[t], expected, rtol=1e-6, atol=1e-6)


def test_functional_trend_core_matches_its_definition_and_autoresets():
    from envs.jax_env import step_autoreset

    core = TrendStackCore(CountingCore())
    assert core.observation_space(4).shape == (6,)
    observation, state = core.reset(jax.random.PRNGKey(0), 4)
    x0 = observation[4:]
    np.testing.assert_array_equal(observation[:4], np.zeros(4))
    first = core.step(jax.random.PRNGKey(1), state, jnp.array([0.5, -0.5]), 4)
    np.testing.assert_allclose(first.obs, np.concatenate([[0, 0], [0.5, -0.5], x0 + np.array([0.5, -0.5])]), atol=1e-6)
    second = jax.jit(core.step, static_argnums=3)(jax.random.PRNGKey(2), first.state, jnp.array([1.0, 0.0]), 4)
    np.testing.assert_allclose(second.obs[:4], [0.5, -0.5, 1.0, 0.0], atol=1e-6)
    state = second.state
    for _ in range(2):  # steps 3 and 4; step 4 truncates and resets
        result, final = step_autoreset(core, jax.random.PRNGKey(3), state, jnp.array([0.1, 0.1]), 4)
        state = result.state
    assert bool(result.truncated)
    np.testing.assert_allclose(final[:4], [0.1, 0.1, 0.1, 0.1], atol=1e-6)
    np.testing.assert_array_equal(result.obs[:4], np.zeros(4))


# ----------------------------------------------------------------------------- online run


def test_tbsac_trains_a_few_hundred_steps_in_train_online_on_the_orbit_env(tmp_path):
    probe = make(ORBIT)
    assert probe.observation_space == OBS and probe.action_space == ACT
    online = tbsac_online_config(
        total_steps=200, warmup_steps=100, eval_interval=200, eval_episodes=1, log_interval=100, checkpoint_interval=0
    )
    # One seed sliced from the shared two-seed agent (saves compiling another create).
    initial = jax.tree.map(lambda leaf: leaf[:1], two_seeds())
    agent, evaluations = train_online(
        create_agent=lambda key: TBSAC.create(key, OBS, ACT, TBSACConfig(**SMALL)),
        make_env=lambda: make(ORBIT),
        config=online,
        seeds=[3],
        run_dir=tmp_path,
        progress=False,
        initial_agent=initial,
    )
    assert isinstance(agent, TBSAC)
    assert agent.actor.params["trend"]["Conv_0"]["kernel"].shape == (1, 3, 1, 1, 4)  # leading seed axis
    assert int(agent.critic.step[0]) == 100  # one gradient step per env step after warm-up
    assert not leaves_equal(agent.actor.params, initial.actor.params)
    assert [row["seed"] for row in evaluations] == [3]
    assert all(np.isfinite(row["eval_return"]) for row in evaluations)
