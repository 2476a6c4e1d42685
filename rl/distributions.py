"""Action distributions: a thin layer over distrax."""

from __future__ import annotations

import distrax
import jax
import jax.numpy as jnp


def tanh_gaussian(mean: jax.Array, log_std: jax.Array) -> distrax.Distribution:
    """Diagonal Gaussian squashed by tanh into (-1, 1); log-probabilities include the tanh
    Jacobian (computed stably by distrax's Tanh bijector)."""
    base = distrax.MultivariateNormalDiag(loc=mean, scale_diag=jnp.exp(log_std))
    return distrax.Transformed(base, distrax.Block(distrax.Tanh(), ndims=1))


def tanh_gaussian_mode(mean: jax.Array) -> jax.Array:
    """The deterministic action of a tanh-Gaussian policy: tanh(mean)."""
    return jnp.tanh(mean)
