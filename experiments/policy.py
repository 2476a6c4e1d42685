"""Trained policies out of run directories: :func:`load_policy` for your own control loop, and
``o2o evaluate`` for fresh evaluation episodes of every seed of a run.

A run directory of ``o2o train`` (sac, tbsac, ppo, loop), ``o2o pretrain`` (CQL / Cal-QL),
``o2o finetune`` (WSRL), ``o2o run`` (its fine-tuned stage: WSRL, or Uni-O4's online PPO) or the
SAC-from-scratch baseline of ``o2o run`` / ``o2o quickstart`` records what built its agent (``config.json``, ``pretrain.json``, ``finetune.json``); the agent
is rebuilt from that record and only its part of the checkpoint is read (no replay buffer, no
environment states).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import gymnasium as gym
import jax
import numpy as np
import tyro

from agents.sac import SAC, SACConfig
from agents.tbsac import TBSAC, TBSACConfig
from envs import registry
from envs.wrappers import unit_to_bounds
from experiments.offline_to_online import FINETUNE_RECORD, PRETRAIN_RECORD, apply_overrides
from rl.checkpoint import Checkpointer
from rl.evaluation import run_episodes
from rl.logging import run_record, write_json_atomic
from rl.rollouts import OnPolicyConfig

CONFIG_RECORD = "config.json"
LOADABLE = "o2o train (sac, tbsac, ppo, loop), o2o pretrain, o2o finetune, o2o run (its fine-tuned stage, WSRL or Uni-O4) or its SAC-from-scratch baseline"


class PolicyLoadError(ValueError):
    """A path holds no run o2o can rebuild a policy from; the message says what was found."""


@dataclasses.dataclass(frozen=True)
class RunAgents:
    """The seed-stacked agents of one checkpoint of a run, and what they were trained on."""

    agents: Any
    """Agent pytree with a leading seed axis (the agent contract's ``act`` works per seed)."""
    kind: str
    """Agent family: sac, tbsac, ppo, loop, cql (pre-trained), wsrl (fine-tuned SAC) or uni_o4 (its online PPO)."""
    env_id: str
    """Environment id the run trained on."""
    seeds: tuple[int, ...]
    """The run's seeds, in the order of the leading axis."""
    step: int
    """Checkpoint restored (its directory name: environment steps; iterations for ppo, loop and uni_o4)."""
    run_dir: Path
    """The run directory."""
    reward_transform: tuple[float, float] = (1.0, 0.0)
    """(scale, bias) of the rewards the run trained on (``scale * r + bias``); evaluation uses the env's own."""
    env_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments the environment is made with (``o2o train --env-kwargs``)."""


def locate_run(path: str | Path) -> tuple[Path, int | None]:
    """The run directory for ``path`` (the run directory, its ``checkpoints/`` or one checkpoint
    step directory in it) and the step that path names (None: the latest)."""
    path = Path(path)
    candidates = [(path, None), (path / "wsrl", None), (path / "online", None)]  # o2o run: its fine-tuned stage
    if path.name == "checkpoints":
        candidates.append((path.parent, None))
    if path.parent.name == "checkpoints" and path.name.isdigit():
        candidates.append((path.parent.parent, int(path.name)))
    for run_dir, step in candidates:
        if any((run_dir / name).is_file() for name in (PRETRAIN_RECORD, FINETUNE_RECORD, CONFIG_RECORD)):
            return run_dir, step
    raise PolicyLoadError(f"{path} is not a run directory of {LOADABLE} (no {CONFIG_RECORD})")


def _spaces(env_id: str, continuous: bool | None, env_kwargs: dict[str, Any]) -> tuple[gym.Space, gym.Space]:
    """The spaces the agent saw: observations as the env gives them, Box actions rescaled to [-1, 1]."""
    env = registry.make(env_id, rescale_actions=True, **env_kwargs)
    try:
        registry.check_spaces(env, continuous_actions=continuous)
        return env.observation_space, env.action_space
    finally:
        env.close()


def _stacked(create: Callable[[jax.Array], Any], num_seeds: int) -> Any:
    return jax.vmap(create)(jax.random.split(jax.random.PRNGKey(0), num_seeds))


def _reward_transform(run_dir: Path) -> tuple[float, float]:
    """The training rewards' (scale, bias) that a pretrain or finetune run or a scratch baseline
    records; (1, 0) otherwise."""
    for name in (PRETRAIN_RECORD, FINETUNE_RECORD):
        if (run_dir / name).is_file():
            record = json.loads((run_dir / name).read_text())
            break
    else:
        record = json.loads((run_dir / CONFIG_RECORD).read_text()).get("config") or {}
    return float(record.get("reward_scale", 1.0)), float(record.get("reward_bias", 0.0))


def recorded_env_kwargs(run_dir: Path) -> dict[str, Any]:
    """The environment keyword arguments an ``o2o train`` run recorded ({} for other runs)."""
    if not (run_dir / CONFIG_RECORD).is_file():
        return {}
    config = json.loads((run_dir / CONFIG_RECORD).read_text()).get("config") or {}
    return registry.parse_env_kwargs(config.get("env_kwargs") or "{}")


def _agent_template(run_dir: Path, env_override: str | None, env_kwargs: dict[str, Any]) -> tuple[Any, str, str, tuple[int, ...]]:
    """(seed-stacked template agent, kind, env id, seeds) from the run's own record, the env made
    with ``env_kwargs``."""
    from agents.cql import CQLConfig
    from agents.wsrl import create_pretrained_template

    if (run_dir / PRETRAIN_RECORD).is_file():
        record = json.loads((run_dir / PRETRAIN_RECORD).read_text())
        env_id = env_override or record["env"]
        observation_space, action_space = _spaces(env_id, True, env_kwargs)
        config = apply_overrides(CQLConfig(), record["cql"])
        seeds = tuple(record["seeds"])
        return create_pretrained_template(observation_space, action_space, config, len(seeds)), "cql", env_id, seeds
    if (run_dir / FINETUNE_RECORD).is_file():
        record = json.loads((run_dir / FINETUNE_RECORD).read_text())
        kind, env_id, seeds, sac_config = "wsrl", record["env"], tuple(record["seeds"]), record["sac"]
    else:
        config = json.loads((run_dir / CONFIG_RECORD).read_text()).get("config") or {}
        if config.get("baseline") == "sac_scratch" and "env" in config:
            kind, env_id, seeds, sac_config = "sac", config["env"], tuple(config["seeds"]), config["sac"]
        elif config.get("agent") == "uni_o4" and "env" in config:
            env_id, seeds = env_override or config["env"], tuple(config["seeds"])
            return _uni_o4_template(config["uni_o4"], env_id, len(seeds), env_kwargs), "uni_o4", env_id, seeds
        elif config.get("agent") in ("sac", "tbsac", "ppo", "loop") and "env" in config:
            kind, env_id = config["agent"], config["env"]
            first, count = int(config.get("seed", 0)), int(config.get("num_seeds", 1))
            seeds = tuple(range(first, first + count))
            if kind in ("ppo", "loop"):
                env_id = env_override or env_id
                return _on_policy_template(kind, config, env_id, len(seeds), env_kwargs), kind, env_id, seeds
            sac_config = config[kind]
        else:
            raise PolicyLoadError(
                f"{run_dir} is not a run of {LOADABLE}: its {CONFIG_RECORD} records no agent and environment to rebuild "
                f"(agent {config.get('agent')!r}, env {config.get('env')!r})"
            )
    env_id = env_override or env_id
    observation_space, action_space = _spaces(env_id, True, env_kwargs)
    agent_cls, config_cls = (TBSAC, TBSACConfig) if kind == "tbsac" else (SAC, SACConfig)
    agent_config = apply_overrides(config_cls(), sac_config)
    template = _stacked(lambda key: agent_cls.create(key, observation_space, action_space, agent_config), len(seeds))
    return template, kind, env_id, seeds


def _on_policy_template(kind: str, config: dict[str, Any], env_id: str, num_seeds: int, env_kwargs: dict[str, Any]) -> Any:
    from experiments.on_policy import AGENTS, agent_factory

    agent_config = apply_overrides(AGENTS[kind][1](), config[kind])
    schedule = apply_overrides(OnPolicyConfig(), config.get("on_policy", {}))
    observation_space, action_space = _spaces(env_id, None, env_kwargs)
    return _stacked(agent_factory(kind, agent_config, observation_space, action_space, schedule.total_steps), num_seeds)


def _uni_o4_template(recorded: dict[str, Any], env_id: str, num_seeds: int, env_kwargs: dict[str, Any]) -> Any:
    """Uni-O4's online PPO agents (the selected member's policy, the offline value net, the
    dataset's observation statistics) with the recorded network shapes."""
    import jax.numpy as jnp

    from agents.ppo import RunningMoments, ValueNet
    from agents.uni_o4 import UniO4Config, UniO4PolicyNet, online_agent

    config = apply_overrides(UniO4Config(), recorded)
    observation_space, action_space = _spaces(env_id, True, env_kwargs)
    observation_dim, action_dim = int(observation_space.shape[0]), int(action_space.shape[0])
    dummy = jnp.zeros((1, observation_dim))

    def create(key: jax.Array) -> Any:
        policy = UniO4PolicyNet(tuple(config.bc_hidden_dims), action_dim, config.bc_activation).init(key, dummy)["params"]
        value = ValueNet(tuple(config.value_hidden_dims), "relu").init(key, dummy)["params"]
        return online_agent(policy, value, RunningMoments.create((observation_dim,)), action_dim, config, key)

    return _stacked(create, num_seeds)


def load_run_agents(
    path: str | Path, step: int | None = None, env_id: str | None = None, env_kwargs: dict[str, Any] | None = None
) -> RunAgents:
    """Every seed's agent of a run at checkpoint ``step`` (default: the step ``path`` names, else
    the latest). ``env_id`` and ``env_kwargs`` replace the recorded environment and its keyword
    arguments (a new ``env_id`` alone drops the recorded ones); the spaces must match: a checkpoint
    of other shapes raises :class:`rl.checkpoint.CheckpointMismatch` naming the parameter."""
    run_dir, named_step = locate_run(path)
    if env_kwargs is None:
        env_kwargs = {} if env_id is not None else recorded_env_kwargs(run_dir)
    template, kind, env_id, seeds = _agent_template(run_dir, env_id, env_kwargs)
    checkpointer = Checkpointer(run_dir / "checkpoints")
    try:
        step = step if step is not None else named_step if named_step is not None else checkpointer.latest_step()
        if step is None:
            raise PolicyLoadError(f"{run_dir / 'checkpoints'} holds no checkpoint yet")
        state, _ = checkpointer.restore({"agent": template}, step, what=str(run_dir), partial=True)
    finally:
        checkpointer.close()
    return RunAgents(state["agent"], kind, env_id, seeds, int(step), run_dir, _reward_transform(run_dir), env_kwargs)


class Policy:
    """One seed's trained policy as a plain function: observations in, actions in the environment's
    own units out (Box actions mapped from the agent's [-1, 1] onto the env's bounds, as training
    did; Discrete actions as integers). Deterministic by default; a stochastic policy draws from its
    own key, advanced on every call, so a fixed ``key_seed`` replays the same actions."""

    def __init__(self, agent: Any, action_space: gym.Space, deterministic: bool = True, key_seed: int = 0) -> None:
        self.agent = agent
        self.action_space = action_space
        self.deterministic = deterministic
        self._key = jax.random.PRNGKey(key_seed)
        self._calls = 0
        self._act = jax.jit(lambda agent, observations, key: agent.act(observations, key, deterministic=deterministic))

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        """The action for one observation (shape ``(obs_dim,)``) or a batch (``(n, obs_dim)``)."""
        observation = np.asarray(observation, np.float32)
        single = observation.ndim == 1
        key = jax.random.fold_in(self._key, self._calls)
        self._calls += 1
        actions = np.asarray(self._act(self.agent, observation[None] if single else observation, key))
        if isinstance(self.action_space, gym.spaces.Box):
            actions = unit_to_bounds(actions, self.action_space.low, self.action_space.high).astype(self.action_space.dtype)
        return actions[0] if single else actions


def load_policy(
    path: str | Path, seed_index: int = 0, step: int | None = None, deterministic: bool = True, env_id: str | None = None
) -> Policy:
    """The trained policy of seed number ``seed_index`` (0 = the run's first seed) of a run
    directory, at checkpoint ``step`` (default the latest), ready for your own control loop::

        policy = load_policy("runs/my_laser_run")
        action = policy(observation)        # in the environment's own action units
    """
    run = load_run_agents(path, step, env_id)
    if not 0 <= seed_index < len(run.seeds):
        raise PolicyLoadError(f"seed_index {seed_index} out of range: the run has {len(run.seeds)} seeds ({list(run.seeds)})")
    env = registry.make(run.env_id, **run.env_kwargs)
    try:
        action_space = env.action_space
    finally:
        env.close()
    return Policy(jax.tree.map(lambda leaf: leaf[seed_index], run.agents), action_space, deterministic, key_seed=run.seeds[seed_index])


# ----------------------------------------------------------------------------- o2o evaluate


@dataclasses.dataclass(frozen=True)
class EvaluateArgs:
    """Evaluate every seed's policy of a run on fresh episodes of its environment (the same reset
    states for every seed); prints the returns and writes them as JSON."""

    run_dir: tyro.conf.Positional[Path]
    """Run directory (or its checkpoints/ or one checkpoint step directory) of train, pretrain, finetune, run (its fine-tuned stage) or a scratch baseline."""
    episodes: int = 10
    """Episodes per seed."""
    step: int | None = None
    """Checkpoint, by its directory name under checkpoints/ (environment steps; iterations for ppo, loop and Uni-O4); default: the one the path names, else the latest."""
    env: str | None = None
    """Evaluate on this environment instead of the run's (same spaces)."""
    env_kwargs: str | None = None
    """Make the environment with these keyword arguments (JSON object) instead of the run's recorded ones, e.g. to test a policy under other conditions."""
    stochastic: bool = False
    """Sample actions from the policy instead of taking its mode."""
    first_reset_seed: int = 1_000_000
    """Episode j resets with seed first_reset_seed + j (away from the training runs' own reset seeds)."""
    out: Path | None = None
    """JSON file to write (default <run dir>/evaluation_step<step>.json)."""


def evaluate_run(run: RunAgents, reset_seeds: Sequence[Sequence[int]], stochastic: bool = False) -> np.ndarray:
    """Undiscounted returns, shaped (seeds, episodes), of every seed's policy on fresh copies of
    the run's environment (actions rescaled to its bounds as in training), episode j of seed i
    reset with ``reset_seeds[i][j]``."""
    make_env = registry.env_factory(run.env_id, rescale_actions=True, **run.env_kwargs)
    envs = [[make_env() for _ in row] for row in reset_seeds]
    keys = jax.vmap(jax.random.PRNGKey)(np.asarray(run.seeds))
    act = jax.jit(
        jax.vmap(lambda agent, observations, key: agent.act(observations, key, deterministic=not stochastic))
    )
    calls = [0]

    def act_all(observations: np.ndarray) -> np.ndarray:
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, calls[0])
        calls[0] += 1
        return np.asarray(act(run.agents, observations, step_keys))

    try:
        return run_episodes(act_all, envs, reset_seeds)
    finally:
        for row in envs:
            for env in row:
                env.close()


def evaluate(args: EvaluateArgs) -> Path:
    """Run ``o2o evaluate``; returns the JSON path."""
    from experiments.cli import score_function

    if args.episodes < 1:
        raise PolicyLoadError(f"--episodes must be >= 1, got {args.episodes}")
    env_kwargs = None if args.env_kwargs is None else registry.parse_env_kwargs(args.env_kwargs)
    run = load_run_agents(args.run_dir, args.step, args.env, env_kwargs)
    started = time.perf_counter()
    reset_seeds = [[args.first_reset_seed + j for j in range(args.episodes)] for _ in run.seeds]
    returns = evaluate_run(run, reset_seeds, args.stochastic)
    score = score_function(run.env_id)
    per_seed = []
    for seed, row in zip(run.seeds, returns):
        entry = {"seed": seed, "mean": float(row.mean()), "std": float(row.std()), "min": float(row.min()), "max": float(row.max()), "returns": row.tolist()}
        if score is not None:
            entry["normalised_score"] = float(np.mean(score(row)))
        per_seed.append(entry)
        print(f"seed {seed}: return {entry['mean']:.1f} ± {entry['std']:.1f} (min {entry['min']:.1f}, max {entry['max']:.1f})"
              + (f", normalised score {entry['normalised_score']:.1f}" if score is not None else ""))
    means = returns.mean(axis=1)
    if run.reward_transform != (1.0, 0.0):
        scale, bias = run.reward_transform
        print(f"note: returns of {run.env_id}'s own rewards r; the run trained on {scale} * r + {bias} (its logged returns are of those)")
    print(f"{run.kind} on {run.env_id}{' ' + json.dumps(run.env_kwargs) if run.env_kwargs else ''}, step {run.step}, {args.episodes} {'stochastic' if args.stochastic else 'deterministic'} episodes per seed: "
          f"mean over seeds {means.mean():.1f} ± {means.std():.1f} ({time.perf_counter() - started:.1f} s)")
    out = args.out or run.run_dir / f"evaluation_step{run.step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {
        **run_record(args), "run_dir": str(run.run_dir), "kind": run.kind, "env": run.env_id, "env_kwargs": run.env_kwargs, "step": run.step,
        "mean_over_seeds": float(means.mean()), "std_over_seeds": float(means.std()), "seeds": per_seed,
        "training_reward_transform": {"scale": run.reward_transform[0], "bias": run.reward_transform[1]},
    })
    print(f"wrote {out}")
    return out
