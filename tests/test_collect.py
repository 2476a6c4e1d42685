"""Dataset collection: rollouts, exploration policies, D4RL-style recipes and writing."""

import dataclasses

import gymnasium as gym
import jax
import numpy as np
import pytest

from agents.sac import SAC, SACConfig
from envs.registry import env_factory
from rl.data import collect
from rl.data.datasets import DatasetError, episode_ends, load, write_d4rl_hdf5
from rl.loops import OnlineConfig

make_pendulum = env_factory("Pendulum-v1", rescale_actions=True)
ACT = gym.spaces.Box(-1, 1, (1,), np.float32)
TINY_SAC = SACConfig(actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16), batch_size=16)


def zero_policy(observations, key):
    return np.zeros((len(observations), 1), np.float32)


def test_rollout_stores_contiguous_episodes_with_distinct_end_flags():
    result = collect.rollout(make_pendulum, collect.random_policy(ACT), 450, seed=3, num_envs=2, metadata={"env_id": "Pendulum-v1"})
    data = result.dataset
    assert len(data) == 450
    # Env copy 0 holds rows 0..224, copy 1 rows 225..449; Pendulum ends by time limit at 200 steps.
    np.testing.assert_array_equal(np.flatnonzero(data.truncated), [199, 224, 424, 449])
    assert not data.terminated.any()
    ends = episode_ends(data)
    np.testing.assert_array_equal(np.flatnonzero(ends), [199, 224, 424, 449])
    inside = ~ends[:-1]
    np.testing.assert_allclose(data.next_observations[:-1][inside], data.observations[1:][inside])
    assert len(result.episode_returns) == 2  # only finished episodes count
    assert data.metadata == {"env_id": "Pendulum-v1", "seed": 3}
    assert np.all(np.abs(data.actions) <= 1.0)


def test_rollout_is_reproducible_per_seed():
    first = collect.rollout(make_pendulum, collect.random_policy(ACT), 50, seed=1).dataset
    again = collect.rollout(make_pendulum, collect.random_policy(ACT), 50, seed=1).dataset
    other = collect.rollout(make_pendulum, collect.random_policy(ACT), 50, seed=2).dataset
    np.testing.assert_array_equal(first.observations, again.observations)
    np.testing.assert_array_equal(first.actions, again.actions)
    assert not np.array_equal(first.actions, other.actions)


def test_noisy_policy_adds_clipped_noise_and_epsilon_random_actions():
    observations = np.zeros((500, 3), np.float32)
    key = jax.random.PRNGKey(0)
    same = collect.noisy_policy(zero_policy, ACT)(observations, key)
    np.testing.assert_array_equal(same, 0.0)
    noisy = collect.noisy_policy(zero_policy, ACT, noise_std=0.3)(observations, key)
    assert 0.25 < noisy.std() < 0.35 and np.all(np.abs(noisy) <= 1.0)
    uniform = collect.noisy_policy(zero_policy, ACT, epsilon=1.0)(observations, key)
    assert abs(uniform.std() - np.sqrt(1 / 3)) < 0.05  # U[-1, 1] everywhere
    half = collect.noisy_policy(zero_policy, ACT, epsilon=0.5)(observations, key)
    assert 0.4 < np.mean(half != 0.0) < 0.6
    with pytest.raises(ValueError, match="epsilon"):
        collect.noisy_policy(zero_policy, ACT, epsilon=1.5)


def test_agent_policy_samples_or_takes_the_mode():
    agent = SAC.create(jax.random.PRNGKey(0), gym.spaces.Box(-np.inf, np.inf, (3,)), ACT, TINY_SAC)
    observations = np.ones((4, 3), np.float32)
    mode = collect.agent_policy(agent, deterministic=True)
    np.testing.assert_array_equal(mode(observations, jax.random.PRNGKey(1)), mode(observations, jax.random.PRNGKey(2)))
    sample = collect.agent_policy(agent)
    assert not np.array_equal(sample(observations, jax.random.PRNGKey(1)), sample(observations, jax.random.PRNGKey(2)))


def test_written_dataset_round_trips_with_metadata(tmp_path):
    result = collect.rollout(make_pendulum, collect.random_policy(ACT), 220, seed=0)
    metadata = {"env_id": "Pendulum-v1", "seed": 0, "behaviour_return": result.mean_return, "ref_min_score": -1200.0, "ref_max_score": -150.0}
    dataset = dataclasses.replace(result.dataset, metadata=metadata)
    loaded = load(write_d4rl_hdf5(tmp_path / "pendulum-random.hdf5", dataset))
    for name in ("observations", "actions", "rewards", "next_observations", "terminated", "truncated"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(dataset, name))
    assert loaded.metadata["env_id"] == "Pendulum-v1" and loaded.metadata["seed"] == 0
    for name in ("behaviour_return", "ref_min_score", "ref_max_score"):
        assert loaded.metadata[name] == pytest.approx(metadata[name])


def test_concatenate_needs_episode_boundaries():
    data = collect.rollout(make_pendulum, collect.random_policy(ACT), 30, seed=0).dataset
    joined = collect.concatenate([data, data], {"recipe": "twice"})
    assert len(joined) == 60 and joined.truncated[29]
    cut = dataclasses.replace(data, truncated=np.zeros_like(data.truncated))
    with pytest.raises(DatasetError, match="episode boundary"):
        collect.concatenate([cut, data])


def test_minari_writer_needs_the_extra():
    try:
        import minari  # noqa: F401
    except ImportError:
        data = collect.rollout(make_pendulum, collect.random_policy(ACT), 10, seed=0).dataset
        with pytest.raises(DatasetError, match="minari"):
            collect.write_minari(data, "pendulum-test-v0")
    else:
        pytest.skip("minari is installed; the guard is not exercised")


def test_d4rl_recipes_on_a_tiny_budget(tmp_path):
    behaviour = OnlineConfig(total_steps=300, warmup_steps=100, eval_interval=150, eval_episodes=1, log_interval=150, buffer_capacity=300)
    config = collect.CollectConfig(env_id="Pendulum-v1", steps_per_dataset=250, seed=0)
    probe = make_pendulum()
    results = collect.collect_d4rl_style(
        make_pendulum,
        lambda key: SAC.create(key, probe.observation_space, probe.action_space, TINY_SAC),
        behaviour,
        config,
        tmp_path,
        progress=False,
        log=lambda message: None,
    )
    assert set(results) == set(collect.RECIPES)
    random_return = results["random"].metadata["behaviour_return"]
    expert_return = results["expert"].metadata["behaviour_return"]
    for name, dataset in results.items():
        meta = dataset.metadata
        assert meta["env_id"] == "Pendulum-v1" and meta["recipe"] == name and meta["seed"] == 0
        assert meta["ref_min_score"] == random_return and meta["ref_max_score"] == expert_return
        # The 150-step replay prefix holds no finished 200-step episode, so its return is unknown.
        assert np.isfinite(meta["behaviour_return"]) == (name != "medium-replay")
        assert dataset.truncated[-1] or dataset.terminated[-1]
    # Only the snapshot at step 150 precedes the final one, so it is the medium policy.
    replay_part = results["medium-replay"]
    assert len(replay_part) == 150 and replay_part.metadata["behaviour_steps"] == 150
    assert len(results["medium"]) == len(results["expert"]) == 250
    assert len(results["medium-expert"]) == 500
    np.testing.assert_array_equal(results["medium-expert"].observations[:250], results["medium"].observations)
    # The replay prefix is the training run's data in order: continuous inside episodes.
    inside = ~episode_ends(replay_part)[:-1]
    np.testing.assert_allclose(replay_part.next_observations[:-1][inside], replay_part.observations[1:][inside])


def test_recipes_train_the_behaviour_agent_of_an_o2o_env_on_the_device(tmp_path):
    from envs.registry import make_jax
    from rl.rollouts import JaxEnvSpec

    env_id = "o2o/OrbitCorrection-v0"
    make_env = env_factory(env_id, rescale_actions=True)
    probe = make_env()
    behaviour = OnlineConfig(total_steps=300, warmup_steps=100, eval_interval=150, eval_episodes=1, log_interval=150, buffer_capacity=300)
    results = collect.collect_d4rl_style(
        make_env,
        lambda key: SAC.create(key, probe.observation_space, probe.action_space, TINY_SAC),
        behaviour,
        collect.CollectConfig(env_id=env_id, recipes=("medium-replay",), steps_per_dataset=100, seed=0),
        tmp_path,
        progress=False,
        log=lambda message: None,
        jax_env=JaxEnvSpec(*make_jax(env_id)),
    )
    # The replay prefix comes out of the device loop's buffer: its first 150 steps, in order.
    replay_part = results["medium-replay"]
    assert len(replay_part) == 150
    inside = ~episode_ends(replay_part)[:-1]
    assert inside.any()
    np.testing.assert_allclose(replay_part.next_observations[:-1][inside], replay_part.observations[1:][inside])
