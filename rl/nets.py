"""Networks: MLPs with optional LayerNorm, Q-ensembles on a vmapped parameter axis, policy heads.

Modules are flax Linen with explicit parameter pytrees: ``module.init`` returns the pytree and
``module.apply(params, ...)`` is a pure function, so ``vmap`` over seeds and ``scan`` over updates
need nothing special and add no Python work per call inside a jitted loop.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from rl import xla_cpu


@jax.custom_vjp
def dense_product(inputs: jax.Array, kernel: jax.Array) -> jax.Array:
    """``inputs @ kernel`` for a dense layer, with a hand-written backward pass.

    Written by hand because autodiff's weight gradient, ``inputs.T @ grads`` contracting the batch
    axis into an ``(in, out)`` array, is the product XLA's CPU backend runs slowest: for a thin
    layer (e.g. a 256 -> 6 policy head) it takes 5-10x as long as the same product formed as
    ``(grads.T @ inputs)`` in ``(out, in)`` order and transposed (``experiments/profile_update.py``
    measures both). The backward pass below uses that order whenever ``out < in``; an optimisation
    barrier keeps XLA from folding the transpose back into the product. Gradients equal autodiff's
    up to float rounding. Forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``) through it is
    not defined; use reverse mode (``jax.grad``, ``jax.jacrev``).
    """
    return inputs @ kernel


def _dense_product_forward(inputs: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return inputs @ kernel, (inputs, kernel)


def _dense_product_backward(residuals: tuple[jax.Array, jax.Array], grads: jax.Array) -> tuple[jax.Array, jax.Array]:
    inputs, kernel = residuals
    rows_in, rows_grad = inputs.reshape(-1, inputs.shape[-1]), grads.reshape(-1, grads.shape[-1])
    if kernel.shape[1] < kernel.shape[0]:
        kernel_grad = jax.lax.optimization_barrier(rows_grad.T @ rows_in).T
    else:
        kernel_grad = rows_in.T @ rows_grad
    return grads @ kernel.T, kernel_grad


dense_product.defvjp(_dense_product_forward, _dense_product_backward)


def dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: jax.lax.DotDimensionNumbers,
                      precision: jax.lax.PrecisionLike = None, preferred_element_type: jnp.dtype | None = None
                      ) -> jax.Array:
    """A ``dot_general`` for ``nn.Dense`` that routes its product through ``dense_product``
    (any other contraction, precision or output type goes to ``lax.dot_general`` unchanged)."""
    if dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2 and precision is None \
            and preferred_element_type is None:
        return dense_product(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)


Dense = functools.partial(nn.Dense, dot_general=dense_dot_general)
"""``flax.linen.Dense`` (same parameters and names) whose gradient uses ``dense_product``; every
o2o network builds its dense layers with it."""


ROW_CHUNK = 32
"""Width of the slices :func:`chunked_row_sum` adds before its one reduction (XLA's CPU backend
splits reductions longer than this into windows of this width)."""


def chunked_row_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis (kept, size 1), adding each row's aligned ``ROW_CHUNK``-wide slices
    first, so that XLA reduces only ``ROW_CHUNK`` values per row (plus any remainder) instead of
    splitting a long reduction into ``reduce-window`` kernels, which its CPU code runs slowly when
    YNNPACK does not run the reduction."""
    width = x.shape[-1]
    full = width - width % ROW_CHUNK
    if full <= ROW_CHUNK:
        return jnp.sum(x, axis=-1, keepdims=True)
    chunks = functools.reduce(jnp.add, (x[..., start:start + ROW_CHUNK] for start in range(0, full, ROW_CHUNK)))
    total = jnp.sum(chunks, axis=-1, keepdims=True)
    return total + jnp.sum(x[..., full:], axis=-1, keepdims=True) if full < width else total


def _layer_norm_chunked_forward(x, scale, bias, epsilon):
    # flax's variance, max(0, E[x^2] - E[x]^2), with the feature sums in chunks.
    inverse_width = 1.0 / x.shape[-1]
    mean = chunked_row_sum(x) * inverse_width
    variance = jnp.maximum(chunked_row_sum(x * x) * inverse_width - mean * mean, 0.0)
    inverse_std = jax.lax.rsqrt(variance + epsilon)
    normalised = (x - mean) * inverse_std
    return normalised * scale + bias, (normalised, inverse_std, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_chunked(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    return _layer_norm_chunked_forward(x, scale, bias, epsilon)[0]


def _layer_norm_chunked_backward(epsilon, residuals, grads):
    del epsilon
    normalised, inverse_std, scale = residuals
    inverse_width = 1.0 / grads.shape[-1]
    grads_normalised = grads * scale
    grads_x = inverse_std * (
        grads_normalised
        - chunked_row_sum(grads_normalised) * inverse_width
        - normalised * (chunked_row_sum(grads_normalised * normalised) * inverse_width)
    )
    batch_axes = tuple(range(grads.ndim - 1))
    return grads_x, jnp.sum(grads * normalised, axis=batch_axes), jnp.sum(grads, axis=batch_axes)


_layer_norm_chunked.defvjp(_layer_norm_chunked_forward, _layer_norm_chunked_backward)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float = 1e-6) -> jax.Array:
    """Layer normalisation over the last axis, as ``flax.linen.LayerNorm`` computes it.

    Traced with :func:`rl.xla_cpu.chunked_row_sums` true (CPU programs compiled with YNNPACK
    fusion off), its feature sums go through :func:`chunked_row_sum`, and its backward pass is
    written by hand so that the backward's sums do too (autodiff would sum over the features
    with plain reductions); elsewhere it is the plain computation differentiated by autodiff.
    Both give flax's values up to float rounding. As with :func:`dense_product`, differentiate
    it in reverse mode.
    """
    with jax.named_scope(xla_cpu.LAYER_NORM_SCOPE):
        if xla_cpu.chunked_row_sums():
            return _layer_norm_chunked(x, scale, bias, epsilon)
        # flax's own operations in its order, so XLA gets the program flax.linen.LayerNorm gives it.
        squares = jax.lax.square(x)
        mean, mean_of_squares = jnp.mean(x, axis=-1), jnp.mean(squares, axis=-1)
        variance = jnp.maximum(0.0, mean_of_squares - jax.lax.square(mean))
        centred = x - jnp.expand_dims(mean, -1)
        feature_shape = (1,) * (x.ndim - 1) + (x.shape[-1],)
        inverse_std_scaled = jax.lax.rsqrt(jnp.expand_dims(variance, -1) + epsilon) * scale.reshape(feature_shape)
        return centred * inverse_std_scaled + bias.reshape(feature_shape)


class LayerNorm(nn.Module):
    """``flax.linen.LayerNorm`` (the same ``scale`` and ``bias`` parameters, named alike, so
    checkpoints carry over) computed by :func:`layer_norm`; every o2o network normalises with it."""

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return layer_norm(x, scale, bias, self.epsilon)


@custom_vmap
def qr_one_matrix_at_a_time(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``jnp.linalg.qr`` (reduced) whose batched form, under ``vmap``, factors one matrix after
    another in a loop instead of in one batched LAPACK call.

    Why: on the CPU, jaxlib's batched LAPACK kernels split a large enough batch into tasks on
    XLA's intra-op thread pool and block their pool thread until the tasks finish. When as many
    such calls run at once as the pool has threads (two on a 2-core machine, e.g. the QRs of
    several layers initialised in one jitted, seed-vmapped ``create``), every pool thread waits
    for tasks no thread is left to run, and the program never returns (a loop of jitted,
    3-seed-vmapped creations of a 5-critic agent with orthogonal initialisation hung within 400
    creations in each of five runs, jax 0.10.2). One matrix per call runs inline, so that cannot
    happen. Same factors, bit for bit.
    """
    q, r = jnp.linalg.qr(matrix)
    return q, r


@qr_one_matrix_at_a_time.def_vmap
def _qr_loop_over_batch(axis_size: int, in_batched: list[bool], matrix: jax.Array):
    del axis_size, in_batched  # vmap calls the rule only with the one argument batched
    return jax.lax.map(qr_one_matrix_at_a_time, matrix), (True, True)


def orthogonal(scale: float | jax.Array = 1.0) -> Callable:
    """``jax.nn.initializers.orthogonal(scale)`` (columns on the last axis), drawing the same
    values, but safe to batch on the CPU: its QR goes through ``qr_one_matrix_at_a_time``."""

    def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        if len(shape) < 2:
            raise ValueError(f"orthogonal initialisation needs at least 2 dimensions, got shape {tuple(shape)}")
        rows, columns = math.prod(shape) // shape[-1], shape[-1]
        normal = jax.random.normal(key, (max(rows, columns), min(rows, columns)), dtype)
        q, r = qr_one_matrix_at_a_time(normal)
        q = q * jnp.sign(jnp.diagonal(r))[None, :]
        if rows < columns:
            q = q.T
        return jnp.asarray(scale, dtype) * q.reshape(shape)

    return init


def kernel_init(orthogonal_init: bool, scale: float = 1.0) -> Callable:
    """Orthogonal(scale * sqrt(2)) initialiser (jaxrl/WSRL style), or flax's default LeCun normal
    scaled by ``scale**2`` in variance (SB3/SBX style)."""
    if orthogonal_init:
        return orthogonal(scale * jnp.sqrt(2.0))
    return nn.initializers.variance_scaling(scale**2, "fan_in", "truncated_normal")


class MLP(nn.Module):
    """Dense → [LayerNorm] → activation for every hidden layer.

    ``activate_final`` applies the block to the last layer too (then the output is a feature
    vector, as the heads below expect). ``final_hidden_scale`` multiplies the initialisation gain
    of the last hidden layer only (WSRL's ``kernel_scale_final``).
    """

    hidden_dims: Sequence[int]
    layer_norm: bool = False
    orthogonal_init: bool = False
    final_hidden_scale: float = 1.0
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for index, width in enumerate(self.hidden_dims):
            scale = self.final_hidden_scale if index == len(self.hidden_dims) - 1 else 1.0
            x = Dense(width, kernel_init=kernel_init(self.orthogonal_init, scale))(x)
            if self.layer_norm:
                x = LayerNorm()(x)
            x = self.activation(x)
        return x


class StateActionValue(nn.Module):
    """Q(s, a): an MLP on concat(s, a) with a scalar head."""

    hidden_dims: Sequence[int]
    layer_norm: bool = False
    orthogonal_init: bool = False
    final_hidden_scale: float = 1.0

    @nn.compact
    def __call__(self, observations: jax.Array, actions: jax.Array) -> jax.Array:
        inputs = jnp.concatenate([observations, actions], axis=-1)
        features = MLP(self.hidden_dims, self.layer_norm, self.orthogonal_init, self.final_hidden_scale)(inputs)
        return Dense(1, kernel_init=kernel_init(self.orthogonal_init))(features)[..., 0]


class StateValue(nn.Module):
    """V(s): an MLP with a scalar head."""

    hidden_dims: Sequence[int]
    layer_norm: bool = False
    orthogonal_init: bool = False

    @nn.compact
    def __call__(self, observations: jax.Array) -> jax.Array:
        features = MLP(self.hidden_dims, self.layer_norm, self.orthogonal_init)(observations)
        return Dense(1, kernel_init=kernel_init(self.orthogonal_init))(features)[..., 0]


def ensemble(module_cls: type[nn.Module], size: int) -> type[nn.Module]:
    """A module class whose parameters gain a leading axis of ``size`` independent members.

    Calling it broadcasts the inputs to every member and returns outputs with a leading member
    axis, computed as one batched program (no Python loop over members).
    """
    return nn.vmap(
        module_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=None,
        out_axes=0,
        axis_size=size,
    )


class GaussianPolicyHead(nn.Module):
    """Mean and clipped log-std of a diagonal Gaussian over pre-squash actions.

    ``state_dependent_std`` selects a log-std head per state (SAC) or one learned vector (WSRL's
    ``uniform``).
    """

    hidden_dims: Sequence[int]
    action_dim: int
    layer_norm: bool = False
    orthogonal_init: bool = False
    final_hidden_scale: float = 1.0
    log_std_min: float = -20.0
    log_std_max: float = 2.0
    state_dependent_std: bool = True

    @nn.compact
    def __call__(self, observations: jax.Array) -> tuple[jax.Array, jax.Array]:
        features = MLP(self.hidden_dims, self.layer_norm, self.orthogonal_init, self.final_hidden_scale)(observations)
        mean = Dense(self.action_dim, kernel_init=kernel_init(self.orthogonal_init))(features)
        if self.state_dependent_std:
            log_std = Dense(self.action_dim, kernel_init=kernel_init(self.orthogonal_init))(features)
        else:
            log_std = jnp.broadcast_to(self.param("log_std", nn.initializers.zeros, (self.action_dim,)), mean.shape)
        return mean, jnp.clip(log_std, self.log_std_min, self.log_std_max)


def subset_min(values: jax.Array, key: jax.Array, subset_size: int, with_replacement: bool) -> jax.Array:
    """Minimum over a random subset of the leading (ensemble) axis, as in REDQ.

    One subset is drawn per call and shared by every element of the batch. With the subset size
    equal to the ensemble size and no replacement this is the plain minimum over all members.
    """
    size = values.shape[0]
    if subset_size > size and not with_replacement:
        raise ValueError(f"subset_size {subset_size} exceeds the ensemble size {size}")
    if subset_size == size and not with_replacement:
        return values.min(axis=0)
    if with_replacement:
        members = jax.random.randint(key, (subset_size,), 0, size)
    else:
        members = jax.random.permutation(key, size)[:subset_size]
    return values[members].min(axis=0)
