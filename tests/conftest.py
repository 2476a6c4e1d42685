"""Shared test setup: JAX on the CPU, small helpers."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from pathlib import Path  # noqa: E402

# Compiled programs are kept in the checkout's .pytest_cache, shared by the test workers and by the
# `o2o` processes that tests start, so a second test run compiles little.
os.environ.setdefault("O2O_COMPILATION_CACHE", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "o2o-xla"))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from rl import compilation_cache  # noqa: E402

compilation_cache.enable()


@pytest.fixture
def write_pendulum_hdf5():
    """``(path, observations, rewards) -> path``: a raw D4RL-layout file for Pendulum-v1 (zero
    actions, no ends) whose observations and rewards a test chooses, e.g. to make them invalid."""

    def write(path: Path, observations: np.ndarray, rewards: np.ndarray) -> Path:
        count = len(rewards)
        with h5py.File(path, "w") as handle:
            handle["observations"] = observations
            handle["actions"] = np.zeros((count, 1), np.float32)
            handle["rewards"] = rewards
            handle["next_observations"] = observations
            handle["terminals"] = np.zeros(count, bool)
            handle["timeouts"] = np.zeros(count, bool)
            handle.attrs["env_id"] = "Pendulum-v1"
        return path

    return write
