"""Conservative Q-learning (CQL) and calibrated CQL (Cal-QL) on top of the ensemble SAC.

A :class:`CQL` agent is a :class:`agents.sac.SAC` plus the state only offline training needs (the
Lagrange multiplier of the auto-tuned conservative weight). Its critic step is SAC's TD regression
with a max-target backup, plus the conservative term of the WSRL specification (section 5):

- per state, Q of 10 uniform random actions, 10 policy actions at s and 10 policy actions sampled
  at s' (all evaluated at s), for an independent subset of the critic ensemble;
- with importance sampling the log-sum-exp runs over those 30 values minus their log-densities
  (the dataset action is excluded); without it over the 30 raw values plus the dataset action's
  Q, minus log(31);
- ``diff = T * logsumexp(z / T) - Q(s, a_data)``, weighted by a fixed alpha or by an auto-tuned
  Lagrange multiplier;
- Cal-QL clamps the policy-action Q values from below by the Monte-Carlo return-to-go of the
  transition (the batch carries ``mc_returns``; see :class:`CalQLTransition`).

Because the wrapped SAC has exactly the networks, optimiser states and temperature the online SAC
uses, :meth:`CQL.to_online` hands them over unchanged (WSRL's warm start).
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from agents.sac import SAC, SACConfig
from rl.data import datasets, replay
from rl.nets import StateActionValue
from rl.types import Batch, Transition
from rl.update import train_state

DATASET_ACTION_LIMIT = 1.0 - 1e-5
"""Dataset actions are clipped to +-this, so that tanh-policy log-densities stay finite."""


@dataclasses.dataclass(frozen=True)
class CQLConfig:
    """Hyperparameters of CQL / Cal-QL. Defaults are the WSRL code's CQL defaults (spec section 5.1)."""

    sac: SACConfig = SACConfig(
        num_critics=10,
        critic_subset_size=2,
        subset_with_replacement=True,
        critic_layer_norm=True,
        actor_layer_norm=True,
        orthogonal_init=True,
        final_hidden_scale=1e-2,
        backup_entropy=False,
        actor_lr=1e-4,
        critic_lr=3e-4,
        temperature_lr=1e-4,
        batch_size=256,
        utd_ratio=1,
        actor_on_full_batch=True,
        log_std_min=math.log(1e-5),
        log_std_max=math.log(10.0),
    )
    """The SAC underneath (networks, optimisers, temperature); its shapes are what fine-tuning inherits."""
    num_sampled_actions: int = 10
    """Actions per state of each kind (random, policy at s, policy at s') in the conservative term."""
    cql_alpha: float = 5.0
    """Fixed weight of the conservative term (unused when autotune_alpha)."""
    importance_sampling: bool = True
    """Subtract the sampling log-densities inside the log-sum-exp and leave out the dataset action."""
    cql_temperature: float = 1.0
    """Temperature T of the log-sum-exp."""
    diff_clip_min: float = -math.inf
    """Lower clip of the per-sample conservative gap (fixed-weight branch)."""
    diff_clip_max: float = math.inf
    """Upper clip of the per-sample conservative gap (fixed-weight branch)."""
    autotune_alpha: bool = False
    """Weight the gap by a Lagrange multiplier that grows while the gap exceeds target_action_gap."""
    target_action_gap: float = 1.0
    """Target of the mean conservative gap when autotune_alpha (antmaze: 0.8)."""
    multiplier_init: float = 1.0
    """Initial value of the softplus-parameterised Lagrange multiplier."""
    multiplier_lr: float = 3e-4
    """Adam learning rate of the Lagrange multiplier."""
    max_target_backup: bool = True
    """TD target = max over num_backup_actions next actions of the subset-min target Q."""
    num_backup_actions: int = 10
    """Next actions sampled for the max-target backup."""
    calql: bool = False
    """Cal-QL: lower-bound the policy-action Q values by the Monte-Carlo return (needs mc_returns)."""
    calql_bound_random_actions: bool = False
    """Also lower-bound the random-action Q values (off in WSRL and Cal-QL)."""
    simultaneous_update: bool = True
    """Actor and temperature step from the pre-update critic (one joint step, as the reference
    offline trainer does) instead of from the critic after its step."""

    def __post_init__(self) -> None:
        checks = {
            "num_sampled_actions": self.num_sampled_actions >= 1,
            "cql_alpha": self.cql_alpha >= 0,
            "cql_temperature": self.cql_temperature > 0,
            "diff_clip_max": self.diff_clip_max > self.diff_clip_min,
            "multiplier_init": self.multiplier_init > 0,
            "num_backup_actions": self.num_backup_actions >= 1,
        }
        for name, valid in checks.items():
            if not valid:
                raise ValueError(f"CQLConfig.{name}={getattr(self, name)!r} is out of range")


@flax.struct.dataclass
class CalQLTransition(Transition):
    """A :class:`Transition` with the Monte-Carlo return-to-go of each step (Cal-QL's bound)."""

    mc_returns: jax.Array


# ----------------------------------------------------------------------------- pure pieces


def conservative_gap(
    q_data: jax.Array,
    q_random: jax.Array,
    q_policy: jax.Array,
    log_prob_policy: jax.Array,
    q_next_policy: jax.Array,
    log_prob_next_policy: jax.Array,
    action_dim: int,
    importance_sampling: bool = True,
    temperature: float = 1.0,
    mc_returns: jax.Array | None = None,
    bound_random_actions: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """CQL's gap ``T * logsumexp(z / T) - Q(s, a_data)`` per critic and state.

    Shapes: ``q_data`` (critics, batch); ``q_random``, ``q_policy``, ``q_next_policy``
    (critics, batch, n); the log-probabilities (batch, n). Random actions are uniform on
    [-1, 1]^action_dim (density 0.5^action_dim). With ``mc_returns`` (batch,) the policy-action
    values (and the random ones if ``bound_random_actions``) are first clamped from below by the
    return (Cal-QL). Returns ``(gap, ood_values, bound_rate)``; ``bound_rate`` is the fraction of
    the bounded values that the clamp raised (0 without ``mc_returns``).
    """
    bound_rate = jnp.zeros((), jnp.float32)
    if mc_returns is not None:
        lower = mc_returns[None, :, None]
        bounded = [q_policy, q_next_policy] + ([q_random] if bound_random_actions else [])
        bound_rate = jnp.mean(jnp.concatenate([(q < lower).reshape(-1) for q in bounded]).astype(jnp.float32))
        q_policy = jnp.maximum(q_policy, lower)
        q_next_policy = jnp.maximum(q_next_policy, lower)
        if bound_random_actions:
            q_random = jnp.maximum(q_random, lower)
    if importance_sampling:
        random_log_density = action_dim * math.log(0.5)
        values = jnp.concatenate(
            [q_random - random_log_density, q_policy - log_prob_policy[None], q_next_policy - log_prob_next_policy[None]],
            axis=-1,
        )
        ood = temperature * jax.nn.logsumexp(values / temperature, axis=-1)
    else:
        values = jnp.concatenate([q_random, q_policy, q_next_policy, q_data[..., None]], axis=-1)
        ood = temperature * jax.nn.logsumexp(values / temperature, axis=-1) - temperature * math.log(values.shape[-1])
    return ood - q_data, ood, bound_rate


def draw_members(key: jax.Array, ensemble_size: int, subset_size: int, with_replacement: bool) -> jax.Array | None:
    """Indices of an ensemble subset (REDQ), or None when the subset is the whole ensemble."""
    if with_replacement:
        return jax.random.randint(key, (subset_size,), 0, ensemble_size)
    if subset_size >= ensemble_size:
        return None
    return jax.random.permutation(key, ensemble_size)[:subset_size]


def sparse_aware_monte_carlo_returns(
    dataset: datasets.OfflineDataset,
    discount: float,
    sparse_negative_reward: float | None = None,
) -> np.ndarray:
    """Monte-Carlo return-to-go of every transition (spec section 5.4).

    Episodes end at terminated / truncated steps and at observation discontinuities
    (:func:`rl.data.datasets.episode_ends`); within an episode the return is the finite-horizon
    discounted sum (terminated steps do not bootstrap, truncated tails count as zero). With
    ``sparse_negative_reward`` (the scaled failure reward, e.g. -5 on antmaze), an episode whose
    every reward equals it gets ``r_neg / (1 - discount)`` at every step: the infinite-horizon value
    of never succeeding.
    """
    returns = datasets.dataset_monte_carlo_returns(dataset, discount)
    if sparse_negative_reward is None:
        return returns
    ends = np.flatnonzero(datasets.episode_ends(dataset))
    starts = np.concatenate([[0], ends[:-1] + 1])
    all_failure = np.array(
        [np.all(np.isclose(dataset.rewards[a : b + 1], sparse_negative_reward)) for a, b in zip(starts, ends)]
    )
    lengths = ends - starts + 1
    failed_rows = np.repeat(all_failure, lengths)
    returns = returns.copy()
    returns[failed_rows] = sparse_negative_reward / (1.0 - discount)
    return returns


def transform_rewards(dataset: datasets.OfflineDataset, scale: float, bias: float) -> datasets.OfflineDataset:
    """The dataset with rewards ``r * scale + bias`` (apply once, and the same to the training env)."""
    if scale == 1.0 and bias == 0.0:
        return dataset
    return dataclasses.replace(dataset, rewards=(dataset.rewards * scale + bias).astype(np.float32))


def offline_buffer(
    dataset: datasets.OfflineDataset,
    discount: float = 0.99,
    with_mc_returns: bool = True,
    sparse_negative_reward: float | None = None,
) -> replay.ReplayBuffer:
    """The dataset as a device replay buffer for offline training.

    Actions are clipped to +-(1 - 1e-5). With ``with_mc_returns`` items are
    :class:`CalQLTransition` (what Cal-QL needs; plain CQL ignores the field), else plain
    :class:`rl.types.Transition` (what the online loop's mixing with an online buffer needs).
    """
    datasets.validate(dataset)
    transition = datasets.to_transition(dataset)
    transition = transition.replace(actions=jnp.clip(transition.actions, -DATASET_ACTION_LIMIT, DATASET_ACTION_LIMIT))
    if with_mc_returns:
        mc_returns = sparse_aware_monte_carlo_returns(dataset, discount, sparse_negative_reward)
        transition = CalQLTransition(**{f.name: getattr(transition, f.name) for f in dataclasses.fields(transition)},
                                     mc_returns=jnp.asarray(mc_returns, jnp.float32))
    return replay.from_items(transition)


# Fields of SACConfig that decide what the networks compute from restored parameters; the others
# (initialisation, learning rates, schedule) may differ between pre-training and fine-tuning.
ARCHITECTURE_FIELDS = (
    "actor_hidden_dims",
    "critic_hidden_dims",
    "num_critics",
    "critic_layer_norm",
    "actor_layer_norm",
    "log_std_min",
    "log_std_max",
    "state_dependent_std",
)


def check_same_architecture(pretrained: SACConfig, online: SACConfig) -> None:
    """Raise ValueError naming the first network setting that differs between the two configs."""
    for name in ARCHITECTURE_FIELDS:
        before, after = getattr(pretrained, name), getattr(online, name)
        if tuple(np.atleast_1d(before)) != tuple(np.atleast_1d(after)):
            raise ValueError(
                f"network mismatch: the pretrained agent has {name}={before!r} but the online config has {after!r}"
            )


def _softplus_inverse(value: float) -> float:
    return float(np.log(np.expm1(value)))


# ----------------------------------------------------------------------------- agent


class CQL(flax.struct.PyTreeNode):
    """CQL / Cal-QL agent: a SAC and the conservative weight's Lagrange multiplier."""

    sac: SAC
    multiplier: TrainState
    config: CQLConfig = flax.struct.field(pytree_node=False)

    @property
    def samples_per_update(self) -> int:
        """How many transitions one ``update`` call consumes."""
        return self.sac.samples_per_update

    @classmethod
    def create(
        cls, key: jax.Array, observation_space: gym.Space, action_space: gym.Space, config: CQLConfig
    ) -> "CQL":
        """Initialise the SAC networks and the multiplier (softplus^-1 of ``multiplier_init``)."""
        sac = SAC.create(key, observation_space, action_space, config.sac)
        raw = jnp.asarray(_softplus_inverse(config.multiplier_init), jnp.float32)
        multiplier = train_state({"raw": raw}, optax.adam(config.multiplier_lr))
        return cls(sac=sac, multiplier=multiplier, config=config)

    def cql_multiplier(self) -> jax.Array:
        """Current Lagrange multiplier (softplus, so >= 0)."""
        return jax.nn.softplus(self.multiplier.params["raw"])

    def _single_critic(self) -> StateActionValue:
        sac_config = self.config.sac
        return StateActionValue(sac_config.critic_hidden_dims, layer_norm=sac_config.critic_layer_norm)

    def _subset_q(self, params, members: jax.Array | None, observations: jax.Array, actions: jax.Array) -> jax.Array:
        """Q of the ensemble members ``members`` (all when None), leading axis = member."""
        if members is None:
            return self.sac.q_values(params, observations, actions)
        subset = jax.tree.map(lambda leaf: leaf[members], params)
        single = self._single_critic()
        return jax.vmap(lambda p: single.apply({"params": p}, observations, actions))(subset)

    def _members(self, key: jax.Array) -> jax.Array | None:
        sac_config = self.config.sac
        return draw_members(key, sac_config.num_critics, sac_config.critic_subset_size, sac_config.subset_with_replacement)

    def td_target(self, batch: Batch, key: jax.Array) -> jax.Array:
        """r + gamma * mask * (max over sampled next actions of the subset-min target Q)."""
        config, sac = self.config, self.sac
        action_key, subset_key = jax.random.split(key)
        count = config.num_backup_actions if config.max_target_backup else 1
        next_actions, next_log_probs = sac.policy(sac.actor.params, batch.next_observations).sample_and_log_prob(
            seed=action_key, sample_shape=(count,)
        )  # (count, batch, A), (count, batch)
        next_observations = jnp.broadcast_to(batch.next_observations, (count, *batch.next_observations.shape))
        members = self._members(subset_key)
        next_q = self._subset_q(sac.target_critic_params, members, next_observations, next_actions).min(axis=0)
        best = jnp.argmax(next_q, axis=0)
        next_q = jnp.take_along_axis(next_q, best[None], axis=0)[0]
        if config.sac.backup_entropy:
            next_q = next_q - sac.alpha() * jnp.take_along_axis(next_log_probs, best[None], axis=0)[0]
        target = batch.rewards + config.sac.discount * batch.bootstrap_mask() * next_q
        return jax.lax.stop_gradient(target)

    def update_critic(self, batch: Batch, key: jax.Array) -> tuple["CQL", dict[str, jax.Array]]:
        """One critic step on TD + conservative loss, a Polyak target step and a multiplier step."""
        config, sac = self.config, self.sac
        if config.calql and not hasattr(batch, "mc_returns"):
            raise ValueError(
                "Cal-QL needs batches with 'mc_returns': build the buffer with agents.cql.offline_buffer(..., with_mc_returns=True)"
            )
        target_key, subset_key, random_key, policy_key, next_policy_key = jax.random.split(key, 5)
        target = self.td_target(batch, target_key)
        observations = batch.observations
        batch_size, action_dim = batch.actions.shape
        count = config.num_sampled_actions

        random_actions = jax.random.uniform(random_key, (batch_size, count, action_dim), minval=-1.0, maxval=1.0)
        policy_actions, policy_log_probs = sac.policy(sac.actor.params, observations).sample_and_log_prob(
            seed=policy_key, sample_shape=(count,)
        )
        next_actions, next_log_probs = sac.policy(sac.actor.params, batch.next_observations).sample_and_log_prob(
            seed=next_policy_key, sample_shape=(count,)
        )
        # (count, batch, ...) -> (batch, count, ...); the sampled actions carry no actor gradient.
        sampled = jax.lax.stop_gradient(
            jnp.concatenate([random_actions, policy_actions.swapaxes(0, 1), next_actions.swapaxes(0, 1)], axis=1)
        )
        policy_log_probs = jax.lax.stop_gradient(policy_log_probs.T)
        next_log_probs = jax.lax.stop_gradient(next_log_probs.T)
        repeated_observations = jnp.broadcast_to(observations[:, None], (batch_size, 3 * count, observations.shape[-1]))
        members = self._members(subset_key)
        multiplier = self.cql_multiplier()
        mc_returns = batch.mc_returns if config.calql else None

        def loss_fn(params):
            q_data_all = sac.q_values(params, observations, batch.actions)
            td_loss = ((q_data_all - target) ** 2).mean()
            q_data = q_data_all if members is None else q_data_all[members]
            q_sampled = self._subset_q(params, members, repeated_observations, sampled)
            gap, ood, bound_rate = conservative_gap(
                q_data,
                q_sampled[..., :count],
                q_sampled[..., count : 2 * count],
                policy_log_probs,
                q_sampled[..., 2 * count :],
                next_log_probs,
                action_dim,
                config.importance_sampling,
                config.cql_temperature,
                mc_returns,
                config.calql_bound_random_actions,
            )
            if config.autotune_alpha:
                cql_loss = multiplier * (gap - config.target_action_gap).mean()
            else:
                cql_loss = config.cql_alpha * jnp.clip(gap, config.diff_clip_min, config.diff_clip_max).mean()
            aux = {
                "td_loss": td_loss,
                "cql_loss": cql_loss,
                "cql_gap": gap.mean(),
                "cql_ood_values": ood.mean(),
                "q_data": q_data_all.mean(),
                "calql_bound_rate": bound_rate,
            }
            return td_loss + cql_loss, aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(sac.critic.params)
        critic = sac.critic.apply_gradients(grads=grads)
        target_params = optax.incremental_update(critic.params, sac.target_critic_params, config.sac.tau)
        gap_excess = jax.lax.stop_gradient(aux["cql_gap"] - config.target_action_gap)

        def multiplier_loss_fn(params):
            return -jax.nn.softplus(params["raw"]) * gap_excess

        new_multiplier = self.multiplier
        if config.autotune_alpha:
            multiplier_grads = jax.grad(multiplier_loss_fn)(self.multiplier.params)
            new_multiplier = self.multiplier.apply_gradients(grads=multiplier_grads)
        metrics = {"critic_loss": loss, "cql_multiplier": multiplier, **aux}
        if not config.calql:
            metrics.pop("calql_bound_rate")
        return (
            self.replace(sac=sac.replace(critic=critic, target_critic_params=target_params), multiplier=new_multiplier),
            metrics,
        )

    # ------------------------------------------------------------------ contract

    def update(self, batch: Batch) -> tuple["CQL", dict[str, jax.Array]]:
        """``utd_ratio`` conservative critic steps on consecutive slices, then one actor and
        temperature step (from the pre-update parameters when ``simultaneous_update``)."""
        sac_config = self.config.sac
        rng, critic_key, actor_key = jax.random.split(self.sac.rng, 3)
        slices = jax.tree.map(lambda x: x.reshape(sac_config.utd_ratio, sac_config.batch_size, *x.shape[1:]), batch)

        def critic_step(agent, inputs):
            minibatch, key = inputs
            return agent.update_critic(minibatch, key)

        agent, critic_metrics = jax.lax.scan(critic_step, self, (slices, jax.random.split(critic_key, sac_config.utd_ratio)))
        actor_batch = batch if sac_config.actor_on_full_batch else jax.tree.map(lambda x: x[-1], slices)
        actor_source = self.sac if self.config.simultaneous_update else agent.sac
        stepped, actor_metrics = actor_source.update_actor(actor_batch, actor_key)
        sac = agent.sac.replace(actor=stepped.actor, temperature=stepped.temperature, rng=rng)
        metrics = {**jax.tree.map(lambda m: m[-1], critic_metrics), **actor_metrics}
        return agent.replace(sac=sac), metrics

    def act(self, observations: jax.Array, key: jax.Array, deterministic: bool = False) -> jax.Array:
        """The SAC policy's action (tanh(mean) when deterministic)."""
        return self.sac.act(observations, key, deterministic)

    def to_online(self, online_config: SACConfig) -> SAC:
        """The pretrained SAC (params, target params, Adam states and counts, temperature, RNG) under
        the online config; optimisers get the online learning rates, their states carry over.

        Raises ValueError if ``online_config`` describes networks of another shape.
        """
        check_same_architecture(self.config.sac, online_config)
        sac = self.sac
        return sac.replace(
            actor=sac.actor.replace(tx=optax.adam(online_config.actor_lr)),
            critic=sac.critic.replace(tx=optax.adam(online_config.critic_lr)),
            temperature=sac.temperature.replace(tx=optax.adam(online_config.temperature_lr)),
            config=online_config,
        )
