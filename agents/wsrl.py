"""WSRL warm-start fine-tuning and the RLPD baseline, as configurations of the ensemble SAC.

WSRL (spec ``wsrl.md``, section 1): restore the whole pretrained CQL / Cal-QL agent (weights,
target weights, Adam states and counts, temperature, RNG), run its frozen stochastic policy for
K = 5,000 steps into an empty online buffer with no updates, then train a non-conservative SAC
(10-critic REDQ ensemble, critic UTD 4) on online data only. Here that is
:meth:`agents.cql.CQL.to_online` followed by :func:`rl.loops.train_online` with
``initial_agent`` and ``OnlineConfig(warmup_actions="policy")``.

RLPD: no pretraining; every update batch is half offline data, half online (``offline_ratio``
0.5), LayerNorm critics, high UTD. Two variants (spec section 6): :func:`rlpd_original_config`
(ikostrikov/rlpd: UTD 20, mean-Q actor, rows interleaved so every critic minibatch is 50/50, see
:class:`InterleavedBatches`) and :func:`rlpd_wsrl_config` (the WSRL repository's "RLPD": the
``wsrl`` SAC with offline data concatenated into the batch).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from agents.cql import CQL, CQLConfig
from agents.sac import SAC, SACConfig
from rl.checkpoint import Checkpointer
from rl.data import replay
from rl.loops import OnlineConfig, train_online
from rl.types import Batch

Domain = Literal["locomotion", "antmaze", "adroit", "kitchen"]


@dataclasses.dataclass(frozen=True)
class DomainSettings:
    """Per-domain settings of the WSRL reference (spec tables 2, 4.6 and 5.5)."""

    critic_hidden_dims: tuple[int, ...]
    """Hidden widths of each critic."""
    actor_hidden_dims: tuple[int, ...]
    """Hidden widths of the policy."""
    state_dependent_std: bool
    """``exp`` std head (True) or one learned log-std vector (``uniform``, False)."""
    final_hidden_scale: float
    """Gain multiplier of the last hidden layer (kernel_scale_final; 1.0 = none)."""
    offline_steps: int
    """Offline gradient steps of pre-training."""
    reward_scale: float
    """Reward multiplier applied to the dataset and the training env."""
    reward_bias: float
    """Reward offset applied after scaling."""
    calql: bool
    """Cal-QL (True) or plain CQL pre-training."""
    cql_alpha: float
    """Fixed conservative weight (unused when autotuned)."""
    autotune_alpha: bool
    """Lagrange-tuned conservative weight."""
    target_action_gap: float
    """Gap target of the tuned weight."""
    importance_sampling: bool
    """Importance-sampled log-sum-exp (False: 31 values, log 31 subtracted)."""
    sparse_negative_reward: float | None
    """Scaled failure reward whose all-failure episodes get r/(1-gamma) as MC return."""
    max_target_backup_online: bool
    """Max-target backup in the online SAC too (antmaze); our SAC has none, see the report."""


DOMAINS: dict[str, DomainSettings] = {
    "antmaze": DomainSettings((256,) * 4, (256, 256), False, 1e-2, 1_000_000, 10.0, -5.0, True, 5.0, True, 0.8, True, -5.0, True),
    "adroit": DomainSettings((512,) * 3, (512, 512), True, 1e-2, 20_000, 10.0, 5.0, True, 1.0, False, 1.0, True, -5.0, False),
    "kitchen": DomainSettings((512,) * 3, (512,) * 3, True, 1.0, 250_000, 1.0, -4.0, True, 5.0, False, 1.0, False, None, False),
    "locomotion": DomainSettings((256, 256), (256, 256), True, 1e-2, 250_000, 1.0, 0.0, False, 5.0, False, 1.0, True, None, False),
}

# WSRL clips the policy's std to [1e-5, 10].
WSRL_LOG_STD_MIN, WSRL_LOG_STD_MAX = math.log(1e-5), math.log(10.0)


def _domain(name: str) -> DomainSettings:
    if name not in DOMAINS:
        raise ValueError(f"unknown WSRL domain '{name}'; choose from {sorted(DOMAINS)}")
    return DOMAINS[name]


def wsrl_config(domain: Domain = "locomotion", **overrides: Any) -> SACConfig:
    """The ``wsrl`` preset (spec sections 4 and 8): the online SAC of WSRL for ``domain``.

    10 critics with LayerNorm in actor and critic, target min over 2 drawn with replacement, actor
    on the min over all critics and the full 4x256 batch, no backup entropy, H = -|A|,
    lr 1e-4 / 3e-4 / 1e-4, critic UTD 4. ``overrides`` replace any field.
    """
    settings = _domain(domain)
    config = SACConfig(
        actor_hidden_dims=settings.actor_hidden_dims,
        critic_hidden_dims=settings.critic_hidden_dims,
        num_critics=10,
        critic_subset_size=2,
        subset_with_replacement=True,
        critic_layer_norm=True,
        actor_layer_norm=True,
        orthogonal_init=True,
        final_hidden_scale=settings.final_hidden_scale,
        actor_objective="min",
        backup_entropy=False,
        target_entropy_scale=1.0,
        init_temperature=1.0,
        actor_lr=1e-4,
        critic_lr=3e-4,
        temperature_lr=1e-4,
        discount=0.99,
        tau=0.005,
        batch_size=256,
        utd_ratio=4,
        actor_on_full_batch=True,
        log_std_min=WSRL_LOG_STD_MIN,
        log_std_max=WSRL_LOG_STD_MAX,
        state_dependent_std=settings.state_dependent_std,
    )
    return dataclasses.replace(config, **overrides)


def pretrain_config(domain: Domain = "locomotion", **overrides: Any) -> CQLConfig:
    """CQL / Cal-QL pre-training for ``domain`` (spec sections 2 and 5): the ``wsrl`` networks at
    UTD 1, max-target backup, and the domain's conservative weight, gap and importance sampling.
    ``overrides`` replace CQLConfig fields."""
    settings = _domain(domain)
    config = CQLConfig(
        sac=wsrl_config(domain, utd_ratio=1),
        cql_alpha=settings.cql_alpha,
        importance_sampling=settings.importance_sampling,
        autotune_alpha=settings.autotune_alpha,
        target_action_gap=settings.target_action_gap,
        calql=settings.calql,
        max_target_backup=True,
    )
    return dataclasses.replace(config, **overrides)


def rlpd_original_config(domain: Domain = "locomotion", **overrides: Any) -> SACConfig:
    """The ``rlpd_original`` preset (ikostrikov/rlpd; spec 6.1 and 8): 10 LayerNorm critics, target
    min over 2 drawn without replacement (1 on antmaze), actor on the mean Q and the last 256
    minibatch, backup entropy (off on antmaze/adroit), H = -|A|/2, lr 3e-4, UTD 20.

    The reference initialises with xavier-uniform; SACConfig offers LeCun-normal, used here.
    """
    hidden = (256, 256, 256) if domain in ("antmaze", "adroit") else (256, 256)
    _domain(domain)
    config = SACConfig(
        actor_hidden_dims=hidden,
        critic_hidden_dims=hidden,
        num_critics=10,
        critic_subset_size=1 if domain == "antmaze" else 2,
        subset_with_replacement=False,
        critic_layer_norm=True,
        actor_layer_norm=False,
        orthogonal_init=False,
        actor_objective="mean",
        backup_entropy=domain not in ("antmaze", "adroit"),
        target_entropy_scale=0.5,
        init_temperature=1.0,
        actor_lr=3e-4,
        critic_lr=3e-4,
        temperature_lr=3e-4,
        batch_size=256,
        utd_ratio=20,
        actor_on_full_batch=False,
    )
    return dataclasses.replace(config, **overrides)


def rlpd_wsrl_config(domain: Domain = "locomotion", **overrides: Any) -> SACConfig:
    """The WSRL repository's "RLPD" (spec 6.2): the ``wsrl`` SAC, trained from scratch with
    offline data ratio 0.5 (antmaze: target subset of 1)."""
    extra = {"critic_subset_size": 1} if domain == "antmaze" else {}
    return wsrl_config(domain, **{**extra, **overrides})


def first_update_step(warmup_steps: int, samples_per_update: int, offline_data_ratio: float = 0.0) -> int:
    """Index j of the first online iteration that updates, as in the WSRL reference:
    updates happen iff ``j > max(warmup_steps, samples_per_update * (1 - offline_data_ratio))``."""
    return max(warmup_steps, int(samples_per_update * (1.0 - offline_data_ratio))) + 1


def wsrl_schedule(
    total_steps: int = 500_000,
    warmup_steps: int = 5_000,
    samples_per_update: int = 1024,
    offline_data_ratio: float = 0.0,
    eval_interval: int = 20_000,
    eval_episodes: int = 20,
    log_interval: int = 1_000,
    checkpoint_interval: int = 0,
) -> OnlineConfig:
    """The online schedule of WSRL (spec 3.2): ``warmup_steps`` + 1 steps of the restored policy's
    stochastic actions into an empty buffer (iterations j = 0..K make no update; the first update
    runs at j = K + 1), then one update block (UTD critic steps + actor + temperature) per step;
    evaluation before the first step (the offline score) and every ``eval_interval`` steps."""
    return OnlineConfig(
        total_steps=total_steps,
        warmup_steps=first_update_step(warmup_steps, samples_per_update, offline_data_ratio),
        warmup_actions="policy",
        updates_per_step=1,
        buffer_capacity=2_000_000,
        eval_interval=eval_interval,
        eval_episodes=eval_episodes,
        eval_at_start=True,
        log_interval=log_interval,
        checkpoint_interval=checkpoint_interval,
    )


def rlpd_schedule(
    total_steps: int = 250_000,
    start_training: int = 5_000,
    eval_interval: int = 5_000,
    eval_episodes: int = 10,
    log_interval: int = 1_000,
    checkpoint_interval: int = 0,
) -> OnlineConfig:
    """The original RLPD schedule (spec 6.1): ``start_training`` uniform random steps without
    updates, then one UTD-20 update per step; 10 evaluation episodes every 5,000 steps."""
    return OnlineConfig(
        total_steps=total_steps,
        warmup_steps=start_training,
        warmup_actions="random",
        updates_per_step=1,
        buffer_capacity=1_000_000,
        eval_interval=eval_interval,
        eval_episodes=eval_episodes,
        log_interval=log_interval,
        checkpoint_interval=checkpoint_interval,
    )


# ----------------------------------------------------------------------------- restore


def create_pretrained_template(
    observation_space: gym.Space, action_space: gym.Space, config: CQLConfig, num_seeds: int
) -> CQL:
    """A seed-stacked CQL agent with the structure a pre-training checkpoint holds."""
    keys = jax.random.split(jax.random.PRNGKey(0), num_seeds)
    return jax.vmap(lambda key: CQL.create(key, observation_space, action_space, config))(keys)


def restore_pretrained(checkpoint_dir: str | Path, template: CQL, step: int | None = None) -> tuple[CQL, dict[str, Any]]:
    """The whole pretrained agent from an ``rl.loops.train_offline`` checkpoint directory.

    Every parameter path and shape is checked against ``template`` first; a checkpoint of another
    agent or network shape raises :class:`rl.checkpoint.CheckpointMismatch` naming the first
    differing parameter. Returns the agent and the checkpoint's host record (step etc.).
    """
    checkpointer = Checkpointer(checkpoint_dir)
    try:
        state, host = checkpointer.restore({"agent": template}, step, what=f"pretrained checkpoint {checkpoint_dir}")
    finally:
        checkpointer.close()
    return state["agent"], host


def warm_start(pretrained: CQL, online_config: SACConfig) -> SAC:
    """WSRL's initialisation: the pretrained SAC whole (params, targets, optimiser states and
    counts, temperature, RNG key), now updated with the non-conservative online ``online_config``.
    Works on seed-stacked agents."""
    return pretrained.to_online(online_config)


# ----------------------------------------------------------------------------- runs


class InterleavedBatches(flax.struct.PyTreeNode):
    """An agent whose update batches alternate rows from two sources (RLPD's interleaving).

    The loop draws ``[source A rows | source B rows]`` in equal halves; this wrapper reorders them
    to A0, B0, A1, B1, ... so every contiguous critic minibatch holds both sources equally.
    """

    inner: Any

    @property
    def samples_per_update(self) -> int:
        """Transitions per update (the inner agent's)."""
        return self.inner.samples_per_update

    @property
    def config(self) -> Any:
        """The inner agent's config."""
        return self.inner.config

    def update(self, batch: Batch) -> tuple["InterleavedBatches", dict[str, jax.Array]]:
        """Interleave the two halves of ``batch``, then update the inner agent."""
        half = self.samples_per_update // 2

        def interleave(x: jax.Array) -> jax.Array:
            return jnp.stack([x[:half], x[half:]], axis=1).reshape(x.shape)

        inner, metrics = self.inner.update(jax.tree.map(interleave, batch))
        return self.replace(inner=inner), metrics

    def act(self, observations: jax.Array, key: jax.Array, deterministic: bool = False) -> jax.Array:
        """The inner agent's action."""
        return self.inner.act(observations, key, deterministic)


def _no_fresh_agent(key: jax.Array) -> Any:
    raise RuntimeError("fine-tuning starts from the pretrained agent; no fresh agent is created")


def run_wsrl(
    pretrained: CQL,
    online_config: SACConfig,
    make_env: Callable[[], gym.Env],
    schedule: OnlineConfig,
    seeds: Sequence[int],
    run_dir: str | Path,
    offline_source: replay.ReplayBuffer | None = None,
    offline_data_ratio: float = 0.0,
    **loop_kwargs: Any,
) -> tuple[SAC, list[dict[str, Any]]]:
    """Fine-tune the seed-stacked ``pretrained`` agent online with WSRL; returns the agent and the
    evaluation rows. With the default ``offline_data_ratio`` 0 the offline data is never sampled.
    ``loop_kwargs`` go to :func:`rl.loops.train_online` (run_config, resume, progress, score_fn).
    The loop donates the agent's buffers: ``pretrained`` is not usable after the call."""
    seed_axis = int(np.shape(jax.tree.leaves(pretrained)[0])[0])
    if seed_axis != len(seeds):
        raise ValueError(f"the pretrained agent holds {seed_axis} seeds but {len(seeds)} seeds were given")
    agent = warm_start(pretrained, online_config)
    return train_online(
        _no_fresh_agent,
        make_env,
        schedule,
        seeds,
        run_dir,
        initial_agent=agent,
        offline_source=offline_source if offline_data_ratio > 0 else None,
        offline_ratio=offline_data_ratio,
        **loop_kwargs,
    )


def run_rlpd(
    observation_space: gym.Space,
    action_space: gym.Space,
    config: SACConfig,
    make_env: Callable[[], gym.Env],
    schedule: OnlineConfig,
    seeds: Sequence[int],
    run_dir: str | Path,
    offline_source: replay.ReplayBuffer,
    interleave: bool = True,
    offline_data_ratio: float = 0.5,
    **loop_kwargs: Any,
) -> tuple[Any, list[dict[str, Any]]]:
    """RLPD from scratch: a fresh agent, ``offline_data_ratio`` of every batch from the dataset
    buffer ``offline_source`` (a plain :class:`rl.types.Transition` buffer). ``interleave``
    alternates offline and online rows (original RLPD, ratio 0.5 only); otherwise the rows are
    concatenated, online first (the WSRL repository's RLPD)."""
    if interleave and (offline_data_ratio != 0.5 or config.utd_ratio * config.batch_size % 2):
        raise ValueError("interleaved RLPD batches need offline_data_ratio 0.5 and an even batch")

    def create(key: jax.Array) -> Any:
        agent = SAC.create(key, observation_space, action_space, config)
        return InterleavedBatches(agent) if interleave else agent

    return train_online(
        create, make_env, schedule, seeds, run_dir, offline_source=offline_source, offline_ratio=offline_data_ratio, **loop_kwargs
    )
