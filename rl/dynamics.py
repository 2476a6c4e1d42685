"""Gaussian dynamics-model ensemble (with elites) and jitted model rollouts for off-policy
evaluation.

The model follows the MOBILE / OfflineRL-Kit recipe used by Uni-O4's OPE (spec ``uni_o4.md``
section 5): an ensemble of Gaussian MLPs predicting ``(Δs, r)`` from ``(s, a)`` in raw (not
normalised) state units, inputs standardised with the training-set statistics, learned soft
bounds on the log-variance, per-layer weight decay, a holdout set of ``min(20 %, 1000)``
transitions, early stopping after ``patience`` epochs without a holdout improvement (every member
keeps its best parameters) and the ``num_elites`` members of lowest holdout MSE as elites.

Ensemble members are a leading parameter axis (``nn.vmap``); one training epoch is one jitted
``lax.scan``. :func:`rollout_values` runs ``H`` model steps of a policy from a batch of start
states as one ``lax.scan`` with a termination mask (the engine of Uni-O4's AM-Q OPE), and
:func:`reduce_values` turns its output into a score.

Termination functions are hand-written per environment family (:data:`TERMINATION_FNS`); a new
task must supply one (or declare that it never terminates).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Literal, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rl.nets import Dense

TerminationFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
"""``(observations, actions, next_observations) -> terminated`` (bool, batch shape), raw units."""


# ----------------------------------------------------------------------------- termination


def _hopper_terminated(observations: jax.Array, actions: jax.Array, next_observations: jax.Array) -> jax.Array:
    """Hopper-v5 (positions excluded): unhealthy when z <= 0.7, |angle| >= 0.2 or any later
    observation entry leaves (-100, 100)."""
    z, angle = next_observations[..., 0], next_observations[..., 1]
    healthy = (z > 0.7) & (jnp.abs(angle) < 0.2) & jnp.all(jnp.abs(next_observations[..., 1:]) < 100.0, axis=-1)
    return ~healthy


def _walker_terminated(observations: jax.Array, actions: jax.Array, next_observations: jax.Array) -> jax.Array:
    """Walker2d-v5: unhealthy when z leaves (0.8, 2.0) or the angle leaves (-1, 1)."""
    z, angle = next_observations[..., 0], next_observations[..., 1]
    return ~((z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0))


def _ant_terminated(observations: jax.Array, actions: jax.Array, next_observations: jax.Array) -> jax.Array:
    """Ant-v5 (positions excluded): unhealthy when the torso height leaves [0.2, 1.0] or the state
    is not finite."""
    z = next_observations[..., 0]
    return ~((z >= 0.2) & (z <= 1.0) & jnp.all(jnp.isfinite(next_observations), axis=-1))


def never_terminated(observations: jax.Array, actions: jax.Array, next_observations: jax.Array) -> jax.Array:
    """Tasks without a terminal state (HalfCheetah, Pendulum, ...): always False."""
    return jnp.zeros(next_observations.shape[:-1], bool)


TERMINATION_FNS: dict[str, TerminationFn] = {
    "hopper": _hopper_terminated,
    "walker2d": _walker_terminated,
    "ant": _ant_terminated,
    "halfcheetah": never_terminated,
    "pendulum": never_terminated,
}
"""Termination functions by lower-case environment family (the env id before its first '-')."""


def termination_fn(env_id: str) -> TerminationFn:
    """The termination function of ``env_id`` (e.g. ``Hopper-v5``, ``hopper-medium-v2``); raises a
    ValueError naming the supported families for an unknown one."""
    family = re.split(r"[-_/]", env_id.lower())[0]
    if family not in TERMINATION_FNS:
        raise ValueError(
            f"no model termination function for env '{env_id}' (family '{family}'); supported: "
            f"{sorted(TERMINATION_FNS)}. Add one to rl.dynamics.TERMINATION_FNS or pass termination_fn."
        )
    return TERMINATION_FNS[family]


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class DynamicsConfig:
    """Hyperparameters of the Gaussian dynamics ensemble (MOBILE / OfflineRL-Kit defaults)."""

    ensemble_size: int = 7
    """Members of the ensemble."""
    num_elites: int = 5
    """Members with the lowest holdout MSE used for prediction."""
    hidden_dims: tuple[int, ...] = (200, 200, 200, 200)
    """Hidden widths of each member (Swish activations)."""
    weight_decay: tuple[float, ...] = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)
    """L2 weight decay per layer (hidden layers, then the output layer): len(hidden_dims) + 1 values."""
    learning_rate: float = 1e-3
    """Adam learning rate."""
    batch_size: int = 256
    """Minibatch per member (each member draws its own)."""
    holdout_fraction: float = 0.2
    """Fraction of the data held out for early stopping and elite choice ..."""
    max_holdout: int = 1000
    """... capped at this many transitions."""
    patience: int = 5
    """Stop after this many epochs without a >1 % holdout improvement of any member."""
    max_epochs: int | None = None
    """Hard cap on training epochs (None: until early stopping)."""
    logvar_loss_coef: float = 0.01
    """Weight of the penalty keeping the learned log-variance bounds tight."""

    def __post_init__(self) -> None:
        checks = {
            "ensemble_size": self.ensemble_size >= 1,
            "num_elites": 1 <= self.num_elites <= self.ensemble_size,
            "weight_decay": len(self.weight_decay) == len(self.hidden_dims) + 1,
            "learning_rate": self.learning_rate > 0,
            "batch_size": self.batch_size >= 1,
            "holdout_fraction": 0.0 < self.holdout_fraction < 1.0,
            "max_holdout": self.max_holdout >= 1,
            "patience": self.patience >= 1,
            "max_epochs": self.max_epochs is None or self.max_epochs >= 1,
        }
        for name, valid in checks.items():
            if not valid:
                raise ValueError(f"DynamicsConfig.{name}={getattr(self, name)!r} is out of range")


class GaussianMLP(nn.Module):
    """One member: Swish MLP → mean and soft-bounded log-variance of ``output_dim`` outputs."""

    hidden_dims: Sequence[int]
    output_dim: int

    @nn.compact
    def __call__(self, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = inputs
        for width in self.hidden_dims:
            x = nn.swish(Dense(width)(x))
        out = Dense(2 * self.output_dim)(x)
        mean, logvar = jnp.split(out, 2, axis=-1)
        max_logvar = self.param("max_logvar", nn.initializers.constant(0.5), (self.output_dim,))
        min_logvar = self.param("min_logvar", nn.initializers.constant(-10.0), (self.output_dim,))
        logvar = max_logvar - nn.softplus(max_logvar - logvar)
        logvar = min_logvar + nn.softplus(logvar - min_logvar)
        return mean, logvar


class DynamicsModel(flax.struct.PyTreeNode):
    """A trained ensemble: stacked member parameters, input statistics and the elite indices."""

    params: dict
    input_mean: jax.Array
    input_std: jax.Array
    elites: jax.Array
    """Indices of the elite members, shape (num_elites,)."""
    holdout_mse: jax.Array
    """Best holdout MSE of every member (normalised-free, raw target units)."""
    hidden_dims: tuple[int, ...] = flax.struct.field(pytree_node=False)
    observation_dim: int = flax.struct.field(pytree_node=False)

    def elite_outputs(self, observations: jax.Array, actions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean and log-variance of every elite at the same inputs: ``[num_elites, B, obs_dim + 1]``."""
        inputs = (jnp.concatenate([observations, actions], axis=-1) - self.input_mean) / self.input_std
        elite_params = jax.tree.map(lambda leaf: leaf[self.elites], self.params)
        size = int(self.elites.shape[0])
        module = _ensemble_module_from(self.hidden_dims, self.observation_dim + 1, size)
        return module.apply({"params": elite_params}, jnp.broadcast_to(inputs, (size,) + inputs.shape))

    def step(self, observations: jax.Array, actions: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One model step ``(next_observations, rewards)``: per sample, the Gaussian of a uniformly
        chosen elite is sampled (no uncertainty penalty)."""
        mean, logvar = self.elite_outputs(observations, actions)
        member_key, noise_key = jax.random.split(key)
        samples = mean + jnp.exp(0.5 * logvar) * jax.random.normal(noise_key, mean.shape)
        choice = jax.random.randint(member_key, observations.shape[:-1], 0, mean.shape[0])
        chosen = jnp.take_along_axis(samples, choice[None, ..., None], axis=0)[0]
        return observations + chosen[..., :-1], chosen[..., -1]


@functools.lru_cache(maxsize=None)
def _ensemble_module_from(hidden_dims: tuple[int, ...], output_dim: int, size: int) -> nn.Module:
    vmapped = nn.vmap(
        GaussianMLP, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0, out_axes=0, axis_size=size
    )
    return vmapped(hidden_dims, output_dim)


def _weight_decay_penalty(params: dict, decays: Sequence[float]) -> jax.Array:
    """Σ_layers decay_l · ½‖W_l‖² (kernels only), summed over members."""
    member = params["GaussianMLP_0"] if "GaussianMLP_0" in params else params
    total = jnp.zeros(())
    for index, decay in enumerate(decays):
        kernel = member[f"Dense_{index}"]["kernel"]
        total = total + decay * 0.5 * jnp.sum(kernel**2)
    return total


def _nll_loss(module: nn.Module, params: dict, inputs: jax.Array, targets: jax.Array, config: DynamicsConfig) -> jax.Array:
    """Gaussian negative log-likelihood (summed over members, mean over samples and outputs) +
    log-variance bound penalty + weight decay."""
    mean, logvar = module.apply({"params": params}, inputs)
    nll = ((mean - targets) ** 2 * jnp.exp(-logvar) + logvar).mean(axis=(1, 2)).sum()
    bounds = params["max_logvar"].sum() - params["min_logvar"].sum()
    return nll + config.logvar_loss_coef * bounds + _weight_decay_penalty(params, config.weight_decay)


@functools.partial(jax.jit, static_argnames=("module", "tx", "config", "num_steps"))
def _train_epoch(params, opt_state, inputs, targets, key, module, tx, config: DynamicsConfig, num_steps: int):
    """``num_steps`` minibatch steps; every member draws its own shuffled order of the data."""
    count = inputs.shape[0]
    size = config.ensemble_size
    orders = jax.vmap(lambda k: jax.random.permutation(k, count))(jax.random.split(key, size))

    def step(carry, index):
        params, opt_state = carry
        rows = jax.lax.dynamic_slice_in_dim(orders, index * config.batch_size, config.batch_size, axis=1)
        loss, grads = jax.value_and_grad(lambda p: _nll_loss(module, p, inputs[rows], targets[rows], config))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jnp.arange(num_steps))
    return params, opt_state, losses.mean()


@functools.partial(jax.jit, static_argnames=("module",))
def _holdout_mse(params, inputs, targets, module) -> jax.Array:
    """Per-member MSE of the predicted mean on the holdout set."""
    size = jax.tree.leaves(params)[0].shape[0]
    mean, _ = module.apply({"params": params}, jnp.broadcast_to(inputs, (size,) + inputs.shape))
    return ((mean - targets) ** 2).mean(axis=(1, 2))


def train_dynamics(
    observations: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    next_observations: np.ndarray,
    config: DynamicsConfig,
    key: jax.Array,
    log: Callable[[dict], None] | None = None,
) -> DynamicsModel:
    """Fit the ensemble on raw transitions; returns the model with its elites.

    Each epoch is one jitted scan over ``len(train) // batch_size`` steps; after it the holdout
    MSE of every member is measured and a member's parameters are kept only when they improve
    its best holdout MSE (so the result is the best snapshot per member). Training stops after
    ``patience`` epochs in which no member improved by more than 1 %, or at ``max_epochs``.
    ``log`` receives ``{"epoch", "train_loss", "holdout_mse"}`` per epoch.
    """
    inputs = np.concatenate([observations, actions], axis=1).astype(np.float32)
    targets = np.concatenate([next_observations - observations, rewards[:, None]], axis=1).astype(np.float32)
    count = inputs.shape[0]
    holdout_size = max(1, min(int(config.holdout_fraction * count), config.max_holdout))
    if count - holdout_size < config.batch_size:
        raise ValueError(f"dynamics training needs more than {config.batch_size + holdout_size} transitions, got {count}")
    split_key, init_key, key = jax.random.split(key, 3)
    order = np.asarray(jax.random.permutation(split_key, count))
    train_rows, holdout_rows = order[holdout_size:], order[:holdout_size]
    mean = inputs[train_rows].mean(axis=0)
    std = inputs[train_rows].std(axis=0) + 1e-6
    train_inputs = jnp.asarray((inputs[train_rows] - mean) / std)
    train_targets = jnp.asarray(targets[train_rows])
    holdout_inputs = jnp.asarray((inputs[holdout_rows] - mean) / std)
    holdout_targets = jnp.asarray(targets[holdout_rows])

    output_dim = targets.shape[1]
    module = _ensemble_module_from(tuple(config.hidden_dims), output_dim, config.ensemble_size)
    params = module.init(init_key, jnp.zeros((config.ensemble_size, 1, inputs.shape[1])))["params"]
    tx = _dynamics_optimizer(config.learning_rate)
    opt_state = tx.init(params)
    # Only the loss-relevant fields are static for the epoch: loop-control fields share compiles.
    epoch_config = dataclasses.replace(config, max_epochs=None, patience=1, holdout_fraction=0.2, max_holdout=1000)
    steps_per_epoch = train_inputs.shape[0] // config.batch_size

    best_mse = np.asarray(_holdout_mse(params, holdout_inputs, holdout_targets, module))
    best_params = params
    epoch, stale = 0, 0
    while config.max_epochs is None or epoch < config.max_epochs:
        key, epoch_key = jax.random.split(key)
        params, opt_state, train_loss = _train_epoch(
            params, opt_state, train_inputs, train_targets, epoch_key, module=module, tx=tx, config=epoch_config, num_steps=steps_per_epoch
        )
        mse = np.asarray(_holdout_mse(params, holdout_inputs, holdout_targets, module))
        improved = (best_mse - mse) / np.maximum(best_mse, 1e-12) > 0.01
        better = mse < best_mse
        best_params = jax.tree.map(
            lambda new, old: jnp.where(better.reshape((-1,) + (1,) * (new.ndim - 1)), new, old), params, best_params
        )
        best_mse = np.where(better, mse, best_mse)
        epoch += 1
        stale = 0 if improved.any() else stale + 1
        if log is not None:
            log({"epoch": epoch, "train_loss": float(train_loss), "holdout_mse": float(np.sort(best_mse)[: config.num_elites].mean())})
        if stale >= config.patience:
            break
    elites = np.argsort(best_mse)[: config.num_elites]
    return DynamicsModel(
        params=best_params,
        input_mean=jnp.asarray(mean),
        input_std=jnp.asarray(std),
        elites=jnp.asarray(elites, jnp.int32),
        holdout_mse=jnp.asarray(best_mse),
        hidden_dims=tuple(config.hidden_dims),
        observation_dim=int(observations.shape[1]),
    )


@functools.lru_cache(maxsize=None)
def _dynamics_optimizer(learning_rate: float) -> optax.GradientTransformation:
    """Cached so that repeated trainings reuse the compiled epoch."""
    return optax.adam(learning_rate)


# ----------------------------------------------------------------------------- model rollouts (OPE)


def rollout_values(
    model: DynamicsModel,
    action_fn: Callable[[jax.Array], jax.Array],
    value_fn: Callable[[jax.Array, jax.Array], jax.Array],
    start_observations: jax.Array,
    key: jax.Array,
    horizon: int,
    terminated_fn: TerminationFn,
) -> tuple[jax.Array, jax.Array]:
    """Roll ``action_fn`` in the model for ``horizon`` steps from every start state.

    Returns ``(values, visited)``, both ``[horizon, B]``: ``values[t] = value_fn(s_t, a_t)`` and
    ``visited[t]`` False once the rollout terminated at an earlier step (the termination function
    fired on the transition out of ``s_{t-1}`` or before). The per-step keys are
    ``fold_in(key, t)``: the same key gives the same model noise (common random numbers).
    Observations are raw; ``action_fn`` and ``value_fn`` do their own normalisation. Pure and
    traceable: call it inside ``jit`` / ``vmap``.
    """

    def step(carry, t):
        observations, alive = carry
        actions = action_fn(observations)
        values = value_fn(observations, actions)
        next_observations, _ = model.step(observations, actions, jax.random.fold_in(key, t))
        terminated = terminated_fn(observations, actions, next_observations)
        # A dead rollout keeps its (finite) last state so that later steps stay well defined.
        next_observations = jnp.where(alive[:, None], next_observations, observations)
        return (next_observations, alive & ~terminated), (values, alive)

    init = (start_observations, jnp.ones(start_observations.shape[:1], bool))
    _, (values, visited) = jax.lax.scan(step, init, jnp.arange(horizon))
    return values, visited


def reduce_values(values: jax.Array, visited: jax.Array, reduction: Literal["sum", "visited_mean"]) -> jax.Array:
    """OPE score from :func:`rollout_values`.

    ``"sum"`` (AM-Q, the spec's recommended design): per rollout Σ_t visited·Q over the horizon,
    averaged over rollouts and divided by the horizon (terminated steps add 0). ``"visited_mean"``
    (reference-code parity): the mean of Q over all visited (s, a) pairs.
    """
    masked = jnp.where(visited, values, 0.0)
    if reduction == "sum":
        return masked.sum(axis=0).mean() / values.shape[0]
    if reduction == "visited_mean":
        return masked.sum() / jnp.maximum(visited.sum(), 1)
    raise ValueError(f"unknown OPE reduction {reduction!r}: expected 'sum' or 'visited_mean'")
