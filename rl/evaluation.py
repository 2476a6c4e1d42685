"""Evaluation episodes and summary statistics across seeds."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import gymnasium as gym
import numpy as np

ActFn = Callable[[np.ndarray], np.ndarray]
"""Maps observations of shape (num_seeds, num_envs, obs_dim) to actions (num_seeds, num_envs, ...)."""


def episode_seed(run_seed: int, stream: int, index: int) -> int:
    """A reset seed for episode ``index`` of ``stream`` (0 = training, 1 = evaluation) of a run,
    independent across streams and runs (NumPy SeedSequence hashing)."""
    return int(np.random.SeedSequence([run_seed, stream, index]).generate_state(1)[0])


def run_episodes(
    act: ActFn, envs: Sequence[Sequence[gym.Env]], reset_seeds: Sequence[Sequence[int]]
) -> np.ndarray:
    """One episode in every env, all stepped in lockstep; returns undiscounted returns
    shaped (num_seeds, num_envs).

    ``envs[i][j]`` is evaluation env ``j`` of seed ``i``; one batched ``act`` call per step serves
    every env, so evaluating many seeds costs one device call per step. Finished envs keep
    receiving their last observation but are not stepped.
    """
    num_seeds, num_envs = len(envs), len(envs[0])
    observations = [[env.reset(seed=int(seed))[0] for env, seed in zip(row, seeds)] for row, seeds in zip(envs, reset_seeds)]
    observations = np.asarray(observations, dtype=np.float32)
    returns = np.zeros((num_seeds, num_envs))
    active = np.ones((num_seeds, num_envs), dtype=bool)
    while active.any():
        actions = np.asarray(act(observations))
        for i, j in zip(*np.nonzero(active)):
            observation, reward, terminated, truncated, _ = envs[i][j].step(actions[i, j])
            observations[i, j] = observation
            returns[i, j] += float(reward)
            active[i, j] = not (terminated or truncated)
    return returns


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean, standard deviation and 95% bootstrap confidence interval of per-seed values."""

    mean: float
    std: float
    ci_low: float
    ci_high: float
    count: int


def summarise(per_seed: Sequence[float], resamples: int = 2000, seed: int = 0) -> Summary:
    """Summary statistics across seeds (percentile bootstrap of the mean)."""
    values = np.asarray(per_seed, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(resamples, len(values)), replace=True).mean(axis=1)
    return Summary(
        mean=float(values.mean()),
        std=float(values.std()),
        ci_low=float(np.percentile(means, 2.5)),
        ci_high=float(np.percentile(means, 97.5)),
        count=len(values),
    )
