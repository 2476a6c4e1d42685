"""Proximal policy optimisation (clipped surrogate, GAE, value network) for discrete and
continuous actions.

The agent follows the contract of DESIGN.md: a pytree of one train state (policy and value
parameters under one optimiser, so the gradient-norm clip sees both, as in CleanRL / SB3),
observation- and return-normalisation statistics and an RNG key; the frozen config is a static
field. ``update(rollout)`` runs the whole update — normalisation, GAE, ``update_epochs`` shuffled
passes of minibatch steps — as one ``lax.scan``, so one jitted call per rollout.

The policy pieces (:class:`PolicyNet`, :class:`StochasticPolicy`, :class:`RunningMoments`) are
shared with LOOP (``agents/loop.py``).

Rollout layout (see :class:`rl.rollouts.Rollout`): arrays ``[num_envs, num_steps, ...]``;
``next_observations`` holds the true next observation of every step (the final observation where
an episode ended), ``valid`` is False on the reset steps of gymnasium's next-step autoreset.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import distrax
import flax.linen as nn
import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from rl.distributions import tanh_gaussian, tanh_gaussian_mode
from rl.nets import MLP, Dense, orthogonal
from rl.rollouts import CollectionSpec, Rollout, gae
from rl.update import train_state

ActionKind = Literal["categorical", "clipped", "tanh"]
TANH_ACTION_LIMIT = 1.0 - 1e-6
"""Stored tanh actions stay inside (-1, 1) so that atanh and the log-probability stay finite."""
ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu}


# ----------------------------------------------------------------------------- shared policy pieces


class RunningMoments(flax.struct.PyTreeNode):
    """Running mean and variance of a batch of vectors (parallel merge of Chan et al., 1979).

    Hand-written because the statistics must live inside the agent pytree and update under
    ``jit``; ``weights`` lets masked (invalid) samples count for nothing.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @classmethod
    def create(cls, shape: tuple[int, ...]) -> "RunningMoments":
        """Zero mean, unit variance and a tiny prior count (as SB3's RunningMeanStd)."""
        return cls(jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32), jnp.asarray(1e-4, jnp.float32))

    def update(self, values: jax.Array, weights: jax.Array) -> "RunningMoments":
        """Merge the weighted samples ``values[i]`` (leading axis) into the statistics."""
        weights = weights.astype(jnp.float32)
        batch_count = weights.sum()
        shape = (-1,) + (1,) * (values.ndim - 1)
        w = weights.reshape(shape)
        batch_mean = (w * values).sum(0) / jnp.maximum(batch_count, 1e-8)
        batch_var = (w * (values - batch_mean) ** 2).sum(0) / jnp.maximum(batch_count, 1e-8)
        total = self.count + batch_count
        delta = batch_mean - self.mean
        mean = self.mean + delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        return RunningMoments(mean, m2 / total, total)

    def normalize(self, values: jax.Array, clip: float) -> jax.Array:
        """``(values - mean) / std`` clipped to ``[-clip, clip]``."""
        return jnp.clip((values - self.mean) / jnp.sqrt(self.var + 1e-8), -clip, clip)


class PolicyNet(nn.Module):
    """MLP torso with an action head: logits (discrete) or a Gaussian mean with a learned,
    state-independent log-std vector (continuous). Small head initialisation (orthogonal, gain
    0.01) keeps the initial policy near uniform / zero-mean, as in the PPO implementation details
    of Huang et al. (2022)."""

    hidden_dims: tuple[int, ...]
    action_dim: int
    discrete: bool
    activation: str = "tanh"
    init_log_std: float = 0.0

    @nn.compact
    def __call__(self, observations: jax.Array) -> tuple[jax.Array, jax.Array]:
        features = MLP(self.hidden_dims, orthogonal_init=True, activation=ACTIVATIONS[self.activation])(observations)
        head = Dense(self.action_dim, kernel_init=orthogonal(0.01))(features)
        if self.discrete:
            return head, jnp.zeros_like(head)
        log_std = self.param("log_std", nn.initializers.constant(self.init_log_std), (self.action_dim,))
        return head, jnp.broadcast_to(log_std, head.shape)


class ValueNet(nn.Module):
    """V(s): MLP torso (orthogonal init) with a unit-gain scalar head."""

    hidden_dims: tuple[int, ...]
    activation: str = "tanh"

    @nn.compact
    def __call__(self, observations: jax.Array) -> jax.Array:
        features = MLP(self.hidden_dims, orthogonal_init=True, activation=ACTIVATIONS[self.activation])(observations)
        return Dense(1, kernel_init=orthogonal(1.0))(features)[..., 0]


def action_kind(action_space: gym.Space, continuous_distribution: Literal["clipped", "tanh"]) -> ActionKind:
    """The distribution family for an action space; raises for unsupported spaces."""
    if isinstance(action_space, gym.spaces.Discrete):
        return "categorical"
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        if not (np.allclose(action_space.low, -1.0) and np.allclose(action_space.high, 1.0)):
            raise ValueError(
                f"continuous on-policy agents act in [-1, 1]; got bounds {action_space.low}..{action_space.high} "
                "(make the env with rescale_actions=True)"
            )
        return continuous_distribution
    raise ValueError(f"on-policy agents need a Discrete or 1-D Box action space, got {action_space}")


def action_dimension(action_space: gym.Space) -> int:
    """Number of logits (Discrete) or action dimensions (Box)."""
    if isinstance(action_space, gym.spaces.Discrete):
        return int(action_space.n)
    return int(action_space.shape[0])


@dataclasses.dataclass(frozen=True)
class StochasticPolicy:
    """A policy network plus its distribution family; static (hashable) so agents keep it as a
    non-pytree field and every method is a pure function of the parameters."""

    net: PolicyNet
    kind: ActionKind

    def distribution(self, params, observations: jax.Array) -> distrax.Distribution:
        """The action distribution at ``observations`` (already normalised)."""
        head, log_std = self.net.apply({"params": params}, observations)
        if self.kind == "categorical":
            return distrax.Categorical(logits=head)
        if self.kind == "tanh":
            return tanh_gaussian(head, log_std)
        return distrax.MultivariateNormalDiag(loc=head, scale_diag=jnp.exp(log_std))

    def sample(self, params, observations: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """A stored action and its log-probability. Gaussian samples are stored unclipped (the
        loop clips what the env receives); tanh samples are pulled inside (-1, 1) and their
        log-probability recomputed at the stored value, so that old and new log-probabilities of
        the update are evaluated at exactly the same point."""
        dist = self.distribution(params, observations)
        actions = dist.sample(seed=key)
        if self.kind == "tanh":
            actions = jnp.clip(actions, -TANH_ACTION_LIMIT, TANH_ACTION_LIMIT)
        return actions, dist.log_prob(actions)

    def mode(self, params, observations: jax.Array) -> jax.Array:
        """The deterministic action: argmax, clip(mean) or tanh(mean)."""
        head, _ = self.net.apply({"params": params}, observations)
        if self.kind == "categorical":
            return jnp.argmax(head, axis=-1)
        if self.kind == "tanh":
            return tanh_gaussian_mode(head)
        return jnp.clip(head, -1.0, 1.0)

    def entropy(self, params, observations: jax.Array) -> jax.Array:
        """Entropy per state; for tanh policies the entropy of the pre-squash Gaussian (the
        squashed one has no closed form; the difference does not depend on the log-std)."""
        dist = self.distribution(params, observations)
        if self.kind == "tanh":
            return dist.distribution.entropy()
        return dist.entropy()

    def to_env(self, actions: jax.Array) -> jax.Array:
        """Stored actions as the env receives them (continuous ones clipped to [-1, 1])."""
        if self.kind == "categorical":
            return actions
        return jnp.clip(actions, -1.0, 1.0)


def make_policy(
    observation_space: gym.Space,
    action_space: gym.Space,
    hidden_dims: tuple[int, ...],
    activation: str,
    continuous_distribution: Literal["clipped", "tanh"],
    init_log_std: float,
) -> StochasticPolicy:
    """Build the policy for the spaces (checks them first)."""
    if not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 1:
        raise ValueError(f"on-policy agents need a 1-D Box observation space, got {observation_space}")
    kind = action_kind(action_space, continuous_distribution)
    net = PolicyNet(tuple(hidden_dims), action_dimension(action_space), kind == "categorical", activation, init_log_std)
    return StochasticPolicy(net, kind)


def masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted mean; ``jnp.where`` keeps NaN/inf at zero-weight entries out of the result."""
    weights = weights.astype(jnp.float32)
    return jnp.where(weights > 0, values, 0.0).sum() / jnp.maximum(weights.sum(), 1e-8)


def select_tree(condition: jax.Array, new, old):
    """``new`` where ``condition`` else ``old``, leaf by leaf (skips an update without a branch)."""
    return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Hyperparameters of PPO. Defaults are CleanRL's ``ppo.py`` / ``ppo_continuous_action.py``."""

    num_envs: int = 8
    """Parallel environments per seed (one vector env, or vmapped JAX envs)."""
    num_steps: int = 128
    """Steps per environment in one rollout; a rollout holds num_envs * num_steps transitions."""
    num_minibatches: int = 4
    """Minibatches per pass over the rollout."""
    update_epochs: int = 4
    """Passes over each rollout."""
    learning_rate: float = 2.5e-4
    """Adam learning rate (initial value under the linear schedule)."""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """Constant learning rate, or linear decay to zero over schedule_iterations rollouts."""
    schedule_iterations: int = 0
    """Rollouts over which the linear schedules decay (the launcher fills it from the step budget)."""
    adam_eps: float = 1e-5
    """Adam epsilon."""
    discount: float = 0.99
    """Discount factor gamma."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    clip_eps: float = 0.2
    """PPO ratio clip epsilon."""
    clip_schedule: Literal["constant", "linear"] = "constant"
    """Constant clip epsilon, or linear decay to zero over schedule_iterations rollouts (SB3 zoo)."""
    clip_value_loss: bool = False
    """Clip the value prediction around the old value (CleanRL's clip_vloss)."""
    normalize_advantages: bool = True
    """Standardise advantages within every minibatch."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Value-loss coefficient."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip of the joint policy+value gradient."""
    normalize_observations: bool = True
    """Standardise observations with running statistics (updated after each update)."""
    update_observation_statistics: bool = True
    """Update the observation statistics after each update; False keeps them frozen (e.g. at an
    offline dataset's statistics, as Uni-O4's fine-tuning does)."""
    normalize_rewards: bool = False
    """Divide rewards by the running std of the discounted return (SB3 VecNormalize)."""
    clip_observations: float = 10.0
    """Clip of normalised observations."""
    clip_rewards: float = 10.0
    """Clip of normalised rewards."""
    actor_hidden_dims: tuple[int, ...] = (64, 64)
    """Hidden widths of the policy network."""
    critic_hidden_dims: tuple[int, ...] = (64, 64)
    """Hidden widths of the value network."""
    activation: Literal["tanh", "relu"] = "tanh"
    """Hidden activation of both networks."""
    continuous_distribution: Literal["clipped", "tanh"] = "clipped"
    """Gaussian whose samples are clipped to the bounds by the env side, or tanh-squashed Gaussian."""
    init_log_std: float = 0.0
    """Initial log standard deviation of continuous policies."""

    def __post_init__(self) -> None:
        checks = {
            "num_envs": self.num_envs >= 1,
            "num_steps": self.num_steps >= 1,
            "num_minibatches": self.num_minibatches >= 1 and (self.num_envs * self.num_steps) % self.num_minibatches == 0,
            "update_epochs": self.update_epochs >= 1,
            "learning_rate": self.learning_rate > 0,
            "schedule_iterations": self.schedule_iterations >= 0,
            "discount": 0.0 <= self.discount <= 1.0,
            "gae_lambda": 0.0 <= self.gae_lambda <= 1.0,
            "clip_eps": self.clip_eps > 0,
            "ent_coef": self.ent_coef >= 0,
            "vf_coef": self.vf_coef >= 0,
            "max_grad_norm": self.max_grad_norm > 0,
        }
        for name, valid in checks.items():
            if not valid:
                hint = " (num_envs * num_steps must divide into it)" if name == "num_minibatches" else ""
                raise ValueError(f"PPOConfig.{name}={getattr(self, name)!r} is out of range{hint}")

    @property
    def minibatch_size(self) -> int:
        """Transitions per minibatch."""
        return self.num_envs * self.num_steps // self.num_minibatches


def _linear_fraction(config: PPOConfig, optimizer_step: jax.Array) -> jax.Array:
    steps_per_rollout = config.update_epochs * config.num_minibatches
    iteration = optimizer_step // steps_per_rollout
    return jnp.clip(1.0 - iteration / max(config.schedule_iterations, 1), 0.0, 1.0)


@functools.lru_cache(maxsize=None)
def _optimizer(config: PPOConfig) -> optax.GradientTransformation:
    """One optimiser object per config: it is a static part of the agent's pytree structure, so
    equal configs must give the identical object for jitted functions to be reused across runs."""
    if config.lr_schedule == "linear":
        learning_rate = lambda count: config.learning_rate * _linear_fraction(config, count)  # noqa: E731
    else:
        learning_rate = config.learning_rate
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(learning_rate, eps=config.adam_eps))


# ----------------------------------------------------------------------------- agent


class PPO(flax.struct.PyTreeNode):
    """PPO agent state; see the module docstring."""

    state: TrainState
    observation_moments: RunningMoments
    return_moments: RunningMoments
    discounted_returns: jax.Array
    """Per-env running discounted return for reward normalisation, carried across rollouts."""
    rng: jax.Array
    policy: StochasticPolicy = flax.struct.field(pytree_node=False)
    value_net: ValueNet = flax.struct.field(pytree_node=False)
    config: PPOConfig = flax.struct.field(pytree_node=False)

    @property
    def collection(self) -> CollectionSpec:
        """What the on-policy loop collects for one update: fixed-length segments."""
        return CollectionSpec(mode="segments", num_envs=self.config.num_envs, num_steps=self.config.num_steps)

    @classmethod
    def create(cls, key: jax.Array, observation_space: gym.Space, action_space: gym.Space, config: PPOConfig) -> "PPO":
        """Initialise networks, optimiser and statistics for the given spaces."""
        if "linear" in (config.lr_schedule, config.clip_schedule) and config.schedule_iterations < 1:
            raise ValueError("PPOConfig.schedule_iterations must be >= 1 with a linear schedule (the launcher sets it)")
        policy = make_policy(
            observation_space,
            action_space,
            config.actor_hidden_dims,
            config.activation,
            config.continuous_distribution,
            config.init_log_std,
        )
        value_net = ValueNet(tuple(config.critic_hidden_dims), config.activation)
        observation_dim = int(observation_space.shape[0])
        dummy = jnp.zeros((1, observation_dim), jnp.float32)
        policy_key, value_key, rng = jax.random.split(key, 3)
        params = {
            "policy": policy.net.init(policy_key, dummy)["params"],
            "value": value_net.init(value_key, dummy)["params"],
        }
        return cls(
            state=train_state(params, _optimizer(config)),
            observation_moments=RunningMoments.create((observation_dim,)),
            return_moments=RunningMoments.create(()),
            discounted_returns=jnp.zeros((config.num_envs,), jnp.float32),
            rng=rng,
            policy=policy,
            value_net=value_net,
            config=config,
        )

    # ------------------------------------------------------------------ pieces

    def normalize(self, observations: jax.Array) -> jax.Array:
        """Observations as the networks see them."""
        observations = observations.astype(jnp.float32)
        if not self.config.normalize_observations:
            return observations
        return self.observation_moments.normalize(observations, self.config.clip_observations)

    def values(self, params, observations: jax.Array) -> jax.Array:
        """V(s) of normalised observations."""
        return self.value_net.apply({"params": params["value"]}, observations)

    def _scale_rewards(self, rollout: Rollout) -> tuple["PPO", jax.Array]:
        """Update the discounted-return statistics with this rollout and scale its rewards."""
        config = self.config
        if not config.normalize_rewards:
            return self, rollout.rewards

        def step(running, inputs):
            reward, done = inputs
            running = running * config.discount + reward
            return jnp.where(done, 0.0, running), running

        done = jnp.logical_or(rollout.terminated, rollout.truncated)
        final, returns = jax.lax.scan(step, self.discounted_returns, (rollout.rewards.T, done.T))
        moments = self.return_moments.update(returns.reshape(-1), rollout.valid.T.reshape(-1))
        scaled = jnp.clip(rollout.rewards / jnp.sqrt(moments.var + 1e-8), -config.clip_rewards, config.clip_rewards)
        return self.replace(return_moments=moments, discounted_returns=final), scaled

    def loss(self, params, minibatch: dict[str, jax.Array], clip_eps: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Clipped surrogate + value loss − entropy bonus on one minibatch of flat transitions."""
        config = self.config
        weights = minibatch["valid"]
        dist = self.policy.distribution(params["policy"], minibatch["observations"])
        log_probs = dist.log_prob(minibatch["actions"])
        log_ratio = log_probs - minibatch["log_probs"]
        ratio = jnp.exp(log_ratio)
        advantages = minibatch["advantages"]
        if config.normalize_advantages:
            mean = masked_mean(advantages, weights)
            std = jnp.sqrt(masked_mean((advantages - mean) ** 2, weights))
            advantages = (advantages - mean) / (std + 1e-8)
        surrogate = jnp.minimum(ratio * advantages, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages)
        policy_loss = -masked_mean(surrogate, weights)

        values = self.values(params, minibatch["observations"])
        value_error = (values - minibatch["targets"]) ** 2
        if config.clip_value_loss:
            clipped = minibatch["old_values"] + jnp.clip(values - minibatch["old_values"], -clip_eps, clip_eps)
            value_error = jnp.maximum(value_error, (clipped - minibatch["targets"]) ** 2)
        value_loss = 0.5 * masked_mean(value_error, weights)
        entropy = masked_mean(self.policy.entropy(params["policy"], minibatch["observations"]), weights)
        total = policy_loss + config.vf_coef * value_loss - config.ent_coef * entropy
        metrics = {
            "policy_loss": policy_loss,
            "value_loss": value_loss,
            "entropy": entropy,
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, weights),
            "clip_fraction": masked_mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32), weights),
        }
        return total, metrics

    # ------------------------------------------------------------------ contract

    def update(self, rollout: Rollout) -> tuple["PPO", dict[str, jax.Array]]:
        """GAE on the rollout, then ``update_epochs`` shuffled minibatch passes (one scan)."""
        config = self.config
        if rollout.rewards.shape != (config.num_envs, config.num_steps):
            raise ValueError(f"PPO expects rollouts of shape {(config.num_envs, config.num_steps)}, got {rollout.rewards.shape}")
        agent, rewards = self._scale_rewards(rollout)
        observations = agent.normalize(rollout.observations)
        next_observations = agent.normalize(rollout.next_observations)
        params = agent.state.params
        values = agent.values(params, observations)
        next_values = agent.values(params, next_observations)
        advantages, targets = gae(
            rewards.T, values.T, next_values.T, rollout.terminated.T, rollout.truncated.T, config.discount, config.gae_lambda
        )
        flat = {
            "observations": observations,
            "actions": rollout.actions,
            "log_probs": rollout.log_probs,
            "advantages": advantages.T,
            "targets": targets.T,
            "old_values": values,
            "valid": rollout.valid.astype(jnp.float32),
        }
        size = config.num_envs * config.num_steps
        flat = jax.tree.map(lambda x: x.reshape(size, *x.shape[2:]), flat)
        if config.clip_schedule == "linear":
            clip_eps = config.clip_eps * _linear_fraction(config, agent.state.step)
        else:
            clip_eps = jnp.asarray(config.clip_eps, jnp.float32)

        def minibatch_step(state: TrainState, indices: jax.Array):
            # Gathered per step, so only one minibatch is ever copied out of the rollout.
            minibatch = jax.tree.map(lambda x: x[indices], flat)
            grad_fn = jax.value_and_grad(agent.loss, has_aux=True)
            (_, metrics), grads = grad_fn(state.params, minibatch, clip_eps)
            metrics["grad_norm"] = optax.global_norm(grads)
            return state.apply_gradients(grads=grads), metrics

        def epoch(state: TrainState, key: jax.Array):
            order = jax.random.permutation(key, size).reshape(config.num_minibatches, config.minibatch_size)
            return jax.lax.scan(minibatch_step, state, order)

        rng, epoch_key = jax.random.split(agent.rng)
        state, metrics = jax.lax.scan(epoch, agent.state, jax.random.split(epoch_key, config.update_epochs))
        metrics = jax.tree.map(jnp.mean, metrics)
        valid = rollout.valid.astype(jnp.float32)
        residual = masked_mean((targets.T - values - masked_mean(targets.T - values, valid)) ** 2, valid)
        target_var = masked_mean((targets.T - masked_mean(targets.T, valid)) ** 2, valid)
        metrics["explained_variance"] = 1.0 - residual / (target_var + 1e-8)
        metrics["clip_eps"] = clip_eps
        moments = agent.observation_moments
        if config.normalize_observations and config.update_observation_statistics:
            obs_dim = rollout.observations.shape[-1]
            moments = moments.update(rollout.observations.reshape(-1, obs_dim).astype(jnp.float32), valid.reshape(-1))
        return agent.replace(state=state, observation_moments=moments, rng=rng), metrics

    def explore(self, observations: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """A stored action and its log-probability (the on-policy loop's sampling call)."""
        return self.policy.sample(self.state.params["policy"], self.normalize(observations), key)

    def act(self, observations: jax.Array, key: jax.Array, deterministic: bool = False) -> jax.Array:
        """Env-ready actions: the mode when deterministic, else a (clipped) policy sample."""
        normalized = self.normalize(observations)
        if deterministic:
            return self.policy.mode(self.state.params["policy"], normalized)
        actions, _ = self.policy.sample(self.state.params["policy"], normalized, key)
        return self.policy.to_env(actions)
