"""Offline datasets: D4RL layouts, reconstruction, validation errors, statistics, atomic writes."""

import gymnasium as gym
import h5py
import numpy as np
import pytest

from rl.data import datasets
from rl.data.datasets import DatasetError


def raw_d4rl_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Three episodes in raw D4RL layout: ends by termination, by time-out, and by data end."""
    rng = np.random.default_rng(seed)
    lengths = [4, 5, 3]
    count = sum(lengths)
    terminals = np.zeros(count, bool)
    timeouts = np.zeros(count, bool)
    terminals[3] = True
    timeouts[8] = True
    return {
        "observations": rng.normal(size=(count, 3)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (count, 2)).astype(np.float32),
        "rewards": rng.normal(size=count).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
    }


def qlearning_reference(raw: dict[str, np.ndarray]) -> dict[str, list]:
    """Transcription of d4rl.qlearning_dataset's loop (terminate_on_end=False, with timeouts)."""
    out = {"observations": [], "next_observations": [], "actions": [], "rewards": [], "terminals": []}
    for i in range(len(raw["rewards"]) - 1):
        if raw["timeouts"][i]:
            continue
        out["observations"].append(raw["observations"][i])
        out["next_observations"].append(raw["observations"][i + 1])
        out["actions"].append(raw["actions"][i])
        out["rewards"].append(raw["rewards"][i])
        out["terminals"].append(bool(raw["terminals"][i]))
    return out


def write_raw_hdf5(path, arrays):
    with h5py.File(path, "w") as handle:
        for name, value in arrays.items():
            handle[name] = value


def test_raw_layout_without_next_observations_matches_d4rl_qlearning_dataset(tmp_path):
    raw = raw_d4rl_arrays()
    write_raw_hdf5(tmp_path / "raw.hdf5", raw)
    loaded = datasets.load(tmp_path / "raw.hdf5")
    reference = qlearning_reference(raw)
    for name in ("observations", "next_observations", "actions", "rewards"):
        np.testing.assert_array_equal(getattr(loaded, name), np.asarray(reference[name]))
    np.testing.assert_array_equal(loaded.terminated, reference["terminals"])
    # Episode ends are reconstructed: before the dropped time-out row and at the data end.
    assert np.flatnonzero(loaded.truncated).tolist() == [7, 9]
    assert np.flatnonzero(loaded.terminated).tolist() == [3]


def test_file_written_by_o2o_round_trips_every_transition(tmp_path):
    rng = np.random.default_rng(1)
    count = 20
    original = datasets.from_arrays(
        observations=rng.normal(size=(count, 4)),
        actions=rng.uniform(-1, 1, (count, 2)),
        rewards=rng.normal(size=count),
        terminals=np.arange(count) == 9,
        timeouts=np.arange(count) == 19,
        next_observations=rng.normal(size=(count, 4)),
        metadata={"env_id": "Hopper-v5", "seed": 3},
    )
    path = datasets.write_d4rl_hdf5(tmp_path / "data" / "set.hdf5", original)
    loaded = datasets.load(path)
    for name in datasets.TRANSITION_FIELDS:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(original, name))
    assert loaded.metadata["env_id"] == "Hopper-v5" and loaded.metadata["seed"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["set.hdf5"]


def test_npz_and_in_memory_arrays_load_to_the_same_transitions(tmp_path):
    raw = raw_d4rl_arrays(2)
    np.savez(tmp_path / "raw.npz", **raw)
    from_npz = datasets.load(tmp_path / "raw.npz")
    from_memory = datasets.from_arrays(**raw)
    for name in datasets.TRANSITION_FIELDS:
        np.testing.assert_array_equal(getattr(from_npz, name), getattr(from_memory, name))


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    good = datasets.from_arrays(**raw_d4rl_arrays())
    path = datasets.write_d4rl_hdf5(tmp_path / "set.hdf5", good)
    before = path.read_bytes()

    class Boom(RuntimeError):
        pass

    def exploding_file(*args, **kwargs):
        raise Boom()

    monkeypatch.setattr(datasets.h5py, "File", exploding_file)
    with pytest.raises(Boom):
        datasets.write_d4rl_hdf5(path, good)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["set.hdf5"]


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda a: a.update(rewards=np.where(np.arange(len(a["rewards"])) == 2, np.nan, a["rewards"])), "rewards"),
        (lambda a: a.update(observations=np.where(np.arange(12)[:, None] == 0, np.inf, a["observations"])), "observations"),
        (lambda a: a.update(actions=a["actions"][:-1]), "actions"),
        (lambda a: a.pop("timeouts"), "timeouts"),
        (lambda a: a.update(rewards=np.zeros((12, 2))), "rewards"),
    ],
)
def test_bad_input_raises_an_error_naming_the_field(change, field):
    arrays = raw_d4rl_arrays()
    change(arrays)
    with pytest.raises(DatasetError, match=field):
        datasets.from_arrays(**arrays)


def test_missing_key_in_file_is_named(tmp_path):
    arrays = raw_d4rl_arrays()
    del arrays["actions"]
    write_raw_hdf5(tmp_path / "broken.hdf5", arrays)
    with pytest.raises(DatasetError, match="missing key 'actions'"):
        datasets.load(tmp_path / "broken.hdf5")


def test_widths_are_checked_against_the_environment():
    dataset = datasets.from_arrays(**raw_d4rl_arrays())
    datasets.validate(dataset, gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (2,)))
    with pytest.raises(DatasetError, match="'observations' have width 3 .* has 11"):
        datasets.validate(dataset, observation_space=gym.spaces.Box(-1, 1, (11,)))
    with pytest.raises(DatasetError, match="'actions' have width 2"):
        datasets.validate(dataset, action_space=gym.spaces.Box(-1, 1, (6,)))


def test_monte_carlo_returns_stop_at_termination_and_at_truncation():
    rewards = np.array([1.0, 1.0, 1.0, 2.0, 2.0], np.float32)
    terminated = np.array([False, False, True, False, False])
    episode_end = np.array([False, False, True, False, True])
    returns = datasets.monte_carlo_returns(rewards, terminated, episode_end, discount=0.5)
    np.testing.assert_allclose(returns, [1.75, 1.5, 1.0, 3.0, 2.0])


def test_episode_ends_also_split_discontinuous_trajectories():
    observations = np.array([[0.0], [1.0], [5.0], [6.0]], np.float32)
    next_observations = np.array([[1.0], [2.0], [6.0], [7.0]], np.float32)  # row 1 does not lead to row 2
    dataset = datasets.from_arrays(observations, np.zeros((4, 1)), np.ones(4), np.zeros(4), np.zeros(4), next_observations)
    assert datasets.episode_ends(dataset).tolist() == [False, True, False, True]
    np.testing.assert_allclose(datasets.episode_returns(dataset), [2.0, 2.0])


def test_normalisation_stats_and_reference_scores():
    dataset = datasets.from_arrays(**raw_d4rl_arrays())
    stats = datasets.normalisation_stats(dataset)
    normalised = stats.normalise_observations(dataset.observations)
    np.testing.assert_allclose(normalised.mean(0), 0.0, atol=1e-5)
    assert datasets.reference_scores("halfcheetah-medium-v2") == (-280.178953, 12135.0)
    assert datasets.reference_scores("Hopper-v5") == (-20.272305, 3234.3)
    assert datasets.reference_scores("antmaze-large-play-v2") == (0.0, 1.0)
    assert datasets.reference_scores("Pendulum-v1") is None
    np.testing.assert_allclose(datasets.normalised_score([12135.0, -280.178953], -280.178953, 12135.0), [1.0, 0.0])
    np.testing.assert_allclose(datasets.normalised_score(2.0, *datasets.reference_scores("kitchen-mixed-v0")), 0.5)


def test_missing_minari_dataset_gives_a_clear_error():
    with pytest.raises(DatasetError, match="not-a-dataset"):
        datasets.load("not-a-dataset")


def test_minari_episodes_become_transitions_with_their_end_flags(monkeypatch):
    """The Minari path on a stand-in module (the extra is optional and nothing may be downloaded)."""
    import sys
    import types

    class Episode:
        def __init__(self, length, offset, terminated):
            self.observations = np.arange(offset, offset + length + 1, dtype=np.float32)[:, None]
            self.actions = np.zeros((length, 1), np.float32)
            self.rewards = np.ones(length, np.float32)
            self.terminations = np.zeros(length, bool)
            self.truncations = np.zeros(length, bool)
            (self.terminations if terminated else self.truncations)[-1] = True

    class StandInDataset:
        env_spec = types.SimpleNamespace(id="Hopper-v5")

        def iterate_episodes(self):
            yield Episode(3, 0, terminated=True)
            yield Episode(2, 10, terminated=False)

    requested = {}

    def load_dataset(dataset_id, download=True):
        requested.update(dataset_id=dataset_id, download=download)
        return StandInDataset()

    monkeypatch.setitem(sys.modules, "minari", types.SimpleNamespace(load_dataset=load_dataset))
    data = datasets.load("mujoco/hopper/medium-v0")
    assert requested == {"dataset_id": "mujoco/hopper/medium-v0", "download": False}
    assert data.observations[:, 0].tolist() == [0, 1, 2, 10, 11]
    assert data.next_observations[:, 0].tolist() == [1, 2, 3, 11, 12]
    assert data.terminated.tolist() == [False, False, True, False, False]
    assert data.truncated.tolist() == [False, False, False, False, True]
    assert datasets.dataset_reference_scores(data) == (-20.272305, 3234.3)
