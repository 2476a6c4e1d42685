"""LOOP: leave-one-out PPO without a value network (specs/loop.md), on episodic gymnasium and
JAX-native environments.

Each iteration the on-policy loop draws ``num_groups`` tasks (reset seeds) and runs
``group_size`` = K episodes per task from the identical seeded start (one episode per env). The
update then

1. sums each episode's rewards to its return R_i (undiscounted, up to termination or truncation);
2. forms the leave-one-out advantage A_i = R_i − mean_{j≠i, same group} R_j (``jax.ops.segment_sum``
   over group ids), optionally divided by a global running scale σ_A (bias-corrected EMA of the
   advantages' second moment; no per-group std unless ``adv_norm="group_std"``);
3. drops episodes with |A_i| below ``abs_adv_threshold`` (the loss divisor stays the minibatch size);
4. runs ``update_epochs`` passes, each shuffling the kept episodes across groups into minibatches of
   ``minibatch_size`` episodes, with the per-step PPO-clipped surrogate, per-episode mean (or sum)
   over valid steps, then a sum over episodes divided by the constant minibatch size;
5. aborts the remaining minibatches of the iteration once a minibatch's k1 KL exceeds
   ``high_kl_threshold``.

Behaviour log-probabilities are the numbers stored at collection time. The whole update is one
``lax.scan`` (epochs × minibatches) inside one jitted call; on JAX-native envs the collection joins
it (``rl.rollouts``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState

from agents.ppo import RunningMoments, StochasticPolicy, make_policy, select_tree
from rl.rollouts import CollectionSpec, Rollout
from rl.update import train_state


@dataclasses.dataclass(frozen=True)
class LOOPConfig:
    """Hyperparameters of LOOP; defaults follow specs/loop.md (paper / official code)."""

    group_size: int = 6
    """Rollouts per task K (>= 2): the leave-one-out baseline uses the other K − 1."""
    num_groups: int = 8
    """Tasks (reset seeds) per iteration M; an iteration holds M * K episodes."""
    update_epochs: int = 2
    """Passes over each iteration's kept episodes."""
    minibatch_size: int = 32
    """Episodes per minibatch B_mb; also the constant loss divisor."""
    learning_rate: float = 3e-4
    """Adam learning rate."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    clip_eps: float = 0.1
    """Ratio clip epsilon."""
    clip_mode: Literal["symmetric", "loop_code"] = "symmetric"
    """Ratio band [1 − ε, 1 + ε], or LOOP code's [1/(1 + ε), 1 + ε]."""
    episode_reduction: Literal["mean", "sum"] = "mean"
    """Per-episode mean over its valid steps (LOOP) or sum."""
    baseline: Literal["loo", "lno", "time_loo"] = "loo"
    """Leave-one-out mean (LOOP), group mean including i (LNO), or time-indexed leave-one-out."""
    adv_norm: Literal["global_std", "group_std", "none"] = "global_std"
    """Divide advantages by a global running std (σ_A), by each group's return std, or not at all."""
    scale_decay: float = 0.99
    """EMA decay of the global advantage scale σ_A."""
    abs_adv_threshold: float = 0.01
    """Drop episodes whose scaled |A_i| is below this (not applied with baseline='time_loo')."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient (LOOP uses none)."""
    high_kl_threshold: float | None = 20.0
    """Abort the iteration's remaining minibatches when a minibatch's k1 KL exceeds this (None: never)."""
    normalize_observations: bool = False
    """Standardise observations with running statistics (updated after each update)."""
    clip_observations: float = 10.0
    """Clip of normalised observations."""
    hidden_dims: tuple[int, ...] = (64, 64)
    """Hidden widths of the policy network."""
    activation: Literal["tanh", "relu"] = "tanh"
    """Hidden activation."""
    continuous_distribution: Literal["clipped", "tanh"] = "clipped"
    """Gaussian clipped to the bounds on the env side, or tanh-squashed Gaussian."""
    init_log_std: float = 0.0
    """Initial log standard deviation of continuous policies."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"LOOPConfig.group_size must be >= 2 (the leave-one-out baseline needs K-1 >= 1), got {self.group_size}")
        checks = {
            "num_groups": self.num_groups >= 1,
            "update_epochs": self.update_epochs >= 1,
            "minibatch_size": self.minibatch_size >= 1,
            "learning_rate": self.learning_rate > 0,
            "max_grad_norm": self.max_grad_norm > 0,
            "clip_eps": self.clip_eps > 0 and (self.clip_mode == "loop_code" or self.clip_eps < 1),
            "scale_decay": 0.0 <= self.scale_decay < 1.0,
            "abs_adv_threshold": self.abs_adv_threshold >= 0,
            "ent_coef": self.ent_coef >= 0,
            "high_kl_threshold": self.high_kl_threshold is None or self.high_kl_threshold > 0,
        }
        for name, valid in checks.items():
            if not valid:
                raise ValueError(f"LOOPConfig.{name}={getattr(self, name)!r} is out of range")

    @property
    def num_episodes(self) -> int:
        """Episodes per iteration M * K."""
        return self.num_groups * self.group_size

    @property
    def num_minibatches(self) -> int:
        """Minibatches per epoch (the last is padded with zero-weight slots)."""
        return math.ceil(self.num_episodes / self.minibatch_size)


# ----------------------------------------------------------------------------- advantages


def group_ids(num_episodes: int, group_size: int) -> jax.Array:
    """Group index of every episode in the contiguous layout [g0]*K + [g1]*K + ..."""
    if group_size < 2:
        raise ValueError(f"leave-one-out advantages need group_size >= 2, got {group_size}")
    if num_episodes % group_size:
        raise ValueError(f"{num_episodes} episodes do not split into groups of {group_size}")
    return jnp.arange(num_episodes) // group_size


def episode_returns(rewards: jax.Array, valid: jax.Array) -> jax.Array:
    """Undiscounted return of each episode ``[N]`` from padded rewards ``[N, T]``."""
    return jnp.where(valid, rewards, 0.0).sum(axis=1)


def leave_one_out_advantages(returns: jax.Array, group_size: int, baseline: Literal["loo", "lno"] = "loo") -> jax.Array:
    """A_i = R_i − (G_g − R_i)/(K − 1) (``loo``) or R_i − G_g/K (``lno``), G_g the group's sum."""
    ids = group_ids(returns.shape[0], group_size)
    num_groups = returns.shape[0] // group_size
    group_sums = jax.ops.segment_sum(returns, ids, num_segments=num_groups)[ids]
    if baseline == "lno":
        return returns - group_sums / group_size
    return returns - (group_sums - returns) / (group_size - 1)


def group_return_std(returns: jax.Array, group_size: int) -> jax.Array:
    """Population std of each episode's group returns, broadcast to episodes ``[N]``."""
    grouped = returns.reshape(-1, group_size)
    return jnp.repeat(grouped.std(axis=1), group_size)


def time_indexed_advantages(rewards: jax.Array, valid: jax.Array, group_size: int) -> jax.Array:
    """A_t^i = G_t^i − mean_{j≠i} G_t^j with reward-to-go G_t (0 after an episode ended), ``[N, T]``."""
    rewards = jnp.where(valid, rewards, 0.0)
    to_go = jnp.flip(jnp.cumsum(jnp.flip(rewards, axis=1), axis=1), axis=1)
    grouped = to_go.reshape(-1, group_size, to_go.shape[1])
    others = (grouped.sum(axis=1, keepdims=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(to_go.shape)


# ----------------------------------------------------------------------------- loss


def ratio_bounds(clip_eps: float, clip_mode: Literal["symmetric", "loop_code"]) -> tuple[float, float]:
    """Lower and upper ratio clip bounds of the chosen mode."""
    if clip_mode == "loop_code":
        return 1.0 / (1.0 + clip_eps), 1.0 + clip_eps
    return 1.0 - clip_eps, 1.0 + clip_eps


def clipped_surrogate(ratio: jax.Array, advantages: jax.Array, low: float, high: float) -> jax.Array:
    """min(ρ·A, clip(ρ, low, high)·A) per step."""
    return jnp.minimum(ratio * advantages, jnp.clip(ratio, low, high) * advantages)


def loop_loss(
    log_probs: jax.Array,
    old_log_probs: jax.Array,
    advantages: jax.Array,
    valid: jax.Array,
    episode_weights: jax.Array,
    low: float,
    high: float,
    reduction: Literal["mean", "sum"],
    minibatch_size: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """LOOP minibatch loss −Σ_i w_i · reduce_t min(ρ_t A_t, clip(ρ_t) A_t) / B_mb on ``[B, T]`` arrays.

    ``episode_weights`` is 1 for kept episodes and 0 for filtered or padding slots. Masking uses
    ``jnp.where`` so padded steps contribute nothing even if their log-probabilities are not finite.
    Also returns the minibatch's k1 KL (mean over kept episodes of Σ_t (log π_old − log π)) and the
    clipped fraction of its valid steps.
    """
    steps = jnp.logical_and(valid, episode_weights[:, None] > 0)
    log_ratio = jnp.where(steps, log_probs - old_log_probs, 0.0)
    ratio = jnp.exp(log_ratio)
    surrogate = jnp.where(steps, clipped_surrogate(ratio, advantages, low, high), 0.0)
    per_episode = surrogate.sum(axis=1)
    if reduction == "mean":
        per_episode = per_episode / jnp.maximum(valid.sum(axis=1), 1)
    loss = -(episode_weights * per_episode).sum() / minibatch_size
    kept = jnp.maximum(episode_weights.sum(), 1e-8)
    clipped = jnp.logical_and(steps, jnp.logical_or(ratio < low, ratio > high))
    aux = {
        "k1_kl": (episode_weights * (-log_ratio).sum(axis=1)).sum() / kept,
        "clip_fraction": clipped.sum() / jnp.maximum(steps.sum(), 1),
    }
    return loss, aux


@functools.lru_cache(maxsize=None)
def _optimizer(learning_rate: float, max_grad_norm: float) -> optax.GradientTransformation:
    """One optimiser object per setting (a static part of the agent's pytree structure, so that
    jitted functions are reused across runs with equal configs)."""
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(learning_rate))


# ----------------------------------------------------------------------------- agent


class LOOP(flax.struct.PyTreeNode):
    """LOOP agent state: the policy's train state, observation statistics, the EMA of the
    advantages' second moment (σ_A) and an RNG key. No value network."""

    state: TrainState
    observation_moments: RunningMoments
    advantage_second_moment: jax.Array
    scale_updates: jax.Array
    rng: jax.Array
    policy: StochasticPolicy = flax.struct.field(pytree_node=False)
    config: LOOPConfig = flax.struct.field(pytree_node=False)

    @property
    def collection(self) -> CollectionSpec:
        """What the on-policy loop collects: K seeded episodes for each of M tasks."""
        config = self.config
        return CollectionSpec(mode="groups", num_envs=config.num_episodes, group_size=config.group_size)

    @classmethod
    def create(cls, key: jax.Array, observation_space: gym.Space, action_space: gym.Space, config: LOOPConfig) -> "LOOP":
        """Initialise the policy and optimiser for the given spaces."""
        policy = make_policy(
            observation_space, action_space, config.hidden_dims, config.activation, config.continuous_distribution, config.init_log_std
        )
        observation_dim = int(observation_space.shape[0])
        init_key, rng = jax.random.split(key)
        params = policy.net.init(init_key, jnp.zeros((1, observation_dim), jnp.float32))["params"]
        return cls(
            state=train_state(params, _optimizer(config.learning_rate, config.max_grad_norm)),
            observation_moments=RunningMoments.create((observation_dim,)),
            advantage_second_moment=jnp.zeros((), jnp.float32),
            scale_updates=jnp.zeros((), jnp.int32),
            rng=rng,
            policy=policy,
            config=config,
        )

    # ------------------------------------------------------------------ pieces

    def normalize(self, observations: jax.Array) -> jax.Array:
        """Observations as the policy sees them."""
        observations = observations.astype(jnp.float32)
        if not self.config.normalize_observations:
            return observations
        return self.observation_moments.normalize(observations, self.config.clip_observations)

    def advantages(self, rollout: Rollout) -> tuple["LOOP", jax.Array, jax.Array, jax.Array]:
        """Per-step advantages ``[N, T]``, the kept-episode mask ``[N]`` and σ_A; updates the EMA."""
        config = self.config
        returns = episode_returns(rollout.rewards, rollout.valid)
        if config.baseline == "time_loo":
            advantages = time_indexed_advantages(rollout.rewards, rollout.valid, config.group_size)
            second_moment = jnp.where(rollout.valid, advantages**2, 0.0).sum() / jnp.maximum(rollout.valid.sum(), 1)
        else:
            advantages = leave_one_out_advantages(returns, config.group_size, config.baseline)
            if config.adv_norm == "group_std":
                advantages = advantages / jnp.maximum(group_return_std(returns, config.group_size), 1e-7)
            second_moment = jnp.mean(advantages**2)
        agent, scale = self, jnp.ones((), jnp.float32)
        if config.adv_norm == "global_std":
            ema = config.scale_decay * self.advantage_second_moment + (1.0 - config.scale_decay) * second_moment
            updates = self.scale_updates + 1
            corrected = ema / (1.0 - config.scale_decay ** updates.astype(jnp.float32))
            scale = jnp.maximum(jnp.sqrt(corrected), 1e-8)
            advantages = advantages / scale
            agent = self.replace(advantage_second_moment=ema, scale_updates=updates)
        if config.baseline == "time_loo":
            keep = rollout.valid.any(axis=1)
            step_advantages = advantages
        else:
            keep = jnp.abs(advantages) >= config.abs_adv_threshold
            step_advantages = jnp.broadcast_to(advantages[:, None], rollout.rewards.shape)
        return agent, step_advantages, keep, scale

    def minibatch_loss(self, params, minibatch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """LOOP loss (plus entropy bonus) of one minibatch of padded episodes."""
        config = self.config
        low, high = ratio_bounds(config.clip_eps, config.clip_mode)
        observations, valid = minibatch["observations"], minibatch["valid"]
        dist = self.policy.distribution(params, observations)
        log_probs = dist.log_prob(minibatch["actions"])
        loss, aux = loop_loss(
            log_probs,
            minibatch["log_probs"],
            minibatch["advantages"],
            valid,
            minibatch["weights"],
            low,
            high,
            config.episode_reduction,
            config.minibatch_size,
        )
        steps = jnp.logical_and(valid, minibatch["weights"][:, None] > 0)
        entropy = jnp.where(steps, self.policy.entropy(params, observations), 0.0).sum() / jnp.maximum(steps.sum(), 1)
        aux["entropy"] = entropy
        return loss - config.ent_coef * entropy, aux

    # ------------------------------------------------------------------ contract

    def update(self, rollout: Rollout) -> tuple["LOOP", dict[str, jax.Array]]:
        """Advantages, filtering, then ``update_epochs`` × minibatch steps in one ``lax.scan``."""
        config = self.config
        num_episodes = rollout.rewards.shape[0]
        if num_episodes != config.num_episodes:
            raise ValueError(f"LOOP expects {config.num_episodes} episodes per update, got {num_episodes}")
        agent, step_advantages, keep, scale = self.advantages(rollout)
        episodes = {
            "observations": agent.normalize(rollout.observations),
            "actions": rollout.actions,
            "log_probs": rollout.log_probs,
            "advantages": step_advantages,
            "valid": rollout.valid,
        }
        slots = config.num_minibatches * config.minibatch_size
        padding = slots - num_episodes

        def epoch(carry, key):
            # Kept episodes first, in random order across groups; filtered ones and padding slots
            # follow with weight 0, so trailing minibatches may hold no kept episode at all.
            priority = jax.random.uniform(key, (num_episodes,)) + jnp.where(keep, 0.0, 2.0)
            ranked = jnp.argsort(priority)
            order = jnp.concatenate([ranked, jnp.zeros((padding,), ranked.dtype)])
            weights = jnp.concatenate([keep[ranked], jnp.zeros((padding,), bool)]).astype(jnp.float32)
            order = order.reshape(config.num_minibatches, config.minibatch_size)
            weights = weights.reshape(config.num_minibatches, config.minibatch_size)
            return jax.lax.scan(minibatch_step, carry, (order, weights))

        def minibatch_step(carry, slot):
            state, stopped = carry
            indices, weights = slot
            # Gathered per step, so only one minibatch is ever copied out of the batch.
            minibatch = {**jax.tree.map(lambda x: x[indices], episodes), "weights": weights}
            (loss, aux), grads = jax.value_and_grad(agent.minibatch_loss, has_aux=True)(state.params, minibatch)
            too_far = jnp.asarray(False) if config.high_kl_threshold is None else aux["k1_kl"] > config.high_kl_threshold
            stopped = jnp.logical_or(stopped, too_far)
            applied = jnp.logical_and(~stopped, minibatch["weights"].sum() > 0)
            state = select_tree(applied, state.apply_gradients(grads=grads), state)
            metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "applied": applied.astype(jnp.float32), **aux}
            return (state, stopped), metrics

        rng, epoch_key = jax.random.split(agent.rng)
        (state, stopped), metrics = jax.lax.scan(
            epoch, (agent.state, jnp.asarray(False)), jax.random.split(epoch_key, config.update_epochs)
        )
        applied = metrics.pop("applied")
        weight = jnp.maximum(applied.sum(), 1.0)
        summary = {name: (values * applied).sum() / weight for name, values in metrics.items()}
        summary.update(
            {
                "minibatch_updates": applied.sum(),
                "kl_stopped": stopped.astype(jnp.float32),
                "filtered_fraction": 1.0 - keep.mean(),
                "advantage_scale": scale,
                "mean_return": episode_returns(rollout.rewards, rollout.valid).mean(),
                "mean_episode_length": rollout.valid.sum(axis=1).mean(),
            }
        )
        moments = agent.observation_moments
        if config.normalize_observations:
            obs_dim = rollout.observations.shape[-1]
            moments = moments.update(rollout.observations.reshape(-1, obs_dim).astype(jnp.float32), rollout.valid.reshape(-1))
        return agent.replace(state=state, observation_moments=moments, rng=rng), summary

    def explore(self, observations: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """A stored action and its behaviour log-probability (the on-policy loop's sampling call)."""
        return self.policy.sample(self.state.params, self.normalize(observations), key)

    def act(self, observations: jax.Array, key: jax.Array, deterministic: bool = False) -> jax.Array:
        """Env-ready actions: the mode when deterministic, else a (clipped) policy sample."""
        normalized = self.normalize(observations)
        if deterministic:
            return self.policy.mode(self.state.params, normalized)
        actions, _ = self.policy.sample(self.state.params, normalized, key)
        return self.policy.to_env(actions)
