"""WSRL: presets (spec section 8), parameter shapes (acceptance 8), the warm-up schedule
(acceptance 1-3), offline data never sampled at ratio 0, RLPD interleaving, the collect ->
pretrain -> finetune round trip and the refusal of bad inputs before any training."""

import dataclasses
import json
import math
from pathlib import Path

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents import wsrl
from agents.cql import CQL, CQLConfig, offline_buffer
from agents.sac import SAC
from envs.registry import env_factory
from experiments import offline_to_online as o2o
from rl.checkpoint import Checkpointer, CheckpointMismatch, tree_signature
from rl.data import collect, datasets, replay
from rl.types import transition_like

make_pendulum = env_factory("Pendulum-v1", rescale_actions=True)
PENDULUM = make_pendulum()
OBS, ACT = PENDULUM.observation_space, PENDULUM.action_space
TINY = dict(actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16), num_critics=4, batch_size=8)
MARKER_REWARD = 12345.0


def tiny_cql() -> CQLConfig:
    return CQLConfig(sac=wsrl.wsrl_config(utd_ratio=1, **TINY), num_sampled_actions=3, num_backup_actions=2, calql=True)


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------- presets


def test_wsrl_and_rlpd_original_presets_follow_the_spec_table():
    ws, rl = wsrl.wsrl_config(), wsrl.rlpd_original_config()
    assert (ws.subset_with_replacement, rl.subset_with_replacement) == (True, False)
    assert (ws.actor_objective, rl.actor_objective) == ("min", "mean")
    assert (ws.target_entropy_scale, rl.target_entropy_scale) == (1.0, 0.5)
    assert (ws.backup_entropy, rl.backup_entropy) == (False, True)
    assert not wsrl.rlpd_original_config("antmaze").backup_entropy and not wsrl.rlpd_original_config("adroit").backup_entropy
    assert (ws.actor_on_full_batch, rl.actor_on_full_batch) == (True, False)
    assert (ws.actor_layer_norm, rl.actor_layer_norm) == (True, False)
    assert ws.critic_layer_norm and rl.critic_layer_norm
    assert (ws.utd_ratio * ws.batch_size, ws.utd_ratio) == (1024, 4)
    assert (rl.utd_ratio, rl.batch_size) == (20, 256)
    assert (ws.num_critics, ws.critic_subset_size, rl.num_critics) == (10, 2, 10)
    assert (ws.actor_lr, ws.critic_lr, ws.temperature_lr) == (1e-4, 3e-4, 1e-4)
    assert (rl.actor_lr, rl.critic_lr, rl.temperature_lr) == (3e-4, 3e-4, 3e-4)
    assert math.exp(ws.log_std_min) == pytest.approx(1e-5) and math.exp(ws.log_std_max) == pytest.approx(10.0)
    assert wsrl.rlpd_original_config("antmaze").critic_subset_size == 1
    assert wsrl.rlpd_wsrl_config("antmaze").critic_subset_size == 1
    cql = wsrl.pretrain_config("locomotion")
    assert (cql.cql_alpha, cql.importance_sampling, cql.autotune_alpha, cql.calql) == (5.0, True, False, False)
    assert cql.sac.utd_ratio == 1 and cql.max_target_backup and cql.num_sampled_actions == 10
    antmaze = wsrl.pretrain_config("antmaze")
    assert antmaze.autotune_alpha and antmaze.target_action_gap == 0.8 and antmaze.calql
    assert not wsrl.pretrain_config("kitchen").importance_sampling and wsrl.pretrain_config("adroit").cql_alpha == 1.0
    with pytest.raises(ValueError, match="unknown WSRL domain"):
        wsrl.wsrl_config("atari")


@pytest.mark.parametrize("domain", sorted(wsrl.DOMAINS))
def test_bundled_presets_equal_the_config_builders(domain):
    args = o2o.run_args_from_preset(f"wsrl_{domain}", Path("data.hdf5"))
    settings = wsrl.DOMAINS[domain]
    assert args.pretrain.cql == wsrl.pretrain_config(domain)
    assert (args.pretrain.steps, args.pretrain.reward_scale, args.pretrain.reward_bias) == (
        settings.offline_steps, settings.reward_scale, settings.reward_bias)
    assert args.pretrain.sparse_negative_reward == settings.sparse_negative_reward
    online = o2o.online_sac_config(args.pretrain.cql.sac, args.finetune)
    assert online == wsrl.wsrl_config(domain)
    assert (args.finetune.warmup_steps, args.finetune.offline_data_ratio) == (5000, 0.0)
    quick = o2o.run_args_from_preset("wsrl_pendulum", Path("data.hdf5"))
    assert quick.pretrain.cql == o2o.quickstart_configs(o2o.QuickstartArgs())[0]


def test_target_entropy_is_minus_action_dim_for_wsrl_and_half_for_rlpd():
    halfcheetah_act = gym.spaces.Box(-1, 1, (6,), np.float32)
    obs = gym.spaces.Box(-np.inf, np.inf, (17,), np.float32)
    agent = jax.eval_shape(lambda: SAC.create(jax.random.PRNGKey(0), obs, halfcheetah_act, wsrl.wsrl_config()))
    assert agent.target_entropy() == -6
    rlpd = jax.eval_shape(lambda: SAC.create(jax.random.PRNGKey(0), obs, halfcheetah_act, wsrl.rlpd_original_config()))
    assert rlpd.target_entropy() == -3


@pytest.mark.parametrize(
    "domain, observation_dim, action_dim",
    [("antmaze", 29, 8), ("adroit", 45, 24), ("kitchen", 60, 9), ("locomotion", 17, 6)],
)
def test_pretrained_and_online_parameter_trees_are_identical(domain, observation_dim, action_dim):
    obs = gym.spaces.Box(-np.inf, np.inf, (observation_dim,), np.float32)
    act = gym.spaces.Box(-1, 1, (action_dim,), np.float32)
    online_config = wsrl.wsrl_config(domain)
    pretrained = jax.eval_shape(lambda: CQL.create(jax.random.PRNGKey(0), obs, act, wsrl.pretrain_config(domain)))
    fresh_online = jax.eval_shape(lambda: SAC.create(jax.random.PRNGKey(0), obs, act, online_config))
    assert tree_signature(pretrained.to_online(online_config)) == tree_signature(fresh_online)
    critic_kernel = fresh_online.critic.params["MLP_0"]["Dense_0"]["kernel"]
    assert critic_kernel.shape == (10, observation_dim + action_dim, wsrl.DOMAINS[domain].critic_hidden_dims[0])


@pytest.mark.parametrize("domain, state_dependent", [("antmaze", False), ("adroit", True), ("kitchen", True), ("locomotion", True)])
def test_policy_std_head_follows_the_domain(domain, state_dependent):
    agent = jax.eval_shape(lambda: SAC.create(jax.random.PRNGKey(0), OBS, ACT, wsrl.wsrl_config(domain)))
    has_vector = "log_std" in agent.actor.params
    assert has_vector != state_dependent
    if has_vector:
        assert agent.actor.params["log_std"].shape == (ACT.shape[0],)


def test_online_config_with_another_std_head_is_refused():
    pretrained = jax.eval_shape(lambda: CQL.create(jax.random.PRNGKey(0), OBS, ACT, tiny_cql()))
    other = dataclasses.replace(tiny_cql().sac, state_dependent_std=False)
    with pytest.raises(ValueError, match="state_dependent_std"):
        pretrained.to_online(other)


def test_schedule_first_update_at_5001_with_policy_warmup():
    schedule = wsrl.wsrl_schedule()
    assert schedule.warmup_steps == 5001 and schedule.warmup_actions == "policy" and schedule.updates_per_step == 1
    assert schedule.eval_at_start and schedule.buffer_capacity == 2_000_000
    assert wsrl.first_update_step(100, 1024) == 1025  # min_steps_to_update = batch * (1 - ratio)
    assert wsrl.first_update_step(100, 1024, offline_data_ratio=0.5) == 513
    rlpd = wsrl.rlpd_schedule()
    assert (rlpd.warmup_steps, rlpd.warmup_actions, rlpd.eval_interval) == (5000, "random", 5000)


def test_warmup_actions_are_stochastic_samples_of_the_policy():
    agent = CQL.create(jax.random.PRNGKey(0), OBS, ACT, tiny_cql())
    observation = jnp.ones((1, 3), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(1), 1000)
    samples = jax.vmap(lambda k: agent.act(observation, k))(keys)[:, 0, 0]
    mean, log_std = agent.sac.actor.apply_fn({"params": agent.sac.actor.params}, observation)
    noise = np.random.default_rng(0).normal(size=200_000)
    expected = np.tanh(float(mean[0, 0]) + np.exp(float(log_std[0, 0])) * noise).mean()
    assert float(samples.var()) > 0
    assert abs(float(samples.mean()) - expected) < 4 * float(samples.std()) / np.sqrt(1000)


# ----------------------------------------------------------------------------- warm-up and data use


class Spy(flax.struct.PyTreeNode):
    """Counts update calls and offline rows (marked by their reward) that reach an update, and
    keeps the agent exactly as the first update received it."""

    inner: SAC
    before_first_update: SAC
    updates: jax.Array
    offline_rows: jax.Array

    @property
    def samples_per_update(self) -> int:
        return self.inner.samples_per_update

    def update(self, batch):
        first = self.updates == 0
        snapshot = jax.tree.map(lambda kept, now: jnp.where(first, now, kept), self.before_first_update, self.inner)
        inner, metrics = self.inner.update(batch)
        seen = jnp.sum(batch.rewards == MARKER_REWARD)
        return self.replace(
            inner=inner, before_first_update=snapshot, updates=self.updates + 1, offline_rows=self.offline_rows + seen
        ), metrics

    def act(self, observations, key, deterministic=False):
        return self.inner.act(observations, key, deterministic)


@pytest.fixture(scope="module")
def marked_offline_buffer():
    data = collect.rollout(make_pendulum, collect.random_policy(ACT), 64, seed=5).dataset
    data = dataclasses.replace(data, rewards=np.full_like(data.rewards, MARKER_REWARD))
    return offline_buffer(data, with_mc_returns=False)


def spy_run(monkeypatch, run_dir, total_steps, ratio, offline):
    def spied_warm_start(pretrained, config):
        online = pretrained.to_online(config)
        # Every leaf needs its own buffer: the loop donates the agent.
        return Spy(online, jax.tree.map(jnp.copy, online), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))

    monkeypatch.setattr(wsrl, "warm_start", spied_warm_start)
    pretrained = jax.vmap(lambda k: CQL.create(k, OBS, ACT, tiny_cql()))(jax.random.split(jax.random.PRNGKey(0), 1))
    reference = jax.tree.map(np.array, pretrained)  # host copy: the loop donates the agent's buffers
    online = dataclasses.replace(pretrained.config.sac, utd_ratio=2, actor_on_full_batch=True)
    schedule = wsrl.wsrl_schedule(
        total_steps=total_steps, warmup_steps=10, samples_per_update=16, offline_data_ratio=ratio,
        eval_interval=total_steps, eval_episodes=1,
    )
    agent, _ = wsrl.run_wsrl(
        pretrained, online, make_pendulum, schedule, [0], run_dir, offline_source=offline,
        offline_data_ratio=ratio, progress=False,
    )
    return reference, agent, schedule


def test_warmup_then_one_update_per_step_on_online_data_only(monkeypatch, tmp_path, marked_offline_buffer):
    # K = 10 and 16 samples per update: iterations j = 0..16 make no update (reference rule), then
    # one update block per step at j = 17..21. The offline buffer is offered but ratio 0 never reads it.
    pretrained, agent, schedule = spy_run(monkeypatch, tmp_path, 22, 0.0, marked_offline_buffer)
    assert schedule.warmup_steps == 17 and schedule.warmup_actions == "policy"
    assert int(agent.updates[0]) == 5
    assert int(agent.offline_rows[0]) == 0
    # Nothing changed during the warm-up: params, targets, Adam states and counts, temperature, RNG.
    assert leaves_equal(agent.before_first_update, pretrained.sac)
    assert not leaves_equal(agent.inner.critic.params, pretrained.sac.critic.params)
    buffer = jax.vmap(lambda _: replay.init(transition_like(3, 1), 22))(jnp.arange(1))
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    state, _ = checkpointer.restore({"agent": agent, "buffer": buffer})
    checkpointer.close()
    assert int(state["buffer"].size[0]) == 22  # warm-up transitions stay in the online buffer
    assert not bool(jnp.any(state["buffer"].data.rewards == MARKER_REWARD))
    assert int(marked_offline_buffer.size) == 64


@pytest.mark.slow
def test_the_spy_does_see_offline_rows_when_they_are_mixed_in(monkeypatch, tmp_path, marked_offline_buffer):
    _, mixed, schedule = spy_run(monkeypatch, tmp_path, 14, 0.5, marked_offline_buffer)
    assert schedule.warmup_steps == 11
    assert int(mixed.updates[0]) == 3 and int(mixed.offline_rows[0]) == 3 * 8


def test_restored_checkpoint_is_bit_for_bit(tmp_path):
    saved = jax.vmap(lambda k: CQL.create(k, OBS, ACT, tiny_cql()))(jax.random.split(jax.random.PRNGKey(0), 2))
    # Give every leaf (Adam moments and counts included) a distinctive non-initial value.
    saved = jax.tree.map(lambda leaf: leaf + jnp.asarray(3, leaf.dtype) if leaf.dtype != jnp.uint32 else leaf ^ 7, saved)
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    checkpointer.save(250, {"agent": saved}, {"step": 250, "eval_round": 1})
    checkpointer.close()
    template = wsrl.create_pretrained_template(OBS, ACT, tiny_cql(), 2)
    restored, host = wsrl.restore_pretrained(tmp_path / "checkpoints", template)
    assert host["step"] == 250
    assert leaves_equal(restored, saved)
    assert int(restored.sac.critic.step[0]) == 3 and int(restored.sac.actor.opt_state[0].count[0]) == 3
    assert leaves_equal(wsrl.warm_start(restored, dataclasses.replace(tiny_cql().sac, utd_ratio=4)), restored.sac)


def test_interleaved_batches_alternate_the_two_sources():
    class Recorder(flax.struct.PyTreeNode):
        seen: jax.Array
        samples_per_update: int = flax.struct.field(pytree_node=False, default=8)

        def update(self, batch):
            return self.replace(seen=batch.rewards), {}

    batch = transition_like(1, 1, (8,)).replace(rewards=jnp.array([0, 1, 2, 3, 10, 11, 12, 13], jnp.float32))
    wrapped, _ = wsrl.InterleavedBatches(Recorder(jnp.zeros(8))).update(batch)
    np.testing.assert_array_equal(wrapped.inner.seen, [0, 10, 1, 11, 2, 12, 3, 13])


# ----------------------------------------------------------------------------- round trip and bad inputs


TINY_PRETRAIN = o2o.PretrainSettings(steps=10, cql=tiny_cql(), eval_interval=10, eval_episodes=1, log_interval=5, updates_per_call=5)


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("o2o")
    written = o2o.collect(o2o.CollectArgs(env="Pendulum-v1", out_dir=root / "data", policy="random", steps=300, seed=0))
    run_dir = o2o.pretrain(o2o.PretrainArgs(dataset=written["random"], run_dir=root / "pretrain", pretrain=TINY_PRETRAIN, progress=False))
    return root, written["random"], run_dir


def test_collect_pretrain_round_trip(pretrained_run):
    root, dataset_path, run_dir = pretrained_run
    meta = datasets.load(dataset_path).metadata
    assert meta["env_id"] == "Pendulum-v1" and meta["seed"] == 0 and np.isfinite(meta["behaviour_return"])
    record = json.loads((run_dir / o2o.PRETRAIN_RECORD).read_text())
    assert record["agent"] == "cql" and record["env"] == "Pendulum-v1" and record["offline_steps"] == 10
    assert o2o.apply_overrides(CQLConfig(), record["cql"]) == tiny_cql()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["phase"] == "offline_eval"] == [10]
    agent, _, env_id = o2o.load_pretrained(run_dir)
    assert env_id == "Pendulum-v1" and int(agent.sac.critic.step[0]) == 10


@pytest.mark.slow
def test_finetune_from_the_round_trip_and_collect_with_its_agent(pretrained_run):
    root, _, run_dir = pretrained_run
    settings = o2o.FinetuneSettings(steps=20, warmup_steps=5, utd_ratio=2, batch_size=8, eval_interval=10, eval_episodes=1, log_interval=10)
    finetune_dir = o2o.finetune(o2o.FinetuneArgs(checkpoint=run_dir, run_dir=root / "wsrl", finetune=settings, progress=False))
    evals = [json.loads(line) for line in (finetune_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted({row["step"] for row in evals if row.get("phase") == "eval"}) == [0, 10, 20]
    record = json.loads((finetune_dir / o2o.FINETUNE_RECORD).read_text())
    assert record["online"]["warmup_steps"] == 17 and record["sac"]["utd_ratio"] == 2
    written = o2o.collect(o2o.CollectArgs(env="Pendulum-v1", out_dir=root / "data2", policy="checkpoint", checkpoint=finetune_dir, steps=20, epsilon=0.1))
    assert len(datasets.load(written["checkpoint"])) == 20


def test_dataset_of_another_observation_width_stops_before_training(tmp_path, write_pendulum_hdf5):
    path = write_pendulum_hdf5(tmp_path / "wide.hdf5", np.zeros((20, 4), np.float32), np.zeros(20, np.float32))
    with pytest.raises(datasets.DatasetError, match=r"'observations' have width 4 .* has 3"):
        o2o.pretrain(o2o.PretrainArgs(dataset=path, run_dir=tmp_path / "run", pretrain=TINY_PRETRAIN))
    assert not (tmp_path / "run").exists()


def test_nan_rewards_stop_before_training(tmp_path, write_pendulum_hdf5):
    rewards = np.zeros(20, np.float32)
    rewards[7] = np.nan
    path = write_pendulum_hdf5(tmp_path / "nan.hdf5", np.zeros((20, 3), np.float32), rewards)
    with pytest.raises(datasets.DatasetError, match=r"'rewards' contains 1 NaN"):
        o2o.pretrain(o2o.PretrainArgs(dataset=path, run_dir=tmp_path / "run", pretrain=TINY_PRETRAIN))
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_agent_is_refused(tmp_path):
    sac_run = tmp_path / "sac_run"
    (sac_run / "checkpoints").mkdir(parents=True)
    (sac_run / "config.json").write_text(json.dumps({"config": {"agent": "sac"}}))
    with pytest.raises(o2o.ConfigError, match="not a pretraining run"):
        o2o.finetune(o2o.FinetuneArgs(checkpoint=sac_run, run_dir=tmp_path / "wsrl"))
    assert not (tmp_path / "wsrl").exists()


def test_checkpoint_of_another_network_shape_is_refused(pretrained_run, tmp_path):
    _, _, run_dir = pretrained_run
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "checkpoints").symlink_to(run_dir / "checkpoints")
    record = json.loads((run_dir / o2o.PRETRAIN_RECORD).read_text())
    record["cql"]["sac"]["critic_hidden_dims"] = [32, 32]
    (edited / o2o.PRETRAIN_RECORD).write_text(json.dumps(record))
    with pytest.raises(CheckpointMismatch, match=r"\.sac\.critic\..* has shape \[.*16.*\] in the checkpoint but \[.*32.*\] here"):
        o2o.finetune(o2o.FinetuneArgs(checkpoint=edited, run_dir=tmp_path / "wsrl"))
    assert not (tmp_path / "wsrl").exists()


def test_environment_of_another_observation_width_is_refused(pretrained_run, tmp_path):
    _, _, run_dir = pretrained_run
    with pytest.raises(o2o.ConfigError, match="observation width 2 but the pretrained agent expects 3"):
        o2o.finetune(o2o.FinetuneArgs(checkpoint=run_dir, env="MountainCarContinuous-v0", run_dir=tmp_path / "wsrl"))
