"""The online loop: warm-up, determinism, exact resume, seeds looped or vmapped, offline loop, and
training envs stepped on the device for JAX-native environments."""

import dataclasses

import gymnasium as gym
import jax
import numpy as np
import pytest

from agents.sac import SAC, SACConfig
from envs.registry import env_factory, make_jax
from rl.data import replay
from rl.loops import OfflineConfig, OnlineConfig, device_action_map, train_offline, train_online
from rl.logging import read_metrics
from rl.rollouts import JaxEnvSpec

SMALL = SACConfig(actor_hidden_dims=(32, 32), critic_hidden_dims=(32, 32), batch_size=32)
MAKE_ENV = env_factory("Pendulum-v1", rescale_actions=True)
SPACES = MAKE_ENV()
SCHEDULE = OnlineConfig(total_steps=500, warmup_steps=100, eval_interval=250, eval_episodes=1, log_interval=75, checkpoint_interval=200)
TIMING = {"steps_per_s"}


def create(key):
    return SAC.create(key, SPACES.observation_space, SPACES.action_space, SMALL)


def untimed_metrics(run_dir):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(run_dir)]


def run(run_dir, seeds=(0,), config=SCHEDULE, **kwargs):
    agent, _ = train_online(create, MAKE_ENV, config, list(seeds), run_dir, progress=False, **kwargs)
    return agent, untimed_metrics(run_dir)


def assert_killed_and_resumed_run_matches(run_fn, tmp_path, stop_at):
    """A run killed at ``stop_at`` and resumed ends with the uninterrupted run's metrics and agent;
    returns those metrics."""
    reference_agent, reference = run_fn(tmp_path / "full")
    run_fn(tmp_path / "split", stop_at=stop_at)
    resumed_agent, resumed = run_fn(tmp_path / "split", resume=True)
    assert resumed == reference
    for x, y in zip(jax.tree.leaves(resumed_agent), jax.tree.leaves(reference_agent)):
        np.testing.assert_array_equal(x, y)
    return reference


def test_same_seed_gives_identical_metrics(tmp_path):
    _, first = run(tmp_path / "a")
    _, second = run(tmp_path / "b")
    assert first == second
    assert any("eval_return" in row for row in first) and any("critic_loss" in row for row in first)


def test_resumed_run_ends_with_the_same_metrics_and_agent(tmp_path):
    # Killed at step 350, after the checkpoint at 200 and past an evaluation at 250.
    assert_killed_and_resumed_run_matches(run, tmp_path, stop_at=350)


def test_warmup_makes_no_updates(tmp_path):
    config = OnlineConfig(total_steps=60, warmup_steps=60, eval_interval=60, eval_episodes=1, log_interval=30)
    agent, _ = run(tmp_path / "w", config=config)
    fresh = jax.vmap(create)(jax.vmap(lambda k: jax.random.split(k)[0])(jax.numpy.stack([jax.random.PRNGKey(0)])))
    for x, y in zip(jax.tree.leaves(agent), jax.tree.leaves(fresh)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("seed_batching", ["vmap", "loop"])
def test_seeds_looped_or_batched_match_separate_runs(tmp_path, seed_batching):
    config = dataclasses.replace(SCHEDULE, seed_batching=seed_batching)
    _, together = run(tmp_path / "both", seeds=(0, 1), config=config)
    _, alone = run(tmp_path / "one", seeds=(1,), config=config)
    together_evals = [r["eval_return"] for r in together if r["seed"] == 1 and "eval_return" in r]
    alone_evals = [r["eval_return"] for r in alone if "eval_return" in r]
    np.testing.assert_allclose(together_evals, alone_evals, rtol=1e-3)


@pytest.mark.parametrize("seed_batching", ["vmap", "loop"])
def test_offline_loop_trains_every_seed_on_one_shared_dataset(tmp_path, seed_batching):
    rng = np.random.default_rng(0)
    from rl.data import datasets

    data = datasets.from_arrays(
        rng.normal(size=(300, 3)), rng.uniform(-1, 1, (300, 1)), rng.normal(size=300), np.zeros(300), np.zeros(300), rng.normal(size=(300, 3))
    )
    source = replay.from_items(datasets.to_transition(data))
    agent = jax.vmap(create)(jax.random.split(jax.random.PRNGKey(0), 2))
    config = OfflineConfig(
        num_steps=120, updates_per_call=50, eval_interval=100, eval_episodes=1, log_interval=60, seed_batching=seed_batching
    )
    agent, evaluations = train_offline(agent, source, config, [0, 1], tmp_path / "off", make_env=MAKE_ENV, progress=False)
    assert agent.critic.step.tolist() == [120, 120]
    assert sorted({r["step"] for r in evaluations}) == [100, 120]
    logged = [r["step"] for r in read_metrics(tmp_path / "off") if r["phase"] == "offline"]
    assert sorted(set(logged)) == [60, 120]


def test_offline_rate_counts_each_chunk_to_its_end_not_its_dispatch(tmp_path, monkeypatch):
    import time

    import jax.numpy as jnp

    import rl.loops

    @jax.jit
    def slow(matrix):  # a few hundred ms of products, dispatched asynchronously
        return jax.lax.fori_loop(0, 60, lambda _, m: jnp.tanh(m @ m), matrix)

    start = jnp.eye(768) * 0.5
    slow(start).block_until_ready()
    began = time.perf_counter()
    slow(start).block_until_ready()
    chunk_seconds = time.perf_counter() - began

    def slow_updates(count, **_):
        return lambda agent, source, keys: (agent, {"loss": jnp.broadcast_to(slow(start)[0, 0], keys.shape[:1])})

    monkeypatch.setattr(rl.loops, "compile_updates", slow_updates)
    config = OfflineConfig(num_steps=2, updates_per_call=1, eval_interval=2, eval_episodes=1, log_interval=1)
    train_offline({"w": jnp.zeros((1, 3))}, None, config, [0], tmp_path / "off", progress=False)
    rates = [row["steps_per_s"] for row in read_metrics(tmp_path / "off") if row["phase"] == "offline"]
    assert len(rates) == 2 and max(rates) <= 1.2 / chunk_seconds, (rates, chunk_seconds)


def test_nonsensical_schedule_values_are_rejected():
    with pytest.raises(ValueError, match="eval_episodes"):
        OnlineConfig(eval_episodes=0)
    with pytest.raises(ValueError, match="offline_ratio"):
        train_online(create, MAKE_ENV, SCHEDULE, [0], "unused", offline_ratio=1.5)


ORBIT = "o2o/OrbitCorrection-v0"
SHORT_EPISODES = {"max_steps": 12}
DEVICE_SCHEDULE = OnlineConfig(total_steps=300, warmup_steps=60, eval_interval=150, eval_episodes=2, log_interval=50, checkpoint_interval=100)


def run_on_device(run_dir, config=DEVICE_SCHEDULE, **kwargs):
    make_env = env_factory(ORBIT, rescale_actions=True, **SHORT_EPISODES)
    spaces = make_env()
    agent, _ = train_online(
        lambda key: SAC.create(key, spaces.observation_space, spaces.action_space, SMALL),
        make_env,
        config,
        [0, 1],
        run_dir,
        progress=False,
        jax_env=JaxEnvSpec(*make_jax(ORBIT, **SHORT_EPISODES)),
        **kwargs,
    )
    return agent, untimed_metrics(run_dir)


def test_device_envs_resume_exactly_and_log_finished_episodes(tmp_path):
    # Killed at step 230, after the checkpoint at 200 and past an evaluation at 150.
    reference = assert_killed_and_resumed_run_matches(run_on_device, tmp_path, stop_at=230)
    train_rows = [row for row in reference if row["phase"] == "train"]
    # Every 50-step window holds at least four whole 12-step episodes per seed.
    assert len(train_rows) == 2 * 6 and all(np.isfinite(row["episode_return"]) for row in train_rows)
    assert [row["step"] for row in reference if "eval_return" in row] == [150, 150, 300, 300]
    assert all("critic_loss" in row for row in train_rows if row["step"] > DEVICE_SCHEDULE.warmup_steps)


class _BoxCore:
    """Just the spaces of a functional core, for the action-map checks."""

    def observation_space(self, params):
        return gym.spaces.Box(-np.inf, np.inf, (4,))

    def action_space(self, params):
        return gym.spaces.Box(np.array([0.0, -3.0], np.float32), np.array([2.0, 5.0], np.float32))


def test_device_action_map_follows_a_unit_rescale_and_rejects_other_wrappers():
    jax_env = JaxEnvSpec(_BoxCore(), None)
    observations, bounds = jax_env.core.observation_space(None), jax_env.core.action_space(None)
    to_core = device_action_map(jax_env, observations, gym.spaces.Box(-1.0, 1.0, (2,)))
    np.testing.assert_allclose(to_core(np.array([-1.0, 1.0], np.float32)), [0.0, 5.0])
    np.testing.assert_allclose(to_core(np.array([0.0, 0.5], np.float32)), [1.0, 3.0])
    np.testing.assert_allclose(to_core(np.array([-2.0, 7.0], np.float32)), [0.0, 5.0])  # clipped, as RescaleToUnit
    np.testing.assert_array_equal(device_action_map(jax_env, observations, bounds)(np.array([2.0, -3.0])), [2.0, -3.0])
    with pytest.raises(ValueError, match="action space"):
        device_action_map(jax_env, observations, gym.spaces.Box(0.0, 1.0, (2,)))
    with pytest.raises(ValueError, match="observation space"):
        device_action_map(jax_env, gym.spaces.Box(-1.0, 1.0, (3,)), bounds)


def test_on_evaluation_sees_the_agent_at_every_evaluation_step(tmp_path):
    seen = []
    _, rows = run(tmp_path / "run", config=dataclasses.replace(SCHEDULE, eval_at_start=True),
                  on_evaluation=lambda step, agent: seen.append((step, int(agent.critic.step[0]))))
    assert [step for step, _ in seen] == [r["step"] for r in rows if r["phase"] == "eval"] == [0, 250, 500]
    assert [updates for _, updates in seen] == [0, 150, 400]  # the agent as trained up to each step (warm-up 100)
