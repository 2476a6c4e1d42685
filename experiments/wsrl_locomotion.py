"""WSRL on MuJoCo locomotion: warm-start fine-tuning next to data-retaining CQL, RLPD and SAC.

For every environment x dataset (o2o-collected ``<env>-<recipe>.hdf5`` files, D4RL recipes) and
every seed (all seeds of a method are one vmapped program) it runs:

- ``wsrl``: CQL pre-training (10 LayerNorm critics, max-target backup, alpha_cql 5; spec sections 2
  and 5: locomotion uses plain CQL), then WSRL fine-tuning: the whole pretrained agent restored, K
  warm-up steps of its stochastic policy into an empty buffer, then the non-conservative ensemble
  SAC at critic UTD 4 on online data only (offline data not retained).
- ``cql``: the same pretrained agent fine-tuned with its conservative loss kept (the reference's
  ``online_use_cql_loss``), every batch half offline data, half online (offline_data_ratio 0.5),
  UTD 1 as in the Cal-QL reference. Locomotion pre-trains plain CQL (no Monte-Carlo bound), so this
  is the CQL variant of "Cal-QL/CQL fine-tuning"; Cal-QL online needs returns of finished online
  episodes, which the online loop does not compute.
- ``rlpd``: the WSRL repository's RLPD (spec 6.2): no pretraining, the ``wsrl`` SAC (LayerNorm,
  10 critics, UTD 4) from scratch with batches half offline, half online (concatenated, online rows
  first); warm-up actions from the freshly initialised policy.
- ``sac``: the same online SAC from scratch without any data, uniform random warm-up.

Every method gets the same online budget (warm-up included) and is evaluated (deterministic
tanh(mean) actions, raw rewards) before the first online step and every ``eval_interval`` steps.

Scales (``--scale``):

- ``paper``: the spec's locomotion values: actor and critics 256x256, 10 critics (subset 2 with
  replacement), batch 256 per critic step, UTD 4, 250,000 offline steps with 10 + 10 + 10 sampled
  and 10 backup actions, K = 5,000 warm-up steps, 1,000,000 online steps (the maintainer's
  locomotion budget, zhouzypaul/wsrl#5), 20 evaluation episodes every 20,000 steps.
- ``cpu`` (Hopper-v5 medium x 4 methods x 3 seeds in about half an hour on two CPU cores, the
  dataset's collection included):
  actor and critics 128x128, 5 critics (subset 2 with replacement), batch 128 per offline critic
  step (online: the spec's 256, UTD 4, so 1,024 transitions per update), 48,000 offline steps with
  5 + 5 + 5 sampled and 5 backup actions, K = 2,000 warm-up steps, 7,000 online steps (5,000 after
  the warm-up), 5 evaluation episodes every 500 steps, and training rewards x 0.1 for every method
  (initial temperature and alpha_cql x 0.1 with them; reported returns are unscaled). Everything
  else (LayerNorm, learning rates, tau, discount, target entropy) is as in ``paper``. Why the
  reward scale: with 5x fewer offline steps at the reference learning rates the critic ends
  pre-training far below the return scale (unscaled: mean Q on dataset actions 67 after 8,000
  steps, 162 after 32,000, still rising) and catches up online, which is where the switch to
  online SAC dips; Adam moves a LayerNorm critic's output by a bounded amount per step, so at x 0.1
  the critic gets further in fewer steps. Why 48,000 offline steps: on Hopper-v5 medium the
  pretrained policy stays at 300-350 (behaviour policy: 541.7) up to 40,000 steps and reaches
  about 600 by 48,000 (mean over 3 seeds x 10 episodes: 8k 306, 16k 301, 24k 338, 32k 303,
  40k 362, 48k 603); from a 300 start WSRL has little to give that SAC from scratch does not
  learn within the budget. With the online batch of 256 and K = 2,000 (instead of 128 and 1,000)
  fine-tuning stays above 0.8 of the pretrained return (see the results README).

Outputs in ``--out-dir``: ``<name>.csv`` (one row per method x env x dataset x seed x evaluation
step), ``<name>_curves.csv`` (mean and std over seeds), ``<name>.md`` (table and acceptance checks)
and ``<name>.png`` (learning curves). Runs live under ``--run-dir``; a rerun continues unfinished
runs from their last checkpoint and reuses finished ones.

    python -m experiments.wsrl_locomotion --scale cpu --envs Hopper-v5 --datasets medium --seeds 0 1 2
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import inspect
import json
import math
import shutil
import textwrap
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import jax
import numpy as np
import tyro

from agents import wsrl
from agents.cql import CQL, CQLConfig, offline_buffer, transform_rewards
from agents.sac import SAC, SACConfig
from experiments import offline_to_online as o2o
from rl.checkpoint import Checkpointer
from rl.data import datasets
from rl.logging import read_metrics, write_json_atomic, write_result_record
from rl.loops import OfflineConfig, OnlineConfig, train_offline, train_online

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("wsrl", "cql", "rlpd", "sac")
METHOD_LABELS = {
    "wsrl": "WSRL (CQL pretrain, no offline data)",
    "cql": "CQL fine-tuning (offline data 50%)",
    "rlpd": "RLPD (WSRL-repo variant, no pretrain, 50/50)",
    "sac": "SAC from scratch",
}
PRETRAINED = ("wsrl", "cql")
"""Methods that start from the pretrained agent (their step-0 score is the offline score)."""
DIP_THRESHOLD = 0.8
"""Acceptance: WSRL's mean return after fine-tuning starts stays above this fraction of the pretrained policy's."""


@dataclasses.dataclass(frozen=True)
class Scale:
    """Network sizes and budgets of one comparison scale (see the module docstring)."""

    hidden: int
    """Width of both hidden layers of actor and critics."""
    num_critics: int
    """Critic ensemble size (the TD target takes the min over 2 drawn with replacement)."""
    batch_size: int
    """Transitions per critic step of pre-training (and online, unless ``online_batch_size`` is set)."""
    utd_ratio: int
    """Online critic steps per environment step (WSRL, RLPD, SAC)."""
    cql_online_utd_ratio: int
    """Online critic steps per environment step of the CQL fine-tuning baseline."""
    pretrain_steps: int
    """Offline CQL gradient steps."""
    num_sampled_actions: int
    """CQL actions per state of each kind (random, policy at s, policy at s')."""
    num_backup_actions: int
    """Next actions of CQL's max-target backup."""
    warmup_steps: int
    """K: online steps without updates at the start of every online run."""
    online_steps: int
    """Online environment steps per run, warm-up included."""
    eval_interval: int
    """Evaluate every this many online steps ("after warm-up" is the first evaluation at or after K)."""
    eval_episodes: int
    """Deterministic evaluation episodes per seed and evaluation."""
    checkpoint_interval: int
    """Online checkpoint interval (a rerun resumes from the last one)."""
    pretrain_temperature_lr: float | None = None
    """Adam learning rate of the temperature during pre-training (None: the spec's 1e-4)."""
    reward_scale: float = 1.0
    """Training reward multiplier (dataset and training env, every method); the initial temperature
    and alpha_cql are multiplied by it too, so the scaled problem weighs entropy and conservatism
    against reward as the unscaled one does. Reported returns are unscaled."""
    online_batch_size: int | None = None
    """Transitions per online critic step of every method (None: ``batch_size``)."""

    @property
    def online_batch(self) -> int:
        """Transitions per online critic step."""
        return self.batch_size if self.online_batch_size is None else self.online_batch_size


SEED_BATCHING = "loop"
"""Seeds' updates run one after another (``rl.update.over_seeds``): with these ensembles (5-10
critics, LayerNorm, UTD 4) batching seeds by vmap is slower on the CPU. Measured at the ``cpu``
scale, 3 seeds, 2-core CPU: WSRL's online update 1.55x, Cal-QL pre-training 1.47x (with
LayerNorm's chunked sums, ``rl.nets.layer_norm``, which made both faster: about 1.10x and 1.20x)."""

SCALES: dict[str, Scale] = {
    "paper": Scale(256, 10, 256, 4, 1, 250_000, 10, 10, 5_000, 1_000_000, 20_000, 20, 100_000),
    "cpu": Scale(128, 5, 128, 4, 1, 48_000, 5, 5, 2_000, 7_000, 500, 5, 2_000, reward_scale=0.1, online_batch_size=256),
}


@dataclasses.dataclass(frozen=True)
class Args:
    """Options of the WSRL locomotion comparison."""

    scale: Literal["paper", "cpu"] = "cpu"
    """Hyperparameter scale (see the module docstring for the exact values)."""
    envs: tuple[str, ...] = ("Hopper-v5", "HalfCheetah-v5")
    """Gymnasium ids."""
    datasets: tuple[str, ...] = ("medium", "medium-replay")
    """o2o collect recipes (files <env>-<recipe>.hdf5 in --data-dir)."""
    methods: tuple[Literal["wsrl", "cql", "rlpd", "sac"], ...] = METHODS
    """Methods to run."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds (one vmapped program per method)."""
    data_dir: Path = Path("data")
    """Where the datasets live; missing ones are collected there with the o2o collect recipes."""
    out_dir: Path = RESULTS
    """Where the CSV / markdown / PNG go."""
    run_dir: Path = Path("runs/wsrl_locomotion")
    """Where the individual runs (checkpoints, metrics) go."""
    name: str = "wsrl_locomotion"
    """File name stem of the outputs."""
    collect_behaviour_steps: int = 100_000
    """SAC steps behind the collected medium / medium-replay datasets (only when a file is missing)."""
    collect_steps: int = 100_000
    """Transitions per collected rolled-out dataset (only when a file is missing)."""
    progress: bool | None = None
    """Show progress bars (default: when stderr is a terminal)."""


# ----------------------------------------------------------------------------- configs


def method_configs(scale: Scale) -> tuple[CQLConfig, SACConfig, SACConfig]:
    """(CQL pre-training, online WSRL / scratch SAC, RLPD) configs of ``scale``: the ``wsrl``
    locomotion presets with the scale's widths, ensemble size and batch."""
    shape = dict(
        actor_hidden_dims=(scale.hidden, scale.hidden),
        critic_hidden_dims=(scale.hidden, scale.hidden),
        num_critics=scale.num_critics,
        batch_size=scale.batch_size,
        init_temperature=1.0 * scale.reward_scale,
    )
    online_shape = {**shape, "batch_size": scale.online_batch}
    online = wsrl.wsrl_config("locomotion", utd_ratio=scale.utd_ratio, **online_shape)
    pretrain = wsrl.pretrain_config(
        "locomotion",
        sac=wsrl.wsrl_config(
            "locomotion", utd_ratio=1, **shape,
            **({} if scale.pretrain_temperature_lr is None else {"temperature_lr": scale.pretrain_temperature_lr}),
        ),
        num_sampled_actions=scale.num_sampled_actions,
        num_backup_actions=scale.num_backup_actions,
    )
    pretrain = dataclasses.replace(pretrain, cql_alpha=pretrain.cql_alpha * scale.reward_scale)
    rlpd = wsrl.rlpd_wsrl_config("locomotion", utd_ratio=scale.utd_ratio, **online_shape)
    return pretrain, online, rlpd


def online_schedule(scale: Scale, samples_per_update: int, offline_data_ratio: float, warmup_actions: str) -> OnlineConfig:
    """The WSRL online schedule at ``scale`` (first update at j = max(K, samples x (1 - ratio)) + 1),
    evaluating at the start and every ``eval_interval`` steps."""
    schedule = wsrl.wsrl_schedule(
        total_steps=scale.online_steps,
        warmup_steps=scale.warmup_steps,
        samples_per_update=samples_per_update,
        offline_data_ratio=offline_data_ratio,
        eval_interval=scale.eval_interval,
        eval_episodes=scale.eval_episodes,
        log_interval=scale.eval_interval,
        checkpoint_interval=scale.checkpoint_interval,
    )
    return dataclasses.replace(
        schedule, warmup_actions=warmup_actions, buffer_capacity=max(scale.online_steps, 1), seed_batching=SEED_BATCHING
    )


# ----------------------------------------------------------------------------- runs


def _checkpoint_step(run_dir: Path) -> int | None:
    if not (run_dir / "checkpoints").exists():
        return None
    checkpointer = Checkpointer(run_dir / "checkpoints")
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def _run_state(run_dir: Path, total_steps: int) -> Literal["done", "resume", "fresh"]:
    """Whether ``run_dir`` holds a finished run, one to resume, or nothing usable (then it is cleared)."""
    step = _checkpoint_step(run_dir)
    if step is not None and step >= total_steps:
        return "done"
    if step is not None:
        return "resume"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return "fresh"


def _eval_rows(run_dir: Path, reward_scale: float = 1.0) -> list[dict[str, Any]]:
    """The evaluation rows of a run, with returns in unscaled rewards (runs evaluate on their
    training env, whose rewards are multiplied by ``reward_scale``)."""
    rows = [row for row in read_metrics(run_dir) if row.get("phase") == "eval"]
    unscaled = ("eval_return", "eval_return_std")
    return [{**row, **{key: row[key] / reward_scale for key in unscaled if row.get(key) is not None}} for row in rows]


def _training_env(env_id: str, scale: Scale):
    """(make_env, spaces) of the training env, its rewards multiplied by ``scale.reward_scale``."""
    make_env, spaces = o2o._make_env_checked(env_id)
    if scale.reward_scale != 1.0:
        make_env = o2o._rewarded(make_env, scale.reward_scale, 0.0)
    return make_env, spaces


def _timed(run_dir: Path, started: float) -> float:
    """Wall-clock seconds of a stage: this process's share plus what earlier processes recorded in
    ``run_dir/wall_clock.json`` (a reused finished stage keeps the time it took when it ran)."""
    path = run_dir / "wall_clock.json"
    before = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
    total = before + time.perf_counter() - started
    if run_dir.exists():
        write_json_atomic(path, {"seconds": total})
    return total


def ensure_dataset(env_id: str, recipe: str, args: Args) -> Path:
    """``<data-dir>/<env>-<recipe>.hdf5``, collected with the o2o recipes if absent."""
    path = args.data_dir / f"{o2o._dataset_name(env_id)}-{recipe}.hdf5"
    if not path.is_file():
        print(f"{path} is missing: collecting it (SAC behaviour run of {args.collect_behaviour_steps} steps)")
        o2o.collect(
            o2o.CollectArgs(
                env=env_id, out_dir=args.data_dir, recipes=(recipe,), steps=args.collect_steps,
                behaviour_steps=args.collect_behaviour_steps, progress=args.progress,
            )
        )
    return path


def pretrain_cql(
    config: CQLConfig, dataset: datasets.OfflineDataset, env_id: str, scale: Scale, seeds: Sequence[int], run_dir: Path,
    score_fn=None, progress: bool | None = None,
) -> Path:
    """CQL pre-training of every seed (one vmapped program); reuses / resumes a run in ``run_dir``."""
    state = _run_state(run_dir, scale.pretrain_steps)
    if state == "done":
        return run_dir
    make_env, (observation_space, action_space) = _training_env(env_id, scale)
    keys = np.stack([jax.random.fold_in(jax.random.PRNGKey(int(seed)), 0) for seed in seeds])
    agent = jax.vmap(lambda key: CQL.create(key, observation_space, action_space, config))(keys)
    source = offline_buffer(dataset, config.sac.discount, with_mc_returns=config.calql)
    schedule = OfflineConfig(
        num_steps=scale.pretrain_steps,
        updates_per_call=min(1_000, scale.pretrain_steps),
        eval_interval=scale.pretrain_steps,
        eval_episodes=scale.eval_episodes,
        log_interval=min(5_000, scale.pretrain_steps),
        checkpoint_interval=min(25_000, scale.pretrain_steps),
        seed_batching=SEED_BATCHING,
    )
    train_offline(
        agent, source, schedule, seeds, run_dir, make_env=make_env, run_config={"cql": config, "offline": schedule},
        resume=state == "resume", progress=progress, score_fn=score_fn,
    )
    return run_dir


def restore_pretrained_agent(run_dir: Path, env_id: str, config: CQLConfig, num_seeds: int) -> CQL:
    """A fresh copy of the seed-stacked pretrained agent (every online run donates its own)."""
    _, (observation_space, action_space) = o2o._make_env_checked(env_id)
    template = wsrl.create_pretrained_template(observation_space, action_space, config, num_seeds)
    agent, _ = wsrl.restore_pretrained(run_dir / "checkpoints", template)
    return agent


def _no_fresh_agent(key: jax.Array) -> Any:
    raise RuntimeError("this run starts from the pretrained agent")


def run_method(
    method: str, env_id: str, dataset: datasets.OfflineDataset, scale: Scale, seeds: Sequence[int], run_dir: Path,
    pretrain_dir: Path | None, score_fn=None, progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume, or reuse) one method's online phase for all seeds; returns its evaluation rows."""
    pretrain_config, online_config, rlpd_config = method_configs(scale)
    state = _run_state(run_dir, scale.online_steps)
    if state != "done":
        make_env, (observation_space, action_space) = _training_env(env_id, scale)
        common = dict(resume=state == "resume", progress=progress, score_fn=score_fn)
        if method == "wsrl":
            pretrained = restore_pretrained_agent(pretrain_dir, env_id, pretrain_config, len(seeds))
            schedule = online_schedule(scale, online_config.utd_ratio * online_config.batch_size, 0.0, "policy")
            wsrl.run_wsrl(pretrained, online_config, make_env, schedule, seeds, run_dir,
                          run_config={"method": method, "sac": online_config, "online": schedule}, **common)
        elif method == "cql":
            cql_config = dataclasses.replace(
                pretrain_config,
                sac=dataclasses.replace(pretrain_config.sac, utd_ratio=scale.cql_online_utd_ratio, batch_size=scale.online_batch),
            )
            pretrained = restore_pretrained_agent(pretrain_dir, env_id, pretrain_config, len(seeds))
            pretrained = pretrained.replace(config=cql_config, sac=pretrained.sac.replace(config=cql_config.sac))
            schedule = online_schedule(scale, cql_config.sac.utd_ratio * cql_config.sac.batch_size, 0.5, "policy")
            train_online(
                _no_fresh_agent, make_env, schedule, seeds, run_dir, initial_agent=pretrained,
                offline_source=offline_buffer(dataset, cql_config.sac.discount, with_mc_returns=False), offline_ratio=0.5,
                run_config={"method": method, "cql": cql_config, "online": schedule}, **common,
            )
        elif method == "rlpd":
            schedule = online_schedule(scale, rlpd_config.utd_ratio * rlpd_config.batch_size, 0.5, "policy")
            wsrl.run_rlpd(
                observation_space, action_space, rlpd_config, make_env, schedule, seeds, run_dir,
                offline_source=offline_buffer(dataset, rlpd_config.discount, with_mc_returns=False),
                interleave=False, offline_data_ratio=0.5,
                run_config={"method": method, "sac": rlpd_config, "online": schedule}, **common,
            )
        elif method == "sac":
            schedule = online_schedule(scale, online_config.utd_ratio * online_config.batch_size, 0.0, "random")
            train_online(
                lambda key: SAC.create(key, observation_space, action_space, online_config), make_env, schedule, seeds,
                run_dir, run_config={"method": method, "sac": online_config, "online": schedule}, **common,
            )
        else:
            raise ValueError(f"unknown method '{method}'; choose from {list(METHODS)}")
    return _eval_rows(run_dir, scale.reward_scale)


# ----------------------------------------------------------------------------- summaries


def score_function(dataset: datasets.OfflineDataset, env_id: str, return_scale: float = 1.0):
    """Normalised score by the D4RL reference returns of the env family (spec 7.3), else by the
    dataset's recorded random / expert returns; returns (function or None, (min, max), source).
    ``return_scale`` undoes the reward scale of the training env the scored returns come from."""
    table = datasets.reference_scores(env_id)
    recorded = datasets.dataset_reference_scores(dataset)
    if table is not None:
        reference, source = table, "D4RL reference"
    elif recorded is not None and all(math.isfinite(value) for value in recorded) and recorded[0] != recorded[1]:
        reference, source = recorded, "dataset random / expert"
    else:
        return None, None, "none"
    return (lambda returns: datasets.normalised_score(np.asarray(returns) / return_scale, *reference)), reference, source


def summarise(rows: list[dict[str, Any]], warmup_steps: int) -> dict[str, dict[str, float]]:
    """Per (method, env, dataset): mean-over-seeds returns at the start, after warm-up and at the
    end; the lowest mean after the start and its ratio to the start; the final std over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["env"], row["dataset"]), []).append(row)
    summary = {}
    for key, group in groups.items():
        steps = sorted({row["step"] for row in group})
        mean_at = {step: float(np.mean([r["eval_return"] for r in group if r["step"] == step])) for step in steps}
        finals = [r["eval_return"] for r in group if r["step"] == steps[-1]]
        after = [mean_at[step] for step in steps if step > 0]
        warm = min((step for step in steps if step >= warmup_steps), default=steps[-1])
        start = mean_at[steps[0]]
        lowest = min(after) if after else float("nan")
        summary[key] = {
            "start": start,
            "after_warmup": mean_at[warm],
            "warmup_step": warm,
            "final": mean_at[steps[-1]],
            "final_std": float(np.std(finals)),
            "final_step": steps[-1],
            "min_after_start": lowest,
            # A fraction of a non-positive return is no bound (Pendulum's returns are all negative).
            "min_ratio": lowest / start if start > 0 else float("nan"),
            "seeds": len(finals),
        }
    return summary


def write_rows_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """The per-seed evaluation rows as CSV."""
    fields = ["method", "env", "dataset", "seed", "step", "eval_return", "eval_return_std", "normalised_score"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["env"], r["dataset"], r["method"], r["seed"], r["step"])))


def write_curves_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Mean and std over seeds of every evaluation."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault((row["env"], row["dataset"], row["method"], row["step"]), []).append(row["eval_return"])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["env", "dataset", "method", "step", "seeds", "mean_return", "std_return"])
        for key in sorted(groups):
            values = groups[key]
            writer.writerow([*key, len(values), f"{np.mean(values):.3f}", f"{np.std(values):.3f}"])


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """One panel per env x dataset: mean +- std over seeds of each method's evaluation return."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(row["env"], row["dataset"]) for row in rows})
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for axis, (env_id, recipe) in zip(axes[0], panels):
        for method in METHODS:
            group = [r for r in rows if (r["env"], r["dataset"], r["method"]) == (env_id, recipe, method)]
            if not group:
                continue
            steps = np.array(sorted({r["step"] for r in group}))
            values = [[r["eval_return"] for r in group if r["step"] == step] for step in steps]
            mean, std = np.array([np.mean(v) for v in values]), np.array([np.std(v) for v in values])
            line, = axis.plot(steps, mean, label=METHOD_LABELS[method])
            axis.fill_between(steps, mean - std, mean + std, alpha=0.2, color=line.get_color())
        axis.set_title(f"{env_id} {recipe}")
        axis.set_xlabel("online environment steps")
        axis.set_ylabel("evaluation return")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def acceptance_lines(summary: dict[tuple, dict[str, float]]) -> list[str]:
    """The issue's two acceptance checks per env x dataset, with the margins."""
    lines = []
    for env_id, recipe in sorted({(env_id, recipe) for _, env_id, recipe in summary}):
        ws = summary.get(("wsrl", env_id, recipe))
        sac = summary.get(("sac", env_id, recipe))
        if ws is None:
            continue
        if sac is not None:
            verdict = "PASS" if ws["final"] > sac["final"] else "MISS"
            lines.append(
                f"- {env_id} {recipe}: WSRL final {ws['final']:.1f} vs SAC from scratch {sac['final']:.1f} "
                f"(difference {ws['final'] - sac['final']:+.1f}): {verdict}"
            )
        lowest = f"- {env_id} {recipe}: WSRL lowest mean return after the start {ws['min_after_start']:.1f}"
        if math.isnan(ws["min_ratio"]):
            lines.append(f"{lowest}; the pretrained policy's {ws['start']:.1f} is not positive, so a fraction of it "
                         f"(threshold {DIP_THRESHOLD}) is no bound: N/A")
            continue
        verdict = "PASS" if ws["min_ratio"] >= DIP_THRESHOLD else "MISS"
        lines.append(
            f"{lowest} = {ws['min_ratio']:.2f} x the pretrained policy's {ws['start']:.1f} "
            f"(threshold {DIP_THRESHOLD}): {verdict}"
        )
    return lines


def markdown_report(
    summary: dict[tuple, dict[str, float]], scale_name: str, scale: Scale, scores: dict[str, Any], timings: dict[str, float]
) -> list[str]:
    """The markdown table (returns and normalised scores), settings, timings and acceptance checks."""

    def normalised(env_id: str, value: float) -> str:
        ref = scores.get(env_id)
        return "-" if ref is None or ref[0] is None else f"{100 * float(datasets.normalised_score(value, *ref[0])):.1f}"

    lines = [
        f"# WSRL on locomotion, scale `{scale_name}`",
        "",
        "Mean over seeds of the deterministic evaluation return (raw rewards); step 0 is before the first online step "
        "(for WSRL and CQL the pretrained policy, for RLPD and SAC the fresh initialisation).",
        "",
        "| env | dataset | method | seeds | start (step 0) | after warm-up | final (mean ± std) | final normalised ×100 "
        "| min after start | min / start | wall-clock s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, env_id, recipe), s in sorted(summary.items(), key=lambda item: (item[0][1], item[0][2], METHODS.index(item[0][0]))):
        # A fresh or non-positive start is no reference.
        ratio = f"{s['min_ratio']:.2f}" if method in PRETRAINED and not math.isnan(s["min_ratio"]) else "-"
        lines.append(
            f"| {env_id} | {recipe} | {METHOD_LABELS[method]} | {s['seeds']} | {s['start']:.1f} | "
            f"{s['after_warmup']:.1f} (step {s['warmup_step']}) | {s['final']:.1f} ± {s['final_std']:.1f} (step {s['final_step']}) | "
            f"{normalised(env_id, s['final'])} | {s['min_after_start']:.1f} | {ratio} | "
            f"{timings.get(f'{method}/{env_id}/{recipe}', float('nan')):.0f} |"
        )
    lines += ["", "Normalised scores: " + "; ".join(f"{env_id}: {ref[1]} {ref[0]}" for env_id, ref in scores.items())]
    pretrain_times = {k: v for k, v in timings.items() if k.startswith("pretrain/")}
    if pretrain_times:
        lines.append("CQL pre-training wall-clock (shared by WSRL and CQL): " + ", ".join(f"{k[9:]} {v:.0f} s" for k, v in pretrain_times.items()))
    lines += ["", "## Acceptance", "", *acceptance_lines(summary), "", f"## Settings (`--scale {scale_name}`)", ""]
    lines += [f"- {field.name} = {getattr(scale, field.name)}: {field_doc}" for field, field_doc in zip(dataclasses.fields(scale), _field_docs())]
    return lines


def _field_docs() -> list[str]:
    """Each ``Scale`` field's attribute docstring on one line, in field order, read from the class's
    source so the report cannot drift from the class. Hand-written with ``ast`` because tyro, which
    reads the same docstrings for ``--help``, keeps its reader private."""
    body = ast.parse(textwrap.dedent(inspect.getsource(Scale))).body[0].body
    docs = {
        node.target.id: " ".join(following.value.value.split())
        for node, following in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
    }
    return [docs[field.name] for field in dataclasses.fields(Scale)]


# ----------------------------------------------------------------------------- main


def run(args: Args, scale: Scale | None = None) -> dict[tuple, dict[str, float]]:
    """Run the comparison (``scale`` overrides ``args.scale``, e.g. for tests); writes the outputs
    and returns the summary by (method, env, dataset)."""
    scale = scale or SCALES[args.scale]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    seeds = [int(seed) for seed in args.seeds]
    pretrain_config, _, _ = method_configs(scale)
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    timings: dict[str, float] = {}
    scores: dict[str, Any] = {}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for env_id in args.envs:
        for recipe in args.datasets:
            dataset, _ = o2o.load_checked_dataset(ensure_dataset(env_id, recipe, args), env_id)
            score_fn, reference, source = score_function(dataset, env_id, scale.reward_scale)
            scores[env_id] = (reference, source)
            training_data = transform_rewards(dataset, scale.reward_scale, 0.0)
            root = args.run_dir / args.scale / f"{o2o._dataset_name(env_id)}-{recipe}"
            pretrain_dir = None
            if {"wsrl", "cql"} & set(args.methods):
                start = time.perf_counter()
                print(f"[{env_id} {recipe}] CQL pre-training, {scale.pretrain_steps} steps, seeds {seeds}", flush=True)
                pretrain_dir = pretrain_cql(pretrain_config, training_data, env_id, scale, seeds, root / "pretrain", score_fn, args.progress)
                timings[f"pretrain/{env_id}/{recipe}"] = _timed(root / "pretrain", start)
            for method in args.methods:
                start = time.perf_counter()
                print(f"[{env_id} {recipe}] {METHOD_LABELS[method]}, {scale.online_steps} online steps", flush=True)
                method_rows = run_method(method, env_id, training_data, scale, seeds, root / method, pretrain_dir, score_fn, args.progress)
                timings[f"{method}/{env_id}/{recipe}"] = _timed(root / method, start)
                rows += [{**row, "method": method, "env": env_id, "dataset": recipe} for row in method_rows]
                final = [r["eval_return"] for r in method_rows if r["step"] == scale.online_steps]
                print(f"    final return per seed: {', '.join(f'{v:.1f}' for v in final)} "
                      f"({timings[f'{method}/{env_id}/{recipe}']:.0f} s)", flush=True)
                # Outputs after every method, so a long comparison shows what is finished so far.
                lines = write_outputs(rows, args, scale, scores, timings, seeds)
    print("\n".join(lines))
    return summarise(rows, scale.warmup_steps)


def write_outputs(
    rows: list[dict[str, Any]], args: Args, scale: Scale, scores: dict[str, Any], timings: dict[str, float], seeds: list[int]
) -> list[str]:
    """Write the rows CSV, curves CSV, PNG and markdown of ``rows``; returns the markdown lines."""
    write_rows_csv(rows, args.out_dir / f"{args.name}.csv")
    write_curves_csv(rows, args.out_dir / f"{args.name}_curves.csv")
    plot_curves(rows, args.out_dir / f"{args.name}.png", f"WSRL vs baselines, scale '{args.scale}', seeds {seeds}")
    lines = markdown_report(summarise(rows, scale.warmup_steps), args.scale, scale, scores, timings)
    (args.out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    write_result_record(args.out_dir / f"{args.name}_run.json", args)
    return lines


def main() -> None:
    """Command-line entry point."""
    run(tyro.cli(Args))


if __name__ == "__main__":
    main()
