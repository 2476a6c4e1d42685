"""Training loops. The online off-policy loop drives any agent with the DESIGN.md contract in any
``gymnasium.Env``, for several seeds at once (a leading seed axis on agent and buffer).

Per environment step the host steps one env per seed and makes one or two jitted calls: the
policy's actions, then (buffer add + ``updates_per_step`` scanned updates). Evaluation, logging
and checkpoints happen between those calls.

On a JAX-native environment (``jax_env``: its functional core) the training envs live on the
device instead: every stretch of steps between two log, evaluation or checkpoint points is one
jitted call that loops over the steps (act, step every seed's env with automatic resets, add to
the buffer, update), so no step returns to Python. Evaluation still runs the gymnasium face that
``make_env`` builds, with the same episodes as on the host path.

Exact resume: a checkpoint holds agent, buffer, the step counter and, per env, the current
episode's index and actions so far (host envs) or the env states themselves (device envs). Every
key is derived from (seed, step) and every host episode's reset seed from (seed, episode index),
so a resumed run re-creates the env, replays the episode's actions to reach the same state (or
restores the device env states), and continues bit-for-bit as the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from rl import xla_cpu
from rl.checkpoint import Checkpointer, check_env_loop
from rl.data import replay
from rl.evaluation import episode_seed, run_episodes
from rl.logging import Progress, RunLogger
from rl.rollouts import JaxEnvSpec, SegmentRunner, autoreset_step, trace_scope, unit_action_map
from rl.types import Transition, transition_like
from rl.update import SeedBatching, compile_updates, over_seeds, scan_updates

TRAIN_STREAM, EVAL_STREAM = 0, 1
UPDATE_KEY_STREAM, ENV_KEY_STREAM, ENV_RESET_STREAM = 1, 2, 3
"""Sub-streams of a step's key ``fold_in(loop_key, step)`` (whose own draws are the step's actions):
the step's updates, its device env steps, and (at step 0) the device envs' first reset."""


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    """Schedule of an online off-policy run (all counts are environment steps per seed)."""

    total_steps: int = 100_000
    """Environment steps to run."""
    warmup_steps: int = 5_000
    """Steps before the first update; their actions come from ``warmup_actions``."""
    warmup_actions: Literal["random", "policy"] = "random"
    """Uniform random actions (SAC) or the agent's own stochastic policy (WSRL) during warm-up."""
    updates_per_step: int = 1
    """Agent ``update`` calls per environment step after warm-up (each may hold several critic steps)."""
    buffer_capacity: int = 1_000_000
    """Replay capacity per seed (capped at total_steps)."""
    eval_interval: int = 5_000
    """Evaluate every this many steps and at the end."""
    eval_episodes: int = 10
    """Deterministic evaluation episodes per seed."""
    eval_at_start: bool = False
    """Also evaluate before the first step (the offline policy's score when fine-tuning)."""
    log_interval: int = 1_000
    """Log training metrics every this many steps."""
    checkpoint_interval: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    seed_batching: SeedBatching = "auto"
    """How the seeds' updates run: batched by vmap, one seed after another in a loop, or auto
    (vmap, except on the CPU from 8 seeds on, where the loop is faster)."""

    def __post_init__(self) -> None:
        for name in ("total_steps", "eval_interval", "eval_episodes", "log_interval", "updates_per_step", "buffer_capacity"):
            if getattr(self, name) < 1:
                raise ValueError(f"OnlineConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"OnlineConfig.{name} must be >= 0, got {getattr(self, name)}")


class EpisodeRunner:
    """One training env of one seed, with the log needed to rebuild its state after a restart."""

    def __init__(self, env: gym.Env, run_seed: int) -> None:
        self.env = env
        self.run_seed = run_seed
        self.episode_index = 0
        self.actions: list[list[float]] = []
        self.episode_return = 0.0
        self.observation: np.ndarray = np.zeros(0)

    def start_episode(self) -> None:
        """Reset with this episode's derived seed."""
        seed = episode_seed(self.run_seed, TRAIN_STREAM, self.episode_index)
        self.observation = np.asarray(self.env.reset(seed=seed)[0], np.float32)
        self.actions = []
        self.episode_return = 0.0

    def step(self, action: np.ndarray) -> tuple[tuple, float | None]:
        """Step the env; returns the transition fields and the episode's return if it ended."""
        observation = self.observation
        next_observation, reward, terminated, truncated, _ = self.env.step(action)
        next_observation = np.asarray(next_observation, np.float32)
        self.actions.append(np.asarray(action).tolist())
        self.episode_return += float(reward)
        fields = (observation, action, float(reward), next_observation, bool(terminated), bool(truncated))
        finished = None
        if terminated or truncated:
            finished = self.episode_return
            self.episode_index += 1
            self.start_episode()
        else:
            self.observation = next_observation
        return fields, finished

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state: episode index and the actions taken so far in it."""
        return {"episode_index": self.episode_index, "actions": self.actions}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Rebuild the env state by replaying the current episode from its seeded reset."""
        self.episode_index = int(snapshot["episode_index"])
        self.start_episode()
        dtype = getattr(self.env.action_space, "dtype", np.float32)
        for action in snapshot["actions"]:
            self.step(np.asarray(action, dtype=dtype))


class Evaluator:
    """Deterministic evaluation episodes for every seed, logged as ``phase='eval'`` rows.

    Round ``r`` of seed ``s`` resets its episodes with seeds derived from ``(s, r)``, so every
    round sees fresh but reproducible starts, identical across resumed and uninterrupted runs.
    """

    def __init__(
        self,
        make_env: Callable[[], gym.Env],
        seeds: Sequence[int],
        episodes: int,
        logger: RunLogger,
        score_fn: Callable[[np.ndarray], np.ndarray] | None = None,
        first_round: int = 0,
    ) -> None:
        self.seeds = [int(s) for s in seeds]
        self.episodes = episodes
        self.envs = [[make_env() for _ in range(episodes)] for _ in seeds]
        self.logger = logger
        self.score_fn = score_fn
        self.round = first_round
        self.rows: list[dict[str, Any]] = []
        self._act = jax.jit(jax.vmap(lambda agent, obs: agent.act(obs, jax.random.PRNGKey(0), deterministic=True)))

    def __call__(self, agent: Any, step: int, phase: str = "eval") -> float:
        """Evaluate the seed-stacked ``agent``; log one row per seed; return the mean return."""
        reset_seeds = [
            [episode_seed(s, EVAL_STREAM, self.round * self.episodes + j) for j in range(self.episodes)] for s in self.seeds
        ]
        returns = run_episodes(lambda obs: self._act(agent, obs), self.envs, reset_seeds)
        self.round += 1
        for seed, seed_returns in zip(self.seeds, returns):
            row = {
                "step": step,
                "seed": seed,
                "phase": phase,
                "eval_return": float(seed_returns.mean()),
                "eval_return_std": float(seed_returns.std()),
            }
            if self.score_fn is not None:
                row["normalised_score"] = float(np.mean(self.score_fn(seed_returns)))
            self.logger.log(row)
            self.rows.append(row)
        return float(returns.mean())


def _stack_transitions(fields: Sequence[tuple]) -> Transition:
    columns = list(zip(*fields))
    return Transition(
        observations=np.stack(columns[0]).astype(np.float32),
        actions=np.stack(columns[1]).astype(np.float32),
        rewards=np.asarray(columns[2], np.float32),
        next_observations=np.stack(columns[3]).astype(np.float32),
        terminated=np.asarray(columns[4], bool),
        truncated=np.asarray(columns[5], bool),
    )


def _space_bounds(space: gym.Space) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(space, gym.spaces.Box):
        raise ValueError(f"the off-policy loop needs a Box action space, got {space}")
    return space.low.astype(np.float32), space.high.astype(np.float32)


def _next_stop(step: int, config: OnlineConfig, stop_at: int | None) -> int:
    """The first step after ``step`` where the loop must return to the host: a log, evaluation or
    checkpoint point, the end of warm-up, the end of the run or ``stop_at``."""
    stops = [config.total_steps, _next_multiple(step, config.log_interval), _next_multiple(step, config.eval_interval)]
    if config.checkpoint_interval:
        stops.append(_next_multiple(step, config.checkpoint_interval))
    if step < config.warmup_steps:
        stops.append(config.warmup_steps)
    if stop_at is not None:
        stops.append(max(stop_at, step + 1))
    return min(stops)


def _next_multiple(step: int, interval: int) -> int:
    return (step // interval + 1) * interval


def train_online(
    create_agent: Callable[[jax.Array], Any],
    make_env: Callable[[], gym.Env],
    config: OnlineConfig,
    seeds: Sequence[int],
    run_dir: str | Path,
    run_config: Any = None,
    resume: bool = False,
    progress: bool | None = None,
    score_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    initial_agent: Any = None,
    stop_at: int | None = None,
    offline_source: replay.ReplayBuffer | None = None,
    offline_ratio: float = 0.0,
    jax_env: JaxEnvSpec | None = None,
    on_evaluation: Callable[[int, Any], None] | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Run online training for every seed in ``seeds`` at once; returns the seed-stacked agent
    and the evaluation rows.

    ``create_agent(key)`` builds one seed's agent (vmapped over seeds), unless ``initial_agent``
    (already seed-stacked, e.g. a pretrained one) is given. ``score_fn`` maps raw returns to a
    normalised score for the logs. With ``offline_ratio > 0`` every update batch holds that
    fraction of rows from ``offline_source`` (one buffer shared by all seeds) and the rest from the
    online buffer; at 0 the offline data is never read. ``stop_at`` ends the call after that step without a final
    checkpoint, exactly as a killed process would (used to test resume). With ``jax_env`` (the
    functional core of the env ``make_env`` builds) the training envs step on the device, a whole
    stretch of steps per jitted call; ``make_env`` then only serves evaluation. ``on_evaluation(step,
    agent)`` is called after every evaluation with the seed-stacked agent (copy what you keep: the
    loop goes on with the agent's buffers).
    """
    if not 0.0 <= offline_ratio <= 1.0:
        raise ValueError(f"offline_ratio must lie in [0, 1], got {offline_ratio}")
    if offline_ratio > 0 and offline_source is None:
        raise ValueError("offline_ratio > 0 needs an offline_source")
    run_dir = Path(run_dir)
    num_seeds = len(seeds)
    root_keys = jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
    agent_keys, loop_keys = jax.vmap(lambda k: jax.random.split(k))(root_keys).transpose(1, 0, 2)

    probe = make_env()
    action_space, observation_space = probe.action_space, probe.observation_space
    probe.close()
    observation_dim = int(np.prod(observation_space.shape))
    low, high = _space_bounds(action_space)

    agent = initial_agent if initial_agent is not None else jax.jit(jax.vmap(create_agent))(agent_keys)
    capacity = min(config.buffer_capacity, config.total_steps)
    example = transition_like(observation_dim, int(np.prod(action_space.shape)))
    buffer = jax.vmap(lambda _: replay.init(example, capacity))(jnp.arange(num_seeds))

    def random_actions(key, step):
        return jax.random.uniform(jax.random.fold_in(key, step), low.shape, minval=low, maxval=high)

    def policy_actions(agent, observations, key, step):
        return agent.act(observations, jax.random.fold_in(key, step))

    def mixed_sample(sources, key, batch_size):
        return replay.sample_mixed(sources, (1.0 - offline_ratio, offline_ratio), key, batch_size)

    def updates(agent, buffer, key, step, offline):
        update_key = jax.random.fold_in(jax.random.fold_in(key, step), UPDATE_KEY_STREAM)
        if offline_ratio > 0:
            return scan_updates(agent, (buffer, offline), update_key, config.updates_per_step, mixed_sample)
        return scan_updates(agent, buffer, update_key, config.updates_per_step)

    def add_and_update(agent, buffer, transition, key, step, offline):
        # The add stays batched over seeds: a per-seed buffer returned from a seed loop would be
        # copied whole on every step.
        buffer = jax.vmap(replay.add_one)(buffer, transition)
        agent, metrics = over_seeds(updates, (0, 0, 0, None, None), config.seed_batching)(agent, buffer, key, step, offline)
        return agent, buffer, metrics

    offline = offline_source if offline_ratio > 0 else None
    if jax_env is None:
        envs: _HostEnvs | _DeviceEnvs = _HostEnvs(make_env, seeds, random_actions, policy_actions, add_and_update)
    else:
        action_map = device_action_map(jax_env, observation_space, action_space)
        envs = _DeviceEnvs(jax_env, action_map, loop_keys, random_actions, policy_actions, add_and_update)

    checkpointer = Checkpointer(run_dir / "checkpoints")
    env_loop = "host" if jax_env is None else "device"
    step, eval_round, elapsed_before = 0, 0, 0.0
    resume_step = checkpointer.latest_step() if resume else None
    if resume_step is not None:
        check_env_loop(_recorded_env_loop(checkpointer.restore_host(resume_step)), env_loop, str(run_dir))
        state, host = checkpointer.restore({"agent": agent, "buffer": buffer, **envs.state()}, resume_step, what=str(run_dir))
        agent, buffer = state["agent"], state["buffer"]
        step, eval_round, elapsed_before = int(host["step"]), int(host["eval_round"]), float(host["elapsed_s"])
        envs.restore(state, host)
    logger = RunLogger(run_dir, run_config, resume_step=resume_step)
    evaluate = Evaluator(make_env, seeds, config.eval_episodes, logger, score_fn, first_round=eval_round)
    bar = Progress(config.total_steps, "online", enabled=progress, completed=step)

    metrics = None
    start_time = time.perf_counter()
    start_step = step

    def save_checkpoint() -> None:
        host = {
            "step": step,
            "eval_round": evaluate.round,
            "elapsed_s": elapsed_before + time.perf_counter() - start_time,
            "env_loop": env_loop,
            **envs.host_state(),
        }
        checkpointer.save(step, {"agent": agent, "buffer": buffer, **envs.state()}, host)

    last_score = None
    if config.eval_at_start and step == 0:
        last_score = evaluate(agent, step)
        if on_evaluation is not None:
            on_evaluation(step, agent)
    try:
        while step < config.total_steps:
            stop = _next_stop(step, config, stop_at)
            explore = step >= config.warmup_steps or config.warmup_actions == "policy"
            learn = step >= config.warmup_steps
            agent, buffer, chunk_metrics = envs.advance(agent, buffer, loop_keys, step, stop - step, explore, learn, offline)
            metrics = chunk_metrics if chunk_metrics is not None else metrics
            step = stop

            if step % config.log_interval == 0:
                rate = (step - start_step) / max(time.perf_counter() - start_time, 1e-9)
                _log_training(logger, step, seeds, metrics, envs.take_finished_returns(), rate)
                bar.update(step, rate, last_score, phase="warmup" if step <= config.warmup_steps else "online")
            if step % config.eval_interval == 0 or step == config.total_steps:
                last_score = evaluate(agent, step)
                if on_evaluation is not None:
                    on_evaluation(step, agent)
            if step == config.total_steps or (config.checkpoint_interval and step % config.checkpoint_interval == 0):
                save_checkpoint()
            if stop_at is not None and step >= stop_at:
                break
    finally:
        bar.close()
        logger.close()
        checkpointer.close()
    return agent, evaluate.rows


def _recorded_env_loop(host: dict[str, Any]) -> str:
    """Where a checkpoint's training envs stepped; checkpoints without the record are told apart by
    their host state (the device loop keeps finished-episode sums, the host loop episodes to replay)."""
    return host.get("env_loop") or ("device" if "episode_return_sums" in host else "host")


def device_action_map(jax_env: JaxEnvSpec, observation_space: gym.Space, action_space: gym.Space) -> Callable[[jax.Array], jax.Array]:
    """How the agent's actions (in ``action_space``, that of the env ``make_env`` builds) become the
    functional core's: clipped to [-1, 1] and mapped affinely onto the core's bounds when
    ``make_env``'s Box is [-1, 1] (as :class:`envs.wrappers.RescaleToUnit` does), unchanged when
    the two spaces are otherwise equal. Any other difference means ``make_env`` wraps the core in
    a way the device loop cannot reproduce: a ``ValueError`` names the space."""
    core_observations = jax_env.core.observation_space(jax_env.params)
    core_actions = jax_env.core.action_space(jax_env.params)
    if core_observations.shape != observation_space.shape:
        raise ValueError(f"jax_env: the core's observation space {core_observations} differs from make_env's {observation_space}")
    unit_face = (
        isinstance(core_actions, gym.spaces.Box)
        and isinstance(action_space, gym.spaces.Box)
        and core_actions.shape == action_space.shape
        and np.all(action_space.low == -1.0)
        and np.all(action_space.high == 1.0)
    )
    if unit_face:
        return unit_action_map(core_actions)
    if core_actions == action_space:
        return lambda actions: actions
    raise ValueError(f"jax_env: the core's action space {core_actions} differs from make_env's {action_space}")


class _HostEnvs:
    """One gymnasium training env per seed, stepped on the host: one or two jitted calls per step."""

    def __init__(self, make_env, seeds, random_actions, policy_actions, add_and_update) -> None:
        self.runners = [EpisodeRunner(make_env(), int(s)) for s in seeds]
        self.finished_returns: list[list[float]] = [[] for _ in seeds]
        self._random = jax.jit(jax.vmap(random_actions, in_axes=(0, None)))
        self._policy = jax.jit(jax.vmap(policy_actions, in_axes=(0, 0, 0, None)))
        self._add = jax.jit(jax.vmap(replay.add_one), donate_argnums=0)
        self._train = xla_cpu.jit(add_and_update, donate_argnums=(0, 1))
        for runner in self.runners:
            runner.start_episode()

    def state(self) -> dict[str, Any]:
        """Device arrays of the envs to checkpoint (none: host envs are rebuilt from the host state)."""
        return {}

    def host_state(self) -> dict[str, Any]:
        """JSON-able state that rebuilds the envs on resume."""
        return {"envs": [runner.snapshot() for runner in self.runners], "finished_returns": self.finished_returns}

    def restore(self, state: dict[str, Any], host: dict[str, Any]) -> None:
        """Rebuild every env's current episode from a checkpoint's host state."""
        self.finished_returns = host["finished_returns"]
        for runner, snapshot in zip(self.runners, host["envs"]):
            runner.restore(snapshot)

    def advance(self, agent, buffer, loop_keys, step: int, count: int, explore: bool, learn: bool, offline):
        """Run ``count`` steps one by one; returns agent, buffer and the last update's metrics."""
        metrics = None
        for current in range(step, step + count):
            observations = np.stack([runner.observation for runner in self.runners])
            actions = self._policy(agent, observations, loop_keys, current) if explore else self._random(loop_keys, current)
            actions = np.asarray(actions)
            fields = []
            for index, runner in enumerate(self.runners):
                transition_fields, finished = runner.step(actions[index])
                fields.append(transition_fields)
                if finished is not None:
                    self.finished_returns[index].append(finished)
            transition = _stack_transitions(fields)
            if learn:
                agent, buffer, metrics = self._train(agent, buffer, transition, loop_keys, current, offline)
            else:
                buffer = self._add(buffer, transition)
        return agent, buffer, metrics

    def take_finished_returns(self) -> list[float | None]:
        """Mean return of the episodes each seed finished since the last call (None if none)."""
        means = [float(np.mean(returns)) if returns else None for returns in self.finished_returns]
        self.finished_returns = [[] for _ in self.runners]
        return means


class _DeviceEnvs:
    """Every seed's training env as a JAX-native core on the device: a stretch of steps (act, env
    step with automatic reset, buffer add, update) is one jitted call looping over the steps."""

    def __init__(self, jax_env: JaxEnvSpec, action_map, loop_keys, random_actions, policy_actions, add_and_update) -> None:
        self.core, self.params, self._action_map = jax_env.core, jax_env.params, action_map
        self._random, self._policy, self._add_and_update = random_actions, policy_actions, add_and_update
        self._chunks: dict[tuple[bool, bool], Any] = {}
        reset_keys = jax.vmap(lambda key: jax.random.fold_in(jax.random.fold_in(key, 0), ENV_RESET_STREAM))(loop_keys)
        with trace_scope(self.core):
            observations, env_state = jax.jit(jax.vmap(self.core.reset, in_axes=(0, None)))(reset_keys, self.params)
        self.carry = SegmentRunner(env_state, observations.astype(jnp.float32), jnp.zeros(len(loop_keys), jnp.float32))
        self.return_sums = np.zeros(len(loop_keys))
        self.episode_counts = np.zeros(len(loop_keys), np.int64)

    def state(self) -> dict[str, Any]:
        """The env states, observations and running returns, checkpointed with the agent."""
        return {"envs": self.carry}

    def host_state(self) -> dict[str, Any]:
        """Returns of the episodes finished since the last log, per seed."""
        return {"episode_return_sums": self.return_sums.tolist(), "episode_counts": self.episode_counts.tolist()}

    def restore(self, state: dict[str, Any], host: dict[str, Any]) -> None:
        """Take the env states and the finished-episode sums from a checkpoint."""
        self.carry = state["envs"]
        self.return_sums = np.asarray(host["episode_return_sums"], np.float64)
        self.episode_counts = np.asarray(host["episode_counts"], np.int64)

    def advance(self, agent, buffer, loop_keys, step: int, count: int, explore: bool, learn: bool, offline):
        """Run ``count`` steps in one jitted call; returns agent, buffer and the last update's metrics."""
        chunk = self._chunks.get((explore, learn))
        if chunk is None:
            chunk = xla_cpu.jit(functools.partial(self._chunk, explore=explore, learn=learn), donate_argnums=(0, 1, 2))
            self._chunks[(explore, learn)] = chunk
        with trace_scope(self.core):
            agent, buffer, self.carry, sums, counts, metrics = chunk(
                agent, buffer, self.carry, loop_keys, jnp.int32(step), jnp.int32(count), offline, self.params
            )
        sums, counts = jax.device_get((sums, counts))
        self.return_sums += sums
        self.episode_counts += counts
        return agent, buffer, metrics if learn else None

    def take_finished_returns(self) -> list[float | None]:
        """Mean return of the episodes each seed finished since the last call (None if none)."""
        means = [float(total / count) if count else None for total, count in zip(self.return_sums, self.episode_counts)]
        self.return_sums = np.zeros_like(self.return_sums)
        self.episode_counts = np.zeros_like(self.episode_counts)
        return means

    def _chunk(self, agent, buffer, carry: SegmentRunner, loop_keys, start, count, offline, params, *, explore: bool, learn: bool):
        num_seeds = carry.observations.shape[0]
        step_envs = jax.vmap(functools.partial(autoreset_step, self.core), in_axes=(0, 0, 0, None))

        def one_step(agent, buffer, carry: SegmentRunner, step):
            if explore:
                actions = jax.vmap(self._policy, in_axes=(0, 0, 0, None))(agent, carry.observations, loop_keys, step)
            else:
                actions = jax.vmap(self._random, in_axes=(0, None))(loop_keys, step)
            env_keys = jax.vmap(lambda key: jax.random.fold_in(jax.random.fold_in(key, step), ENV_KEY_STREAM))(loop_keys)
            result, final_observations = step_envs(env_keys, carry.env_state, self._action_map(actions), params)
            transition = Transition(
                observations=carry.observations,
                actions=actions.astype(jnp.float32),
                rewards=result.reward.astype(jnp.float32),
                next_observations=final_observations.astype(jnp.float32),
                terminated=result.terminated,
                truncated=result.truncated,
            )
            done = jnp.logical_or(result.terminated, result.truncated)
            returns = carry.episode_returns + transition.rewards
            finished = (jnp.where(done, returns, 0.0), done.astype(jnp.int32))
            carry = SegmentRunner(result.state, result.obs.astype(jnp.float32), jnp.where(done, 0.0, returns))
            if learn:
                agent, buffer, metrics = self._add_and_update(agent, buffer, transition, loop_keys, step, offline)
            else:
                buffer, metrics = jax.vmap(replay.add_one)(buffer, transition), {}
            return agent, buffer, carry, finished, metrics

        def body(index, loop_carry):
            agent, buffer, carry, sums, counts, _ = loop_carry
            agent, buffer, carry, (returns, ended), metrics = one_step(agent, buffer, carry, start + index)
            return agent, buffer, carry, sums + returns, counts + ended, metrics

        metrics_shape = jax.eval_shape(lambda: one_step(agent, buffer, carry, start)[-1])
        initial = (
            agent,
            buffer,
            carry,
            jnp.zeros(num_seeds, jnp.float32),
            jnp.zeros(num_seeds, jnp.int32),
            jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), metrics_shape),
        )
        return jax.lax.fori_loop(0, count, body, initial)


def _log_training(
    logger: RunLogger,
    step: int,
    seeds: Sequence[int],
    metrics: dict[str, jax.Array] | None,
    episode_returns: Sequence[float | None],
    steps_per_second: float,
    phase: str = "train",
) -> None:
    host_metrics = jax.device_get(metrics) if metrics is not None else {}
    for index, seed in enumerate(seeds):
        row: dict[str, Any] = {"step": step, "seed": int(seed), "phase": phase, "steps_per_s": steps_per_second}
        if episode_returns[index] is not None:
            row["episode_return"] = episode_returns[index]
        row.update({name: float(values[index]) for name, values in host_metrics.items()})
        logger.log(row)


@dataclasses.dataclass(frozen=True)
class OfflineConfig:
    """Schedule of offline (dataset-only) training; counts are gradient updates."""

    num_steps: int = 250_000
    """Agent updates to run."""
    updates_per_call: int = 1_000
    """Updates fused into one jitted lax.scan call (fewer host round trips)."""
    eval_interval: int = 50_000
    """Evaluate every this many updates and at the end (needs an env)."""
    eval_episodes: int = 10
    """Deterministic evaluation episodes per seed."""
    log_interval: int = 5_000
    """Log training metrics (averaged over the last call) every this many updates."""
    checkpoint_interval: int = 0
    """Checkpoint every this many updates (0: only at the end)."""
    seed_batching: SeedBatching = "auto"
    """How the seeds' updates run: batched by vmap, one seed after another in a loop, or auto
    (vmap, except on the CPU from 8 seeds on, where the loop is faster)."""

    def __post_init__(self) -> None:
        for name in ("num_steps", "updates_per_call", "eval_interval", "eval_episodes", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"OfflineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_interval < 0:
            raise ValueError(f"OfflineConfig.checkpoint_interval must be >= 0, got {self.checkpoint_interval}")


def _next_boundary(step: int, interval: int, total: int) -> int:
    return min((step // interval + 1) * interval, total) if interval else total


def train_offline(
    agent: Any,
    source: Any,
    config: OfflineConfig,
    seeds: Sequence[int],
    run_dir: str | Path,
    make_env: Callable[[], gym.Env] | None = None,
    run_config: Any = None,
    resume: bool = False,
    progress: bool | None = None,
    score_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    sample_fn=replay.sample,
) -> tuple[Any, list[dict[str, Any]]]:
    """Train the seed-stacked ``agent`` on ``source`` (one dataset buffer shared by all seeds).

    Updates run in jitted chunks of up to ``updates_per_call``, cut at log / eval / checkpoint
    boundaries so that every boundary lands exactly. Returns the agent and the evaluation rows.
    """

    run_dir = Path(run_dir)
    update_keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(int(s)), 7) for s in seeds])
    checkpointer = Checkpointer(run_dir / "checkpoints")
    step, eval_round = 0, 0
    resume_step = checkpointer.latest_step() if resume else None
    if resume_step is not None:
        state, host = checkpointer.restore({"agent": agent}, resume_step, what=str(run_dir))
        agent, step, eval_round = state["agent"], int(host["step"]), int(host["eval_round"])
    logger = RunLogger(run_dir, run_config, resume_step=resume_step)
    evaluate = (
        Evaluator(make_env, seeds, config.eval_episodes, logger, score_fn, first_round=eval_round) if make_env else None
    )
    bar = Progress(config.num_steps, "offline", enabled=progress, completed=step)
    compiled: dict[int, Callable] = {}
    start_time, start_step, last_score = time.perf_counter(), step, None
    try:
        while step < config.num_steps:
            stop = min(
                step + config.updates_per_call,
                _next_boundary(step, config.log_interval, config.num_steps),
                _next_boundary(step, config.eval_interval, config.num_steps),
                _next_boundary(step, config.checkpoint_interval, config.num_steps),
            )
            count = stop - step
            if count not in compiled:
                compiled[count] = compile_updates(
                    count, seed_axis=True, sample_fn=sample_fn, shared_source=True, seed_batching=config.seed_batching
                )
            keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(update_keys, step)
            agent, metrics = compiled[count](agent, source, keys)
            # Dispatch returns before the chunk has run: wait for it, or the rate counts dispatches.
            metrics = jax.block_until_ready(metrics)
            step = stop
            rate = (step - start_step) / max(time.perf_counter() - start_time, 1e-9)
            if step % config.log_interval == 0 or step == config.num_steps:
                _log_training(logger, step, seeds, metrics, [None for _ in seeds], rate, phase="offline")
            if evaluate is not None and (step % config.eval_interval == 0 or step == config.num_steps):
                last_score = evaluate(agent, step, phase="offline_eval")
            if step == config.num_steps or (config.checkpoint_interval and step % config.checkpoint_interval == 0):
                round_done = evaluate.round if evaluate is not None else 0
                checkpointer.save(step, {"agent": agent}, {"step": step, "eval_round": round_done})
            bar.update(step, rate, last_score)
    finally:
        bar.close()
        logger.close()
        checkpointer.close()
    return agent, (evaluate.rows if evaluate is not None else [])
