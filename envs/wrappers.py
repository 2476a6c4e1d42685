"""Gymnasium wrappers the agents need; gymnasium's own wrappers are used wherever they fit."""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class RescaleToUnit(gym.ActionWrapper):
    """Expose a bounded Box action space as [-1, 1] and map actions affinely to the env's bounds.

    Unlike ``gymnasium.wrappers.RescaleAction`` this clips out-of-range actions instead of
    asserting, since a tanh policy may return exactly +-1 after float32 rounding.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        space = env.action_space
        assert isinstance(space, gym.spaces.Box)
        self._low = space.low.astype(np.float64)
        self._high = space.high.astype(np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=space.shape, dtype=np.float32)

    def action(self, action: np.ndarray) -> np.ndarray:
        """[-1, 1] → [low, high]."""
        return unit_to_bounds(action, self._low, self._high).astype(self.env.action_space.dtype)


def unit_to_bounds(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map actions in [-1, 1] (clipped there first) affinely onto [low, high], in float64; any
    leading batch axes broadcast."""
    unit = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
    return np.asarray(low, np.float64) + (unit + 1.0) * 0.5 * (np.asarray(high, np.float64) - np.asarray(low, np.float64))
