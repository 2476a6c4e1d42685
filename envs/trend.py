"""Trend stacking: observe ``[delta x_{t-1}, delta x_t, x_t]`` instead of ``x_t``.

``delta x_t = x_t - x_{t-1}`` is the change the last action caused. At reset there is no earlier
observation, so both changes are zero: ``s_0 = [0, 0, x_0]``, ``s_1 = [0, x_1 - x_0, x_1]``,
``s_2 = [x_1 - x_0, x_2 - x_1, x_2]``, ... This is the state of trend-based SAC
(:mod:`agents.tbsac`), whose convolutions read it as a ``3 x n`` image. The orbit-correction
environment already emits it (with a probe step at reset); these wrappers give it to any
environment with a flat ``Box`` observation:

- :class:`TrendStack`, a ``gymnasium.Wrapper``;
- :class:`TrendStackCore`, the same for a functional :class:`envs.jax_env.JaxEnv` core.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from envs.jax_env import JaxEnv, StepResult


def trend_stack(previous_change: Any, change: Any, value: Any) -> Any:
    """``[previous_change, change, value]`` along the last axis (numpy or JAX, same type out)."""
    module = jnp if isinstance(value, jax.Array) else np
    return module.concatenate([previous_change, change, value], axis=-1)


def trend_space(space: gym.Space) -> gym.spaces.Box:
    """The Box of trend stacks of observations in the 1-D Box ``space``.

    A change lies in ``[low - high, high - low]`` (infinite where ``space`` is unbounded).
    """
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise ValueError(f"trend stacking needs a 1-D Box observation space, got {space}")
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    with np.errstate(invalid="ignore"):
        span = high - low
    span = np.where(np.isnan(span), np.inf, span)  # inf - inf where both bounds are +inf or -inf
    return gym.spaces.Box(
        low=np.concatenate([-span, -span, low]).astype(np.float32),
        high=np.concatenate([span, span, high]).astype(np.float32),
        dtype=np.float32,
    )


class TrendStack(gym.Wrapper):
    """Observe ``[delta x_{t-1}, delta x_t, x_t]`` (float32) of a flat-Box environment.

    Rewards, ``terminated``, ``truncated`` and ``info`` pass through unchanged.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = trend_space(env.observation_space)
        size = env.observation_space.shape[0]
        self._value = np.zeros(size, np.float32)
        self._change = np.zeros(size, np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Reset the env; the first stack is ``[0, 0, x_0]``."""
        observation, info = self.env.reset(seed=seed, options=options)
        self._value = np.asarray(observation, np.float32).copy()
        self._change = np.zeros_like(self._value)
        return trend_stack(self._change, self._change, self._value), info

    def step(self, action):
        """Step the env and shift the stack by one change."""
        observation, reward, terminated, truncated, info = self.env.step(action)
        value = np.asarray(observation, np.float32).copy()
        change = value - self._value
        stacked = trend_stack(self._change, change, value)
        self._value, self._change = value, change
        return stacked, reward, terminated, truncated, info


class TrendState(struct.PyTreeNode):
    """State of :class:`TrendStackCore`: the inner state, the last observation and its change."""

    inner: Any
    value: jax.Array
    change: jax.Array


class TrendStackCore(JaxEnv[TrendState, Any]):
    """A functional core whose observations are the trend stacks of ``core``'s (flat) ones.

    Parameters are the inner core's; everything stays jittable and vmappable.
    """

    def __init__(self, core: JaxEnv) -> None:
        self.core = core

    def default_params(self) -> Any:
        """The inner core's default parameters."""
        return self.core.default_params()

    def reset(self, key: jax.Array, params: Any) -> tuple[jax.Array, TrendState]:
        """Reset the inner core; the first stack is ``[0, 0, x_0]``."""
        observation, inner = self.core.reset(key, params)
        value = observation.astype(jnp.float32)
        change = jnp.zeros_like(value)
        return trend_stack(change, change, value), TrendState(inner, value, change)

    def step(self, key: jax.Array, state: TrendState, action: jax.Array, params: Any) -> StepResult:
        """Step the inner core and shift the stack by one change."""
        result = self.core.step(key, state.inner, action, params)
        value = result.obs.astype(jnp.float32)
        change = value - state.value
        stacked = trend_stack(state.change, change, value)
        return result._replace(obs=stacked, state=TrendState(result.state, value, change))

    def observation_space(self, params: Any) -> gym.spaces.Box:
        """Trend stacks of the inner observation space (see :func:`trend_space`)."""
        return trend_space(self.core.observation_space(params))

    def action_space(self, params: Any) -> gym.spaces.Space:
        """The inner core's action space."""
        return self.core.action_space(params)
