"""On-policy training entry point and the PPO-vs-LOOP comparison.

``train_agent`` is what ``o2o train --agent ppo|loop`` calls: it builds the envs (host gymnasium
envs, or the JAX core of an o2o environment for fully jitted training), the agent factory, and runs
:func:`rl.rollouts.train_on_policy`. ``train_preset`` does the same from a named preset
(``experiments/presets/{ppo,loop}_*.json``).

Run as a script it compares PPO and LOOP at equal environment steps on CartPole-v1, Pendulum-v1
and one MuJoCo task (seeds are a vmapped axis): final and best evaluation return, wall-clock, and
the peak memory of the compiled update (from XLA's ``memory_analysis``), both for the presets as
tuned and at equal batch size. Writes ``on_policy.csv`` and ``on_policy_memory.csv`` (rows of the
envs run now replace earlier ones, so envs can be run one at a time), ``on_policy.md`` built from
them, and one PNG of learning curves per environment to ``--out``::

    python -m experiments.on_policy --steps 20000 --seeds 0 1 --envs CartPole-v1
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import time
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from agents.loop import LOOP, LOOPConfig
from agents.ppo import PPO, PPOConfig
from envs import registry
from experiments import presets
from rl.logging import write_result_record
from rl.rollouts import JaxEnvSpec, OnPolicyConfig, Rollout, train_on_policy

AGENTS: dict[str, tuple[type, type]] = {"ppo": (PPO, PPOConfig), "loop": (LOOP, LOOPConfig)}
ENV_SHORT_NAMES = {"CartPole-v1": "cartpole", "Pendulum-v1": "pendulum", "Hopper-v5": "hopper"}
DEFAULT_ENVS = ("CartPole-v1", "Pendulum-v1", "Hopper-v5")


# ----------------------------------------------------------------------------- building runs


def config_from_dict(config_cls: type, values: dict[str, Any]) -> Any:
    """A config dataclass from (JSON) values; lists become tuples where the field is a tuple."""
    hints = typing.get_type_hints(config_cls)
    known = {field.name for field in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {config_cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    converted = {}
    for name, value in values.items():
        if isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
            value = tuple(value)
        converted[name] = value
    return config_cls(**converted)


def agent_factory(
    agent_name: str, config: Any, observation_space: gym.Space, action_space: gym.Space, total_steps: int
) -> Callable[[jax.Array], Any]:
    """``key -> agent`` for one seed; a PPO linear schedule without a length gets one from the budget."""
    if agent_name not in AGENTS:
        raise ValueError(f"unknown on-policy agent '{agent_name}'; known: {', '.join(AGENTS)}")
    agent_cls, _ = AGENTS[agent_name]
    if isinstance(config, PPOConfig) and config.schedule_iterations == 0 and "linear" in (config.lr_schedule, config.clip_schedule):
        config = dataclasses.replace(config, schedule_iterations=-(-total_steps // (config.num_envs * config.num_steps)))
    return lambda key: agent_cls.create(key, observation_space, action_space, config)


def _unit_box(space: gym.Space) -> gym.Space:
    """The [-1, 1] Box the agent sees for a Box env space (the loop maps it onto the bounds)."""
    if isinstance(space, gym.spaces.Box):
        return gym.spaces.Box(-1.0, 1.0, space.shape, np.float32)
    return space


def train_agent(
    agent_name: str,
    env_id: str,
    agent_config: Any | None = None,
    schedule: OnPolicyConfig = OnPolicyConfig(),
    seeds: Sequence[int] = (0,),
    run_dir: str | Path = "runs/on_policy",
    jax_native: bool | None = None,
    run_config: Any = None,
    resume: bool = False,
    progress: bool | None = None,
    score_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Train PPO or LOOP on ``env_id`` (made with ``env_kwargs``) for all ``seeds`` at once;
    returns (seed-stacked agent, evaluation rows). ``jax_native`` (default: whenever the id has a
    JAX core) runs collection and update as one jitted call per iteration."""
    env_kwargs = env_kwargs or {}
    if agent_name not in AGENTS:
        raise ValueError(f"unknown on-policy agent '{agent_name}'; known: {', '.join(AGENTS)}")
    config = agent_config if agent_config is not None else AGENTS[agent_name][1]()
    if jax_native is None:
        jax_native = registry.steps_on_device(env_id)
    common = dict(config=schedule, seeds=seeds, run_dir=run_dir, run_config=run_config, resume=resume, progress=progress, score_fn=score_fn)
    if jax_native:
        core, params = registry.make_jax(env_id, **env_kwargs)
        observation_space, action_space = core.observation_space(params), _unit_box(core.action_space(params))
        create = agent_factory(agent_name, config, observation_space, action_space, schedule.total_steps)
        return train_on_policy(create, jax_env=JaxEnvSpec(core, params), **common)
    make_env = registry.env_factory(env_id, rescale_actions=True, **env_kwargs)
    probe = make_env()
    registry.check_spaces(probe)
    observation_space, action_space = probe.observation_space, probe.action_space
    probe.close()
    create = agent_factory(agent_name, config, observation_space, action_space, schedule.total_steps)
    return train_on_policy(create, make_env=make_env, **common)


def load_preset(name: str) -> tuple[str, str, Any, OnPolicyConfig]:
    """(agent name, env id, agent config, schedule) of a preset such as ``ppo_cartpole``."""
    values = presets.load(name)
    agent_name = values["agent"]
    if agent_name not in AGENTS:
        raise ValueError(f"preset '{name}' names agent '{agent_name}', not an on-policy agent ({', '.join(AGENTS)})")
    config = config_from_dict(AGENTS[agent_name][1], values.get(agent_name, {}))
    schedule = config_from_dict(OnPolicyConfig, values.get("on_policy", {}))
    return agent_name, values["env"], config, schedule


def train_preset(
    name: str,
    seeds: Sequence[int] = (0,),
    run_dir: str | Path | None = None,
    steps: int | None = None,
    progress: bool | None = False,
    eval_interval: int | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Train a preset (optionally with another step budget or evaluation interval); returns
    (agent, evaluation rows)."""
    agent_name, env_id, config, schedule = load_preset(name)
    if steps is not None:
        schedule = dataclasses.replace(schedule, total_steps=steps, eval_interval=min(schedule.eval_interval, steps))
    if eval_interval is not None:
        schedule = dataclasses.replace(schedule, eval_interval=eval_interval)
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / name
    run_config = {"preset": name, "agent": agent_name, "env": env_id, agent_name: config, "on_policy": schedule, "seeds": list(seeds)}
    return train_agent(agent_name, env_id, config, schedule, seeds, run_dir, run_config=run_config, progress=progress)


# ----------------------------------------------------------------------------- update memory


def zero_rollout(agent: Any, length: int | None = None) -> Rollout:
    """A zero :class:`Rollout` of the shape ``agent.update`` consumes (``length`` = episode cap for
    grouped episodes; segments use the agent's ``num_steps``)."""
    spec = agent.collection
    steps = spec.num_steps if spec.mode == "segments" else length
    if steps is None:
        raise ValueError("grouped episodes need the episode length (length=...)")
    observation_dim = int(agent.observation_moments.mean.shape[-1])
    shape = (spec.num_envs, steps)
    if agent.policy.kind == "categorical":
        actions = jnp.zeros(shape, jnp.int32)
    else:
        actions = jnp.zeros(shape + (agent.policy.net.action_dim,), jnp.float32)
    observations = jnp.zeros(shape + (observation_dim,), jnp.float32)
    return Rollout(
        observations=observations,
        actions=actions,
        log_probs=jnp.zeros(shape, jnp.float32),
        rewards=jnp.zeros(shape, jnp.float32),
        terminated=jnp.zeros(shape, bool),
        truncated=jnp.zeros(shape, bool),
        valid=jnp.ones(shape, bool),
        next_observations=observations if spec.mode == "segments" else None,
    )


def update_peak_bytes(agent: Any, length: int | None = None) -> int:
    """Peak device bytes of one compiled ``agent.update``: arguments + outputs + temporaries −
    aliased bytes, from XLA's ``memory_analysis`` of the lowered program (no execution)."""
    compiled = jax.jit(type(agent).update).lower(agent, zero_rollout(agent, length)).compile()
    stats = compiled.memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def parameter_count(tree: Any) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree)))


def equal_batch_ppo(ppo_config: PPOConfig, loop_config: LOOPConfig, episode_cap: int) -> PPOConfig:
    """A PPO config whose rollout and minibatches hold as many transitions as LOOP's padded batch
    (minibatch slots × cap, minibatch_size episodes × cap), with LOOP's epochs and policy widths."""
    return dataclasses.replace(
        ppo_config,
        num_envs=loop_config.num_minibatches * loop_config.minibatch_size,
        num_steps=episode_cap,
        num_minibatches=loop_config.num_minibatches,
        update_epochs=loop_config.update_epochs,
        actor_hidden_dims=loop_config.hidden_dims,
        lr_schedule="constant",
        clip_schedule="constant",
    )


# ----------------------------------------------------------------------------- comparison


def _episode_cap(env_id: str, schedule: OnPolicyConfig) -> int:
    if schedule.max_episode_steps is not None:
        return schedule.max_episode_steps
    env = registry.make(env_id)
    cap = env.spec.max_episode_steps
    env.close()
    return int(cap)


def compare(
    envs: Sequence[str], seeds: Sequence[int], steps: int | None, out: Path, run_root: Path, evaluations: int = 10, progress: bool = False
) -> list[dict[str, Any]]:
    """Train PPO and LOOP on each env at the same step budget; write CSV, markdown and PNGs."""
    from rl.logging import plot_runs

    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    memory_rows: list[dict[str, Any]] = []
    for env_id in envs:
        short = ENV_SHORT_NAMES.get(env_id, env_id.lower().replace("/", "_").replace("-", "_"))
        run_dirs = []
        agents: dict[str, Any] = {}
        # One budget for both agents: --steps, else the PPO preset's.
        budget = steps or load_preset(f"ppo_{short}")[3].total_steps
        for agent_name in AGENTS:
            preset = f"{agent_name}_{short}"
            _, _, config, schedule = load_preset(preset)
            run_dir = run_root / f"{agent_name}_{short}"
            if (run_dir / "checkpoints").exists():
                import shutil

                shutil.rmtree(run_dir / "checkpoints")
            start = time.perf_counter()
            agent, eval_rows = train_preset(
                preset, seeds=seeds, run_dir=run_dir, steps=budget, progress=progress, eval_interval=max(budget // evaluations, 1)
            )
            wall_clock = time.perf_counter() - start
            run_dirs.append(run_dir)
            single = jax.tree.map(lambda leaf: leaf[0], agent)
            agents[agent_name] = (single, config, schedule)
            length = None if agent_name == "ppo" else _episode_cap(env_id, schedule)
            peak = update_peak_bytes(single, length)
            params = single.state.params
            for seed in seeds:
                seed_rows = [row for row in eval_rows if row["seed"] == seed]
                within = [row["eval_return"] for row in seed_rows if row["env_steps"] <= budget] or [float("nan")]
                rows.append(
                    {
                        "env": env_id,
                        "agent": agent_name,
                        "seed": seed,
                        "budget_steps": budget,
                        "final_env_steps": seed_rows[-1]["env_steps"],
                        "final_eval_return": seed_rows[-1]["eval_return"],
                        "best_eval_within_budget": max(within),
                        "wall_clock_s": wall_clock,
                        "update_peak_bytes": peak,
                        "parameters": parameter_count(params),
                    }
                )
        ppo_single, ppo_config, _ = agents["ppo"]
        loop_single, loop_config, loop_schedule = agents["loop"]
        cap = _episode_cap(env_id, loop_schedule)
        matched = PPO.create(jax.random.PRNGKey(0), *_spaces(env_id), equal_batch_ppo(ppo_config, loop_config, cap))
        memory_rows.append(
            {
                "env": env_id,
                "transitions_per_update": loop_config.num_minibatches * loop_config.minibatch_size * cap,
                "ppo_update_bytes": update_peak_bytes(matched),
                "loop_update_bytes": update_peak_bytes(loop_single, cap),
            }
        )
        plot_runs(run_dirs, out / f"on_policy_{short}.png", title=f"PPO vs LOOP on {env_id} ({budget} steps, {len(seeds)} seeds)")
    _write_outputs(rows, memory_rows, out)
    return rows


def _spaces(env_id: str) -> tuple[gym.Space, gym.Space]:
    env = registry.make(env_id, rescale_actions=True)
    spaces = (env.observation_space, env.action_space)
    env.close()
    return spaces


def _merge_csv(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of ``path`` for other envs followed by ``rows``; written back (envs can be run one at a time)."""
    envs = {row["env"] for row in rows}
    kept: list[dict[str, Any]] = []
    if path.exists():
        with path.open(newline="") as handle:
            kept = [row for row in csv.DictReader(handle) if row["env"] not in envs]
    merged = kept + [{key: str(value) for key, value in row.items()} for row in rows]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(merged)
    return merged


def _write_outputs(rows: list[dict[str, Any]], memory_rows: list[dict[str, Any]], out: Path) -> None:
    rows = _merge_csv(out / "on_policy.csv", rows)
    memory_rows = _merge_csv(out / "on_policy_memory.csv", memory_rows)
    lines = [
        "# PPO vs LOOP at equal environment steps",
        "",
        "Deterministic evaluation return, mean ± std over seeds. 'final' is the evaluation after the",
        "iteration that reached the budget, at 'final steps' (a seed stops after the iteration that",
        "crosses the budget: PPO overshoots by < num_envs*num_steps, LOOP by < one iteration of episodes);",
        "'best within budget' uses only evaluations at or below the budget. Wall-clock covers all seeds",
        "of a run together (one vmapped program, compilation included). Update MiB: peak bytes of the",
        "compiled update (XLA memory_analysis) for the preset's own batch; parameters: policy (+ value).",
        "",
        "| env | agent | seeds | budget | final steps | final return | best within budget | wall-clock s | update MiB | parameters |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["env"], row["agent"]), []).append(row)
    for (env_id, agent_name), group in groups.items():
        def stat(key: str) -> str:
            values = np.array([float(row[key]) for row in group])
            return f"{values.mean():.1f} ± {values.std():.1f}"

        lines.append(
            f"| {env_id} | {agent_name} | {len(group)} | {group[0]['budget_steps']} | "
            f"{np.mean([float(row['final_env_steps']) for row in group]):.0f} | {stat('final_eval_return')} | "
            f"{stat('best_eval_within_budget')} | {float(group[0]['wall_clock_s']):.0f} | "
            f"{float(group[0]['update_peak_bytes']) / 2**20:.2f} | {group[0]['parameters']} |"
        )
    lines += [
        "",
        "## Update memory at equal batch size",
        "",
        "PPO configured with LOOP's transitions per update and per minibatch (episodes × episode cap),",
        "LOOP's epochs and policy widths; LOOP keeps no value network.",
        "",
        "| env | transitions per update | PPO update MiB | LOOP update MiB | LOOP / PPO |",
        "|---|---|---|---|---|",
    ]
    for row in memory_rows:
        lines.append(
            f"| {row['env']} | {row['transitions_per_update']} | {float(row['ppo_update_bytes']) / 2**20:.2f} | "
            f"{float(row['loop_update_bytes']) / 2**20:.2f} | {float(row['loop_update_bytes']) / float(row['ppo_update_bytes']):.2f} |"
        )
    (out / "on_policy.md").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry: ``python -m experiments.on_policy --help``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(DEFAULT_ENVS), help="environment ids (each needs ppo_/loop_ presets)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds, trained together as a vmapped axis")
    parser.add_argument("--steps", type=int, default=None, help="environment steps per seed for every env and agent (default: the PPO preset's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="where CSV/markdown/PNG go")
    parser.add_argument("--run-root", type=Path, default=Path("runs") / "on_policy", help="run directories (metrics, checkpoints)")
    parser.add_argument("--evaluations", type=int, default=10, help="evaluations per run (every steps/evaluations)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    rows = compare(args.envs, args.seeds, args.steps, args.out, args.run_root, args.evaluations, args.progress)
    write_result_record(args.out / "on_policy_run.json", vars(args))
    print((args.out / "on_policy.md").read_text())
    print(f"wrote {args.out / 'on_policy.csv'} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
