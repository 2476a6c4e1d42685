"""The jitted update core: ``k`` × (sample a batch on device, ``agent.update``) in one ``lax.scan``.

Works for any agent with ``update(batch) -> (agent, metrics)`` and ``samples_per_update``. The
compiled function donates the agent (its buffers are reused in place) and can run over a
leading seed axis of agent, buffer and key, so N seeds are one program, not N processes
(:func:`over_seeds`: batched by vmap on accelerators, one seed after another on the CPU).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState

from rl import xla_cpu
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


SeedBatching = Literal["auto", "vmap", "loop"]
"""How :func:`over_seeds` runs the seeds: batched by ``vmap``, one after another in a ``loop``, or
``auto`` (``loop`` on the CPU backend from :data:`LOOP_FROM_SEEDS` seeds on, ``vmap`` otherwise)."""

LOOP_FROM_SEEDS = 8
"""The seed count from which ``auto`` loops over seeds on the CPU (see :func:`over_seeds`)."""


def over_seeds(fn: Callable, in_axes: tuple[int | None, ...], batching: SeedBatching = "auto") -> Callable:
    """``fn`` applied to every seed of a leading seed axis, returning what ``jax.vmap(fn, in_axes)``
    returns: arguments whose ``in_axes`` entry is 0 carry the seed axis, those with ``None`` are
    shared, and every output gets the seed axis in front.

    ``batching="vmap"`` is ``jax.vmap``. ``"loop"`` runs ``fn`` unbatched for one seed after
    another inside the compiled program (``lax.map`` over seed indices; each seed reads its slice
    of the stacked arguments by index, so a large per-seed replay buffer is not copied up front).
    ``"auto"`` (the default) loops on the CPU backend from :data:`LOOP_FROM_SEEDS` seeds on and
    vmaps otherwise. With a single seed both run ``fn`` unbatched without a loop. Results equal
    vmap's up to float rounding.

    Why: XLA's CPU backend compiles the seed-batched products, gradients and transposes of a
    vmapped update less well the more seeds are batched, while a loop keeps every seed's update at
    the unbatched rate. Measured on a 2-core CPU (updates/s summed over seeds, loop against vmap,
    2026-11-29): SAC 256 x 256, 2 critics, at 50-100 updates per call: 2 and 4 seeds 1.00x and
    0.99x, 8 seeds 1.10x, 16 seeds 1.24x, 32 seeds 1.36x; at one update per call (the online
    loop) 4 seeds 0.85x, and SAC on Hopper-v5 with 8 seeds ran 1.29-1.31x the environment steps
    per second end to end. Some agents gain at few seeds too (WSRL's online update at
    the ``wsrl_locomotion`` CPU scale, 5 critics, UTD 4, LayerNorm: 1.55x at 3 seeds; Cal-QL
    pre-training there: 1.47x; since LayerNorm sums in chunks, :func:`rl.nets.layer_norm`, about
    1.10x and 1.20x), which is why the loops take ``seed_batching`` from their config.
    On accelerators the batch fills otherwise idle units, so ``auto`` keeps vmap there.
    """
    if batching not in ("auto", "vmap", "loop"):
        raise ValueError(f"batching must be 'auto', 'vmap' or 'loop', got {batching!r}")

    def call(*args):
        sizes = {leaf.shape[0] for arg, axis in zip(args, in_axes) if axis == 0 for leaf in jax.tree.leaves(arg)}
        if len(sizes) != 1:
            raise ValueError(f"arguments mapped over seeds disagree on the seed count: leading sizes {sorted(sizes)}")
        (num_seeds,) = sizes
        if num_seeds > 1 and _resolve(batching, num_seeds) == "vmap":
            return jax.vmap(fn, in_axes=in_axes)(*args)

        def one_seed(index):
            seed_args = [
                jax.tree.map(lambda leaf: jax.lax.dynamic_index_in_dim(leaf, index, keepdims=False), arg) if axis == 0 else arg
                for arg, axis in zip(args, in_axes)
            ]
            return fn(*seed_args)

        if num_seeds == 1:
            return jax.tree.map(lambda leaf: leaf[None], one_seed(0))
        return jax.lax.map(one_seed, jnp.arange(num_seeds))

    return call


def _resolve(batching: SeedBatching, num_seeds: int) -> str:
    """``batching`` with ``auto`` replaced by the choice for ``num_seeds`` on the default backend."""
    if batching == "auto":
        return "loop" if jax.default_backend() == "cpu" and num_seeds >= LOOP_FROM_SEEDS else "vmap"
    return batching


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
    seed_axis: bool = False,
    sample_fn: SampleFn = replay.sample,
    shared_source: bool = False,
    seed_batching: SeedBatching = "auto",
) -> Callable[[Any, Any, jax.Array], tuple[Any, dict[str, jax.Array]]]:
    """A jitted ``(agent, source, key) -> (agent, metrics)`` running ``num_updates`` updates.

    With ``seed_axis`` agent and key carry a leading seed axis, and so does the source unless
    ``shared_source`` (one offline dataset read by every seed); ``seed_batching`` says how the
    seeds run (see :func:`over_seeds`). XLA's options are chosen from the traced program
    (:func:`rl.xla_cpu.jit`). The agent argument is donated: do not use the agent passed in after
    the call.
    """
    if num_updates < 1:
        raise ValueError(f"num_updates must be >= 1, got {num_updates}")

    def run(agent, source, key):
        return scan_updates(agent, source, key, num_updates, sample_fn)

    if seed_axis:
        run = over_seeds(run, in_axes=(0, None if shared_source else 0, 0), batching=seed_batching)
    return xla_cpu.jit(run, donate_argnums=0)


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
