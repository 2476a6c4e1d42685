"""The device replay buffer: ring semantics, filled-slot sampling, fixed-ratio mixing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl.data import replay
from rl.types import Transition, transition_like


def numbered_items(start: int, count: int) -> Transition:
    ids = np.arange(start, start + count, dtype=np.float32)
    return Transition(
        observations=ids[:, None],
        actions=ids[:, None],
        rewards=ids,
        next_observations=ids[:, None] + 1,
        terminated=(np.arange(count) % 3 == 0),
        truncated=(np.arange(count) % 3 == 1),
    )


def test_wraparound_overwrites_oldest_items_in_order():
    buffer = replay.init(transition_like(1, 1), capacity=5)
    buffer = replay.add(buffer, numbered_items(0, 4))
    buffer = replay.add(buffer, numbered_items(4, 3))
    assert int(buffer.size) == 5 and int(buffer.position) == 2
    np.testing.assert_array_equal(buffer.data.rewards, [5, 6, 2, 3, 4])


def test_batch_larger_than_capacity_keeps_the_last_items():
    buffer = replay.add(replay.init(transition_like(1, 1), capacity=4), numbered_items(0, 10))
    assert sorted(np.asarray(buffer.data.rewards).tolist()) == [6, 7, 8, 9]
    buffer = replay.add_one(buffer, jax.tree.map(lambda x: x[0], numbered_items(10, 1)))
    assert 6 not in np.asarray(buffer.data.rewards) and 10 in np.asarray(buffer.data.rewards)


def test_sampling_never_reads_empty_slots():
    buffer = replay.add(replay.init(transition_like(1, 1), capacity=1000), numbered_items(1, 7))
    batch = replay.sample(buffer, jax.random.PRNGKey(0), 5000)
    assert set(np.asarray(batch.rewards).tolist()) == set(range(1, 8))


def test_terminated_and_truncated_survive_a_round_trip():
    items = numbered_items(0, 9)
    buffer = replay.from_items(items)
    np.testing.assert_array_equal(buffer.data.terminated, items.terminated)
    np.testing.assert_array_equal(buffer.data.truncated, items.truncated)
    batch = replay.sample(buffer, jax.random.PRNGKey(1), 200)
    ids = np.asarray(batch.rewards).astype(int)
    np.testing.assert_array_equal(batch.terminated, ids % 3 == 0)
    np.testing.assert_array_equal(batch.truncated, ids % 3 == 1)
    np.testing.assert_array_equal(batch.bootstrap_mask(), 1.0 - (ids % 3 == 0))


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9])
def test_mixed_batches_hold_the_requested_share_of_each_source(ratio):
    offline = replay.from_items(numbered_items(1000, 50))
    online = replay.from_items(numbered_items(0, 50))
    batch = jax.jit(lambda key: replay.sample_mixed([online, offline], [1 - ratio, ratio], key, 256))(jax.random.PRNGKey(2))
    from_offline = np.asarray(batch.rewards) >= 1000
    assert from_offline.sum() == round(256 * ratio)
    assert not from_offline[: 256 - round(256 * ratio)].any()


def test_mixture_counts_sum_to_batch_and_reject_bad_ratios():
    assert replay.mixture_counts([1, 1, 1], 256) == (86, 85, 85)
    assert sum(replay.mixture_counts([0.3, 0.7], 1023)) == 1023
    with pytest.raises(ValueError, match="ratios"):
        replay.mixture_counts([-1, 2], 10)


def test_buffer_is_a_pytree_that_vmaps_over_seeds():
    buffers = jax.vmap(lambda _: replay.init(transition_like(3, 2), 8))(jnp.arange(4))
    items = jax.tree.map(lambda x: jnp.broadcast_to(x, (4, *x.shape)), transition_like(3, 2))
    buffers = jax.jit(jax.vmap(replay.add_one))(buffers, items)
    assert buffers.size.tolist() == [1, 1, 1, 1]
    assert buffers.data.observations.shape == (4, 8, 3)
