"""Device-resident circular replay buffer with pure ``init / add / sample``.

The buffer is a pytree (so it is jitted, donated, vmapped over seeds and checkpointed like any
other state). It stores any pytree of arrays with a leading item axis: usually a
:class:`rl.types.Transition`, with extra fields (e.g. Monte-Carlo returns) as the caller needs.

Hand-written rather than taken from flashbax: flashbax's flat buffer samples
(observation, next observation) pairs by index arithmetic, which breaks at truncated episode ends
(flashbax#3) and has no fixed-ratio mixing of sources (flashbax#69); both are one line here.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rl.types import PyTree, leading_size


@flax.struct.dataclass
class ReplayBuffer:
    """Fixed-capacity ring of items; ``size`` counts filled slots, ``position`` the next write."""

    data: PyTree
    position: jax.Array
    size: jax.Array

    @property
    def capacity(self) -> int:
        """Number of slots (static)."""
        return leading_size(self.data)


def init(example_item: PyTree, capacity: int) -> ReplayBuffer:
    """An empty buffer with ``capacity`` slots shaped like ``example_item`` (one item, no batch axis)."""
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    data = jax.tree.map(lambda x: jnp.zeros((capacity, *jnp.shape(x)), jnp.asarray(x).dtype), example_item)
    return ReplayBuffer(data=data, position=jnp.zeros((), jnp.int32), size=jnp.zeros((), jnp.int32))


def from_items(items: PyTree, capacity: int | None = None) -> ReplayBuffer:
    """A buffer holding ``items`` (leading axis = item axis), e.g. a whole offline dataset."""
    count = leading_size(items)
    capacity = count if capacity is None else capacity
    example = jax.tree.map(lambda x: x[0], items)
    return add(init(example, capacity), items)


def add(buffer: ReplayBuffer, items: PyTree) -> ReplayBuffer:
    """Write a batch of items at the write position, wrapping around (oldest items overwritten).

    When more items than slots arrive, only the last ``capacity`` survive, as in a ring.
    """
    count = leading_size(items)
    capacity = buffer.capacity
    if count > capacity:
        items = jax.tree.map(lambda x: x[-capacity:], items)
        buffer = buffer.replace(position=(buffer.position + count - capacity) % capacity)
        count = capacity
    slots = (buffer.position + jnp.arange(count)) % capacity
    data = jax.tree.map(lambda store, new: store.at[slots].set(jnp.asarray(new, store.dtype)), buffer.data, items)
    return ReplayBuffer(
        data=data,
        position=(buffer.position + count) % capacity,
        size=jnp.minimum(buffer.size + count, capacity),
    )


def add_one(buffer: ReplayBuffer, item: PyTree) -> ReplayBuffer:
    """Write a single item (no batch axis) at the write position."""
    data = jax.tree.map(lambda store, new: store.at[buffer.position].set(jnp.asarray(new, store.dtype)), buffer.data, item)
    return ReplayBuffer(
        data=data,
        position=(buffer.position + 1) % buffer.capacity,
        size=jnp.minimum(buffer.size + 1, buffer.capacity),
    )


def sample_indices(buffer: ReplayBuffer, key: jax.Array, batch_size: int) -> jax.Array:
    """Uniform indices over the filled slots only (an empty buffer yields index 0)."""
    return jax.random.randint(key, (batch_size,), 0, jnp.maximum(buffer.size, 1))


def sample(buffer: ReplayBuffer, key: jax.Array, batch_size: int) -> PyTree:
    """A uniform batch of ``batch_size`` items drawn with replacement from the filled slots."""
    indices = sample_indices(buffer, key, batch_size)
    return jax.tree.map(lambda x: x[indices], buffer.data)


def mixture_counts(ratios: Sequence[float], batch_size: int) -> tuple[int, ...]:
    """Split ``batch_size`` into per-source counts proportional to ``ratios`` (largest remainder).

    The counts are static Python ints, so every batch holds exactly the requested proportions
    (up to rounding), rather than proportions that only hold on average.
    """
    weights = np.asarray(ratios, dtype=np.float64)
    if weights.ndim != 1 or len(weights) == 0 or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"ratios must be non-negative with a positive sum, got {list(ratios)}")
    exact = weights / weights.sum() * batch_size
    counts = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - counts), kind="stable")[: batch_size - counts.sum()]:
        counts[index] += 1
    return tuple(int(c) for c in counts)


def sample_mixed(
    buffers: Sequence[ReplayBuffer], ratios: Sequence[float], key: jax.Array, batch_size: int
) -> PyTree:
    """A batch whose first rows come from ``buffers[0]``, the next from ``buffers[1]``, and so on,
    in fixed per-source counts given by :func:`mixture_counts`. Sources with count 0 are never read.
    All sources must hold items of the same structure."""
    counts = mixture_counts(ratios, batch_size)
    keys = jax.random.split(key, len(buffers))
    parts = [sample(b, k, c) for b, k, c in zip(buffers, keys, counts) if c > 0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)
