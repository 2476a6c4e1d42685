"""Functional JAX environments and their gymnasium face.

A project environment is written once as a pure functional core (``reset``/``step`` on explicit
state and parameter pytrees, gymnax-style) so that thousands of environments and seeds compile into
one program with ``jit``/``vmap``/``lax.scan``. :class:`GymnasiumFace` wraps the same core as a
``gymnasium.Env`` for host loops, ``check_env`` and user code; both faces share every line of the
dynamics, so they cannot drift apart.

Unlike gymnax, ``step`` keeps ``terminated`` and ``truncated`` apart and does not reset by itself:
bootstrapping needs the distinction. :func:`step_autoreset` adds the reset for vectorised rollouts.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any, Generic, NamedTuple, TypeVar

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

EnvState = TypeVar("EnvState")
EnvParams = TypeVar("EnvParams")


class StepResult(NamedTuple):
    """What one functional step returns; ``info`` is a dict of arrays with static keys."""

    obs: jax.Array
    state: Any
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    info: dict[str, jax.Array]


class JaxEnv(abc.ABC, Generic[EnvState, EnvParams]):
    """A pure functional environment: every method is jittable and vmappable.

    Subclasses hold only static configuration (Python scalars, shapes); everything that changes
    during an episode lives in ``EnvState`` and everything a user may randomise lives in
    ``EnvParams`` (both pytrees).
    """

    @abc.abstractmethod
    def default_params(self) -> EnvParams:
        """Return the nominal parameter pytree."""

    @abc.abstractmethod
    def reset(self, key: jax.Array, params: EnvParams) -> tuple[jax.Array, EnvState]:
        """Start an episode; return ``(observation, state)``."""

    @abc.abstractmethod
    def step(self, key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams) -> StepResult:
        """Advance one step without resetting at episode end."""

    @abc.abstractmethod
    def observation_space(self, params: EnvParams) -> gym.spaces.Space:
        """The gymnasium observation space for these parameters."""

    @abc.abstractmethod
    def action_space(self, params: EnvParams) -> gym.spaces.Space:
        """The gymnasium action space for these parameters."""

    def trace_scope(self) -> contextlib.AbstractContextManager:
        """Context that callers enter while tracing programs that ``vmap`` a ``lax.scan`` over this
        env's steps (rollouts, evaluations).

        Default: nothing. Envs whose numerics run in a scoped ``jax.enable_x64`` return that scope
        here: ``vmap`` re-traces a scanned body outside any scope entered inside it, and the
        float64 parts then no longer agree on their dtypes.
        """
        return contextlib.nullcontext()


class RewardTransformed(JaxEnv):
    """``core`` with every reward replaced by ``scale * reward + bias``: the functional twin of
    ``gymnasium.wrappers.TransformReward(face, lambda r: scale * r + bias)``, so a loop stepping the
    core on the device trains on the same rewards as one stepping the wrapped gymnasium face.

    Everything else (spaces, parameters, resets, termination, info, trace scope) is ``core``'s.
    """

    def __init__(self, core: JaxEnv, scale: float = 1.0, bias: float = 0.0) -> None:
        self.core, self.scale, self.bias = core, float(scale), float(bias)

    def default_params(self) -> Any:
        """The wrapped core's parameters."""
        return self.core.default_params()

    def reset(self, key: jax.Array, params: Any) -> tuple[jax.Array, Any]:
        """The wrapped core's reset."""
        return self.core.reset(key, params)

    def step(self, key: jax.Array, state: Any, action: jax.Array, params: Any) -> StepResult:
        """The wrapped core's step with its reward transformed (same dtype)."""
        result = self.core.step(key, state, action, params)
        reward = (self.scale * result.reward + self.bias).astype(jnp.result_type(result.reward))
        return result._replace(reward=reward)

    def observation_space(self, params: Any) -> gym.spaces.Space:
        """The wrapped core's observation space."""
        return self.core.observation_space(params)

    def action_space(self, params: Any) -> gym.spaces.Space:
        """The wrapped core's action space."""
        return self.core.action_space(params)

    def trace_scope(self) -> contextlib.AbstractContextManager:
        """The wrapped core's trace scope."""
        return self.core.trace_scope()


def step_autoreset(
    env: JaxEnv, key: jax.Array, state: Any, action: jax.Array, params: Any
) -> tuple[StepResult, jax.Array]:
    """Step, and where the episode ended replace state and observation by a fresh reset.

    Returns the step result (whose ``obs``/``state`` are the post-reset ones where the episode
    ended) and the true final observation of the step, which the caller stores as
    ``next_observation`` so that truncated transitions still bootstrap from the right state.
    """
    key_step, key_reset = jax.random.split(key)
    result = env.step(key_step, state, action, params)
    reset_obs, reset_state = env.reset(key_reset, params)
    done = jnp.logical_or(result.terminated, result.truncated)
    state = jax.tree.map(lambda r, s: jnp.where(done, r, s), reset_state, result.state)
    obs = jnp.where(done, reset_obs, result.obs)
    return result._replace(obs=obs, state=state), result.obs


class GymnasiumFace(gym.Env):
    """A ``gymnasium.Env`` driven by a :class:`JaxEnv` core (jitted once per instance).

    ``reset(seed=s)`` derives the episode's key from ``s`` so seeded resets are reproducible;
    ``reset()`` without a seed continues the instance's key stream.
    """

    metadata = {"render_modes": []}

    def __init__(self, core: JaxEnv, params: Any | None = None) -> None:
        self.core = core
        self.params = core.default_params() if params is None else params
        self.observation_space = core.observation_space(self.params)
        self.action_space = core.action_space(self.params)
        self._reset = jax.jit(core.reset)
        self._step = jax.jit(core.step)
        self._key = jax.random.PRNGKey(0)
        self._state: Any = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Reset the core; returns ``(observation, info)`` as numpy."""
        super().reset(seed=seed)
        if seed is not None:
            self._key = jax.random.PRNGKey(seed)
        self._key, key = jax.random.split(self._key)
        obs, self._state = self._reset(key, self.params)
        return self._to_obs(obs), {}

    def step(self, action):
        """Step the core; returns the gymnasium 5-tuple as numpy / Python scalars."""
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        self._key, key = jax.random.split(self._key)
        result = self._step(key, self._state, jnp.asarray(action), self.params)
        self._state = result.state
        info = {name: np.asarray(value) for name, value in result.info.items()}
        return (
            self._to_obs(result.obs),
            float(result.reward),
            bool(result.terminated),
            bool(result.truncated),
            info,
        )

    def _to_obs(self, obs: jax.Array) -> np.ndarray:
        dtype = getattr(self.observation_space, "dtype", None)
        return np.asarray(obs, dtype=dtype)
