"""SAC learns Pendulum-v1: mean evaluation return >= -250 over 10 episodes within 20,000 steps,
for each of 3 seeds (trained together as one vmapped run). A broken critic, actor or temperature
update stays near the random policy's return of about -1,200."""

import numpy as np
import pytest

from agents.sac import SAC, SACConfig
from envs.registry import env_factory
from rl.loops import OnlineConfig, train_online


@pytest.mark.slow
def test_sac_reaches_minus_250_on_pendulum_within_20k_steps_for_3_of_3_seeds(tmp_path):
    make_env = env_factory("Pendulum-v1", rescale_actions=True)
    probe = make_env()
    config = OnlineConfig(total_steps=20_000, warmup_steps=1_000, eval_interval=5_000, eval_episodes=10, log_interval=1_000)
    _, evaluations = train_online(
        create_agent=lambda key: SAC.create(key, probe.observation_space, probe.action_space, SACConfig()),
        make_env=make_env,
        config=config,
        seeds=[0, 1, 2],
        run_dir=tmp_path,
        progress=False,
    )
    final = {row["seed"]: row["eval_return"] for row in evaluations if row["step"] == 20_000}
    print("final evaluation returns:", final)
    assert len(final) == 3
    assert all(value >= -250 for value in final.values()), final
    assert np.mean(list(final.values())) >= -250
