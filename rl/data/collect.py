"""Roll a policy in an environment and write the transitions as an offline dataset.

Two layers:

- :func:`rollout` steps any gymnasium ``Env`` (several copies in lockstep, one batched policy call
  per step) under a :data:`Policy`: :func:`random_policy`, :func:`agent_policy` (any agent with the
  DESIGN.md ``act``), or :func:`noisy_policy` (Gaussian / epsilon-random exploration around another
  policy). The result is an :class:`rl.data.datasets.OfflineDataset`; write it with
  :func:`rl.data.datasets.write_d4rl_hdf5` (atomic) or :func:`write_minari`.
- :func:`collect_d4rl_style` builds the D4RL family of datasets for one environment: ``random``,
  ``medium`` (an agent trained with :func:`rl.loops.train_online` until it reaches about a third of
  the expert's normalised return), ``expert`` (the same agent at the end of training),
  ``medium-replay`` (that run's replay buffer up to the medium snapshot) and ``medium-expert``
  (medium + expert). The agent to train comes in as ``create_agent`` so that this module names no
  agent (DESIGN.md: ``rl`` imports neither ``agents`` nor ``envs``).

Every dataset's metadata records ``env_id``, ``recipe``, ``seed``, ``behaviour_return`` (mean
episode return of the behaviour policy) and ``ref_min_score`` / ``ref_max_score`` (the random and
expert returns measured here), so scores normalise without an outside table.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from rl.checkpoint import Checkpointer
from rl.data import replay
from rl.data.datasets import DatasetError, OfflineDataset, episode_ends, validate
from rl.evaluation import episode_seed
from rl.loops import OnlineConfig, train_online
from rl.rollouts import JaxEnvSpec
from rl.types import transition_like

Policy = Callable[[np.ndarray, jax.Array], np.ndarray]
"""``(observations (num_envs, obs_dim), key) -> actions (num_envs, action_dim)`` in the env's action space."""

COLLECT_STREAM = 2
"""Episode-seed stream of collection resets (0 and 1 are the training and evaluation streams)."""

RECIPES = ("random", "medium", "expert", "medium-replay", "medium-expert")
"""Dataset recipes that mirror D4RL's locomotion sets."""


# ----------------------------------------------------------------------------- policies


def _box(space: gym.Space) -> gym.spaces.Box:
    if not isinstance(space, gym.spaces.Box):
        raise ValueError(f"collection needs a Box action space, got {space}")
    return space


def random_policy(action_space: gym.Space) -> Policy:
    """Uniform random actions over the (bounded) Box ``action_space``."""
    low = jnp.asarray(_box(action_space).low, jnp.float32)
    high = jnp.asarray(action_space.high, jnp.float32)
    draw = jax.jit(lambda key, count: jax.random.uniform(key, (count, *low.shape), minval=low, maxval=high), static_argnums=1)
    return lambda observations, key: np.asarray(draw(key, len(observations)))


def agent_policy(agent: Any, deterministic: bool = False) -> Policy:
    """The actions of ``agent.act`` (one agent, no seed axis): samples, or the mode when deterministic."""
    act = jax.jit(lambda a, observations, key: a.act(observations, key, deterministic=deterministic))
    return lambda observations, key: np.asarray(act(agent, jnp.asarray(observations, jnp.float32), key))


def noisy_policy(policy: Policy, action_space: gym.Space, noise_std: float = 0.0, epsilon: float = 0.0) -> Policy:
    """``policy`` with Gaussian noise of ``noise_std`` (relative to the half-range of the action
    box) added and clipped to the box, and with probability ``epsilon`` per env and step a uniform
    random action instead."""
    box = _box(action_space)
    if noise_std < 0 or not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"noise_std must be >= 0 and epsilon in [0, 1], got {noise_std}, {epsilon}")
    low, high = box.low.astype(np.float32), box.high.astype(np.float32)
    half_range = 0.5 * (high - low)
    uniform = random_policy(box)

    def act(observations: np.ndarray, key: jax.Array) -> np.ndarray:
        policy_key, noise_key, coin_key, random_key = jax.random.split(key, 4)
        actions = np.asarray(policy(observations, policy_key), np.float32)
        if noise_std > 0:
            noise = np.asarray(jax.random.normal(noise_key, actions.shape)) * noise_std * half_range
            actions = np.clip(actions + noise, low, high)
        if epsilon > 0:
            replace = np.asarray(jax.random.uniform(coin_key, (len(actions),))) < epsilon
            actions = np.where(replace[:, None], uniform(observations, random_key), actions)
        return actions

    return act


# ----------------------------------------------------------------------------- rollouts


@dataclasses.dataclass(frozen=True)
class Rollout:
    """Collected transitions and the returns of the episodes that finished."""

    dataset: OfflineDataset
    episode_returns: np.ndarray

    @property
    def mean_return(self) -> float:
        """Mean return of finished episodes (NaN if none finished)."""
        return float(np.mean(self.episode_returns)) if len(self.episode_returns) else float("nan")


def rollout(
    make_env: Callable[[], gym.Env],
    policy: Policy,
    num_steps: int,
    seed: int,
    num_envs: int = 1,
    metadata: Mapping[str, Any] | None = None,
) -> Rollout:
    """Collect ``num_steps`` transitions (split over ``num_envs`` env copies stepped in lockstep).

    Episodes are stored contiguously per env copy; an episode still running when collection stops
    is marked ``truncated`` at its last stored step (the logged data ends there). Resets use seeds
    derived from ``(seed, env copy, episode index)``, actions keys from ``(seed, step)``, so a
    collection is reproducible.
    """
    if num_envs < 1 or num_steps < num_envs:
        raise ValueError(f"need 1 <= num_envs <= num_steps, got num_envs={num_envs}, num_steps={num_steps}")
    envs = [make_env() for _ in range(num_envs)]
    quotas = [num_steps // num_envs + (index < num_steps % num_envs) for index in range(num_envs)]
    key = jax.random.PRNGKey(seed)
    episode_index = [0] * num_envs
    current_return = [0.0] * num_envs
    finished: list[float] = []
    columns: list[dict[str, list]] = [
        {name: [] for name in ("observations", "actions", "rewards", "next_observations", "terminated", "truncated")}
        for _ in envs
    ]

    def reset(index: int) -> np.ndarray:
        reset_seed = episode_seed(seed, COLLECT_STREAM + index, episode_index[index])
        return np.asarray(envs[index].reset(seed=reset_seed)[0], np.float32).reshape(-1)

    observations = np.stack([reset(i) for i in range(num_envs)])
    for step in range(quotas[0]):
        actions = np.asarray(policy(observations, jax.random.fold_in(key, step)), np.float32)
        for index, env in enumerate(envs):
            if step >= quotas[index]:
                continue
            next_observation, reward, terminated, truncated, _ = env.step(actions[index])
            next_observation = np.asarray(next_observation, np.float32).reshape(-1)
            record = columns[index]
            record["observations"].append(observations[index].copy())
            record["actions"].append(actions[index])
            record["rewards"].append(float(reward))
            record["next_observations"].append(next_observation)
            record["terminated"].append(bool(terminated))
            record["truncated"].append(bool(truncated))
            current_return[index] += float(reward)
            if terminated or truncated:
                finished.append(current_return[index])
                current_return[index] = 0.0
                episode_index[index] += 1
                observations[index] = reset(index)
            else:
                observations[index] = next_observation
    for env in envs:
        env.close()
    for record in columns:
        if not record["terminated"][-1]:
            record["truncated"][-1] = True  # the logged data ends inside this episode
    joined = {name: np.concatenate([np.asarray(record[name]) for record in columns]) for name in columns[0]}
    dataset = OfflineDataset(
        observations=joined["observations"].astype(np.float32),
        actions=joined["actions"].astype(np.float32).reshape(len(joined["rewards"]), -1),
        rewards=joined["rewards"].astype(np.float32),
        next_observations=joined["next_observations"].astype(np.float32),
        terminated=joined["terminated"].astype(bool),
        truncated=joined["truncated"].astype(bool),
        metadata={**dict(metadata or {}), "seed": seed},
    )
    validate(dataset)
    return Rollout(dataset, np.asarray(finished, np.float64))


def concatenate(parts: Sequence[OfflineDataset], metadata: Mapping[str, Any] | None = None) -> OfflineDataset:
    """Datasets one after another (each part must end on an episode boundary)."""
    for index, part in enumerate(parts):
        if not (part.terminated[-1] or part.truncated[-1]):
            raise DatasetError(f"part {index} does not end on an episode boundary: mark its last row truncated")
    fields = ("observations", "actions", "rewards", "next_observations", "terminated", "truncated")
    arrays = {name: np.concatenate([getattr(part, name) for part in parts]) for name in fields}
    return OfflineDataset(**arrays, metadata=dict(metadata or {}))


def write_minari(dataset: OfflineDataset, dataset_id: str, env_id: str | None = None) -> Any:
    """Write ``dataset`` to Minari's local storage under ``dataset_id`` (needs the ``minari`` extra).

    Episodes are cut at :func:`rl.data.datasets.episode_ends`; metadata ``ref_min_score`` /
    ``ref_max_score`` become Minari's reference scores.
    """
    try:
        import minari
    except ImportError as error:
        raise DatasetError("writing a Minari dataset needs the extra: pip install 'o2o[minari]'") from error
    ends = np.flatnonzero(episode_ends(dataset))
    starts = np.concatenate([[0], ends[:-1] + 1])
    episodes = []
    for start, end in zip(starts, ends):
        rows = slice(start, end + 1)
        episodes.append(
            {
                "observations": np.concatenate([dataset.observations[rows], dataset.next_observations[end : end + 1]]),
                "actions": dataset.actions[rows],
                "rewards": dataset.rewards[rows],
                "terminations": dataset.terminated[rows],
                "truncations": dataset.truncated[rows] | (np.arange(start, end + 1) == end) & ~dataset.terminated[rows],
            }
        )
    meta = dataset.metadata
    return minari.create_dataset_from_buffers(
        dataset_id=dataset_id,
        buffer=episodes,
        env=env_id or meta.get("env_id"),
        algorithm_name=str(meta.get("recipe", "o2o.collect")),
        ref_min_score=meta.get("ref_min_score"),
        ref_max_score=meta.get("ref_max_score"),
    )


# ----------------------------------------------------------------------------- D4RL-style recipes


@dataclasses.dataclass(frozen=True)
class BehaviourRun:
    """An online training run kept for dataset recipes: agent snapshots and every transition."""

    steps: tuple[int, ...]
    """Environment step of each snapshot (the evaluation steps of the run)."""
    eval_returns: tuple[float, ...]
    """Deterministic evaluation return of each snapshot."""
    agents: tuple[Any, ...]
    """One agent (no seed axis) per snapshot, on the host."""
    replay: OfflineDataset
    """All training transitions in the order they were collected."""


def train_behaviour_agent(
    create_agent: Callable[[jax.Array], Any],
    make_env: Callable[[], gym.Env],
    config: OnlineConfig,
    seed: int,
    run_dir: str | os.PathLike,
    progress: bool | None = None,
    jax_env: JaxEnvSpec | None = None,
) -> BehaviourRun:
    """Train one agent with :func:`rl.loops.train_online`, keeping a snapshot at every evaluation.

    One run; the agent is copied after every evaluation (``on_evaluation``), and the replay buffer
    of the final checkpoint holds every transition, in order (the capacity must cover the run).
    With ``jax_env`` (the functional core of ``make_env``'s env) the training envs step on the
    device.
    """
    if config.buffer_capacity < config.total_steps:
        raise ValueError(
            f"buffer_capacity {config.buffer_capacity} < total_steps {config.total_steps}: the replay "
            "recipe needs every transition of the run"
        )
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir / "checkpoints")
    snapshots: dict[int, Any] = {}

    def keep(step: int, agent: Any) -> None:
        if step > 0:
            snapshots[step] = jax.device_get(jax.tree.map(lambda leaf: leaf[0], agent))

    agent, rows = train_online(
        create_agent, make_env, config, [seed], run_dir, progress=progress, jax_env=jax_env, on_evaluation=keep
    )
    steps = sorted(snapshots)
    returns = [float(np.mean([row["eval_return"] for row in rows if row["step"] == step])) for step in steps]
    agents = [snapshots[step] for step in steps]
    replay_data = _replay_from_checkpoint(run_dir, agent, make_env, config)
    return BehaviourRun(tuple(steps), tuple(returns), tuple(agents), replay_data)


def _replay_from_checkpoint(run_dir: Path, agent: Any, make_env: Callable[[], gym.Env], config: OnlineConfig) -> OfflineDataset:
    probe = make_env()
    observation_dim = int(np.prod(probe.observation_space.shape))
    action_dim = int(np.prod(probe.action_space.shape))
    probe.close()
    capacity = min(config.buffer_capacity, config.total_steps)
    buffer = jax.vmap(lambda _: replay.init(transition_like(observation_dim, action_dim), capacity))(jnp.arange(1))
    checkpointer = Checkpointer(run_dir / "checkpoints")
    try:
        # partial: a run whose envs stepped on the device also checkpointed their states
        state, _ = checkpointer.restore({"agent": agent, "buffer": buffer}, config.total_steps, what=str(run_dir), partial=True)
    finally:
        checkpointer.close()
    data = jax.device_get(jax.tree.map(lambda leaf: leaf[0], state["buffer"].data))
    return OfflineDataset(
        observations=np.asarray(data.observations, np.float32),
        actions=np.asarray(data.actions, np.float32),
        rewards=np.asarray(data.rewards, np.float32),
        next_observations=np.asarray(data.next_observations, np.float32),
        terminated=np.asarray(data.terminated, bool),
        truncated=np.asarray(data.truncated, bool),
    )


def prefix(dataset: OfflineDataset, count: int, metadata: Mapping[str, Any] | None = None) -> OfflineDataset:
    """The first ``count`` transitions; the last one is marked truncated unless it terminated."""
    rows = slice(0, count)
    truncated = dataset.truncated[rows].copy()
    truncated[-1] = truncated[-1] or not dataset.terminated[count - 1]
    return OfflineDataset(
        observations=dataset.observations[rows],
        actions=dataset.actions[rows],
        rewards=dataset.rewards[rows],
        next_observations=dataset.next_observations[rows],
        terminated=dataset.terminated[rows],
        truncated=truncated,
        metadata=dict(metadata or {}),
    )


def _returns_before(dataset: OfflineDataset, count: int) -> np.ndarray:
    """Returns of the episodes that finished (terminated or truncated) within the first ``count`` rows."""
    ends = np.flatnonzero((dataset.terminated | dataset.truncated)[:count])
    cumulative = np.concatenate([[0.0], np.cumsum(dataset.rewards[:count], dtype=np.float64)])
    starts = np.concatenate([[0], ends[:-1] + 1])
    return cumulative[ends + 1] - cumulative[starts]


def select_medium(run: BehaviourRun, ref_min: float, ref_max: float, fraction: float = 1.0 / 3.0) -> int:
    """Index of the snapshot (before the last) whose evaluation return is closest to
    ``ref_min + fraction * (ref_max - ref_min)``: a third of the expert's normalised return, which
    also makes sense for negative returns (e.g. Pendulum)."""
    target = ref_min + fraction * (ref_max - ref_min)
    candidates = np.asarray(run.eval_returns[:-1] if len(run.eval_returns) > 1 else run.eval_returns)
    return int(np.argmin(np.abs(candidates - target)))


@dataclasses.dataclass(frozen=True)
class CollectConfig:
    """What :func:`collect_d4rl_style` collects."""

    env_id: str = "Pendulum-v1"
    """Environment id recorded in the metadata."""
    recipes: tuple[str, ...] = RECIPES
    """Which datasets to build (subset of random, medium, expert, medium-replay, medium-expert)."""
    steps_per_dataset: int = 100_000
    """Transitions of each rolled-out dataset (random, medium, expert)."""
    seed: int = 0
    """Collection seed (training, rollouts and resets derive from it)."""
    num_envs: int = 1
    """Env copies stepped in lockstep during rollouts."""
    medium_fraction: float = 1.0 / 3.0
    """Normalised return of the medium snapshot relative to the expert's (D4RL: about a third)."""

    def __post_init__(self) -> None:
        unknown = [name for name in self.recipes if name not in RECIPES]
        if unknown:
            raise ValueError(f"CollectConfig.recipes: unknown {unknown}; choose from {list(RECIPES)}")
        if self.steps_per_dataset < 1 or self.num_envs < 1:
            raise ValueError("CollectConfig.steps_per_dataset and num_envs must be >= 1")


def collect_d4rl_style(
    make_env: Callable[[], gym.Env],
    create_agent: Callable[[jax.Array], Any],
    behaviour: OnlineConfig,
    config: CollectConfig,
    work_dir: str | os.PathLike,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    jax_env: JaxEnvSpec | None = None,
) -> dict[str, OfflineDataset]:
    """Build the requested D4RL-style datasets for one environment (see the module docstring).

    ``behaviour`` schedules the training run of ``create_agent`` (skipped when only ``random`` is
    requested; on the device with ``jax_env``, the functional core of ``make_env``'s env); its
    checkpoints and logs go under ``work_dir``. The random and expert returns
    measured here become every dataset's ``ref_min_score`` / ``ref_max_score``.
    """
    probe = make_env()
    action_space = probe.action_space
    probe.close()
    base = {"env_id": config.env_id}
    random_rollout = rollout(
        make_env, random_policy(action_space), config.steps_per_dataset, config.seed, config.num_envs,
        {**base, "recipe": "random", "behaviour_policy": "uniform random"},
    )
    ref_min = random_rollout.mean_return
    log(f"random policy: mean return {ref_min:.2f} over {len(random_rollout.episode_returns)} episodes")
    results: dict[str, OfflineDataset] = {"random": random_rollout.dataset}
    behaviour_returns = {"random": ref_min}
    ref_max = float("nan")
    if set(config.recipes) - {"random"}:
        run = train_behaviour_agent(
            create_agent, make_env, behaviour, config.seed, Path(work_dir) / "behaviour", progress, jax_env=jax_env
        )
        expert_rollout = rollout(
            make_env, agent_policy(run.agents[-1]), config.steps_per_dataset, config.seed + 1, config.num_envs,
            {**base, "recipe": "expert", "behaviour_policy": f"agent after {run.steps[-1]} steps", "behaviour_steps": run.steps[-1]},
        )
        ref_max = expert_rollout.mean_return
        log(f"expert policy ({run.steps[-1]} training steps): mean return {ref_max:.2f}")
        medium_index = select_medium(run, ref_min, ref_max, config.medium_fraction)
        medium_step = run.steps[medium_index]
        medium_rollout = rollout(
            make_env, agent_policy(run.agents[medium_index]), config.steps_per_dataset, config.seed + 2, config.num_envs,
            {**base, "recipe": "medium", "behaviour_policy": f"agent after {medium_step} steps", "behaviour_steps": medium_step},
        )
        log(
            f"medium policy ({medium_step} training steps, eval {run.eval_returns[medium_index]:.2f}): "
            f"mean return {medium_rollout.mean_return:.2f}"
        )
        replay_part = prefix(run.replay, medium_step, {**base, "recipe": "medium-replay", "behaviour_steps": medium_step,
                                                       "behaviour_policy": f"replay buffer of the first {medium_step} training steps"})
        results.update(expert=expert_rollout.dataset, medium=medium_rollout.dataset, **{"medium-replay": replay_part})
        behaviour_returns.update(expert=ref_max, medium=medium_rollout.mean_return)
        replay_returns = _returns_before(run.replay, medium_step)
        behaviour_returns["medium-replay"] = float(replay_returns.mean()) if len(replay_returns) else float("nan")
        results["medium-expert"] = concatenate(
            [medium_rollout.dataset, expert_rollout.dataset],
            {**base, "recipe": "medium-expert", "behaviour_policy": "medium then expert"},
        )
        behaviour_returns["medium-expert"] = float(
            np.mean(np.concatenate([medium_rollout.episode_returns, expert_rollout.episode_returns]))
        )
    chosen = {}
    for name in config.recipes:
        dataset = results[name]
        metadata = {
            **dataset.metadata,
            "recipe": name,
            "seed": config.seed,
            "behaviour_return": behaviour_returns[name],
            "ref_min_score": ref_min,
            "ref_max_score": ref_max,
            "dataset_name": f"{config.env_id}-{name}",
        }
        chosen[name] = dataclasses.replace(dataset, metadata={k: v for k, v in metadata.items() if v is not None})
    return chosen
