"""A framework-free SAC update in plain ``jax.numpy``: the reference row of ``bench_updates``.

It does the same work as one o2o SAC update at the benchmark's shapes (uniform sample of one batch
from a device buffer; two critics, TD target with the entropy term and the minimum of two target
critics; one Adam step each for critics, policy and temperature; a Polyak step of the targets) with
no Flax, Optax or Distrax in between: parameters are dicts of arrays, the critic ensemble is a
leading axis contracted with ``einsum``, Adam and the tanh-Gaussian log-density are written out.
That is why it is hand-written where o2o uses libraries: it measures what XLA makes of the bare
arithmetic on this machine, so the gap between it and o2o is what o2o's abstractions cost, and its
gap to the arithmetic bound is what no JAX SAC implementation at these shapes can close.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, jax.Array]
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
LEARNING_RATE, DISCOUNT, TAU, BETA1, BETA2, EPSILON = 3e-4, 0.99, 0.005, 0.9, 0.999, 1e-8


class Buffer(NamedTuple):
    """Transitions stored row-wise on the device."""

    observations: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_observations: jax.Array
    terminated: jax.Array


class AdamMoments(NamedTuple):
    """First and second moment estimates of one parameter set."""

    first: Any
    second: Any


class PlainSACState(NamedTuple):
    """Everything one update reads and writes."""

    critic: list[Params]
    target_critic: list[Params]
    actor: list[Params]
    log_alpha: jax.Array
    critic_moments: AdamMoments
    actor_moments: AdamMoments
    alpha_moments: AdamMoments
    step: jax.Array


def _dense(key: jax.Array, fan_in: int, fan_out: int, ensemble: tuple[int, ...] = ()) -> Params:
    """LeCun-normal kernel and zero bias, with optional leading ensemble axes."""
    kernel = jax.random.normal(key, ensemble + (fan_in, fan_out)) / np.sqrt(fan_in)
    return {"kernel": kernel, "bias": jnp.zeros(ensemble + (fan_out,))}


def init_state(key: jax.Array, obs_dim: int, action_dim: int, hidden: int = 256, num_critics: int = 2) -> PlainSACState:
    """Fresh parameters (target critics a copy of the critics), zero Adam moments, alpha 1."""
    keys = jax.random.split(key, 6)
    critic = [
        _dense(keys[0], obs_dim + action_dim, hidden, (num_critics,)),
        _dense(keys[1], hidden, hidden, (num_critics,)),
        _dense(keys[2], hidden, 1, (num_critics,)),
    ]
    actor = [_dense(keys[3], obs_dim, hidden), _dense(keys[4], hidden, hidden), _dense(keys[5], hidden, 2 * action_dim)]
    zeros = lambda tree: AdamMoments(jax.tree.map(jnp.zeros_like, tree), jax.tree.map(jnp.zeros_like, tree))
    log_alpha = jnp.zeros(())
    # A copy, not the same arrays: the scanned call donates the state, and XLA refuses to donate
    # one buffer twice.
    target_critic = jax.tree.map(jnp.copy, critic)
    return PlainSACState(
        critic, target_critic, actor, log_alpha, zeros(critic), zeros(actor), zeros(log_alpha), jnp.zeros(())
    )


def q_values(critic: list[Params], observations: jax.Array, actions: jax.Array) -> jax.Array:
    """Q of every critic, shape (num_critics, batch)."""
    hidden = jnp.concatenate([observations, actions], axis=-1)
    hidden = jax.nn.relu(jnp.einsum("bi,eio->ebo", hidden, critic[0]["kernel"]) + critic[0]["bias"][:, None])
    hidden = jax.nn.relu(jnp.einsum("ebi,eio->ebo", hidden, critic[1]["kernel"]) + critic[1]["bias"][:, None])
    return (jnp.einsum("ebi,eio->ebo", hidden, critic[2]["kernel"]) + critic[2]["bias"][:, None])[..., 0]


def sample_action(actor: list[Params], observations: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A reparameterised tanh-Gaussian action and its log-density (tanh Jacobian included)."""
    hidden = jax.nn.relu(observations @ actor[0]["kernel"] + actor[0]["bias"])
    hidden = jax.nn.relu(hidden @ actor[1]["kernel"] + actor[1]["bias"])
    mean, log_std = jnp.split(hidden @ actor[2]["kernel"] + actor[2]["bias"], 2, axis=-1)
    log_std = jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)
    noise = jax.random.normal(key, mean.shape)
    pre_tanh = mean + jnp.exp(log_std) * noise
    gaussian = -0.5 * noise**2 - log_std - 0.5 * np.log(2 * np.pi)
    # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), stable for large |u|.
    jacobian = 2.0 * (np.log(2.0) - pre_tanh - jax.nn.softplus(-2.0 * pre_tanh))
    return jnp.tanh(pre_tanh), (gaussian - jacobian).sum(axis=-1)


def adam_step(params: Any, grads: Any, moments: AdamMoments, step: jax.Array) -> tuple[Any, AdamMoments]:
    """One bias-corrected Adam step at the fixed learning rate."""
    first = jax.tree.map(lambda m, g: BETA1 * m + (1 - BETA1) * g, moments.first, grads)
    second = jax.tree.map(lambda v, g: BETA2 * v + (1 - BETA2) * g * g, moments.second, grads)
    scale1, scale2 = 1 - BETA1**step, 1 - BETA2**step
    params = jax.tree.map(
        lambda p, m, v: p - LEARNING_RATE * (m / scale1) / (jnp.sqrt(v / scale2) + EPSILON), params, first, second
    )
    return params, AdamMoments(first, second)


def update(
    state: PlainSACState, buffer: Buffer, key: jax.Array, batch_size: int = 256
) -> tuple[PlainSACState, jax.Array]:
    """Sample a batch and apply one SAC update; returns the new state and the critic loss."""
    sample_key, next_key, actor_key = jax.random.split(key, 3)
    rows = jax.random.randint(sample_key, (batch_size,), 0, buffer.rewards.shape[0])
    batch = jax.tree.map(lambda column: column[rows], buffer)
    action_dim = batch.actions.shape[-1]
    alpha = jnp.exp(state.log_alpha)
    step = state.step + 1

    next_actions, next_log_probs = sample_action(state.actor, batch.next_observations, next_key)
    next_q = q_values(state.target_critic, batch.next_observations, next_actions).min(axis=0) - alpha * next_log_probs
    target = jax.lax.stop_gradient(batch.rewards + DISCOUNT * (1.0 - batch.terminated) * next_q)
    critic_loss, critic_grads = jax.value_and_grad(
        lambda critic: ((q_values(critic, batch.observations, batch.actions) - target) ** 2).mean()
    )(state.critic)
    critic, critic_moments = adam_step(state.critic, critic_grads, state.critic_moments, step)
    target_critic = jax.tree.map(lambda new, old: TAU * new + (1 - TAU) * old, critic, state.target_critic)

    def actor_loss(actor):
        actions, log_probs = sample_action(actor, batch.observations, actor_key)
        return (alpha * log_probs - q_values(critic, batch.observations, actions).min(axis=0)).mean(), log_probs

    (_, log_probs), actor_grads = jax.value_and_grad(actor_loss, has_aux=True)(state.actor)
    actor, actor_moments = adam_step(state.actor, actor_grads, state.actor_moments, step)
    # d/d log_alpha of -log_alpha * (log pi + target entropy), target entropy -|A|.
    alpha_grad = -(jax.lax.stop_gradient(log_probs).mean() - action_dim)
    log_alpha, alpha_moments = adam_step(state.log_alpha, alpha_grad, state.alpha_moments, step)
    new_state = PlainSACState(
        critic, target_critic, actor, log_alpha, critic_moments, actor_moments, alpha_moments, step
    )
    return new_state, critic_loss


def compile_scan(
    num_updates: int, batch_size: int = 256
) -> Callable[[PlainSACState, Buffer, jax.Array], tuple[PlainSACState, jax.Array]]:
    """A jitted ``(state, buffer, key) -> (state, losses)`` running ``num_updates`` updates in one
    ``lax.scan``; the state is donated."""

    def run(state, buffer, key):
        keys = jax.random.split(key, num_updates)
        return jax.lax.scan(lambda carry, step_key: update(carry, buffer, step_key, batch_size), state, keys)

    return jax.jit(run, donate_argnums=0)
