"""Generic pieces of the functional env layer (``envs/jax_env.py``) and the fine-tuning loop's
choice of where envs step (``experiments.offline_to_online.device_envs``)."""

import gymnasium as gym
import jax
import numpy as np

from envs import registry
from envs.jax_env import GymnasiumFace, RewardTransformed
from experiments.offline_to_online import device_envs

ORBIT = "o2o/OrbitCorrection-v0"


def test_reward_transformed_core_scales_and_shifts_only_the_reward() -> None:
    core, params = registry.make_jax(ORBIT)
    wrapped = RewardTransformed(core, scale=0.1, bias=-1.0)
    key = jax.random.PRNGKey(3)
    observation, state = wrapped.reset(key, params)
    plain_observation, plain_state = core.reset(key, params)
    np.testing.assert_array_equal(observation, plain_observation)
    action = 0.5 * np.ones(wrapped.action_space(params).shape, np.float32)
    result, plain = wrapped.step(key, state, action, params), core.step(key, plain_state, action, params)
    np.testing.assert_allclose(result.reward, 0.1 * plain.reward - 1.0, rtol=1e-6)
    assert result.reward.dtype == plain.reward.dtype
    np.testing.assert_array_equal(result.obs, plain.obs)
    assert bool(result.terminated) == bool(plain.terminated) and bool(result.truncated) == bool(plain.truncated)
    assert wrapped.observation_space(params) == core.observation_space(params)
    assert wrapped.action_space(params) == core.action_space(params)


def test_reward_transformed_core_gives_the_rewards_of_the_transformed_gymnasium_face() -> None:
    core, params = registry.make_jax(ORBIT)
    device = GymnasiumFace(RewardTransformed(core, 0.1, 0.5), params)
    host = gym.wrappers.TransformReward(GymnasiumFace(core, params), lambda reward: 0.1 * reward + 0.5)
    device.reset(seed=7), host.reset(seed=7)
    actions = np.random.default_rng(0).uniform(-1, 1, (5, *device.action_space.shape)).astype(np.float32)
    for action in actions:
        assert np.isclose(device.step(action)[1], host.step(action)[1], rtol=1e-6)


def test_fine_tuning_steps_o2o_envs_on_the_device_with_the_training_rewards_and_others_on_the_host() -> None:
    spec = device_envs(ORBIT, "device", reward_scale=0.1)
    assert isinstance(spec.core, RewardTransformed) and spec.core.scale == 0.1 and spec.core.bias == 0.0
    assert type(device_envs(ORBIT, "device").core).__name__ == "OrbitCorrectionCore"
    assert device_envs(ORBIT, "host") is None
    assert device_envs("Pendulum-v1", "device") is None


def test_a_resumed_fine_tuning_keeps_the_env_loop_its_checkpoints_were_written_with(tmp_path, capsys):
    import json

    from experiments.offline_to_online import FINETUNE_RECORD, FinetuneSettings, _resumed_env_loop

    assert _resumed_env_loop(tmp_path, FinetuneSettings(env_loop="host")).env_loop == "host"  # nothing recorded yet
    (tmp_path / FINETUNE_RECORD).write_text(json.dumps({"agent": "sac"}))  # written before the choice existed
    assert _resumed_env_loop(tmp_path, FinetuneSettings()).env_loop == "host"
    assert "continue there" in capsys.readouterr().out
    (tmp_path / FINETUNE_RECORD).write_text(json.dumps({"env_loop": "device"}))
    assert _resumed_env_loop(tmp_path, FinetuneSettings(env_loop="host")).env_loop == "device"
