"""The jitted update core: ``k`` × (sample a batch on device, ``agent.update``) in one ``lax.scan``.

Works for any agent with ``update(batch) -> (agent, metrics)`` and ``samples_per_update``. The
compiled function donates the agent (its buffers are reused in place) and can be vmapped over a
leading seed axis of agent, buffer and key, so N seeds are one program, not N processes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from rl.data import replay
from rl.types import PyTree

SampleFn = Callable[[Any, jax.Array, int], PyTree]
"""``(source, key, batch_size) -> batch``; the default draws uniformly from one ReplayBuffer."""


def sample_and_update(agent: Any, source: Any, key: jax.Array, sample_fn: SampleFn = replay.sample):
    """Draw ``agent.samples_per_update`` transitions from ``source`` and apply one agent update."""
    batch = sample_fn(source, key, agent.samples_per_update)
    return agent.update(batch)


def scan_updates(
    agent: Any, source: Any, key: jax.Array, num_updates: int, sample_fn: SampleFn = replay.sample
) -> tuple[Any, dict[str, jax.Array]]:
    """``num_updates`` sample+update steps as one ``lax.scan``; metrics are averaged over them."""

    def body(carry, step_key):
        return sample_and_update(carry, source, step_key, sample_fn)

    agent, metrics = jax.lax.scan(body, agent, jax.random.split(key, num_updates))
    return agent, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)


def compile_updates(
    num_updates: int,
    vmap_seeds: bool = False,
    sample_fn: SampleFn = replay.sample,
    shared_source: bool = False,
) -> Callable[[Any, Any, jax.Array], tuple[Any, dict[str, jax.Array]]]:
    """A jitted ``(agent, source, key) -> (agent, metrics)`` running ``num_updates`` updates.

    With ``vmap_seeds`` agent and key carry a leading seed axis, and so does the source unless
    ``shared_source`` (one offline dataset read by every seed). The agent argument is donated:
    do not use the agent passed in after the call.
    """
    if num_updates < 1:
        raise ValueError(f"num_updates must be >= 1, got {num_updates}")

    def run(agent, source, key):
        return scan_updates(agent, source, key, num_updates, sample_fn)

    if vmap_seeds:
        run = jax.vmap(run, in_axes=(0, None if shared_source else 0, 0))
    return jax.jit(run, donate_argnums=0)


def stack_seeds(trees: list[PyTree]) -> PyTree:
    """Stack per-seed pytrees on a new leading seed axis.

    Only the array leaves must match; static fields (e.g. optimiser closures, which differ by
    identity between separately created agents) are taken from the first tree.
    """
    structure = jax.tree.structure(trees[0])
    leaves = [jax.tree.leaves(tree) for tree in trees]
    return jax.tree.unflatten(structure, [jnp.stack(column) for column in zip(*leaves)])


def unstack_seed(tree: PyTree, index: int) -> PyTree:
    """The pytree of one seed out of a seed-stacked pytree."""
    return jax.tree.map(lambda leaf: leaf[index], tree)
