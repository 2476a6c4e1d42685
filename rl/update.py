"""The jitted update core: ``k`` × (sample a batch on device, ``agent.update``) in one ``lax.scan``.

Works for any agent with ``update(batch) -> (agent, metrics)`` and ``samples_per_update``. The
compiled function donates the agent (its buffers are reused in place) and can be vmapped over a
leading seed axis of agent, buffer and key, so N seeds are one program, not N processes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState

from rl.data import replay
from rl.types import PyTree

SampleFn = Callable[[Any, jax.Array, int], PyTree]
"""``(source, key, batch_size) -> batch``; the default draws uniformly from one ReplayBuffer."""


def train_state(params: PyTree, tx: optax.GradientTransformation, apply_fn: Callable | None = None) -> TrainState:
    """A flax ``TrainState`` whose step counter is a strongly typed int32 array.

    ``TrainState.create`` starts the count at the Python int 0, which jit traces as a weakly typed
    scalar: the second call of a jitted update then misses JAX's dispatch cache once, and a state
    restored from a checkpoint (strong int32) compiles the update again.
    """
    return TrainState.create(apply_fn=apply_fn, params=params, tx=tx).replace(step=jnp.zeros((), jnp.int32))


def seed_vmap(fn: Callable, in_axes: tuple[int | None, ...]) -> Callable:
    """``jax.vmap(fn, in_axes)`` over a leading seed axis, except that with a single seed (every
    mapped argument's leaves have leading size 1) the axis is dropped, ``fn`` runs unbatched and
    the axis is put back on every output, as vmap would.

    Why not plain vmap: XLA's CPU backend compiles the size-1 batched products and gradients of a
    vmapped update less well than the unbatched ones (``bench_updates``: o2o's scanned update at
    1 seed vmapped ran at 0.91x the same update unbatched), and one seed is the common case of
    ``o2o train``. Results equal vmap's up to float rounding. Trace-time only: the choice is made
    from static shapes.
    """
    batched = jax.vmap(fn, in_axes=in_axes)

    def call(*args):
        sizes = {leaf.shape[0] for arg, axis in zip(args, in_axes) if axis == 0 for leaf in jax.tree.leaves(arg)}
        if sizes != {1}:
            return batched(*args)
        squeezed = [jax.tree.map(lambda leaf: leaf[0], arg) if axis == 0 else arg for arg, axis in zip(args, in_axes)]
        return jax.tree.map(lambda leaf: leaf[None], fn(*squeezed))

    return call


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
        run = seed_vmap(run, in_axes=(0, None if shared_source else 0, 0))
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
