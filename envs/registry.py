"""``envs.make``: one entry point for gymnasium ids, o2o's own environments and user classes.

- ``make("Hopper-v5")``: any registered gymnasium id (classic control, MuJoCo, ...).
- ``make("o2o/LaserPulse-v0")``: the project's JAX-native environments (gymnasium face); their
  functional cores come from :func:`make_jax`.
- ``make("my_pkg.envs:MyEnv", **kwargs)``: a user's ``gymnasium.Env`` subclass (or a factory
  returning one) by import path.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Callable

import gymnasium as gym
import numpy as np

from envs.wrappers import RescaleToUnit

# id -> "module:factory" returning a gymnasium.Env; imported lazily so that `import envs` stays light.
PROJECT_ENVS: dict[str, str] = {
    "o2o/LaserPulse-v0": "envs.laser:make_laser_env",
    "o2o/OrbitCorrection-v0": "envs.beam:make_orbit_env",
    "o2o/SORBandit-v0": "envs.solver:make_sor_bandit_env",
    "o2o/HeatSSOR-v0": "envs.solver:make_heat_ssor_env",
}


class EnvError(ValueError):
    """An environment id that cannot be made, or spaces an agent cannot use."""


def _import_object(path: str) -> Any:
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise EnvError(f"'{path}' is not of the form 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise EnvError(f"cannot import module '{module_name}' for environment '{path}': {error}") from error
    if not hasattr(module, attribute):
        raise EnvError(f"module '{module_name}' has no attribute '{attribute}'")
    return getattr(module, attribute)


def make(env_id: str, rescale_actions: bool = False, **kwargs: Any) -> gym.Env:
    """Create an environment by id (see the module docstring).

    ``rescale_actions`` maps a Box action space to [-1, 1] (what tanh-squashed policies emit).
    """
    if env_id in PROJECT_ENVS:
        env = _import_object(PROJECT_ENVS[env_id])(**kwargs)
    elif ":" in env_id and env_id not in gym.registry:
        factory: Callable[..., Any] = _import_object(env_id)
        env = factory(**kwargs)
        if not isinstance(env, gym.Env):
            raise EnvError(f"'{env_id}' returned {type(env).__name__}, not a gymnasium.Env")
    else:
        try:
            env = gym.make(env_id, **kwargs)
        except gym.error.Error as error:
            known = ", ".join(sorted(PROJECT_ENVS))
            raise EnvError(
                f"unknown environment id '{env_id}': not a gymnasium id, not one of o2o's ({known}), "
                "and not an import path 'package.module:ClassName'"
            ) from error
    if rescale_actions and isinstance(env.action_space, gym.spaces.Box):
        env = RescaleToUnit(env)
    return env


def env_factory(env_id: str, rescale_actions: bool = False, **kwargs: Any) -> Callable[[], gym.Env]:
    """A zero-argument callable that makes a fresh copy of the environment."""
    return lambda: make(env_id, rescale_actions=rescale_actions, **kwargs)


def check_spaces(env: gym.Env, continuous_actions: bool | None = None) -> None:
    """Raise :class:`EnvError` unless the observation space is a flat Box and the action space is
    a Box (``continuous_actions=True``), Discrete (``False``) or either (``None``)."""
    observation_space = env.observation_space
    if not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 1:
        raise EnvError(
            f"observation space must be a 1-D Box, got {observation_space}; flatten it with "
            "gymnasium.wrappers.FlattenObservation"
        )
    action_space = env.action_space
    if continuous_actions is True and not (isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1):
        raise EnvError(f"this agent needs a 1-D Box action space, got {action_space}")
    if continuous_actions is False and not isinstance(action_space, gym.spaces.Discrete):
        raise EnvError(f"this agent needs a Discrete action space, got {action_space}")
    if isinstance(action_space, gym.spaces.Box) and not np.all(np.isfinite(action_space.low) & np.isfinite(action_space.high)):
        raise EnvError(f"the Box action space must be bounded, got low={action_space.low}, high={action_space.high}")


def parse_env_kwargs(text: str) -> dict[str, Any]:
    """Keyword arguments for an environment's constructor from the command line's JSON object
    (``'{"power": 2.0}'``); anything else raises :class:`EnvError` showing what was given."""
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as error:
        raise EnvError(f"--env-kwargs must be a JSON object such as '{{\"power\": 2.0}}'; got {text!r} ({error.msg})") from None
    if not isinstance(kwargs, dict):
        raise EnvError(f"--env-kwargs must be a JSON object such as '{{\"power\": 2.0}}'; got {text!r}")
    return kwargs


def steps_on_device(env_id: str, env_loop: str = "device") -> bool:
    """Whether training on ``env_id`` steps its envs on the device: it has a JAX core and the
    caller's ``env_loop`` choice is ``"device"`` (``"host"`` steps the gymnasium face)."""
    return env_loop == "device" and env_id in PROJECT_ENVS


def make_jax(env_id: str, **kwargs: Any):
    """The functional JAX core of a project environment (for fully jitted rollouts)."""
    if env_id not in PROJECT_ENVS:
        raise EnvError(f"'{env_id}' has no JAX core; JAX-native ids: {', '.join(sorted(PROJECT_ENVS))}")
    env = make(env_id, **kwargs)
    core = getattr(env.unwrapped, "core", None)
    if core is None:
        raise EnvError(f"'{env_id}' did not expose a JAX core")
    return core, env.unwrapped.params
