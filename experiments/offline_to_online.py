"""Offline-to-online commands: ``o2o collect | pretrain | finetune | run | quickstart``.

- ``collect``: roll policies in an environment and write D4RL-layout HDF5 datasets (the D4RL
  recipes random / medium / expert / medium-replay / medium-expert, a random policy, or a
  checkpointed agent with optional Gaussian / epsilon exploration).
- ``pretrain``: CQL or Cal-QL on a dataset (``rl.loops.train_offline``); writes checkpoints and
  ``pretrain.json`` (what ``finetune`` needs to rebuild the agent).
- ``finetune --from RUN``: WSRL: restore the whole pretrained agent, warm up with its policy into an
  empty buffer, then online SAC on online data only.
- ``run``: pretrain then finetune (optionally also SAC from scratch for the same online budget).
- ``quickstart``: everything above on Pendulum-v1 (about three minutes on two CPU cores), with a
  table and a learning-curve PNG.

Note: ``rl.loops.train_online`` evaluates on the training env, so with a reward transform
(``reward_scale`` / ``reward_bias``) online evaluation returns are of the transformed reward; with a
pure scale they are divided back for scores and the quickstart table.

Each command is a documented args dataclass plus a function; :data:`COMMANDS` maps the command
name to both, for ``experiments.cli``.

    python -m experiments.offline_to_online quickstart
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import jax
import numpy as np
import tyro

from agents.cql import CQL, CQLConfig, offline_buffer, transform_rewards
from agents.sac import SAC, SACConfig
from agents.uni_o4 import UniO4Config
from agents.wsrl import run_wsrl, wsrl_config, wsrl_schedule
from envs import registry
from envs.jax_env import RewardTransformed
from rl import compilation_cache
from rl.checkpoint import CheckpointMismatch
from rl.data import collect as collect_lib
from rl.data import datasets
from rl.extras import MissingExtra
from rl.logging import LogSinks, metric_sinks, plot_runs, write_json_atomic
from rl.loops import OfflineConfig, OnlineConfig, train_offline, train_online
from rl.rollouts import JaxEnvSpec

PRETRAIN_RECORD = "pretrain.json"
FINETUNE_RECORD = "finetune.json"
STAGE_SECONDS = "stage_seconds.json"
"""Wall-clock seconds of each stage of ``o2o run``, written in its run directory."""


class ConfigError(ValueError):
    """A run directory, record or option that cannot be used; the message says which and why."""


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """Offline pre-training (spec section 2); defaults are the locomotion CQL of WSRL."""

    steps: int = 250_000
    """Offline gradient steps."""
    cql: CQLConfig = CQLConfig()
    """CQL / Cal-QL and SAC hyperparameters (networks are inherited by fine-tuning)."""
    reward_scale: float = 1.0
    """Dataset rewards are multiplied by this (and the training env's during fine-tuning)."""
    reward_bias: float = 0.0
    """Added to the scaled rewards."""
    sparse_negative_reward: float | None = None
    """Scaled failure reward: all-failure episodes get r/(1-gamma) as Monte-Carlo return (Cal-QL)."""
    eval_interval: int = 50_000
    """Evaluate the policy every this many gradient steps and at the end."""
    eval_episodes: int = 10
    """Deterministic evaluation episodes per seed."""
    log_interval: int = 5_000
    """Log training metrics every this many gradient steps."""
    updates_per_call: int = 1_000
    """Gradient steps fused into one jitted call."""


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """WSRL online fine-tuning (spec section 3)."""

    steps: int = 500_000
    """Online environment steps, warm-up included."""
    warmup_steps: int = 5_000
    """K: steps of the frozen pretrained policy into the empty online buffer; no update at
    j <= max(K, utd_ratio x batch_size x (1 - offline_data_ratio)), as in the reference."""
    utd_ratio: int = 4
    """Critic steps per environment step."""
    batch_size: int = 256
    """Transitions per critic step (the actor/temperature step sees utd_ratio x batch_size)."""
    offline_data_ratio: float = 0.0
    """Fraction of every batch drawn from the offline dataset (WSRL: 0, the data is not retained)."""
    eval_interval: int = 20_000
    """Evaluate every this many online steps (and before the first step, and at the end)."""
    eval_episodes: int = 20
    """Deterministic evaluation episodes per seed."""
    log_interval: int = 1_000
    """Log training metrics every this many steps."""
    checkpoint_interval: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    env_loop: Literal["device", "host"] = "device"
    """Where o2o's own environments step during fine-tuning (and the scratch baseline): on the
    device, a stretch of steps per compiled call of their functional core, or one step at a time
    through their gymnasium face. Other environments always step on the host."""


# ----------------------------------------------------------------------------- command args


@dataclasses.dataclass(frozen=True)
class CollectArgs:
    """Collect offline datasets by rolling policies in an environment (D4RL-layout HDF5)."""

    env: str = "Pendulum-v1"
    """Gymnasium id, o2o id (o2o/...) or import path 'package.module:ClassName'."""
    out_dir: Path = Path("data")
    """Directory of the written datasets (<env>-<recipe>.hdf5)."""
    policy: Literal["recipes", "random", "checkpoint"] = "recipes"
    """D4RL-style recipes (trains a SAC), a uniform random policy, or a checkpointed agent (--from)."""
    recipes: tuple[str, ...] = collect_lib.RECIPES
    """Recipes to write when --policy recipes."""
    checkpoint: Annotated[Path | None, tyro.conf.arg(name="from")] = None
    """Run directory of a pretrain / finetune / train run whose agent to roll (--policy checkpoint)."""
    deterministic: bool = False
    """Roll the checkpointed agent's mode instead of its samples."""
    noise_std: float = 0.0
    """Gaussian action noise (fraction of the action half-range) around the checkpointed policy."""
    epsilon: float = 0.0
    """Probability of a uniform random action instead (checkpointed policy)."""
    steps: int = 100_000
    """Transitions per rolled-out dataset."""
    num_envs: int = 1
    """Env copies stepped in lockstep."""
    seed: int = 0
    """Collection seed."""
    behaviour_steps: int = 100_000
    """Environment steps of the SAC run behind the medium / expert / medium-replay recipes."""
    behaviour_warmup: int = 5_000
    """Uniform random steps before that SAC starts learning."""
    behaviour_eval_interval: int = 5_000
    """Snapshot and evaluate the SAC every this many steps (medium is chosen among snapshots)."""
    sac: SACConfig = SACConfig()
    """Hyperparameters of the behaviour SAC."""
    minari_id: str | None = None
    """Also write each dataset to Minari storage under '<minari-id>-<recipe>-v0' (needs the minari extra)."""
    progress: bool | None = None
    """Show progress bars (default: when stderr is a terminal)."""
    log: LogSinks = LogSinks()
    """Extra metric sinks: --log.tensorboard, --log.wandb-project NAME (the metric files are always written)."""


@dataclasses.dataclass(frozen=True)
class PretrainArgs:
    """Pre-train CQL / Cal-QL on an offline dataset; writes checkpoints and pretrain.json."""

    dataset: Path
    """Dataset file (.hdf5 D4RL layout or .npz) or local Minari id."""
    env: str | None = None
    """Environment for evaluation and its spaces (default: the dataset's env_id metadata)."""
    seed: int = 0
    """First seed."""
    num_seeds: int = 1
    """Seeds trained together as a vmapped axis."""
    run_dir: Path | None = None
    """Output directory (default runs/pretrain_<env>_s<seed>_<time>)."""
    resume: bool = False
    """Continue from the latest checkpoint in --run-dir."""
    overwrite: bool = False
    """Start over in a --run-dir that already holds checkpoints."""
    progress: bool | None = None
    """Show the progress bar (default: when stderr is a terminal)."""
    log: LogSinks = LogSinks()
    """Extra metric sinks: --log.tensorboard, --log.wandb-project NAME (the metric files are always written)."""
    pretrain: PretrainSettings = PretrainSettings()
    """Pre-training settings."""


@dataclasses.dataclass(frozen=True)
class FinetuneArgs:
    """Fine-tune a pretrained agent online with WSRL."""

    checkpoint: Annotated[Path, tyro.conf.arg(name="from")]
    """Pretraining run directory (holding pretrain.json and checkpoints/)."""
    env: str | None = None
    """Training environment (default: the one of pre-training)."""
    dataset: Path | None = None
    """Offline data for --finetune.offline-data-ratio > 0 (default: the pre-training dataset)."""
    run_dir: Path | None = None
    """Output directory (default runs/wsrl_<env>_s<seed>_<time>)."""
    resume: bool = False
    """Continue from the latest checkpoint in --run-dir."""
    overwrite: bool = False
    """Start over in a --run-dir that already holds checkpoints."""
    progress: bool | None = None
    """Show the progress bar (default: when stderr is a terminal)."""
    log: LogSinks = LogSinks()
    """Extra metric sinks: --log.tensorboard, --log.wandb-project NAME (the metric files are always written)."""
    finetune: FinetuneSettings = FinetuneSettings()
    """Online fine-tuning settings."""


@dataclasses.dataclass(frozen=True)
class RunArgs:
    """Pre-train on a dataset, then fine-tune online with WSRL (and optionally SAC from scratch)."""

    dataset: Path
    """Dataset file or local Minari id."""
    env: str | None = None
    """Environment (default: the dataset's env_id metadata)."""
    seed: int = 0
    """First seed."""
    num_seeds: int = 1
    """Seeds trained together as a vmapped axis."""
    run_dir: Path | None = None
    """Output directory; pretrain/, wsrl/ (and sac_scratch/) go below it."""
    scratch_baseline: bool = False
    """Also train the same online SAC from scratch for the same online budget."""
    overwrite: bool = False
    """Start over in a --run-dir that already holds checkpoints."""
    progress: bool | None = None
    """Show progress bars (default: when stderr is a terminal)."""
    log: LogSinks = LogSinks()
    """Extra metric sinks: --log.tensorboard, --log.wandb-project NAME (the metric files are always written)."""
    pretrain: PretrainSettings = PretrainSettings()
    """Pre-training settings."""
    finetune: FinetuneSettings = FinetuneSettings()
    """Online fine-tuning settings."""
    agent: Literal["wsrl", "uni_o4"] = "wsrl"
    """wsrl: CQL / Cal-QL pre-training then WSRL (--pretrain, --finetune); uni_o4: Uni-O4's offline
    ensemble BC + gated multi-step PPO, then online PPO (--uni-o4; runs under run-dir/offline, online)."""
    uni_o4: UniO4Config = UniO4Config()
    """Uni-O4 settings (spec defaults; experiments.uni_o4_hopper --scale cpu shows a reduced preset)."""


@dataclasses.dataclass(frozen=True)
class QuickstartArgs:
    """Collect a Pendulum dataset, pre-train Cal-QL, fine-tune with WSRL, compare with SAC from
    scratch for the same online budget; prints a table and writes a learning-curve PNG."""

    out_dir: Path = Path("runs/quickstart")
    """Where datasets, runs, the table and the PNG go."""
    env: str = "Pendulum-v1"
    """Environment (a short-horizon continuous-control task keeps the demo fast)."""
    recipe: Literal["random", "medium", "expert", "medium-replay", "medium-expert"] = "medium"
    """Which collected dataset to pre-train on."""
    seed: int = 0
    """First seed."""
    num_seeds: int = 3
    """Seeds of pre-training, fine-tuning and the scratch baseline (a vmapped axis: one program each);
    the table shows every seed's final score next to the means."""
    behaviour_steps: int = 8_000
    """Steps of the SAC run that produces the datasets."""
    dataset_steps: int = 4_000
    """Transitions of each rolled-out dataset."""
    pretrain_steps: int = 16_000
    """Offline gradient steps. The switch to online SAC holds the pretrained return only when the
    pretrained critic has (nearly) converged: after 4,000 steps its mean Q on dataset actions was still
    falling fast (-5 of an eventual -13, scaled) and fine-tuning collapsed from about -310 to about
    -760 within 500 updates; after 16,000 steps the mean Q has settled and the fine-tuned return stays
    near the pretrained one through step 1,500 on every seed."""
    cql_sampled_actions: int = 4
    """CQL actions per state of each kind (random, policy at s, policy at s') and max-target backup
    actions. The spec uses 10; the conservative term's cost grows with it, and 4 buys the 4x longer
    pre-training above for about the wall-clock of 4,000 steps with 10."""
    online_steps: int = 1_000
    """Online steps of fine-tuning and of the scratch baseline (warm-up included): SAC from scratch
    has only just started learning here. On longer budgets it catches up on this easy task, and both
    runs fluctuate (this online SAC with 10 LayerNorm critics is not a stable Pendulum learner)."""
    warmup_steps: int = 500
    """K: warm-up steps (pretrained policy for WSRL, uniform random for the scratch SAC)."""
    hidden: int = 64
    """Width of the two hidden layers of actor and critics (WSRL uses 256; smaller is faster on a CPU)."""
    reward_scale: float = 0.1
    """Training reward multiplier (dataset and training env). Pendulum pays up to -16 per step; with
    LayerNorm critics and Adam a Q-value moves by a bounded amount per step, so x0.1 brings the true
    value scale within reach of a short pre-training. Reported returns are unscaled."""
    batch_size: int = 128
    """Transitions per critic step offline and online (WSRL uses 256; with UTD 4 the online update
    takes 4 x 128, so updates start after max(K, 512) steps as in the reference rule)."""
    eval_interval: int = 250
    """Online evaluation interval (a multiple of it should equal warmup_steps)."""
    eval_episodes: int = 10
    """Evaluation episodes per seed and evaluation (Pendulum returns vary a lot with the start state)."""
    overwrite: bool = True
    """Replace an earlier quickstart in --out-dir."""
    progress: bool | None = None
    """Show progress bars (default: when stderr is a terminal)."""
    log: LogSinks = LogSinks()
    """Extra metric sinks: --log.tensorboard, --log.wandb-project NAME (the metric files are always written)."""


# ----------------------------------------------------------------------------- helpers


def apply_overrides(default: Any, values: dict[str, Any]) -> Any:
    """``default`` (a dataclass) with ``values`` replaced, recursing into nested dataclasses and
    turning JSON lists back into tuples."""
    if not dataclasses.is_dataclass(default):
        raise ConfigError(f"cannot apply {values!r} to {default!r}")
    names = {field.name for field in dataclasses.fields(default)}
    changes = {}
    for name, value in values.items():
        if name not in names:
            raise ConfigError(f"{type(default).__name__} has no field '{name}'")
        current = getattr(default, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = apply_overrides(current, value)
        elif isinstance(value, list):
            value = tuple(value)
        changes[name] = value
    return dataclasses.replace(default, **changes)


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    checkpoints = run_dir / "checkpoints"
    has_checkpoints = checkpoints.exists() and any(checkpoints.iterdir())
    if resume and not has_checkpoints:
        raise ConfigError(f"--resume given but {checkpoints} holds no checkpoint")
    if not resume and has_checkpoints:
        if not overwrite:
            raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume to continue or --overwrite to start over")
        shutil.rmtree(checkpoints)


def _seeds(first: int, count: int) -> list[int]:
    if count < 1:
        raise ConfigError(f"num_seeds must be >= 1, got {count}")
    return list(range(first, first + count))


def _make_env_checked(env_id: str):
    make_env = registry.env_factory(env_id, rescale_actions=True)
    probe = make_env()
    registry.check_spaces(probe, continuous_actions=True)
    spaces = probe.observation_space, probe.action_space
    probe.close()
    return make_env, spaces


def device_envs(env_id: str, env_loop: str, reward_scale: float = 1.0, reward_bias: float = 0.0) -> JaxEnvSpec | None:
    """The functional core the online loop steps on the device, with the rewards of the gymnasium
    training env (``scale * r + bias``); None where the envs step on the host (``env_loop``
    "host", or an environment without a JAX core)."""
    if not registry.steps_on_device(env_id, env_loop):
        return None
    core, params = registry.make_jax(env_id)
    if (reward_scale, reward_bias) != (1.0, 0.0):
        core = RewardTransformed(core, reward_scale, reward_bias)
    return JaxEnvSpec(core, params)


def _score_fn(dataset: datasets.OfflineDataset | None, env_id: str, return_scale: float = 1.0):
    """Normalised-score function from the dataset's (or the D4RL table's) reference returns.

    ``return_scale`` undoes a reward scale of the env the returns come from (the online loop
    evaluates on its training env, see the module notes)."""
    scores = datasets.dataset_reference_scores(dataset) if dataset is not None else None
    scores = scores or datasets.reference_scores(env_id)
    if scores is None or not all(math.isfinite(s) for s in scores) or scores[0] == scores[1]:
        return None, None
    return (lambda returns: datasets.normalised_score(np.asarray(returns) / return_scale, *scores)), scores


def _online_score_fn(dataset, env_id: str, reward_scale: float, reward_bias: float):
    """The score function for online runs on an env whose rewards are ``scale * r + bias``."""
    if reward_bias != 0.0:
        print(
            f"note: training env rewards are {reward_scale} * r + {reward_bias}; online evaluation returns are of "
            "these rewards (rl.loops.train_online evaluates on the training env) and are not normalised"
        )
        return None
    return _score_fn(dataset, env_id, reward_scale)[0]


def load_checked_dataset(path: Path, env_id: str | None) -> tuple[datasets.OfflineDataset, str]:
    """Load a dataset and check it against its environment (observation / action width, finite
    values); returns the dataset and the environment id."""
    dataset = datasets.load(path)
    env_id = env_id or dataset.metadata.get("env_id")
    if not env_id:
        raise ConfigError(f"{path}: the dataset records no env_id; pass --env")
    _, (observation_space, action_space) = _make_env_checked(env_id)
    datasets.validate(dataset, observation_space, action_space)
    return dataset, env_id


def online_sac_config(pretrained: SACConfig, settings: FinetuneSettings) -> SACConfig:
    """The online SAC of WSRL for a pretrained config: same networks and optimisers, critic UTD
    ``utd_ratio`` on minibatches of ``batch_size``, actor and temperature on the full batch."""
    return dataclasses.replace(
        pretrained, utd_ratio=settings.utd_ratio, batch_size=settings.batch_size, actor_on_full_batch=True
    )


def find_pretrain_run(path: Path) -> tuple[Path, int | None]:
    """The pretraining run directory for ``path`` (the run dir, its checkpoints/ dir or one step
    dir) and the requested step (None = latest)."""
    path = Path(path)
    for candidate, step in ((path, None), (path.parent, None), (path.parent.parent, path.name)):
        if (candidate / PRETRAIN_RECORD).is_file():
            return candidate, (int(step) if step is not None and step.isdigit() else None)
    if (path / "config.json").is_file() or (path.parent / "config.json").is_file():
        raise ConfigError(
            f"{path} is not a pretraining run (no {PRETRAIN_RECORD}): fine-tuning starts from a CQL / Cal-QL "
            "checkpoint written by 'o2o pretrain'"
        )
    raise ConfigError(f"{path}: no pretraining run found (expected a directory with {PRETRAIN_RECORD})")


def read_pretrain_record(run_dir: Path) -> dict[str, Any]:
    """The record ``pretrain`` wrote; checks that it describes a CQL / Cal-QL agent."""
    record = json.loads((run_dir / PRETRAIN_RECORD).read_text())
    if record.get("agent") != "cql":
        raise ConfigError(f"{run_dir}: checkpoint of agent '{record.get('agent')}', fine-tuning needs 'cql'")
    return record


def load_pretrained(path: Path, env_id: str | None = None) -> tuple[CQL, dict[str, Any], str]:
    """Restore the seed-stacked pretrained agent of a pretraining run; checks the environment's
    spaces against the checkpoint. Returns the agent, the record and the env id."""
    from experiments.policy import load_run_agents  # it builds on this module

    run_dir, step = find_pretrain_run(path)
    record = read_pretrain_record(run_dir)
    env_id = env_id or record["env"]
    _, (observation_space, action_space) = _make_env_checked(env_id)
    for name, space, expected in (
        ("observation", observation_space, record["observation_dim"]),
        ("action", action_space, record["action_dim"]),
    ):
        width = int(np.prod(space.shape))
        if width != expected:
            raise ConfigError(
                f"environment '{env_id}' has {name} width {width} but the pretrained agent expects {expected}"
            )
    return load_run_agents(run_dir, step, env_id).agents, record, env_id


# ----------------------------------------------------------------------------- collect


def _write(dataset: datasets.OfflineDataset, path: Path, minari_id: str | None, recipe: str) -> Path:
    datasets.write_d4rl_hdf5(path, dataset)
    if minari_id:
        collect_lib.write_minari(dataset, f"{minari_id}-{recipe}-v0")
    return path


def _dataset_name(env_id: str) -> str:
    return env_id.replace("/", "-").replace(":", "-")


def _agent_for_collection(run_dir: Path, env_id: str) -> Any:
    """One agent (seed 0) from a pretrain, finetune or train run directory."""
    from experiments.policy import load_run_agents  # it builds on this module

    run = load_run_agents(run_dir, env_id=env_id)
    return jax.tree.map(lambda leaf: leaf[0], run.agents)


def collect(args: CollectArgs) -> dict[str, Path]:
    """Run ``o2o collect``; returns the written dataset paths by recipe name."""
    make_env, (observation_space, action_space) = _make_env_checked(args.env)
    name = _dataset_name(args.env)
    written: dict[str, Path] = {}
    if args.policy == "recipes":
        unknown = [recipe for recipe in args.recipes if recipe not in collect_lib.RECIPES]
        if unknown:
            raise ConfigError(f"unknown recipes {unknown}; choose from {list(collect_lib.RECIPES)}")
        behaviour = OnlineConfig(
            total_steps=args.behaviour_steps,
            warmup_steps=args.behaviour_warmup,
            eval_interval=args.behaviour_eval_interval,
            eval_episodes=10,
            log_interval=args.behaviour_eval_interval,
            buffer_capacity=max(args.behaviour_steps, 1),
        )
        config = collect_lib.CollectConfig(
            env_id=args.env, recipes=tuple(args.recipes), steps_per_dataset=args.steps, seed=args.seed, num_envs=args.num_envs
        )
        results = collect_lib.collect_d4rl_style(
            make_env,
            lambda key: SAC.create(key, observation_space, action_space, args.sac),
            behaviour,
            config,
            args.out_dir / f".{name}-collect",
            progress=args.progress,
            jax_env=device_envs(args.env, "device"),  # o2o's own envs train the behaviour SAC on the device
        )
        for recipe, dataset in results.items():
            written[recipe] = _write(dataset, args.out_dir / f"{name}-{recipe}.hdf5", args.minari_id, recipe)
    else:
        if args.policy == "random":
            policy, label = collect_lib.random_policy(action_space), "uniform random"
        else:
            if args.checkpoint is None:
                raise ConfigError("--policy checkpoint needs --from RUN_DIR")
            agent = _agent_for_collection(args.checkpoint, args.env)
            policy = collect_lib.agent_policy(agent, deterministic=args.deterministic)
            policy = collect_lib.noisy_policy(policy, action_space, args.noise_std, args.epsilon)
            label = f"{args.checkpoint} (noise {args.noise_std}, epsilon {args.epsilon})"
        result = collect_lib.rollout(
            make_env, policy, args.steps, args.seed, args.num_envs,
            {"env_id": args.env, "recipe": args.policy, "behaviour_policy": label},
        )
        metadata = {**result.dataset.metadata, "behaviour_return": result.mean_return, "dataset_name": f"{args.env}-{args.policy}"}
        reference = datasets.reference_scores(args.env)
        if reference is not None:
            metadata.update(ref_min_score=reference[0], ref_max_score=reference[1])
        dataset = dataclasses.replace(result.dataset, metadata=metadata)
        written[args.policy] = _write(dataset, args.out_dir / f"{name}-{args.policy}.hdf5", args.minari_id, args.policy)
    for recipe, path in written.items():
        meta = datasets.load(path).metadata
        print(f"{recipe:>14}: {path}  (behaviour return {float(meta.get('behaviour_return', float('nan'))):.1f})")
    return written


# ----------------------------------------------------------------------------- pretrain


def pretrain(args: PretrainArgs) -> Path:
    """Run ``o2o pretrain``; returns the run directory."""
    settings = args.pretrain
    dataset, env_id = load_checked_dataset(args.dataset, args.env)
    make_env, (observation_space, action_space) = _make_env_checked(env_id)
    seeds = _seeds(args.seed, args.num_seeds)
    run_dir = args.run_dir or Path("runs") / f"pretrain_{_dataset_name(env_id)}_s{args.seed}_{_stamp()}"
    _prepare_run_dir(run_dir, args.resume, args.overwrite)
    config = settings.cql
    scaled = transform_rewards(dataset, settings.reward_scale, settings.reward_bias)
    source = offline_buffer(scaled, config.sac.discount, with_mc_returns=True, sparse_negative_reward=settings.sparse_negative_reward)
    keys = [jax.random.fold_in(jax.random.PRNGKey(seed), 0) for seed in seeds]
    agent = jax.vmap(lambda key: CQL.create(key, observation_space, action_space, config))(np.stack(keys))
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "agent": "cql",
        "env": env_id,
        "dataset": str(args.dataset),
        "seeds": seeds,
        "offline_steps": settings.steps,
        "cql": config,
        "reward_scale": settings.reward_scale,
        "reward_bias": settings.reward_bias,
        "observation_dim": int(np.prod(observation_space.shape)),
        "action_dim": int(np.prod(action_space.shape)),
    }
    write_json_atomic(run_dir / PRETRAIN_RECORD, record)
    score_fn, _ = _score_fn(dataset, env_id)
    schedule = OfflineConfig(
        num_steps=settings.steps,
        updates_per_call=min(settings.updates_per_call, settings.steps),
        eval_interval=settings.eval_interval,
        eval_episodes=settings.eval_episodes,
        log_interval=settings.log_interval,
    )
    _, rows = train_offline(
        agent, source, schedule, seeds, run_dir, make_env=make_env, run_config=args, resume=args.resume,
        progress=args.progress, score_fn=score_fn,
    )
    final = [row for row in rows if row["step"] == settings.steps]
    if final:
        print(f"offline policy after {settings.steps} steps: " + ", ".join(f"seed {r['seed']}: {r['eval_return']:.1f}" for r in final))
    print(f"pretraining run: {run_dir}")
    return run_dir


# ----------------------------------------------------------------------------- finetune


def _resumed_env_loop(run_dir: Path, settings: FinetuneSettings) -> FinetuneSettings:
    """``settings`` with the env loop of the run being resumed: its checkpoints hold the device
    envs' states or not, so the loop cannot change midway (runs recorded before the choice existed
    stepped on the host)."""
    path = run_dir / FINETUNE_RECORD
    if not path.is_file():
        return settings
    recorded = json.loads(path.read_text()).get("env_loop", "host")
    if recorded != settings.env_loop:
        print(f"resuming {run_dir}: its envs stepped on the {recorded}, so they continue there")
    return dataclasses.replace(settings, env_loop=recorded)


def finetune(args: FinetuneArgs) -> Path:
    """Run ``o2o finetune``; returns the run directory."""
    settings = args.finetune
    pretrained, record, env_id = load_pretrained(args.checkpoint, args.env)
    cql_config = apply_overrides(CQLConfig(), record["cql"])
    online = online_sac_config(cql_config.sac, settings)
    seeds = [int(s) for s in record["seeds"]]
    run_dir = args.run_dir or Path("runs") / f"wsrl_{_dataset_name(env_id)}_s{seeds[0]}_{_stamp()}"
    _prepare_run_dir(run_dir, args.resume, args.overwrite)
    settings = _resumed_env_loop(run_dir, settings) if args.resume else settings
    make_env, (observation_space, action_space) = _make_env_checked(env_id)
    reward_scale, reward_bias = float(record["reward_scale"]), float(record["reward_bias"])
    if (reward_scale, reward_bias) != (1.0, 0.0):
        make_env = _rewarded(make_env, reward_scale, reward_bias)
    dataset_path = args.dataset or Path(record["dataset"])
    offline_source, dataset = None, None
    if settings.offline_data_ratio > 0:
        dataset, _ = load_checked_dataset(dataset_path, env_id)
        offline_source = offline_buffer(
            transform_rewards(dataset, reward_scale, reward_bias), online.discount, with_mc_returns=False
        )
    elif Path(dataset_path).is_file():
        dataset = datasets.load(dataset_path)  # only for its reference scores
    schedule = wsrl_schedule(
        total_steps=settings.steps,
        warmup_steps=settings.warmup_steps,
        samples_per_update=online.utd_ratio * online.batch_size,
        offline_data_ratio=settings.offline_data_ratio,
        eval_interval=settings.eval_interval,
        eval_episodes=settings.eval_episodes,
        log_interval=settings.log_interval,
        checkpoint_interval=settings.checkpoint_interval,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        run_dir / FINETUNE_RECORD,
        {"agent": "sac", "env": env_id, "seeds": seeds, "sac": online, "online": schedule,
         "pretrained_from": str(args.checkpoint), "offline_steps": record["offline_steps"],
         "reward_scale": reward_scale, "reward_bias": reward_bias, "env_loop": settings.env_loop},
    )
    score_fn = _online_score_fn(dataset, env_id, reward_scale, reward_bias)
    _, rows = run_wsrl(
        pretrained, online, make_env, schedule, seeds, run_dir,
        offline_source=offline_source, offline_data_ratio=settings.offline_data_ratio,
        run_config={"finetune": args, "sac": online, "online": schedule, "offline_steps": record["offline_steps"]},
        resume=args.resume, progress=args.progress, score_fn=score_fn,
        jax_env=device_envs(env_id, settings.env_loop, reward_scale, reward_bias),
    )
    final = [row for row in rows if row["step"] == settings.steps]
    if final:
        scale = "" if (reward_scale, reward_bias) == (1.0, 0.0) else f" (training rewards: x{reward_scale:g} + {reward_bias:g})"
        print(f"after {settings.steps} online steps{scale}: " + ", ".join(f"seed {r['seed']}: {r['eval_return']:.1f}" for r in final))
    print(f"fine-tuning run: {run_dir}")
    return run_dir


def _rewarded(make_env: Callable, scale: float, bias: float) -> Callable:
    import gymnasium as gym

    return lambda: gym.wrappers.TransformReward(make_env(), lambda reward: scale * reward + bias)


def train_scratch(
    env_id: str, config: SACConfig, schedule: OnlineConfig, seeds: list[int], run_dir: Path,
    score_fn=None, progress: bool | None = None, reward_scale: float = 1.0, reward_bias: float = 0.0,
    env_loop: Literal["device", "host"] = "device",
) -> list[dict[str, Any]]:
    """The same online SAC from a fresh initialisation with uniform random warm-up (the baseline),
    on the same (reward-transformed) training env as fine-tuning, stepped where ``env_loop`` says."""
    make_env, (observation_space, action_space) = _make_env_checked(env_id)
    if (reward_scale, reward_bias) != (1.0, 0.0):
        make_env = _rewarded(make_env, reward_scale, reward_bias)
    schedule = dataclasses.replace(schedule, warmup_actions="random")
    _, rows = train_online(
        lambda key: SAC.create(key, observation_space, action_space, config), make_env, schedule, seeds, run_dir,
        run_config={"baseline": "sac_scratch", "env": env_id, "seeds": seeds, "sac": config, "online": schedule,
                    "reward_scale": reward_scale, "reward_bias": reward_bias},
        progress=progress, score_fn=score_fn,
        jax_env=device_envs(env_id, env_loop, reward_scale, reward_bias),
    )
    return rows


class _PhaseClock:
    """Prints wall-clock and process CPU seconds of each phase of a pipeline (quickstart, ``o2o run``)
    and keeps the wall-clock seconds by phase in ``laps``."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.first_wall, self.first_cpu = self.wall, self.cpu
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        """Report the time since the previous lap."""
        wall, cpu = time.perf_counter(), time.process_time()
        print(f"      {name}: {wall - self.wall:.0f} s wall, {cpu - self.cpu:.0f} s CPU")
        self.laps[name] = wall - self.wall
        self.wall, self.cpu = wall, cpu

    def total(self) -> str:
        """Wall-clock and CPU seconds since the start."""
        return f"{time.perf_counter() - self.first_wall:.0f} s wall, {time.process_time() - self.first_cpu:.0f} s CPU"


def run(args: RunArgs) -> Path:
    """Run ``o2o run`` (pretrain, then finetune; optionally the scratch baseline); returns the run directory."""
    dataset, env_id = load_checked_dataset(args.dataset, args.env)
    root = args.run_dir or Path("runs") / f"o2o_{_dataset_name(env_id)}_s{args.seed}_{_stamp()}"
    if args.agent == "uni_o4":
        from experiments.uni_o4_hopper import run_uni_o4  # its import chain is only needed here

        _prepare_run_dir(root / "online", False, args.overwrite)
        summary = run_uni_o4(args.dataset, env_id, _seeds(args.seed, args.num_seeds), root, args.uni_o4, args.progress)
        for row in summary["seeds"]:
            final = row["online_curve"][-1]["return"] if row["online_curve"] else float("nan")
            print(
                f"seed {row['seed']}: best BC member {row['bc_best_return']:.1f}, Uni-O4 offline {row['selected_return']:.1f}, "
                f"after {args.uni_o4.online.total_steps} online steps {final:.1f}"
            )
        print(f"Uni-O4 run: {root} (summary.json)")
        return root
    clock = _PhaseClock()
    pretrain_dir = pretrain(
        PretrainArgs(
            dataset=args.dataset, env=env_id, seed=args.seed, num_seeds=args.num_seeds, run_dir=root / "pretrain",
            overwrite=args.overwrite, progress=args.progress, pretrain=args.pretrain,
        )
    )
    clock.lap("pre-training")
    finetune_dir = finetune(
        FinetuneArgs(checkpoint=pretrain_dir, run_dir=root / "wsrl", overwrite=args.overwrite,
                     progress=args.progress, finetune=args.finetune)
    )
    clock.lap("fine-tuning")
    if args.scratch_baseline:
        record = json.loads((finetune_dir / FINETUNE_RECORD).read_text())
        online = apply_overrides(SACConfig(), record["sac"])
        schedule = apply_overrides(OnlineConfig(), record["online"])
        _prepare_run_dir(root / "sac_scratch", False, args.overwrite)
        scale, bias = float(record["reward_scale"]), float(record["reward_bias"])
        score_fn = _online_score_fn(dataset, env_id, scale, bias)
        train_scratch(
            env_id, online, schedule, record["seeds"], root / "sac_scratch", score_fn, args.progress, scale, bias,
            record.get("env_loop", "host"),
        )
        clock.lap("SAC from scratch")
    write_json_atomic(root / STAGE_SECONDS, clock.laps)
    return root


# ----------------------------------------------------------------------------- quickstart


def _eval_at(rows: list[dict[str, Any]], step: int, key: str = "eval_return") -> float:
    values = [row[key] for row in rows if row["step"] == step and row.get(key) is not None]
    return float(np.mean(values)) if values else float("nan")


def quickstart_configs(args: QuickstartArgs) -> tuple[CQLConfig, FinetuneSettings]:
    """The Cal-QL pre-training config and the fine-tuning settings of the quickstart: the WSRL
    locomotion recipe (10 LayerNorm critics, REDQ subsets, UTD 4) with narrower networks and 4
    instead of 10 CQL sampled actions.

    The initial temperature and the conservative weight are multiplied by ``reward_scale``, so the
    scaled problem weighs entropy and conservatism against reward exactly as the unscaled one with
    the reference values (alpha 1.0, alpha_cql 5.0) would."""
    hidden = (args.hidden, args.hidden)
    sac = wsrl_config(
        "locomotion", utd_ratio=1, batch_size=args.batch_size, actor_hidden_dims=hidden, critic_hidden_dims=hidden,
        init_temperature=1.0 * args.reward_scale,
    )
    cql = CQLConfig(
        sac=sac, calql=True, cql_alpha=5.0 * args.reward_scale,
        num_sampled_actions=args.cql_sampled_actions, num_backup_actions=args.cql_sampled_actions,
    )
    settings = FinetuneSettings(
        steps=args.online_steps,
        warmup_steps=args.warmup_steps,
        batch_size=args.batch_size,
        eval_interval=args.eval_interval,
        eval_episodes=args.eval_episodes,
        log_interval=args.eval_interval,
    )
    return cql, settings


def _eval_per_seed(rows: list[dict[str, Any]], step: int, seeds: list[int]) -> list[float]:
    """The evaluation return of every seed (in ``seeds`` order) at ``step``; NaN where missing."""
    found = {row["seed"]: row["eval_return"] for row in rows if row["step"] == step and row.get("eval_return") is not None}
    return [float(found.get(seed, float("nan"))) for seed in seeds]


def quickstart(args: QuickstartArgs) -> dict[str, Any]:
    """Run ``o2o quickstart``; returns the numbers of the printed table: the means over seeds
    (``offline``, ``after_warmup``, ``wsrl_final``, ``scratch_final``), ``seeds`` and the per-seed
    finals ``wsrl_final_per_seed`` / ``scratch_final_per_seed`` (lists in ``seeds`` order)."""
    clock = _PhaseClock()
    out = args.out_dir
    if out.exists() and args.overwrite:
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty: pass --overwrite or another --out-dir")
    print(f"[1/4] collecting datasets on {args.env} (SAC behaviour run of {args.behaviour_steps} steps)")
    hidden = (args.hidden, args.hidden)
    written = collect(
        CollectArgs(
            env=args.env, out_dir=out / "data", recipes=collect_lib.RECIPES,
            steps=args.dataset_steps, seed=args.seed, behaviour_steps=args.behaviour_steps,
            behaviour_warmup=min(1_000, args.behaviour_steps // 4), behaviour_eval_interval=max(args.behaviour_steps // 8, 1),
            sac=SACConfig(actor_hidden_dims=hidden, critic_hidden_dims=hidden), progress=args.progress,
        )
    )
    clock.lap("collect")
    dataset_path = written[args.recipe]
    cql, settings = quickstart_configs(args)
    print(f"[2/4] pre-training Cal-QL for {args.pretrain_steps} steps on {dataset_path.name}")
    pretrain_dir = pretrain(
        PretrainArgs(
            dataset=dataset_path, env=args.env, seed=args.seed, num_seeds=args.num_seeds, run_dir=out / "pretrain",
            progress=args.progress,
            pretrain=PretrainSettings(
                steps=args.pretrain_steps, cql=cql, reward_scale=args.reward_scale,
                eval_interval=args.pretrain_steps, eval_episodes=args.eval_episodes,
                log_interval=max(args.pretrain_steps // 5, 1), updates_per_call=max(args.pretrain_steps // 5, 1),
            ),
        )
    )
    clock.lap("pretrain")
    print(f"[3/4] WSRL fine-tuning for {args.online_steps} online steps (warm-up {args.warmup_steps})")
    wsrl_dir = finetune(FinetuneArgs(checkpoint=pretrain_dir, run_dir=out / "wsrl", progress=args.progress, finetune=settings))
    clock.lap("fine-tune")
    print(f"[4/4] SAC from scratch for the same {args.online_steps} online steps")
    record = json.loads((wsrl_dir / FINETUNE_RECORD).read_text())
    online = apply_overrides(SACConfig(), record["sac"])
    schedule = apply_overrides(OnlineConfig(), record["online"])
    dataset = datasets.load(dataset_path)
    score_fn, scores = _score_fn(dataset, args.env, args.reward_scale)
    scratch_rows = train_scratch(
        args.env, online, schedule, record["seeds"], out / "sac_scratch", score_fn, args.progress, args.reward_scale,
        env_loop=record.get("env_loop", "host"),
    )
    clock.lap("SAC from scratch")

    wsrl_rows = [json.loads(line) for line in (wsrl_dir / "metrics.jsonl").read_text().splitlines()]
    wsrl_eval = [row for row in wsrl_rows if row.get("phase") == "eval"]
    warm_step = min((row["step"] for row in wsrl_eval if row["step"] >= args.warmup_steps), default=args.warmup_steps)
    unscale = 1.0 / args.reward_scale  # online evaluations ran on the scaled training env
    table = {
        "offline": _eval_at(wsrl_eval, 0) * unscale,
        "after_warmup": _eval_at(wsrl_eval, warm_step) * unscale,
        "wsrl_final": _eval_at(wsrl_eval, args.online_steps) * unscale,
        "scratch_final": _eval_at(scratch_rows, args.online_steps) * unscale,
        "seeds": [int(seed) for seed in record["seeds"]],
    }
    table["wsrl_final_per_seed"] = [v * unscale for v in _eval_per_seed(wsrl_eval, args.online_steps, table["seeds"])]
    table["scratch_final_per_seed"] = [v * unscale for v in _eval_per_seed(scratch_rows, args.online_steps, table["seeds"])]
    plot = plot_runs(
        [wsrl_dir, out / "sac_scratch"], out / "learning_curves.png",
        metric="normalised_score" if scores is not None else "eval_return", title=f"{args.env}: WSRL vs SAC from scratch",
    )
    lines = _format_table(table, scores, warm_step, args, dataset.metadata)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"learning curves: {plot}\ntotal time: {clock.total()}")
    print(f"next: 'o2o evaluate {out}' scores the fine-tuned policies on fresh episodes; "
          "experiments.policy.load_policy gives one as a plain function")
    return table


def _format_table(table: dict[str, Any], scores, warm_step: int, args: QuickstartArgs, metadata) -> list[str]:
    def score(value: float) -> str:
        if scores is None:
            return "-"
        return f"{100 * float(datasets.normalised_score(value, *scores)):.1f}"

    rows = [
        ("offline (pretrained policy, step 0)", table["offline"]),
        (f"after warm-up (step {warm_step})", table["after_warmup"]),
        (f"WSRL final (step {args.online_steps})", table["wsrl_final"]),
        (f"SAC from scratch final (step {args.online_steps})", table["scratch_final"]),
    ]
    lines = [
        f"{args.env}, dataset '{args.recipe}' (behaviour return {float(metadata.get('behaviour_return', float('nan'))):.1f}), "
        f"{args.num_seeds} seed(s), {args.eval_episodes} evaluation episodes each",
        "",
        "| stage | return | normalised score (x100) |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {value:.1f} | {score(value)} |" for name, value in rows]
    if scores is not None:
        lines.append(f"\nnormalised with random return {scores[0]:.1f} -> 0 and expert return {scores[1]:.1f} -> 100")
    lines += ["", f"| seed | WSRL final (step {args.online_steps}) | SAC from scratch final | WSRL - SAC |", "|---|---|---|---|"]
    pairs = list(zip(table["seeds"], table["wsrl_final_per_seed"], table["scratch_final_per_seed"]))
    lines += [f"| {seed} | {wsrl:.1f} | {scratch:.1f} | {wsrl - scratch:+.1f} |" for seed, wsrl, scratch in pairs]
    verdict = "beats" if table["wsrl_final"] > table["scratch_final"] else "does NOT beat"
    wins = sum(wsrl > scratch for _, wsrl, scratch in pairs)
    lines.append(
        f"\nWSRL fine-tuning {verdict} SAC from scratch at the same online budget on average, "
        f"and on {wins} of {len(pairs)} seeds."
    )
    return lines


def run_args_from_preset(name: str, dataset: Path, **changes: Any) -> RunArgs:
    """``RunArgs`` for ``dataset`` from a bundled ``wsrl_*`` preset (a partial RunArgs as JSON),
    with ``changes`` applied last."""
    from experiments import presets

    return dataclasses.replace(apply_overrides(RunArgs(dataset=Path(dataset)), presets.load(name)), **changes)


# ----------------------------------------------------------------------------- command table

COMMANDS: dict[str, tuple[type, Callable[[Any], Any]]] = {
    "collect": (CollectArgs, collect),
    "pretrain": (PretrainArgs, pretrain),
    "finetune": (FinetuneArgs, finetune),
    "run": (RunArgs, run),
    "quickstart": (QuickstartArgs, quickstart),
}
"""Command name -> (args dataclass, function taking the parsed args)."""

ERRORS = (ConfigError, datasets.DatasetError, CheckpointMismatch, registry.EnvError, ValueError, MissingExtra)
"""Exceptions the CLI turns into a one-line message and a non-zero exit."""


def main(argv: list[str] | None = None) -> None:
    """Stand-alone entry point (``python -m experiments.offline_to_online <command> ...``); keeps
    compiled programs between runs as the ``o2o`` command does."""
    from typing import Union

    command = Union[tuple(Annotated[cls, tyro.conf.subcommand(name)] for name, (cls, _) in COMMANDS.items())]
    try:
        args = tyro.cli(command, args=argv, prog="o2o")
    except ValueError as error:
        raise SystemExit(f"o2o: {error}") from None
    function = next(fn for cls, fn in COMMANDS.values() if isinstance(args, cls))
    compilation_cache.enable()
    try:
        with metric_sinks(args.log):
            function(args)
    except ERRORS as error:
        raise SystemExit(f"o2o: {error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
