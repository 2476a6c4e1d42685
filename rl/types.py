"""Pytrees that cross module boundaries: transitions, batches and array specs."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


@flax.struct.dataclass
class Transition:
    """One environment step, or a batch of them along leading axes.

    ``terminated`` ends the episode with no bootstrap (the MDP reached a terminal state);
    ``truncated`` ends it for an outside reason (time limit, end of logged data) and the value of
    ``next_observations`` still counts. Bootstrapping uses :meth:`bootstrap_mask`; episode
    boundaries use :meth:`episode_end`.
    """

    observations: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_observations: jax.Array
    terminated: jax.Array
    truncated: jax.Array

    def bootstrap_mask(self) -> jax.Array:
        """1.0 where the next state's value enters the target, 0.0 at terminal states."""
        return 1.0 - self.terminated.astype(jnp.float32)

    def episode_end(self) -> jax.Array:
        """True where an episode ends, whether terminated or truncated."""
        return jnp.logical_or(self.terminated, self.truncated)


Batch = Transition
"""A batch is a :class:`Transition` whose arrays have a leading batch axis."""


def transition_like(observation_dim: int, action_dim: int, leading: tuple[int, ...] = ()) -> Transition:
    """A zero :class:`Transition` with the given leading shape (float32 data, bool flags)."""
    return Transition(
        observations=jnp.zeros((*leading, observation_dim), jnp.float32),
        actions=jnp.zeros((*leading, action_dim), jnp.float32),
        rewards=jnp.zeros(leading, jnp.float32),
        next_observations=jnp.zeros((*leading, observation_dim), jnp.float32),
        terminated=jnp.zeros(leading, jnp.bool_),
        truncated=jnp.zeros(leading, jnp.bool_),
    )


def leading_size(tree: PyTree) -> int:
    """Length of the leading axis shared by every leaf of ``tree``."""
    return int(np.shape(jax.tree.leaves(tree)[0])[0])
