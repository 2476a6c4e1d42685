"""envs.make: gymnasium ids, o2o ids, user environments by import path, and clear space errors."""

import gymnasium as gym
import numpy as np
import pytest

from envs import registry
from envs.registry import EnvError


USER_MODULE = """
import gymnasium as gym
import numpy as np


class TinyUserEnv(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)

    def __init__(self, scale=1.0):
        self.scale = scale
        self.last_action = None

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.last_action = np.asarray(action)
        return np.zeros(2, np.float32), self.scale, False, False, {}
"""


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A user's own module on the import path, as `pip install -e` of their package would put it."""
    (tmp_path / "my_user_envs.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_user_envs"


def test_gymnasium_ids_are_made_with_unit_actions_when_asked():
    env = registry.make("Pendulum-v1", rescale_actions=True)
    assert env.action_space.low.tolist() == [-1.0] and env.action_space.high.tolist() == [1.0]
    env.reset(seed=0)
    env.step(np.array([1.0], np.float32))


def test_user_environment_by_import_path_with_kwargs(user_package):
    env = registry.make(f"{user_package}:TinyUserEnv", rescale_actions=True, scale=3.0)
    env.reset(seed=0)
    _, reward, *_ = env.step(np.array([1.0], np.float32))
    assert reward == 3.0
    assert env.unwrapped.last_action.tolist() == [2.0]  # [-1, 1] mapped to the env's [-2, 2]


@pytest.mark.parametrize(
    "env_id, message",
    [
        ("NoSuchEnv-v0", "unknown environment id 'NoSuchEnv-v0'"),
        ("no_such_module:Env", "cannot import module 'no_such_module'"),
        ("my_user_envs:Missing", "has no attribute 'Missing'"),
    ],
)
def test_unknown_ids_fail_with_a_message_naming_them(user_package, env_id, message):
    with pytest.raises(EnvError, match=message):
        registry.make(env_id)


def test_space_checks_name_what_the_agent_needs():
    with pytest.raises(EnvError, match="1-D Box action space"):
        registry.check_spaces(gym.make("CartPole-v1"), continuous_actions=True)
    with pytest.raises(EnvError, match="Discrete action space"):
        registry.check_spaces(gym.make("Pendulum-v1"), continuous_actions=False)
    registry.check_spaces(gym.make("Hopper-v5"), continuous_actions=True)


@pytest.mark.parametrize("env_id", sorted(registry.PROJECT_ENVS))
def test_project_environments_are_registered(env_id):
    module_path = registry.PROJECT_ENVS[env_id].split(":")[0]
    pytest.importorskip(module_path)
    env = registry.make(env_id)
    observation, _ = env.reset(seed=0)
    assert env.observation_space.contains(np.asarray(observation, env.observation_space.dtype))
