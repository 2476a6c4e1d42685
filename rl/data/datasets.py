"""Offline datasets: loading (D4RL HDF5, Minari, .npz, arrays), validation, statistics, writing.

Everything here is host-side numpy; :func:`to_transition` moves a dataset to the device as a
:class:`rl.types.Transition` (for :func:`rl.data.replay.from_items`).

Conventions: ``terminated`` = the MDP ended (no bootstrap); ``truncated`` = the episode was cut
(time limit or end of the logged data). The D4RL names ``terminals`` and ``timeouts`` map to them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import gymnasium as gym
import h5py
import jax.numpy as jnp
import numpy as np

from rl.types import Transition

TRANSITION_FIELDS = ("observations", "actions", "rewards", "next_observations", "terminated", "truncated")

# D4RL reference returns (REF_MIN = random policy, REF_MAX = expert) for normalised scores.
# Locomotion -v1/-v2 datasets reuse the `<env>-random-v0` constants for every dataset type.
D4RL_REFERENCE_SCORES: dict[str, tuple[float, float]] = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
    "antmaze": (0.0, 1.0),
    "kitchen": (0.0, 4.0),
    "pen": (96.262799, 3076.8331017826877),
    "door": (-56.512833, 2880.5693087298737),
    "relocate": (-6.425911, 4233.877797728884),
    "hammer": (-274.856578, 12794.134825156867),
}


class DatasetError(ValueError):
    """A dataset that cannot be trained on; the message names the offending field."""


@dataclasses.dataclass(frozen=True)
class OfflineDataset:
    """Transitions as flat numpy arrays (leading axis = transition) plus metadata.

    ``metadata`` records where the data came from: ``env_id``, ``seed``, behaviour-policy return,
    and, when known, ``ref_min_score`` / ``ref_max_score`` for normalised scores.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def observation_dim(self) -> int:
        """Width of one observation."""
        return int(self.observations.shape[1])

    @property
    def action_dim(self) -> int:
        """Width of one action."""
        return int(self.actions.shape[1])


# ----------------------------------------------------------------------------- construction


def _as_2d(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise DatasetError(f"'{name}' must have shape (N, dim), got {array.shape}")
    return array.astype(np.float32)


def _as_1d(name: str, value: Any, dtype: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise DatasetError(f"'{name}' must have shape (N,), got {array.shape}")
    return array.astype(dtype)


def from_arrays(
    observations: Any,
    actions: Any,
    rewards: Any,
    terminals: Any,
    timeouts: Any | None = None,
    next_observations: Any | None = None,
    metadata: Mapping[str, Any] | None = None,
    max_episode_steps: int | None = None,
) -> OfflineDataset:
    """Build a dataset from D4RL-style arrays and validate it.

    With ``next_observations`` every row is a transition (``terminals`` → terminated, ``timeouts``
    → truncated). Without them, transitions are reconstructed exactly as ``d4rl.qlearning_dataset``
    does (see :func:`reconstruct_transitions`).
    """
    metadata = dict(metadata or {})
    obs = _as_2d("observations", observations)
    act = _as_2d("actions", actions)
    rew = _as_1d("rewards", rewards, np.float32)
    term = _as_1d("terminals", terminals, bool)
    _check_lengths({"observations": obs, "actions": act, "rewards": rew, "terminals": term})
    if next_observations is None:
        if timeouts is None and max_episode_steps is None:
            raise DatasetError(
                "missing key 'timeouts': without 'next_observations' the episode ends must come from "
                "'timeouts' (or pass max_episode_steps)"
            )
        tout = None if timeouts is None else _as_1d("timeouts", timeouts, bool)
        dataset = reconstruct_transitions(obs, act, rew, term, tout, max_episode_steps, metadata)
    else:
        nobs = _as_2d("next_observations", next_observations)
        tout = np.zeros_like(term) if timeouts is None else _as_1d("timeouts", timeouts, bool)
        _check_lengths({"observations": obs, "next_observations": nobs, "timeouts": tout})
        dataset = OfflineDataset(obs, act, rew, nobs, term, tout, metadata)
    validate(dataset)
    return dataset


def reconstruct_transitions(
    observations: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    terminals: np.ndarray,
    timeouts: np.ndarray | None,
    max_episode_steps: int | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> OfflineDataset:
    """Rebuild (s, a, r, s', done) from consecutive rows, as ``d4rl.qlearning_dataset`` does.

    Row ``i`` (for ``i < N - 1``) becomes a transition with ``s' = observations[i + 1]`` unless
    row ``i`` is a time-out (its true next observation was never logged), in which case it is
    dropped. The last row is always dropped. Without ``timeouts`` a time-out is the
    ``max_episode_steps``-th step since the last episode end, as d4rl does.

    d4rl returns no episode ends; here the transition before a dropped row (and the last kept one)
    is marked ``truncated`` so that Monte-Carlo returns and episode statistics stay correct.
    """
    count = rewards.shape[0]
    if timeouts is None:
        timeouts = _timeouts_from_episode_length(terminals, max_episode_steps)
    kept = np.flatnonzero(~timeouts[: count - 1])
    following_dropped = np.append(timeouts[1 : count - 1], True)  # row i + 1 is a time-out or the last row
    truncated = following_dropped[kept] & ~terminals[kept]
    return OfflineDataset(
        observations=observations[kept],
        actions=actions[kept],
        rewards=rewards[kept],
        next_observations=observations[kept + 1],
        terminated=terminals[kept],
        truncated=truncated,
        metadata=dict(metadata or {}),
    )


def _timeouts_from_episode_length(terminals: np.ndarray, max_episode_steps: int | None) -> np.ndarray:
    if max_episode_steps is None or max_episode_steps <= 0:
        raise DatasetError(f"max_episode_steps must be a positive int, got {max_episode_steps}")
    timeouts = np.zeros_like(terminals)
    episode_step = 0
    for index, terminal in enumerate(terminals):
        final = episode_step == max_episode_steps - 1
        timeouts[index] = final
        episode_step = 0 if (final or terminal) else episode_step + 1
    return timeouts


def _check_lengths(arrays: Mapping[str, np.ndarray]) -> None:
    lengths = {name: int(a.shape[0]) for name, a in arrays.items()}
    expected = lengths.get("observations", next(iter(lengths.values())))
    for name, length in lengths.items():
        if length != expected:
            raise DatasetError(f"'{name}' has {length} rows but 'observations' has {expected}")


# ----------------------------------------------------------------------------- validation


def validate(
    dataset: OfflineDataset,
    observation_space: gym.Space | None = None,
    action_space: gym.Space | None = None,
) -> None:
    """Raise :class:`DatasetError` naming the field if the dataset is unusable.

    Checks: non-empty, equal lengths, finite values, and (when spaces are given) observation and
    action widths that match the environment's.
    """
    if len(dataset) == 0:
        raise DatasetError("dataset is empty: 'rewards' has 0 rows")
    _check_lengths({name: getattr(dataset, name) for name in TRANSITION_FIELDS})
    for name in ("observations", "actions", "rewards", "next_observations"):
        values = getattr(dataset, name)
        if not np.all(np.isfinite(values)):
            bad = int(np.count_nonzero(~np.isfinite(values)))
            raise DatasetError(f"'{name}' contains {bad} NaN/inf values")
    if observation_space is not None:
        expected = int(np.prod(observation_space.shape))
        if dataset.observation_dim != expected:
            raise DatasetError(
                f"'observations' have width {dataset.observation_dim} but the environment's "
                f"observation space has {expected}"
            )
    if action_space is not None:
        expected = int(np.prod(action_space.shape)) if isinstance(action_space, gym.spaces.Box) else 1
        if dataset.action_dim != expected:
            raise DatasetError(
                f"'actions' have width {dataset.action_dim} but the environment's action space has {expected}"
            )


# ----------------------------------------------------------------------------- loading


def load(source: str | os.PathLike, **kwargs: Any) -> OfflineDataset:
    """Load a dataset from an ``.hdf5``/``.h5`` file (D4RL layout), an ``.npz`` file or a Minari id."""
    path = Path(source)
    if path.suffix in (".hdf5", ".h5"):
        return load_d4rl_hdf5(path, **kwargs)
    if path.suffix == ".npz":
        return load_npz(path, **kwargs)
    if path.exists():
        raise DatasetError(f"unknown dataset file type '{path.suffix}': expected .hdf5, .h5 or .npz")
    return load_minari(str(source))


def load_d4rl_hdf5(path: str | os.PathLike, max_episode_steps: int | None = None) -> OfflineDataset:
    """Load a D4RL-layout HDF5 file (``observations, actions, rewards, terminals[, timeouts,
    next_observations]``); attributes of the root group become metadata."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    with h5py.File(path, "r") as handle:
        arrays = {name: handle[name][()] for name in handle.keys() if isinstance(handle[name], h5py.Dataset)}
        metadata = {name: _from_attr(value) for name, value in handle.attrs.items()}
    return _from_mapping(arrays, metadata, max_episode_steps, source=str(path))


def load_npz(path: str | os.PathLike, max_episode_steps: int | None = None) -> OfflineDataset:
    """Load an ``.npz`` with the D4RL key names (or ``terminated``/``truncated``)."""
    with np.load(path, allow_pickle=False) as handle:
        arrays = {name: handle[name] for name in handle.files}
    metadata = {}
    if "metadata_env_id" in arrays:
        metadata["env_id"] = str(arrays.pop("metadata_env_id"))
    return _from_mapping(arrays, metadata, max_episode_steps, source=str(path))


def _from_mapping(
    arrays: dict[str, np.ndarray], metadata: dict[str, Any], max_episode_steps: int | None, source: str
) -> OfflineDataset:
    arrays = dict(arrays)
    if "terminated" in arrays and "terminals" not in arrays:
        arrays["terminals"] = arrays.pop("terminated")
    if "truncated" in arrays and "timeouts" not in arrays:
        arrays["timeouts"] = arrays.pop("truncated")
    for required in ("observations", "actions", "rewards", "terminals"):
        if required not in arrays:
            raise DatasetError(f"{source}: missing key '{required}' (found {sorted(arrays)})")
    return from_arrays(
        observations=arrays["observations"],
        actions=arrays["actions"],
        rewards=arrays["rewards"],
        terminals=arrays["terminals"],
        timeouts=arrays.get("timeouts"),
        next_observations=arrays.get("next_observations"),
        metadata=metadata,
        max_episode_steps=max_episode_steps,
    )


def load_minari(dataset_id: str) -> OfflineDataset:
    """Load a Minari dataset from local storage (``minari`` extra; nothing is downloaded)."""
    try:
        import minari
    except ImportError as error:
        raise DatasetError(
            f"'{dataset_id}' is not a file and Minari is not installed: pip install 'o2o[minari]'"
        ) from error
    try:
        minari_dataset = minari.load_dataset(dataset_id, download=False)
    except Exception as error:  # minari raises several types for a missing local dataset
        raise DatasetError(f"Minari dataset '{dataset_id}' not found in local storage: {error}") from error
    parts: dict[str, list[np.ndarray]] = {name: [] for name in TRANSITION_FIELDS}
    for episode in minari_dataset.iterate_episodes():
        observations = np.asarray(episode.observations)
        parts["observations"].append(observations[:-1])
        parts["next_observations"].append(observations[1:])
        parts["actions"].append(np.asarray(episode.actions))
        parts["rewards"].append(np.asarray(episode.rewards))
        parts["terminated"].append(np.asarray(episode.terminations, bool))
        parts["truncated"].append(np.asarray(episode.truncations, bool))
    joined = {name: np.concatenate(values) for name, values in parts.items()}
    env_spec = getattr(minari_dataset, "env_spec", None)
    metadata = {"source": f"minari:{dataset_id}", "env_id": getattr(env_spec, "id", None)}
    return from_arrays(
        observations=joined["observations"],
        actions=joined["actions"],
        rewards=joined["rewards"],
        terminals=joined["terminated"],
        timeouts=joined["truncated"],
        next_observations=joined["next_observations"],
        metadata=metadata,
    )


def _from_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------- writing


def write_d4rl_hdf5(path: str | os.PathLike, dataset: OfflineDataset) -> Path:
    """Write ``dataset`` in D4RL layout (with ``next_observations``) atomically.

    The file is written under a temporary name in the target directory and renamed into place, so
    a crash never leaves a half-written file where a good one was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        with h5py.File(temporary, "w") as handle:
            handle["observations"] = dataset.observations
            handle["actions"] = dataset.actions
            handle["rewards"] = dataset.rewards
            handle["next_observations"] = dataset.next_observations
            handle["terminals"] = dataset.terminated
            handle["timeouts"] = dataset.truncated
            for name, value in dataset.metadata.items():
                if value is not None:
                    handle.attrs[name] = value
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- statistics


def episode_ends(dataset: OfflineDataset) -> np.ndarray:
    """True at the last transition of every episode.

    An episode ends where it terminated or was truncated, where the logged ``next_observations``
    do not continue into the next row (split trajectories, as CORL PR #63), and at the last row.
    """
    ends = dataset.terminated | dataset.truncated
    discontinuous = np.any(np.abs(dataset.next_observations[:-1] - dataset.observations[1:]) > 1e-6, axis=1)
    ends = ends.copy()
    ends[:-1] |= discontinuous
    ends[-1] = True
    return ends


def monte_carlo_returns(
    rewards: np.ndarray, terminated: np.ndarray, episode_end: np.ndarray, discount: float
) -> np.ndarray:
    """Discounted return-to-go per step, computed backward within each episode.

    ``G_t = r_t + discount * (1 - terminated_t) * G_{t+1}`` with ``G = 0`` after the last step of an
    episode (a truncated episode's tail is unknown and counts as zero, the finite-horizon return).
    """
    returns = np.zeros_like(rewards, dtype=np.float64)
    following = 0.0
    for index in range(len(rewards) - 1, -1, -1):
        if episode_end[index]:
            following = 0.0
        following = rewards[index] + discount * (1.0 - float(terminated[index])) * following
        returns[index] = following
    return returns.astype(np.float32)


def dataset_monte_carlo_returns(dataset: OfflineDataset, discount: float) -> np.ndarray:
    """:func:`monte_carlo_returns` with the episode ends of :func:`episode_ends`."""
    return monte_carlo_returns(dataset.rewards, dataset.terminated, episode_ends(dataset), discount)


def episode_returns(dataset: OfflineDataset) -> np.ndarray:
    """Undiscounted return of every episode, in order."""
    ends = np.flatnonzero(episode_ends(dataset))
    starts = np.concatenate([[0], ends[:-1] + 1])
    cumulative = np.concatenate([[0.0], np.cumsum(dataset.rewards, dtype=np.float64)])
    return cumulative[ends + 1] - cumulative[starts]


@dataclasses.dataclass(frozen=True)
class NormalisationStats:
    """Per-dimension observation mean/std and reward statistics of a dataset."""

    observation_mean: np.ndarray
    observation_std: np.ndarray
    reward_mean: float
    reward_std: float
    episode_return_min: float
    episode_return_max: float

    def normalise_observations(self, observations: np.ndarray) -> np.ndarray:
        """(obs - mean) / std, elementwise."""
        return (observations - self.observation_mean) / self.observation_std


def normalisation_stats(dataset: OfflineDataset, epsilon: float = 1e-3) -> NormalisationStats:
    """Observation and reward statistics; ``epsilon`` keeps constant dimensions finite."""
    returns = episode_returns(dataset)
    return NormalisationStats(
        observation_mean=dataset.observations.mean(axis=0),
        observation_std=dataset.observations.std(axis=0) + epsilon,
        reward_mean=float(dataset.rewards.mean()),
        reward_std=float(dataset.rewards.std() + epsilon),
        episode_return_min=float(returns.min()),
        episode_return_max=float(returns.max()),
    )


def reference_scores(name: str) -> tuple[float, float] | None:
    """D4RL (REF_MIN, REF_MAX) for a dataset or env name, e.g. ``hopper-medium-v2`` or
    ``Hopper-v5``; ``None`` when the family has no reference."""
    family = re.split(r"[-_/]", name.lower().removeprefix("d4rl/"))[0]
    if family.startswith("antmaze") or name.lower().startswith("antmaze"):
        family = "antmaze"
    return D4RL_REFERENCE_SCORES.get(family)


def normalised_score(episode_return: float | np.ndarray, ref_min: float, ref_max: float) -> np.ndarray:
    """(R - REF_MIN) / (REF_MAX - REF_MIN): 0 = random policy, 1 = expert (report x100)."""
    return (np.asarray(episode_return, np.float64) - ref_min) / (ref_max - ref_min)


def dataset_reference_scores(dataset: OfflineDataset) -> tuple[float, float] | None:
    """Reference scores recorded in the dataset's metadata, else the D4RL table's for its env."""
    meta = dataset.metadata
    if "ref_min_score" in meta and "ref_max_score" in meta:
        return float(meta["ref_min_score"]), float(meta["ref_max_score"])
    for key in ("dataset_name", "env_id"):
        if meta.get(key):
            found = reference_scores(str(meta[key]))
            if found is not None:
                return found
    return None


def to_transition(dataset: OfflineDataset) -> Transition:
    """The dataset as a device :class:`Transition` (float32 data, bool flags)."""
    return Transition(
        observations=jnp.asarray(dataset.observations, jnp.float32),
        actions=jnp.asarray(dataset.actions, jnp.float32),
        rewards=jnp.asarray(dataset.rewards, jnp.float32),
        next_observations=jnp.asarray(dataset.next_observations, jnp.float32),
        terminated=jnp.asarray(dataset.terminated, jnp.bool_),
        truncated=jnp.asarray(dataset.truncated, jnp.bool_),
    )
