"""SAC: the agent contract (pure, jittable, vmappable), its options and its update schedule."""

import os
import subprocess
import sys
import textwrap

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.sac import SAC, SACConfig
from rl.data import replay
from rl.types import Transition
from rl.update import LOOP_FROM_SEEDS, compile_updates, over_seeds, scan_updates, stack_seeds, unstack_seed

OBS = gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)
ACT = gym.spaces.Box(-1, 1, (2,), np.float32)
SMALL = dict(actor_hidden_dims=(32, 32), critic_hidden_dims=(32, 32), batch_size=16)


def random_batch(count: int, seed: int = 0) -> Transition:
    rng = np.random.default_rng(seed)
    return Transition(
        observations=jnp.asarray(rng.normal(size=(count, 5)), jnp.float32),
        actions=jnp.asarray(rng.uniform(-1, 1, (count, 2)), jnp.float32),
        rewards=jnp.asarray(rng.normal(size=count), jnp.float32),
        next_observations=jnp.asarray(rng.normal(size=(count, 5)), jnp.float32),
        terminated=jnp.asarray(rng.random(count) < 0.2),
        truncated=jnp.zeros(count, bool),
    )


def make(seed: int = 0, **overrides) -> SAC:
    return SAC.create(jax.random.PRNGKey(seed), OBS, ACT, SACConfig(**{**SMALL, **overrides}))


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_update_is_pure_and_deterministic():
    agent = make()
    batch = random_batch(16)
    first, metrics = jax.jit(SAC.update)(agent, batch)
    second, _ = jax.jit(SAC.update)(agent, batch)
    assert leaves_equal(first, second)
    assert not leaves_equal(first.critic.params, agent.critic.params)
    assert set(metrics) >= {"critic_loss", "actor_loss", "temperature", "entropy", "q_mean"}
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_vmapped_seeds_match_separate_updates():
    agents = [make(seed) for seed in range(3)]
    batch = random_batch(16)
    stacked, _ = jax.jit(jax.vmap(SAC.update, in_axes=(0, None)))(stack_seeds(agents), batch)
    for index, agent in enumerate(agents):
        alone, _ = jax.jit(SAC.update)(agent, batch)
        for x, y in zip(jax.tree.leaves(unstack_seed(stacked, index)), jax.tree.leaves(alone)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_utd_ratio_runs_that_many_critic_steps_and_one_actor_step():
    agent = make(utd_ratio=4)
    assert agent.samples_per_update == 64
    updated, _ = jax.jit(SAC.update)(agent, random_batch(64))
    assert int(updated.critic.step) == 4
    assert int(updated.actor.step) == 1 and int(updated.temperature.step) == 1


def test_a_restored_agent_reuses_the_compiled_update():
    update = jax.jit(lambda agent, batch: agent.update(batch))  # its own compilation cache
    agent, _ = update(make(), random_batch(16))
    # a checkpoint restores every leaf as a strongly typed array: the step counters must already be
    restored = jax.tree.map(lambda leaf: jnp.asarray(np.asarray(leaf)), agent)
    update(restored, random_batch(16))
    assert update._cache_size() == 1
    assert agent.critic.step.dtype == jnp.int32 and not agent.critic.step.weak_type


def test_target_critics_move_by_polyak_averaging():
    agent = make(tau=0.5)
    updated, _ = jax.jit(SAC.update)(agent, random_batch(16))
    old_target = jax.tree.leaves(agent.target_critic_params)[0]
    new_online = jax.tree.leaves(updated.critic.params)[0]
    new_target = jax.tree.leaves(updated.target_critic_params)[0]
    np.testing.assert_allclose(new_target, 0.5 * old_target + 0.5 * new_online, rtol=1e-5, atol=1e-6)


def test_entropy_backup_switch_changes_the_critic_target():
    batch = random_batch(16)
    with_entropy, _ = jax.jit(SAC.update)(make(backup_entropy=True), batch)
    without, _ = jax.jit(SAC.update)(make(backup_entropy=False), batch)
    assert not leaves_equal(with_entropy.critic.params, without.critic.params)


def test_terminated_transitions_do_not_bootstrap():
    agent = make(discount=0.99)
    batch = random_batch(16).replace(terminated=jnp.ones(16, bool))
    # With every transition terminal, the target is the reward alone: the loss is independent of
    # the target critics, so scrambling them changes nothing.
    scrambled = agent.replace(target_critic_params=jax.tree.map(lambda x: x + 10.0, agent.target_critic_params))
    _, a = jax.jit(agent.update_critic)(batch, jax.random.PRNGKey(0))
    _, b = jax.jit(scrambled.update_critic)(batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(a["critic_loss"], b["critic_loss"], rtol=1e-6)


def test_act_is_bounded_and_deterministic_mode_is_tanh_mean():
    agent = make()
    observations = jnp.asarray(np.random.default_rng(0).normal(size=(64, 5)), jnp.float32)
    sampled = agent.act(observations, jax.random.PRNGKey(0))
    assert sampled.shape == (64, 2) and float(jnp.abs(sampled).max()) <= 1.0
    deterministic = agent.act(observations, jax.random.PRNGKey(1), deterministic=True)
    again = agent.act(observations, jax.random.PRNGKey(2), deterministic=True)
    np.testing.assert_array_equal(deterministic, again)
    mean, _ = agent.actor.apply_fn({"params": agent.actor.params}, observations)
    np.testing.assert_allclose(deterministic, jnp.tanh(mean), rtol=1e-6)


def test_default_target_entropy_is_minus_action_dim():
    assert make().target_entropy() == -2.0
    assert make(target_entropy_scale=0.5).target_entropy() == -1.0
    assert make(target_entropy=-7.0).target_entropy() == -7.0


def test_ten_critic_ensemble_with_layer_norm_has_the_expected_shapes():
    agent = make(num_critics=10, critic_subset_size=2, subset_with_replacement=True, critic_layer_norm=True)
    kernel = agent.critic.params["MLP_0"]["Dense_0"]["kernel"]
    assert kernel.shape == (10, 7, 32)
    updated, metrics = jax.jit(SAC.update)(agent, random_batch(16))
    assert np.isfinite(float(metrics["critic_loss"]))


@pytest.mark.parametrize("field, value", [("num_critics", 0), ("tau", 0.0), ("utd_ratio", 0), ("critic_subset_size", 3)])
def test_nonsensical_config_values_are_rejected_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        SACConfig(**{field: value})


def test_discrete_action_space_is_rejected():
    with pytest.raises(ValueError, match="Box action space"):
        SAC.create(jax.random.PRNGKey(0), OBS, gym.spaces.Discrete(3), SACConfig())


def test_scanned_updates_equal_sequential_updates():
    agent = make()
    buffer = replay.from_items(random_batch(200))
    key = jax.random.PRNGKey(3)
    scanned, _ = jax.jit(lambda a: scan_updates(a, buffer, key, 3))(agent)
    sequential = agent
    for step_key in jax.random.split(key, 3):
        sequential, _ = jax.jit(SAC.update)(sequential, replay.sample(buffer, step_key, 16))
    for x, y in zip(jax.tree.leaves(scanned), jax.tree.leaves(sequential)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_compiled_updates_vmap_over_seeds_and_donate_the_agent():
    agents = stack_seeds([make(seed) for seed in range(2)])
    buffers = stack_seeds([replay.from_items(random_batch(100, seed)) for seed in range(2)])
    run = compile_updates(5, seed_axis=True)
    updated, metrics = run(agents, buffers, jax.random.split(jax.random.PRNGKey(0), 2))
    assert metrics["critic_loss"].shape == (2,)
    assert updated.critic.step.tolist() == [5, 5]
    assert jax.tree.leaves(agents)[0].is_deleted()


def test_one_seed_runs_unbatched_with_the_seed_axis_kept_on_every_output():
    agents = stack_seeds([make(0)])
    buffers = stack_seeds([replay.from_items(random_batch(100, 0))])
    keys = jax.random.split(jax.random.PRNGKey(0), 1)
    run = compile_updates(5, seed_axis=True)
    traced_inside = []

    def probe(x):
        traced_inside.append(isinstance(x, jax.core.Tracer))
        return x * 2

    assert over_seeds(probe, (0,))(np.ones((1, 3))).shape == (1, 3)
    assert traced_inside == [False]  # one seed: fn called on the unbatched array, no vmap, no loop
    vmapped = jax.jit(jax.vmap(lambda a, b, k: scan_updates(a, b, k, 5)))(agents, buffers, keys)
    updated, metrics = run(agents, buffers, keys)
    assert metrics["critic_loss"].shape == (1,) and updated.critic.step.tolist() == [5]
    for x, y in zip(jax.tree.leaves((updated, metrics)), jax.tree.leaves(vmapped)):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def _primitives(fn, *args) -> set[str]:
    return {equation.primitive.name for equation in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


def test_many_seeds_run_in_a_loop_on_the_cpu_few_batched_and_either_when_asked():
    few, many = np.ones((3, 4), np.float32), np.ones((LOOP_FROM_SEEDS, 4), np.float32)
    shared = np.arange(4, dtype=np.float32)

    def fn(x, y):
        return {"sum": x + y, "total": (x * y).sum()}

    assert jax.default_backend() == "cpu"
    assert "scan" in _primitives(over_seeds(fn, (0, None)), many, shared)
    assert "scan" not in _primitives(over_seeds(fn, (0, None)), few, shared)
    assert "scan" in _primitives(over_seeds(fn, (0, None), batching="loop"), few, shared)
    assert "scan" not in _primitives(over_seeds(fn, (0, None), batching="vmap"), many, shared)
    for batching in ("auto", "loop", "vmap"):
        for stacked in (few, many):
            out = over_seeds(fn, (0, None), batching=batching)(stacked, shared)
            np.testing.assert_array_equal(out["sum"], stacked + shared)
            np.testing.assert_array_equal(out["total"], np.full(len(stacked), 6.0))
    with pytest.raises(ValueError, match="seed count"):
        over_seeds(fn, (0, 0))(few, np.ones((2, 4)))
    with pytest.raises(ValueError, match="batching"):
        over_seeds(fn, (0, None), batching="pmap")(few, shared)


def test_looped_seeds_give_the_updates_of_vmapped_seeds():
    agents = stack_seeds([make(seed) for seed in range(3)])
    buffers = stack_seeds([replay.from_items(random_batch(100, seed)) for seed in range(3)])
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    looped = compile_updates(5, seed_axis=True, seed_batching="loop")(jax.tree.map(jnp.copy, agents), buffers, keys)
    batched = compile_updates(5, seed_axis=True, seed_batching="vmap")(agents, buffers, keys)
    for x, y in zip(jax.tree.leaves(looped), jax.tree.leaves(batched)):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


REPEATED_CREATION = textwrap.dedent("""
    import gymnasium as gym, jax, numpy as np
    from agents.sac import SAC, SACConfig
    observations, actions = gym.spaces.Box(-np.inf, np.inf, (11,), np.float32), gym.spaces.Box(-1, 1, (3,), np.float32)
    config = SACConfig(actor_hidden_dims=(128, 128), critic_hidden_dims=(128, 128), num_critics=5, orthogonal_init=True)
    create = jax.jit(jax.vmap(lambda key: SAC.create(key, observations, actions, config)))
    for index in range(1000):
        jax.block_until_ready(create(jax.random.split(jax.random.PRNGKey(index), 3)))
""")


@pytest.mark.slow
def test_seed_vmapped_orthogonal_agents_are_created_a_thousand_times_without_hanging():
    """With batched LAPACK QRs, this loop hung on a 2-core CPU after 20-400 creations in each of
    several runs (see ``rl.nets.qr_one_matrix_at_a_time``); it takes about 15 s."""
    subprocess.run([sys.executable, "-c", REPEATED_CREATION], check=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
