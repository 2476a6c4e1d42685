"""On-policy rollouts and the on-policy training loop.

Two collection modes, chosen by the agent's :class:`CollectionSpec`:

- ``"segments"`` (PPO): every env runs ``num_steps`` steps with automatic resets; episodes cross
  rollout boundaries.
- ``"groups"`` (LOOP): every iteration draws ``num_envs / group_size`` tasks (reset seeds) and runs
  exactly one episode per env, ``group_size`` envs per task from the identical seeded start;
  arrays are padded to the episode cap and ``valid`` marks the real steps.

Two backends with the same :class:`Rollout` output, ``[num_envs, T, ...]`` per seed:

- host ``gymnasium`` envs: one ``gymnasium.vector`` env per seed, stepped in lockstep across seeds
  with one batched policy call per step; the update is one jitted call per iteration.
- JAX-native :class:`envs.jax_env.JaxEnv` cores: collection (``vmap`` over envs, ``lax.scan`` over
  time) and update compile into one jitted call per iteration.

Seeds are a leading ``vmap`` axis in both. Each seed counts its own environment steps (segments:
``num_envs * num_steps`` per rollout, as CleanRL / SB3 count; groups: the valid steps of its
episodes) and stops updating once it reaches the budget, so every seed gets the same budget even
when episode lengths differ (LOOP).

An on-policy agent provides ``collection`` (a :class:`CollectionSpec`), ``explore(obs, key) ->
(stored action, log-probability)``, ``act(obs, key, deterministic)`` and ``update(rollout) ->
(agent, metrics)``; Box actions are in [-1, 1] and mapped onto the env's bounds here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import flax.struct
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from rl.checkpoint import Checkpointer, check_env_loop
from rl.evaluation import run_episodes
from rl.logging import METRICS_JSONL, Progress, RunLogger, read_metrics
from rl.update import stack_seeds

TRAIN_STREAM, EVAL_STREAM, TASK_STREAM = 0, 1, 2
EVAL_SEED_OFFSET = 2**31
"""Evaluation reset seeds lie in [2**31, 2**32), training task seeds in [0, 2**31): never shared."""


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class CollectionSpec:
    """What an on-policy agent needs collected for one update."""

    mode: Literal["segments", "groups"]
    """Fixed-length segments with autoreset (PPO) or one seeded episode per env in groups (LOOP)."""
    num_envs: int
    """Environments per seed (for groups: num_groups * group_size)."""
    num_steps: int = 0
    """Steps per env per rollout (segments only)."""
    group_size: int = 1
    """Envs sharing one task seed (groups only); envs [g*K, (g+1)*K) form group g."""

    def __post_init__(self) -> None:
        if self.mode == "segments" and self.num_steps < 1:
            raise ValueError(f"segment collection needs num_steps >= 1, got {self.num_steps}")
        if self.mode == "groups" and (self.group_size < 1 or self.num_envs % self.group_size):
            raise ValueError(f"num_envs {self.num_envs} is not a multiple of group_size {self.group_size}")

    @property
    def num_groups(self) -> int:
        """Tasks per iteration (groups mode)."""
        return self.num_envs // self.group_size


@flax.struct.dataclass
class Rollout:
    """On-policy data, arrays ``[num_envs, T, ...]``.

    ``actions`` are the stored (e.g. unclipped) actions and ``log_probs`` their log-probabilities
    under the behaviour policy. ``next_observations`` is the true next observation of every step,
    the final one where an episode ended, so truncated steps bootstrap from the right state (None
    in groups mode, which needs no values). ``valid`` is False on padding and on the reset steps of
    gymnasium's next-step autoreset.
    """

    observations: jax.Array
    actions: jax.Array
    log_probs: jax.Array
    rewards: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    valid: jax.Array
    next_observations: jax.Array | None = None


def gae(
    rewards: jax.Array,
    values: jax.Array,
    next_values: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    discount: float,
    gae_lambda: float,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over a time-major axis 0; returns (advantages, targets).

    ``next_values`` are V of each step's true next observation: a truncated step bootstraps from
    it, a terminated one does not, and either one stops the recursion (the next row belongs to
    another episode). A short reverse ``lax.scan`` written here because rlax (which has one) is not
    a dependency and its version takes one discount per step rather than the two flags.
    """
    terminated = terminated.astype(jnp.float32)
    done = jnp.logical_or(terminated > 0, truncated).astype(jnp.float32)
    deltas = rewards + discount * next_values * (1.0 - terminated) - values

    def step(next_advantage, inputs):
        delta, episode_ended = inputs
        advantage = delta + discount * gae_lambda * (1.0 - episode_ended) * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(step, jnp.zeros_like(values[0]), (deltas, done), reverse=True)
    return advantages, advantages + values


def derived_seed(*words: int) -> int:
    """A 31-bit seed hashed from integer words (NumPy SeedSequence), independent across words."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1)[0] % 2**31)


def task_seeds(run_seed: int, iteration: int, num_tasks: int) -> np.ndarray:
    """Reset seeds of one iteration's tasks, from the run's dedicated task stream (in [0, 2**31))."""
    return np.random.default_rng([run_seed, TASK_STREAM, iteration]).integers(0, 2**31, num_tasks)


def eval_seeds(run_seed: int, eval_round: int, num_episodes: int) -> list[int]:
    """Reset seeds of one evaluation round, in [2**31, 2**32): disjoint from every task seed."""
    return [EVAL_SEED_OFFSET + derived_seed(run_seed, EVAL_STREAM, eval_round, j) for j in range(num_episodes)]


def unit_action_map(space: gym.Space) -> Callable[[jax.Array], jax.Array]:
    """Agent actions → env actions: Box actions are clipped to [-1, 1] and mapped affinely onto the
    space's bounds (the identity for an already rescaled env); discrete ones pass through."""
    return _bounds_map(_space_bounds(space))


def _select_rows(condition: jax.Array, new: Any, old: Any) -> Any:
    """Per-env ``where`` on pytrees whose leaves have a leading env axis."""

    def pick(n, o):
        return jnp.where(condition.reshape(condition.shape + (1,) * (n.ndim - condition.ndim)), n, o)

    return jax.tree.map(pick, new, old)


def _time_major_to_env_major(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), tree)


# ----------------------------------------------------------------------------- JAX-native collection


class SegmentRunner(flax.struct.PyTreeNode):
    """Envs of a JAX-native core on the device: their states, current observations and running
    returns (the carry of segment collection here and of the online loop's device envs)."""

    env_state: Any
    observations: jax.Array
    episode_returns: jax.Array


def init_segment_runner(env: Any, params: Any, key: jax.Array, num_envs: int) -> SegmentRunner:
    """Reset ``num_envs`` copies of a JAX env with independent keys."""
    observations, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(key, num_envs), params)
    return SegmentRunner(state, observations.astype(jnp.float32), jnp.zeros((num_envs,), jnp.float32))


def autoreset_step(env: Any, key: jax.Array, state: Any, action: jax.Array, params: Any):
    """Step, then reset where the episode ended; returns (result with post-reset obs/state, true
    final observation). The same semantics as ``envs.jax_env.step_autoreset``, written against the
    bare ``reset``/``step`` protocol because ``rl`` does not import ``envs`` (DESIGN.md layering)."""
    key_step, key_reset = jax.random.split(key)
    result = env.step(key_step, state, action, params)
    reset_observation, reset_state = env.reset(key_reset, params)
    done = jnp.logical_or(result.terminated, result.truncated)
    state = jax.tree.map(lambda r, s: jnp.where(done, r, s), reset_state, result.state)
    observation = jnp.where(done, reset_observation, result.obs)
    return result._replace(obs=observation, state=state), result.obs


def collect_segments(
    agent: Any,
    env: Any,
    params: Any,
    runner: SegmentRunner,
    key: jax.Array,
    num_steps: int,
    action_map: Callable[[jax.Array], jax.Array],
) -> tuple[SegmentRunner, Rollout, dict[str, jax.Array]]:
    """``num_steps`` autoreset steps of every env (``lax.scan`` over time, ``vmap`` over envs)."""
    num_envs = runner.observations.shape[0]
    step_env = jax.vmap(partial(autoreset_step, env), in_axes=(0, 0, 0, None))

    def step(runner: SegmentRunner, step_key):
        action_key, env_key = jax.random.split(step_key)
        actions, log_probs = agent.explore(runner.observations, action_key)
        result, final_observations = step_env(jax.random.split(env_key, num_envs), runner.env_state, action_map(actions), params)
        done = jnp.logical_or(result.terminated, result.truncated)
        returns = runner.episode_returns + result.reward
        record = Rollout(
            observations=runner.observations,
            actions=actions,
            log_probs=log_probs,
            rewards=result.reward.astype(jnp.float32),
            terminated=result.terminated,
            truncated=result.truncated,
            valid=jnp.ones_like(done),
            next_observations=final_observations.astype(jnp.float32),
        )
        finished = (jnp.where(done, returns, 0.0).sum(), done.sum())
        runner = SegmentRunner(result.state, result.obs.astype(jnp.float32), jnp.where(done, 0.0, returns))
        return runner, (record, finished)

    runner, (records, (return_sums, counts)) = jax.lax.scan(step, runner, jax.random.split(key, num_steps))
    stats = {
        "episode_return_sum": return_sums.sum(),
        "episodes": counts.sum(),
        "env_steps": jnp.asarray(num_envs * num_steps, jnp.int32),
    }
    return runner, _time_major_to_env_major(records), stats


def collect_groups(
    agent: Any,
    env: Any,
    params: Any,
    task_keys: jax.Array,
    key: jax.Array,
    group_size: int,
    max_steps: int,
    action_map: Callable[[jax.Array], jax.Array],
    deterministic: bool = False,
) -> tuple[Rollout, dict[str, jax.Array]]:
    """One episode per env, ``group_size`` envs per task key, padded to ``max_steps``.

    Reset and environment-noise keys come from the task key and are shared within a group (common
    random numbers); action keys are independent per env. Finished envs keep their final state and
    their later steps are marked invalid. A step cap reached without termination is a truncation.
    """
    num_envs = task_keys.shape[0] * group_size
    reset_keys, noise_keys = jax.vmap(jax.random.split, out_axes=1)(task_keys)
    reset_keys, noise_keys = jnp.repeat(reset_keys, group_size, axis=0), jnp.repeat(noise_keys, group_size, axis=0)
    observations, state = jax.vmap(env.reset, in_axes=(0, None))(reset_keys, params)
    step_env = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def step(carry, t):
        state, observations, alive = carry
        action_key = jax.random.fold_in(key, t)
        if deterministic:
            actions = agent.act(observations, action_key, deterministic=True)
            log_probs = jnp.zeros((num_envs,), jnp.float32)
        else:
            actions, log_probs = agent.explore(observations, action_key)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(noise_keys, t)
        result = step_env(step_keys, state, action_map(actions), params)
        truncated = jnp.logical_or(result.truncated, jnp.logical_and(t == max_steps - 1, ~result.terminated))
        record = Rollout(
            observations=observations,
            actions=actions,
            log_probs=log_probs,
            rewards=jnp.where(alive, result.reward, 0.0).astype(jnp.float32),
            terminated=jnp.logical_and(alive, result.terminated),
            truncated=jnp.logical_and(alive, truncated),
            valid=alive,
        )
        new_state = _select_rows(alive, result.state, state)
        new_observations = jnp.where(alive[:, None], result.obs.astype(jnp.float32), observations)
        alive = jnp.logical_and(alive, ~jnp.logical_or(result.terminated, truncated))
        return (new_state, new_observations, alive), record

    init = (state, observations.astype(jnp.float32), jnp.ones((num_envs,), bool))
    _, records = jax.lax.scan(step, init, jnp.arange(max_steps))
    rollout = _time_major_to_env_major(records)
    returns = rollout.rewards.sum(axis=1)
    stats = {
        "episode_return_sum": returns.sum(),
        "episodes": jnp.asarray(num_envs, jnp.int32),
        "env_steps": rollout.valid.sum().astype(jnp.int32),
    }
    return rollout, stats


# ----------------------------------------------------------------------------- host collection


def make_vector_env(make_env: Callable[[], gym.Env], num_envs: int, mode: Literal["sync", "async"]) -> gym.vector.VectorEnv:
    """A gymnasium vector env of ``num_envs`` copies (next-step autoreset, Gymnasium's default)."""
    if mode == "async":
        return gym.vector.AsyncVectorEnv([make_env] * num_envs)
    return gym.vector.SyncVectorEnv([make_env] * num_envs)


HostPolicy = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
"""``(observations [S, N, D], t) -> (actions [S, N, ...], log_probs [S, N])``."""


def _empty_rollout(num_seeds: int, num_envs: int, length: int, observation_dim: int, action_shape: tuple, action_dtype, with_next: bool) -> dict[str, np.ndarray]:
    shape = (num_seeds, num_envs, length)
    arrays = {
        "observations": np.zeros(shape + (observation_dim,), np.float32),
        "actions": np.zeros(shape + action_shape, action_dtype),
        "log_probs": np.zeros(shape, np.float32),
        "rewards": np.zeros(shape, np.float32),
        "terminated": np.zeros(shape, bool),
        "truncated": np.zeros(shape, bool),
        "valid": np.zeros(shape, bool),
    }
    if with_next:
        arrays["next_observations"] = np.zeros(shape + (observation_dim,), np.float32)
    return arrays


class HostCollector:
    """One gymnasium vector env per seed; collects segments or seeded episode groups.

    Gymnasium 1.0's vector envs reset a finished sub-env on the *next* ``step`` call (whose action
    is ignored and whose reward is 0): that step is stored with ``valid=False``; the step that
    ended the episode already returned the true final observation.
    """

    def __init__(self, make_env: Callable[[], gym.Env], run_seeds: Sequence[int], num_envs: int, vector_mode: Literal["sync", "async"] = "sync") -> None:
        self.run_seeds = [int(s) for s in run_seeds]
        self.num_envs = num_envs
        self.envs = [make_vector_env(make_env, num_envs, vector_mode) for _ in self.run_seeds]
        single = self.envs[0]
        self.observation_dim = int(np.prod(single.single_observation_space.shape))
        self.action_space = single.single_action_space
        discrete = isinstance(self.action_space, gym.spaces.Discrete)
        self.action_shape = () if discrete else tuple(self.action_space.shape)
        self.action_dtype = np.int32 if discrete else np.float32
        self.to_env = unit_action_map(self.action_space)
        self.observations = np.zeros((len(self.run_seeds), num_envs, self.observation_dim), np.float32)
        self.pending_reset = np.zeros((len(self.run_seeds), num_envs), bool)
        self.episode_returns = np.zeros((len(self.run_seeds), num_envs))

    def _env_actions(self, actions: np.ndarray) -> np.ndarray:
        if self.action_dtype == np.int32:
            return actions.astype(np.int64)
        return np.asarray(self.to_env(actions), np.float32)

    def restart_segments(self, restart_index: int) -> None:
        """Seeded reset of every env (segments mode); ``restart_index`` 0 at the start, the
        iteration after a resume (a resumed segment run restarts its episodes)."""
        for index, (vector_env, run_seed) in enumerate(zip(self.envs, self.run_seeds)):
            seeds = [derived_seed(run_seed, TRAIN_STREAM, restart_index, j) for j in range(self.num_envs)]
            observations, _ = vector_env.reset(seed=seeds)
            self.observations[index] = np.asarray(observations, np.float32).reshape(self.num_envs, -1)
        self.pending_reset[:] = False
        self.episode_returns[:] = 0.0

    def collect_segments(self, policy: HostPolicy, num_steps: int, active: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, list[list[float]]]:
        """``num_steps`` steps of every active seed's envs; returns the rollout arrays
        ``[S, N, T, ...]``, env steps per seed and the returns of episodes that finished."""
        num_seeds = len(self.run_seeds)
        data = _empty_rollout(num_seeds, self.num_envs, num_steps, self.observation_dim, self.action_shape, self.action_dtype, True)
        finished: list[list[float]] = [[] for _ in range(num_seeds)]
        for t in range(num_steps):
            actions, log_probs = policy(self.observations, t)
            actions, log_probs = np.asarray(actions), np.asarray(log_probs)
            for s in np.flatnonzero(active):
                observations, rewards, terminated, truncated, _ = self.envs[s].step(self._env_actions(actions[s]))
                observations = np.asarray(observations, np.float32).reshape(self.num_envs, -1)
                valid = ~self.pending_reset[s]
                data["observations"][s, :, t] = self.observations[s]
                data["actions"][s, :, t] = actions[s]
                data["log_probs"][s, :, t] = log_probs[s]
                data["rewards"][s, :, t] = np.where(valid, rewards, 0.0)
                data["terminated"][s, :, t] = terminated & valid
                data["truncated"][s, :, t] = truncated & valid
                data["valid"][s, :, t] = valid
                data["next_observations"][s, :, t] = observations
                done = (terminated | truncated) & valid
                self.episode_returns[s] += np.where(valid, rewards, 0.0)
                finished[s].extend(self.episode_returns[s][done].tolist())
                self.episode_returns[s][done] = 0.0
                self.pending_reset[s] = done
                self.observations[s] = observations
        # Every vector step is num_envs env interactions (a reset step included), as CleanRL/SB3 count.
        steps = np.where(active, self.num_envs * num_steps, 0)
        return data, steps, finished

    def collect_groups(self, policy: HostPolicy, seeds_per_task: np.ndarray, group_size: int, max_steps: int, active: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, list[list[float]]]:
        """One episode per env from seeded resets ``envs.reset(seed=[s1]*K + [s2]*K + ...)``;
        ``seeds_per_task`` is ``[S, num_groups]``. Steps after an env's first episode end are
        padding; the cap ``max_steps`` truncates."""
        num_seeds = len(self.run_seeds)
        data = _empty_rollout(num_seeds, self.num_envs, max_steps, self.observation_dim, self.action_shape, self.action_dtype, False)
        alive = np.zeros((num_seeds, self.num_envs), bool)
        for s in np.flatnonzero(active):
            seeds = np.repeat(np.asarray(seeds_per_task[s]), group_size).tolist()
            observations, _ = self.envs[s].reset(seed=[int(x) for x in seeds])
            self.observations[s] = np.asarray(observations, np.float32).reshape(self.num_envs, -1)
            alive[s] = True
        for t in range(max_steps):
            if not alive.any():
                break
            actions, log_probs = policy(self.observations, t)
            actions, log_probs = np.asarray(actions), np.asarray(log_probs)
            for s in np.flatnonzero(alive.any(axis=1)):
                observations, rewards, terminated, truncated, _ = self.envs[s].step(self._env_actions(actions[s]))
                truncated = truncated | ((t == max_steps - 1) & ~terminated)
                live = alive[s]
                data["observations"][s, :, t] = self.observations[s]
                data["actions"][s, :, t] = actions[s]
                data["log_probs"][s, :, t] = log_probs[s]
                data["rewards"][s, :, t] = np.where(live, rewards, 0.0)
                data["terminated"][s, :, t] = terminated & live
                data["truncated"][s, :, t] = truncated & live
                data["valid"][s, :, t] = live
                self.observations[s] = np.asarray(observations, np.float32).reshape(self.num_envs, -1)
                alive[s] = live & ~(terminated | truncated)
        returns = data["rewards"].sum(axis=2)
        finished = [returns[s].tolist() if active[s] else [] for s in range(num_seeds)]
        return data, data["valid"].sum(axis=(1, 2)), finished

    def close(self) -> None:
        """Close every vector env."""
        for vector_env in self.envs:
            vector_env.close()


# ----------------------------------------------------------------------------- training loop


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
    """Schedule of an on-policy run (counts are environment steps per seed)."""

    total_steps: int = 100_000
    """Environment steps (valid transitions) per seed; a seed stops updating once it has them."""
    eval_interval: int = 10_000
    """Evaluate a seed when its step count passes a multiple of this, and at the end."""
    eval_episodes: int = 10
    """Deterministic evaluation episodes per seed."""
    eval_at_start: bool = False
    """Also evaluate before the first update."""
    log_interval: int = 2_000
    """Log training metrics when a seed's step count passes a multiple of this."""
    checkpoint_every: int = 0
    """Checkpoint every this many iterations (0: only at the end)."""
    max_episode_steps: int | None = None
    """Episode cap of grouped episodes and of JAX-env evaluation (None: the env's TimeLimit)."""
    vector_mode: Literal["sync", "async"] = "sync"
    """gymnasium vector env class for host envs."""

    def __post_init__(self) -> None:
        for name in ("total_steps", "eval_interval", "eval_episodes", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"OnPolicyConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"OnPolicyConfig.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ValueError(f"OnPolicyConfig.max_episode_steps must be >= 1, got {self.max_episode_steps}")


@dataclasses.dataclass(frozen=True)
class JaxEnvSpec:
    """A JAX-native env for fully jitted training: the functional core and its parameters."""

    core: Any
    params: Any


def _episode_cap(config: OnPolicyConfig, make_env: Callable[[], gym.Env] | None) -> int | None:
    if config.max_episode_steps is not None:
        return config.max_episode_steps
    if make_env is None:
        return None
    probe = make_env()
    spec = getattr(probe, "spec", None)
    probe.close()
    return None if spec is None else spec.max_episode_steps


def _drop_rows_after(run_dir: Path, iteration: int) -> None:
    """Rewrite the run's JSONL without rows logged after ``iteration`` (atomic rename)."""
    path = run_dir / METRICS_JSONL
    if not path.exists():
        return
    kept = [row for row in read_metrics(run_dir) if row.get("iteration", 0) <= iteration]
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(temporary, path)


@jax.jit
def _take_seeds(tree: Any, indices: jax.Array) -> Any:
    return jax.tree.map(lambda leaf: leaf[indices], tree)


def train_on_policy(
    create_agent: Callable[[jax.Array], Any],
    config: OnPolicyConfig,
    seeds: Sequence[int],
    run_dir: str | Path,
    make_env: Callable[[], gym.Env] | None = None,
    jax_env: JaxEnvSpec | None = None,
    run_config: Any = None,
    resume: bool = False,
    progress: bool | None = None,
    score_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    stop_at_iteration: int | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Train an on-policy agent for every seed in ``seeds`` at once; returns the seed-stacked agent
    and the evaluation rows.

    Give exactly one of ``make_env`` (host gymnasium envs, Box actions in [-1, 1]) or ``jax_env``
    (a JAX core; Box actions are mapped from [-1, 1] onto its bounds). ``create_agent(key)`` builds
    one seed's agent with ``collection``, ``explore``, ``act`` and ``update``. Rows follow
    :mod:`rl.loops`: ``step``, ``seed``, ``phase`` ('train' / 'eval'), ``eval_return``; evaluation
    rows also carry ``env_steps``, the exact count behind the grid step. ``stop_at_iteration``
    ends the call early without a final checkpoint, as a killed process would.
    """
    if (make_env is None) == (jax_env is None):
        raise ValueError("give exactly one of make_env (host env) or jax_env (JAX-native env)")
    run_dir = Path(run_dir)
    seeds = [int(s) for s in seeds]
    num_seeds = len(seeds)
    root_keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    agent_keys, loop_keys, runner_keys = jax.vmap(lambda k: jax.random.split(k, 3))(root_keys).transpose(1, 0, 2)
    # Per-seed creation then stacking: cheaper than compiling a vmapped init for every run.
    agent = stack_seeds([create_agent(key) for key in agent_keys])
    spec: CollectionSpec = agent.collection
    cap = _episode_cap(config, make_env)
    if spec.mode == "groups" and cap is None:
        raise ValueError("grouped episodes need an episode cap: set OnPolicyConfig.max_episode_steps")
    if jax_env is not None and cap is None:
        raise ValueError("JAX-native envs need OnPolicyConfig.max_episode_steps for evaluation")

    backend = _JaxBackend(jax_env, spec, cap, seeds, loop_keys, runner_keys) if jax_env is not None else _HostBackend(
        make_env, spec, cap, seeds, loop_keys, config
    )
    checkpointer = Checkpointer(run_dir / "checkpoints")
    iteration, eval_round, elapsed_before = 0, np.zeros(num_seeds, int), 0.0
    counters = np.zeros(num_seeds, np.int64)
    last_eval_step = np.full(num_seeds, -1, np.int64)
    next_log = np.full(num_seeds, config.log_interval, np.int64)
    env_loop = "host" if jax_env is None else "device"
    resume_step = checkpointer.latest_step() if resume else None
    if resume_step is not None:
        check_env_loop(checkpointer.restore_host(resume_step).get("env_loop"), env_loop, str(run_dir))
        state, host = checkpointer.restore({"agent": agent, **backend.state()}, resume_step, what=str(run_dir))
        # Restored arrays come back committed to a device; uncommitted copies hit the same
        # compiled functions as a fresh run instead of compiling them again.
        state = jax.tree.map(jnp.asarray, jax.device_get(state))
        agent = state["agent"]
        backend.restore(state, int(host["iteration"]))
        iteration, elapsed_before = int(host["iteration"]), float(host["elapsed_s"])
        counters = np.asarray(host["counters"], np.int64)
        eval_round = np.asarray(host["eval_round"], int)
        last_eval_step = np.asarray(host["last_eval_step"], np.int64)
        next_log = np.asarray(host["next_log"], np.int64)
    if resume_step is not None:
        _drop_rows_after(run_dir, iteration)
    # Rows are trimmed by iteration above (seeds count env steps at different rates), so the
    # logger keeps every remaining row.
    logger = RunLogger(run_dir, run_config, resume_step=None if resume_step is None else np.iinfo(np.int64).max)
    bar = Progress(config.total_steps, spec.mode, enabled=progress, completed=int(counters.min()))
    evaluations: list[dict[str, Any]] = []
    pending_returns: list[list[float]] = [[] for _ in seeds]
    start_time, start_counters = time.perf_counter(), counters.copy()
    last_score = None

    def evaluate(indices: np.ndarray, labels: np.ndarray) -> float:
        returns = backend.evaluate(agent, indices, eval_round[indices], config.eval_episodes)
        for index, label, seed_returns in zip(indices, labels, returns):
            row = {
                "step": int(label),
                "seed": seeds[index],
                "phase": "eval",
                "iteration": iteration,
                "eval_return": float(np.mean(seed_returns)),
                "eval_return_std": float(np.std(seed_returns)),
                "env_steps": int(counters[index]),
            }
            if score_fn is not None:
                row["normalised_score"] = float(np.mean(score_fn(np.asarray(seed_returns))))
            logger.log(row)
            evaluations.append(row)
            eval_round[index] += 1
            last_eval_step[index] = label
        return float(np.mean(returns))

    def save_checkpoint() -> None:
        host = {
            "iteration": iteration,
            "elapsed_s": elapsed_before + time.perf_counter() - start_time,
            "counters": counters.tolist(),
            "eval_round": eval_round.tolist(),
            "last_eval_step": last_eval_step.tolist(),
            "next_log": next_log.tolist(),
            "env_loop": env_loop,
        }
        checkpointer.save(iteration, {"agent": agent, **backend.state()}, host)

    try:
        if config.eval_at_start and iteration == 0:
            last_score = evaluate(np.arange(num_seeds), np.zeros(num_seeds, np.int64))
        while (counters < config.total_steps).any():
            active = counters < config.total_steps
            agent, metrics, stats = backend.iterate(agent, iteration, active)
            counters += np.where(active, stats["env_steps"], 0)
            iteration += 1
            for index in np.flatnonzero(active):
                pending_returns[index].extend(stats["returns"][index])
            elapsed = max(time.perf_counter() - start_time, 1e-9)
            rate = float((counters - start_counters).sum() / num_seeds / elapsed)
            for index in np.flatnonzero(active & (counters >= next_log)):
                row: dict[str, Any] = {"step": int(counters[index]), "seed": seeds[index], "phase": "train", "iteration": iteration, "steps_per_s": rate}
                if pending_returns[index]:
                    row["episode_return"] = float(np.mean(pending_returns[index]))
                row.update({name: float(values[index]) for name, values in metrics.items()})
                logger.log(row)
                pending_returns[index] = []
                next_log[index] = (counters[index] // config.log_interval + 1) * config.log_interval
            labels = np.where(
                counters >= config.total_steps,
                config.total_steps,
                counters // config.eval_interval * config.eval_interval,
            )
            due = np.flatnonzero(active & (labels > last_eval_step) & (labels > 0))
            if due.size:
                last_score = evaluate(due, labels[due])
            bar.update(int(counters.min()), rate, last_score)
            finished = not (counters < config.total_steps).any()
            if finished or (config.checkpoint_every and iteration % config.checkpoint_every == 0):
                save_checkpoint()
            if stop_at_iteration is not None and iteration >= stop_at_iteration:
                break
    finally:
        bar.close()
        logger.close()
        checkpointer.close()
        backend.close()
    return agent, evaluations


class _ByIdentity:
    """A hashable handle on an object (a JAX env core) so that it can be a static jit argument
    whatever its own ``__eq__``; the compiled functions are cached per core across runs."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.value is self.value


def trace_scope(core: Any) -> contextlib.AbstractContextManager:
    """The env core's :meth:`envs.jax_env.JaxEnv.trace_scope` (nothing for cores without one)."""
    scope = getattr(core, "trace_scope", None)
    return contextlib.nullcontext() if scope is None else scope()


def _keep_where(active: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)


def _bounds_map(bounds: tuple[jax.Array, jax.Array] | None) -> Callable[[jax.Array], jax.Array]:
    if bounds is None:
        return lambda actions: actions
    low, high = bounds
    return lambda actions: low + (jnp.clip(actions, -1.0, 1.0) + 1.0) * 0.5 * (high - low)


def _space_bounds(space: gym.Space) -> tuple[np.ndarray, np.ndarray] | None:
    if isinstance(space, gym.spaces.Box):
        return np.asarray(space.low, np.float32), np.asarray(space.high, np.float32)
    return None


@jax.jit
def _explore_seeds(agent, observations, keys, iteration, t):
    def one(agent, observations, key):
        return agent.explore(observations, jax.random.fold_in(jax.random.fold_in(key, iteration), t))

    return jax.vmap(one)(agent, observations, keys)


@partial(jax.jit, donate_argnums=0)
def _update_seeds(agent, rollout, active):
    def one(agent, rollout, active):
        new_agent, metrics = agent.update(rollout)
        return _keep_where(active, new_agent, agent), metrics

    return jax.vmap(one)(agent, rollout, active)


@jax.jit
def _deterministic_actions(agent, observations):
    return jax.vmap(lambda agent, obs: agent.act(obs, jax.random.PRNGKey(0), deterministic=True))(agent, observations)


@partial(jax.jit, static_argnames=("core", "num_envs"))
def _init_runners(keys, params, core: _ByIdentity, num_envs: int):
    return jax.vmap(lambda key: init_segment_runner(core.value, params, key, num_envs))(keys)


@partial(jax.jit, static_argnames=("core", "spec"), donate_argnums=(0, 1))
def _segment_iteration(agent, runner, keys, iteration, active, params, bounds, core: _ByIdentity, spec: CollectionSpec):
    def one(agent, runner, key, active):
        key = jax.random.fold_in(key, iteration)
        new_runner, rollout, stats = collect_segments(agent, core.value, params, runner, key, spec.num_steps, _bounds_map(bounds))
        new_agent, metrics = agent.update(rollout)
        return _keep_where(active, new_agent, agent), _keep_where(active, new_runner, runner), metrics, stats

    return jax.vmap(one)(agent, runner, keys, active)


@partial(jax.jit, static_argnames=("core", "spec", "cap"), donate_argnums=0)
def _group_iteration(agent, keys, iteration, active, params, bounds, core: _ByIdentity, spec: CollectionSpec, cap: int):
    def one(agent, key, active):
        task_key, action_key = jax.random.split(jax.random.fold_in(key, iteration))
        task_keys = jax.random.split(task_key, spec.num_groups)
        rollout, stats = collect_groups(agent, core.value, params, task_keys, action_key, spec.group_size, cap, _bounds_map(bounds))
        new_agent, metrics = agent.update(rollout)
        stats["returns"] = rollout.rewards.sum(axis=1)
        return _keep_where(active, new_agent, agent), metrics, stats

    return jax.vmap(one)(agent, keys, active)


@partial(jax.jit, static_argnames=("core", "cap"))
def _evaluate_groups(agent, keys, params, bounds, core: _ByIdentity, cap: int):
    def one(agent, keys):
        rollout, _ = collect_groups(agent, core.value, params, keys, jax.random.PRNGKey(0), 1, cap, _bounds_map(bounds), deterministic=True)
        return rollout.rewards.sum(axis=1)

    return jax.vmap(one)(agent, keys)


class _HostBackend:
    """Iterations on host gymnasium vector envs: host collection, one jitted update call."""

    def __init__(self, make_env, spec: CollectionSpec, cap: int | None, seeds: list[int], loop_keys: jax.Array, config: OnPolicyConfig) -> None:
        self.spec, self.cap, self.seeds, self.loop_keys = spec, cap, seeds, loop_keys
        self.collector = HostCollector(make_env, seeds, spec.num_envs, config.vector_mode)
        self.eval_envs = [[make_env() for _ in range(config.eval_episodes)] for _ in seeds]
        if spec.mode == "segments":
            self.collector.restart_segments(0)

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any], iteration: int) -> None:
        if self.spec.mode == "segments":
            self.collector.restart_segments(iteration)

    def iterate(self, agent, iteration: int, active: np.ndarray):
        policy = lambda obs, t: _explore_seeds(agent, obs, self.loop_keys, iteration, t)  # noqa: E731
        if self.spec.mode == "segments":
            data, steps, finished = self.collector.collect_segments(policy, self.spec.num_steps, active)
        else:
            tasks = np.stack([task_seeds(seed, iteration, self.spec.num_groups) for seed in self.seeds])
            data, steps, finished = self.collector.collect_groups(policy, tasks, self.spec.group_size, self.cap, active)
        agent, metrics = _update_seeds(agent, Rollout(**data), jnp.asarray(active))
        return agent, jax.device_get(metrics), {"env_steps": steps, "returns": finished}

    def evaluate(self, agent, indices: np.ndarray, rounds: np.ndarray, episodes: int) -> np.ndarray:
        sub_agent = _take_seeds(agent, jnp.asarray(indices))
        envs = [self.eval_envs[i] for i in indices]
        reset_seeds = [eval_seeds(self.seeds[i], int(r), episodes) for i, r in zip(indices, rounds)]
        return run_episodes(lambda obs: _deterministic_actions(sub_agent, obs), envs, reset_seeds)

    def close(self) -> None:
        self.collector.close()
        for row in self.eval_envs:
            for env in row:
                env.close()


class _JaxBackend:
    """Iterations on a JAX-native env: collection and update in one jitted, seed-vmapped call."""

    def __init__(self, jax_env: JaxEnvSpec, spec: CollectionSpec, cap: int, seeds: list[int], loop_keys: jax.Array, runner_keys: jax.Array) -> None:
        self.spec, self.cap, self.seeds, self.loop_keys = spec, cap, seeds, loop_keys
        self.core, self.params = _ByIdentity(jax_env.core), jax_env.params
        self.bounds = _space_bounds(jax_env.core.action_space(jax_env.params))
        self.runner = None
        if spec.mode == "segments":
            with trace_scope(jax_env.core):
                self.runner = _init_runners(runner_keys, self.params, core=self.core, num_envs=spec.num_envs)

    def state(self) -> dict[str, Any]:
        return {} if self.runner is None else {"runner": self.runner}

    def restore(self, state: dict[str, Any], iteration: int) -> None:
        if self.runner is not None:
            self.runner = state["runner"]

    def iterate(self, agent, iteration: int, active: np.ndarray):
        with trace_scope(self.core.value):
            return self._iterate(agent, iteration, active)

    def _iterate(self, agent, iteration: int, active: np.ndarray):
        active = jnp.asarray(active)
        if self.spec.mode == "segments":
            agent, self.runner, metrics, stats = _segment_iteration(
                agent, self.runner, self.loop_keys, iteration, active, self.params, self.bounds, core=self.core, spec=self.spec
            )
            stats = jax.device_get(stats)
            # The mean repeated once per finished episode keeps later averages correctly weighted.
            returns = [
                [float(total / count)] * int(count) if count else []
                for total, count in zip(stats["episode_return_sum"], stats["episodes"])
            ]
        else:
            agent, metrics, stats = _group_iteration(
                agent, self.loop_keys, iteration, active, self.params, self.bounds, core=self.core, spec=self.spec, cap=self.cap
            )
            stats = jax.device_get(stats)
            returns = [list(map(float, row)) for row in stats["returns"]]
        return agent, jax.device_get(metrics), {"env_steps": np.asarray(stats["env_steps"]), "returns": returns}

    def evaluate(self, agent, indices: np.ndarray, rounds: np.ndarray, episodes: int) -> np.ndarray:
        sub_agent = _take_seeds(agent, jnp.asarray(indices))
        keys = jnp.stack(
            [jnp.stack([jax.random.PRNGKey(s) for s in eval_seeds(self.seeds[i], int(r), episodes)]) for i, r in zip(indices, rounds)]
        )
        with trace_scope(self.core.value):
            return np.asarray(_evaluate_groups(sub_agent, keys, self.params, self.bounds, core=self.core, cap=self.cap))

    def close(self) -> None:
        pass
