"""The laser benchmark's per-seed verdicts (``experiments/laser_sac.py``)."""

import numpy as np

from experiments.laser_sac import WITHIN_STEPS, summary_rows


def _traces(episodes: int, steps: int, terminated_episode: int | None) -> dict[str, np.ndarray]:
    """One seed whose episodes all sit at x 0.87 / 1.58 ps, except one that terminates at step 1
    with a stretched pulse (kept in the later steps, as ``episode_traces`` does)."""
    x = np.full((1, episodes, steps), 0.87)
    fwhm = np.full((1, episodes, steps), 1.58)
    active = np.ones((1, episodes, steps), bool)
    if terminated_episode is not None:
        x[0, terminated_episode], fwhm[0, terminated_episode] = 0.05, 30.5
        active[0, terminated_episode, 1:] = False
    return {"x": x, "fwhm_ps": fwhm, "reward": np.ones((1, episodes, steps)), "active": active}


def test_one_terminated_episode_fails_the_seed_on_the_mean_and_is_counted_alone() -> None:
    row = summary_rows("sac", [2], _traces(20, 50, terminated_episode=0), x_target=0.83, fwhm_bound=1.63)[0]
    assert not row["meets_target"]
    assert row[f"fwhm_ps_at_{WITHIN_STEPS}"] > 1.63
    assert row["episodes_on_target"] == 19
    assert row["terminated_episodes"] == 1


def test_a_seed_with_every_episode_on_target_meets_it() -> None:
    row = summary_rows("sac", [0], _traces(20, 50, terminated_episode=None), x_target=0.83, fwhm_bound=1.63)[0]
    assert row["meets_target"] and row["episodes_on_target"] == 20 and row["terminated_episodes"] == 0
    assert row["first_step_on_target"] == 1.0
