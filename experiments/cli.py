"""The ``o2o`` command. Every option comes from a documented config dataclass (tyro builds the
flags and their help from the field docstrings); ``o2o <command> --help`` lists them."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import tyro

from agents.loop import LOOPConfig
from agents.ppo import PPOConfig
from agents.sac import SAC, SACConfig
from agents.tbsac import TBSAC, TBSACConfig
from envs import registry
from experiments import presets
from experiments.sweep import SweepArgs, SweepError, sweep
from rl import compilation_cache
from rl.checkpoint import CheckpointMismatch
from rl.data.datasets import DatasetError, normalised_score, reference_scores
from rl.logging import LogSinks, metric_sinks
from rl.loops import OnlineConfig, train_online
from rl.rollouts import JaxEnvSpec, OnPolicyConfig

OFF_POLICY_AGENTS = {"sac": SAC, "tbsac": TBSAC}


@dataclasses.dataclass(frozen=True)
class TrainArgs:
    """Train an agent online from scratch in one environment (seeds run as one compiled program)."""

    agent: Literal["sac", "tbsac", "ppo", "loop"] = "sac"
    """Agent to train: off-policy sac / tbsac (online loop), on-policy ppo / loop (rollout loop)."""
    env: str = "Pendulum-v1"
    """Gymnasium id, o2o id (o2o/...) or import path 'package.module:ClassName'."""
    env_kwargs: str = "{}"
    """Keyword arguments of the environment's constructor as a JSON object, e.g. '{"power": 2.0}' (recorded; o2o evaluate uses them again)."""
    seed: int = 0
    """First seed; seeds are seed, seed+1, ..., seed+num_seeds-1."""
    num_seeds: int = 1
    """Seeds trained together on a leading array axis in one program (off-policy updates: see --online.seed-batching)."""
    steps: int | None = None
    """Environment steps per seed (shorthand for --online.total-steps / --on-policy.total-steps)."""
    run_dir: Path | None = None
    """Output directory (default runs/<agent>_<env>_s<seed>_<time>)."""
    resume: bool = False
    """Continue the run in --run-dir from its latest checkpoint."""
    overwrite: bool = False
    """Start over in a --run-dir that already holds checkpoints."""
    progress: bool | None = None
    """Show the progress bar (default: when stderr is a terminal)."""
    log: LogSinks = LogSinks()
    """Extra metric sinks: --log.tensorboard, --log.wandb-project NAME (the metric files are always written)."""
    env_loop: Literal["device", "host"] = "device"
    """Where o2o's own environments step: on the device (off-policy: a stretch of steps per compiled
    call; on-policy: collection and update in one call per iteration), or one step at a time through
    their gymnasium face. Other environments always step on the host."""
    sac: SACConfig = SACConfig()
    """SAC hyperparameters (--agent sac)."""
    tbsac: TBSACConfig = TBSACConfig()
    """Trend-based SAC hyperparameters (--agent tbsac)."""
    ppo: PPOConfig = PPOConfig()
    """PPO hyperparameters (--agent ppo)."""
    loop: LOOPConfig = LOOPConfig()
    """LOOP hyperparameters (--agent loop)."""
    online: OnlineConfig = OnlineConfig()
    """Schedule of the off-policy online loop (sac, tbsac)."""
    on_policy: OnPolicyConfig = OnPolicyConfig()
    """Schedule of the on-policy rollout loop (ppo, loop)."""


@dataclasses.dataclass(frozen=True)
class PlotArgs:
    """Draw learning curves (mean and spread over seeds) of one or more runs to a PNG."""

    run_dirs: tyro.conf.Positional[tuple[Path, ...]]
    """Run directories to compare."""
    out: Path = Path("curves.png")
    """PNG file to write."""
    metric: str = "eval_return"
    """Metric column to plot."""
    title: str | None = None
    """Figure title."""


def _apply_preset(default: Any, values: dict[str, Any]) -> Any:
    """``default`` with the preset's values replaced, recursing into nested config dataclasses."""
    changes = {}
    for name, value in values.items():
        current = getattr(default, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = _apply_preset(current, value)
        elif isinstance(current, tuple):
            value = tuple(value)
        changes[name] = value
    return dataclasses.replace(default, **changes)


def _default_run_dir(agent: str, env: str, seed: int) -> Path:
    name = env.replace("/", "-").replace(":", "-")
    return Path("runs") / f"{agent}_{name}_s{seed}_{time.strftime('%Y%m%d-%H%M%S')}"


def score_function(env_id: str):
    """Normalised-score function for envs with D4RL reference returns, else None."""
    scores = reference_scores(env_id)
    if scores is None:
        return None
    return lambda returns: normalised_score(returns, *scores)


def _prepare_run_dir(args: TrainArgs) -> Path:
    """The run directory, refusing to mix a fresh run into one that holds checkpoints."""
    run_dir = args.run_dir or _default_run_dir(args.agent, args.env, args.seed)
    checkpoints = run_dir / "checkpoints"
    if args.resume and not any(checkpoints.glob("*")):
        raise SystemExit(f"o2o: --resume given but {checkpoints} holds no checkpoint")
    if not args.resume and any(checkpoints.glob("*")):
        if not args.overwrite:
            raise SystemExit(f"o2o: {run_dir} already holds checkpoints: pass --resume to continue or --overwrite to start over")
        import shutil

        shutil.rmtree(checkpoints)
    return run_dir


def _print_final(evaluations: list[dict[str, Any]], total_steps: int, episodes: int, run_dir: Path) -> None:
    final = [row for row in evaluations if row["step"] >= total_steps]
    if final:
        returns = ", ".join(f"seed {row['seed']}: {row['eval_return']:.1f}" for row in final)
        print(f"final evaluation return ({episodes} episodes) — {returns}")
    print(f"run directory: {run_dir}")


def train_on_policy_agent(args: TrainArgs) -> Path:
    """``o2o train --agent ppo|loop``: the rollout loop of :mod:`rl.rollouts`."""
    from experiments.on_policy import train_agent

    schedule = args.on_policy if args.steps is None else dataclasses.replace(args.on_policy, total_steps=args.steps)
    run_dir = _prepare_run_dir(args)
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    _, evaluations = train_agent(
        args.agent,
        args.env,
        getattr(args, args.agent),
        schedule,
        seeds,
        run_dir,
        run_config=dataclasses.replace(args, on_policy=schedule),
        resume=args.resume,
        progress=args.progress,
        score_fn=score_function(args.env),
        jax_native=registry.steps_on_device(args.env, args.env_loop),
        env_kwargs=registry.parse_env_kwargs(args.env_kwargs),
    )
    _print_final(evaluations, schedule.total_steps, schedule.eval_episodes, run_dir)
    return run_dir


def train(args: TrainArgs) -> Path:
    """Run ``o2o train``; returns the run directory."""
    if args.agent not in OFF_POLICY_AGENTS:
        return train_on_policy_agent(args)
    online = args.online if args.steps is None else dataclasses.replace(args.online, total_steps=args.steps)
    run_dir = _prepare_run_dir(args)
    agent_cls, agent_config = OFF_POLICY_AGENTS[args.agent], getattr(args, args.agent)
    env_kwargs = registry.parse_env_kwargs(args.env_kwargs)
    make_env = registry.env_factory(args.env, rescale_actions=True, **env_kwargs)
    probe = make_env()
    registry.check_spaces(probe, continuous_actions=True)
    observation_space, action_space = probe.observation_space, probe.action_space
    probe.close()
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    jax_env = JaxEnvSpec(*registry.make_jax(args.env, **env_kwargs)) if registry.steps_on_device(args.env, args.env_loop) else None
    _, evaluations = train_online(
        create_agent=lambda key: agent_cls.create(key, observation_space, action_space, agent_config),
        make_env=make_env,
        jax_env=jax_env,
        config=online,
        seeds=seeds,
        run_dir=run_dir,
        run_config=dataclasses.replace(args, online=online),
        resume=args.resume,
        progress=args.progress,
        score_fn=score_function(args.env),
    )
    _print_final(evaluations, online.total_steps, online.eval_episodes, run_dir)
    return run_dir


def plot(args: PlotArgs) -> Path:
    """Run ``o2o plot``; returns the PNG path."""
    from rl.logging import plot_runs

    out = plot_runs(args.run_dirs, args.out, metric=args.metric, title=args.title)
    print(f"wrote {out}")
    return out


def _offline_to_online_commands() -> dict[str, tuple[type, Any]]:
    """``collect``, ``pretrain``, ``finetune``, ``run`` and ``quickstart`` (defined beside their
    implementation in :mod:`experiments.offline_to_online`)."""
    from experiments.offline_to_online import COMMANDS

    return COMMANDS


def commands() -> dict[str, tuple[type, Any]]:
    """Every ``o2o`` command: name -> (args dataclass, function taking the parsed args), in the
    order ``o2o --help`` lists them."""
    from experiments.policy import EvaluateArgs, evaluate

    return {
        "train": (TrainArgs, train), "plot": (PlotArgs, plot), "evaluate": (EvaluateArgs, evaluate), "sweep": (SweepArgs, sweep),
        **_offline_to_online_commands(),
    }


def command_args_types() -> dict[str, type]:
    """Each ``o2o`` command's args dataclass, by command name."""
    return {name: args_type for name, (args_type, _) in commands().items()}


def _split_preset(argv: list[str]) -> tuple[list[str], str | None]:
    if "--preset" not in argv:
        return argv, None
    index = argv.index("--preset")
    if index + 1 >= len(argv):
        raise SystemExit(f"o2o: --preset needs a name; available: {', '.join(presets.available())}")
    return argv[:index] + argv[index + 2 :], argv[index + 1]


def parse_args(argv: list[str]) -> tuple[Any, Any]:
    """Parse an ``o2o`` command line into its args dataclass and the function that runs it; bad
    flags or values exit with tyro's message, a failed config check with one line."""
    argv, preset = _split_preset(list(argv))
    train_default = TrainArgs()
    if preset is not None:
        try:
            train_default = _apply_preset(train_default, presets.load(preset))
        except ValueError as error:
            raise SystemExit(f"o2o: {error}") from None
    handlers: dict[type, Any] = {}
    choices: list[Any] = []
    for name, (args_type, handler) in commands().items():
        handlers[args_type] = handler
        marker = tyro.conf.subcommand(name, default=train_default) if name == "train" else tyro.conf.subcommand(name)
        choices.append(Annotated[args_type, marker])
    try:
        args = tyro.cli(Union[tuple(choices)], args=argv, prog="o2o")
    except ValueError as error:  # config __post_init__ checks
        raise SystemExit(f"o2o: {error}") from None
    return args, handlers[type(args)]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``o2o`` console script. Compiled programs are kept between runs
    (:mod:`rl.compilation_cache`; ``O2O_COMPILATION_CACHE=off`` turns that off)."""
    args, handler = parse_args(list(sys.argv[1:] if argv is None else argv))
    from experiments.offline_to_online import ERRORS
    from experiments.policy import PolicyLoadError

    compilation_cache.enable()
    try:
        with metric_sinks(getattr(args, "log", LogSinks())):
            handler(args)
    except (registry.EnvError, DatasetError, CheckpointMismatch, SweepError, PolicyLoadError, *ERRORS) as error:
        raise SystemExit(f"o2o: {error}") from None


if __name__ == "__main__":
    main()
