"""Soft actor-critic with a Q-ensemble (SAC, REDQ-style subsets, RLPD / WSRL options).

The agent follows the contract of DESIGN.md: a pytree of train states, target parameters and an
RNG key, with a frozen config as a static field; ``create`` / ``update`` / ``act`` are pure.

One ``update(batch)`` call does ``utd_ratio`` critic steps on consecutive ``batch_size`` slices of
``batch`` (a ``lax.scan``), then one actor and one temperature step on the full batch or its last
slice. ``batch`` therefore holds ``samples_per_update = utd_ratio * batch_size`` transitions.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import flax.linen as nn
import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from rl.distributions import tanh_gaussian, tanh_gaussian_mode
from rl.nets import GaussianPolicyHead, StateActionValue, ensemble, subset_min
from rl.types import Batch
from rl.update import train_state


@dataclasses.dataclass(frozen=True)
class SACConfig:
    """Hyperparameters of SAC. Defaults are the standard SAC of Haarnoja et al. (2018) / SB3."""

    actor_hidden_dims: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the policy network."""
    critic_hidden_dims: tuple[int, ...] = (256, 256)
    """Hidden layer widths of each Q network."""
    num_critics: int = 2
    """Number of Q networks in the ensemble (2 for SAC, 10 for REDQ/WSRL)."""
    critic_subset_size: int = 2
    """How many critics enter the minimum of the TD target (REDQ's M)."""
    subset_with_replacement: bool = False
    """Draw the target subset with replacement (WSRL) or without (REDQ/RLPD)."""
    critic_layer_norm: bool = False
    """LayerNorm after every hidden layer of the critics (RLPD/WSRL use it)."""
    actor_layer_norm: bool = False
    """LayerNorm after every hidden layer of the policy."""
    orthogonal_init: bool = False
    """Orthogonal(sqrt 2) kernels (jaxrl/WSRL) instead of LeCun normal (SB3/SBX)."""
    final_hidden_scale: float = 1.0
    """Initialisation gain multiplier of the last hidden layer (WSRL's kernel_scale_final)."""
    actor_objective: Literal["min", "mean"] = "min"
    """Ensemble reduction of Q in the actor loss: min over all critics, or their mean (RLPD)."""
    backup_entropy: bool = True
    """Subtract alpha * log pi(a'|s') in the TD target."""
    target_entropy: float | None = None
    """Entropy target of the temperature; None means -target_entropy_scale * action_dim."""
    target_entropy_scale: float = 1.0
    """Scale of the default target entropy (0.5 gives RLPD's -|A|/2)."""
    init_temperature: float = 1.0
    """Initial entropy temperature alpha."""
    actor_lr: float = 3e-4
    """Adam learning rate of the policy."""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics."""
    temperature_lr: float = 3e-4
    """Adam learning rate of log(alpha)."""
    discount: float = 0.99
    """Discount factor gamma."""
    tau: float = 0.005
    """Polyak rate of the target critics, applied after every critic step."""
    batch_size: int = 256
    """Transitions per critic step."""
    utd_ratio: int = 1
    """Critic steps per update call (update-to-data ratio when called once per env step)."""
    actor_on_full_batch: bool = False
    """Actor/temperature step on all utd_ratio*batch_size samples (WSRL) or on the last slice."""
    log_std_min: float = -20.0
    """Lower clip of the policy's log standard deviation."""
    log_std_max: float = 2.0
    """Upper clip of the policy's log standard deviation."""
    state_dependent_std: bool = True
    """Log-std from a head on the state (SAC) or one learned vector (WSRL's ``uniform`` std)."""

    def __post_init__(self) -> None:
        checks = {
            "num_critics": self.num_critics >= 1,
            "critic_subset_size": 1 <= self.critic_subset_size
            and (self.subset_with_replacement or self.critic_subset_size <= self.num_critics),
            "discount": 0.0 <= self.discount <= 1.0,
            "tau": 0.0 < self.tau <= 1.0,
            "batch_size": self.batch_size >= 1,
            "utd_ratio": self.utd_ratio >= 1,
            "init_temperature": self.init_temperature > 0,
        }
        for name, valid in checks.items():
            if not valid:
                raise ValueError(f"SACConfig.{name}={getattr(self, name)!r} is out of range")


def _continuous_action_dim(action_space: gym.Space) -> int:
    if not isinstance(action_space, gym.spaces.Box) or len(action_space.shape) != 1:
        raise ValueError(f"SAC needs a 1-D Box action space, got {action_space}")
    return int(action_space.shape[0])


class SAC(flax.struct.PyTreeNode):
    """SAC agent state; see the module docstring for the update schedule."""

    actor: TrainState
    critic: TrainState
    target_critic_params: flax.core.FrozenDict
    temperature: TrainState
    rng: jax.Array
    config: SACConfig = flax.struct.field(pytree_node=False)
    action_dim: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def samples_per_update(self) -> int:
        """How many transitions one ``update`` call consumes."""
        return self.config.utd_ratio * self.config.batch_size

    @classmethod
    def networks(cls, config: SACConfig, action_dim: int) -> tuple[nn.Module, nn.Module]:
        """The policy module and the critic-ensemble module; subclasses override this (and only
        this) to change architectures while keeping SAC's update."""
        actor_net = GaussianPolicyHead(
            config.actor_hidden_dims,
            action_dim,
            layer_norm=config.actor_layer_norm,
            orthogonal_init=config.orthogonal_init,
            final_hidden_scale=config.final_hidden_scale,
            log_std_min=config.log_std_min,
            log_std_max=config.log_std_max,
            state_dependent_std=config.state_dependent_std,
        )
        critic_net = ensemble(StateActionValue, config.num_critics)(
            config.critic_hidden_dims,
            layer_norm=config.critic_layer_norm,
            orthogonal_init=config.orthogonal_init,
            final_hidden_scale=config.final_hidden_scale,
        )
        return actor_net, critic_net

    @classmethod
    def create(
        cls, key: jax.Array, observation_space: gym.Space, action_space: gym.Space, config: SACConfig
    ) -> "SAC":
        """Initialise networks and optimisers for the given spaces."""
        action_dim = _continuous_action_dim(action_space)
        observation = jnp.zeros((1, int(np.prod(observation_space.shape))), jnp.float32)
        action = jnp.zeros((1, action_dim), jnp.float32)
        actor_key, critic_key, rng = jax.random.split(key, 3)
        actor_net, critic_net = cls.networks(config, action_dim)
        critic_params = critic_net.init(critic_key, observation, action)["params"]
        log_alpha = jnp.asarray(np.log(config.init_temperature), jnp.float32)
        return cls(
            actor=train_state(
                actor_net.init(actor_key, observation)["params"], optax.adam(config.actor_lr), actor_net.apply
            ),
            critic=train_state(critic_params, optax.adam(config.critic_lr), critic_net.apply),
            target_critic_params=jax.tree.map(jnp.copy, critic_params),  # own buffers: donation-safe
            temperature=train_state({"log_alpha": log_alpha}, optax.adam(config.temperature_lr)),
            rng=rng,
            config=config,
            action_dim=action_dim,
        )

    # ------------------------------------------------------------------ pieces

    def alpha(self) -> jax.Array:
        """Current entropy temperature."""
        return jnp.exp(self.temperature.params["log_alpha"])

    def target_entropy(self) -> float:
        """The temperature's entropy target."""
        if self.config.target_entropy is not None:
            return self.config.target_entropy
        return -self.config.target_entropy_scale * self.action_dim

    def policy(self, actor_params, observations: jax.Array):
        """The tanh-Gaussian action distribution at ``observations``."""
        mean, log_std = self.actor.apply_fn({"params": actor_params}, observations)
        return tanh_gaussian(mean, log_std)

    def q_values(self, critic_params, observations: jax.Array, actions: jax.Array) -> jax.Array:
        """Q of every ensemble member, shape (num_critics, batch)."""
        return self.critic.apply_fn({"params": critic_params}, observations, actions)

    def update_critic(self, batch: Batch, key: jax.Array) -> tuple["SAC", dict[str, jax.Array]]:
        """One critic step towards the (subset-min) soft TD target, then a Polyak target step."""
        config = self.config
        action_key, subset_key = jax.random.split(key)
        next_actions, next_log_probs = self.policy(self.actor.params, batch.next_observations).sample_and_log_prob(
            seed=action_key
        )
        next_q = subset_min(
            self.q_values(self.target_critic_params, batch.next_observations, next_actions),
            subset_key,
            config.critic_subset_size,
            config.subset_with_replacement,
        )
        if config.backup_entropy:
            next_q = next_q - self.alpha() * next_log_probs
        target = batch.rewards + config.discount * batch.bootstrap_mask() * next_q
        target = jax.lax.stop_gradient(target)

        def loss_fn(params):
            q = self.q_values(params, batch.observations, batch.actions)
            return ((q - target) ** 2).mean(), q.mean()

        (loss, q_mean), grads = jax.value_and_grad(loss_fn, has_aux=True)(self.critic.params)
        critic = self.critic.apply_gradients(grads=grads)
        target_params = optax.incremental_update(critic.params, self.target_critic_params, config.tau)
        return self.replace(critic=critic, target_critic_params=target_params), {
            "critic_loss": loss,
            "q_mean": q_mean,
        }

    def update_actor(self, batch: Batch, key: jax.Array) -> tuple["SAC", dict[str, jax.Array]]:
        """One policy step (reparameterised) and one temperature step."""
        alpha = self.alpha()

        def actor_loss_fn(params):
            actions, log_probs = self.policy(params, batch.observations).sample_and_log_prob(seed=key)
            q = self.q_values(self.critic.params, batch.observations, actions)
            q = q.min(axis=0) if self.config.actor_objective == "min" else q.mean(axis=0)
            return (alpha * log_probs - q).mean(), -log_probs.mean()

        (actor_loss, entropy), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(self.actor.params)
        actor = self.actor.apply_gradients(grads=grads)

        def temperature_loss_fn(params):
            return params["log_alpha"] * jax.lax.stop_gradient(entropy - self.target_entropy())

        temperature_loss, grads = jax.value_and_grad(temperature_loss_fn)(self.temperature.params)
        temperature = self.temperature.apply_gradients(grads=grads)
        return self.replace(actor=actor, temperature=temperature), {
            "actor_loss": actor_loss,
            "entropy": entropy,
            "temperature": alpha,
            "temperature_loss": temperature_loss,
        }

    # ------------------------------------------------------------------ contract

    def update(self, batch: Batch) -> tuple["SAC", dict[str, jax.Array]]:
        """``utd_ratio`` critic steps on consecutive slices of ``batch``, then one actor step."""
        config = self.config
        rng, critic_key, actor_key = jax.random.split(self.rng, 3)
        slices = jax.tree.map(lambda x: x.reshape(config.utd_ratio, config.batch_size, *x.shape[1:]), batch)

        def critic_step(agent, inputs):
            minibatch, key = inputs
            return agent.update_critic(minibatch, key)

        agent, critic_metrics = jax.lax.scan(
            critic_step, self, (slices, jax.random.split(critic_key, config.utd_ratio))
        )
        actor_batch = batch if config.actor_on_full_batch else jax.tree.map(lambda x: x[-1], slices)
        agent, actor_metrics = agent.update_actor(actor_batch, actor_key)
        metrics = {**jax.tree.map(lambda m: m[-1], critic_metrics), **actor_metrics}
        return agent.replace(rng=rng), metrics

    def act(self, observations: jax.Array, key: jax.Array, deterministic: bool = False) -> jax.Array:
        """Actions in [-1, 1]: tanh(mean) when deterministic, else a policy sample."""
        mean, log_std = self.actor.apply_fn({"params": self.actor.params}, observations)
        if deterministic:
            return tanh_gaussian_mode(mean)
        return tanh_gaussian(mean, log_std).sample(seed=key)
