"""WSRL on orbit correction: pretrain on logged corrections of a noisy SVD expert, then fine-tune.

The logged data mimics what an accelerator control room has: corrections made by the operators'
SVD least-squares tool (``envs.beam.svd_expert_action``, gain 0.7) with Gaussian noise on every
kick (``--noise-std``, a fraction of the kick range) and, with probability ``--epsilon``, a random
kick instead. The dataset is written in the D4RL HDF5 layout with the environment id, then the
offline-to-online pipeline of ``o2o run`` runs on it: Cal-QL pre-training, WSRL fine-tuning (the
frozen pretrained policy fills an empty buffer for ``--warmup-steps``, then online SAC without the
offline data), and SAC from scratch with the same online budget as the baseline. Seeds are a
vmapped axis.

CPU settings (documented here because they differ from the locomotion recipe of spec ``wsrl.md``):
2 critics with LayerNorm instead of 10, ``--hidden`` x ``--hidden`` networks (128; the recipe's
256), Cal-QL with 4 sampled actions of each kind for the conservative term (as the quickstart)
and 1 backup action (the plain backup, no maximum over next actions) instead of 10 and 10: with
the recipe's numbers and 256-wide networks pre-training runs at about 7 updates/s for 3 seeds on a
2-core CPU, with these at about 43. UTD 1 during pre-training and ``--utd-ratio`` online,
``--offline-steps`` pre-training steps; everything else is the recipe.

    python -m experiments.orbit_wsrl                       # the committed results
    python -m experiments.orbit_wsrl --dataset-steps 2000 --offline-steps 500 --online-steps 600 \\
        --warmup-steps 200 --eval-interval 200 --seeds 0 --name orbit_wsrl_smoke   # smoke

Outputs in ``--out-dir``: ``<name>.csv`` (evaluation returns: method x seed x step), ``<name>.md``
and ``<name>.png``.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from agents.cql import CQLConfig
from agents.wsrl import wsrl_config
from envs.beam import expert_pseudo_inverse, svd_expert_action
from envs.registry import make
from experiments.offline_to_online import STAGE_SECONDS, FinetuneSettings, PretrainSettings, RunArgs, run
from experiments.orbit_tbsac import ENV_ID, EXPERT_GAIN, write_csv
from rl.data import collect as collect_lib
from rl.data import datasets
from rl.logging import plot_runs, read_metrics, write_result_record

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Args:
    """Options of the orbit-correction offline-to-online benchmark."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """Training seeds (vmapped)."""
    dataset_steps: int = 20_000
    """Logged transitions of the noisy SVD expert."""
    noise_std: float = 0.5
    """Gaussian noise on every logged kick, as a fraction of the kick half-range."""
    epsilon: float = 0.1
    """Probability of a uniformly random kick instead of the expert's."""
    offline_steps: int = 20_000
    """Cal-QL pre-training gradient steps."""
    hidden: int = 128
    """Width of the two hidden layers of actor and critics."""
    num_sampled_actions: int = 4
    """Cal-QL: actions per state of each kind (random, policy at s, policy at s') in the conservative term."""
    num_backup_actions: int = 1
    """Cal-QL: next actions whose maximum target forms the backup (1: the plain backup)."""
    online_steps: int = 10_000
    """Online environment steps (warm-up included), the same for WSRL and SAC from scratch."""
    warmup_steps: int = 1_000
    """WSRL warm-up: steps of the frozen pretrained policy into the empty online buffer."""
    utd_ratio: int = 2
    """Critic updates per online environment step."""
    eval_interval: int = 1_000
    """Online evaluation interval (env steps)."""
    eval_episodes: int = 10
    """Deterministic evaluation episodes per seed."""
    out_dir: Path = RESULTS
    """Where the CSV / markdown / PNG go."""
    name: str = "orbit_wsrl"
    """File name stem of the outputs."""
    run_dir: Path | None = None
    """Where the dataset and the runs go (a temporary directory if not given)."""
    env_loop: Literal["device", "host"] = "device"
    """Where the online envs step (fine-tuning and the baseline): on the device, a stretch of steps
    per compiled call of the env's functional core, or one step at a time through its gymnasium face."""


STAGE_ORDER = ("collection", "pre-training", "fine-tuning", "SAC from scratch")
"""The pipeline's stages in the order they run (names as ``o2o run`` records them)."""


def noisy_expert_policy(noise_std: float, epsilon: float) -> collect_lib.Policy:
    """The SVD expert (nominal response matrix, gain 0.7) with kick noise and random kicks."""
    pseudo_inverse = expert_pseudo_inverse()
    expert = jax.jit(lambda observations: svd_expert_action(observations, pseudo_inverse, EXPERT_GAIN))
    policy = lambda observations, key: np.asarray(expert(jnp.asarray(observations, jnp.float32)))
    return collect_lib.noisy_policy(policy, make(ENV_ID).action_space, noise_std=noise_std, epsilon=epsilon)


def write_dataset(args: Args, path: Path) -> tuple[Path, float]:
    """Collect the logged corrections into ``path``; returns (path, behaviour mean return)."""
    metadata = {"env_id": ENV_ID, "behaviour": f"svd_expert(noise_std={args.noise_std}, epsilon={args.epsilon})"}
    rolled = collect_lib.rollout(lambda: make(ENV_ID), noisy_expert_policy(args.noise_std, args.epsilon), args.dataset_steps, seed=0, metadata=metadata)
    dataset = dataclasses.replace(rolled.dataset, metadata={**rolled.dataset.metadata, "behaviour_return": rolled.mean_return})
    datasets.write_d4rl_hdf5(path, dataset)
    return path, rolled.mean_return


def run_args(args: Args, dataset: Path, root: Path) -> RunArgs:
    """The ``o2o run`` settings of this benchmark (see the module docstring)."""
    sac = wsrl_config(
        "locomotion", num_critics=2, critic_subset_size=2, subset_with_replacement=False, utd_ratio=1,
        actor_hidden_dims=(args.hidden, args.hidden), critic_hidden_dims=(args.hidden, args.hidden),
    )
    return RunArgs(
        dataset=dataset,
        env=ENV_ID,
        seed=args.seeds[0],
        num_seeds=len(args.seeds),
        run_dir=root,
        scratch_baseline=True,
        overwrite=True,
        progress=False,
        pretrain=PretrainSettings(
            steps=args.offline_steps,
            cql=CQLConfig(
                sac=sac, calql=True, num_sampled_actions=args.num_sampled_actions, num_backup_actions=args.num_backup_actions,
            ),
            eval_interval=args.offline_steps,
            eval_episodes=args.eval_episodes, log_interval=max(args.offline_steps // 10, 1),
            updates_per_call=max(min(1_000, args.offline_steps), 1),
        ),
        finetune=FinetuneSettings(
            steps=args.online_steps, warmup_steps=args.warmup_steps, utd_ratio=args.utd_ratio,
            eval_interval=args.eval_interval, eval_episodes=args.eval_episodes, log_interval=args.eval_interval,
            env_loop=args.env_loop,
        ),
    )


def evaluation_rows(method: str, run_dir: Path) -> list[dict]:
    """Evaluation rows of a run as ``method, seed, step, eval_return``."""
    return [
        {"method": method, "seed": row["seed"], "step": row["step"], "eval_return": row["eval_return"]}
        for row in read_metrics(run_dir)
        if row.get("phase") == "eval"
    ]


def mean_at(rows: list[dict], method: str, step: int) -> float:
    """Mean over seeds of ``method``'s evaluation return at ``step``."""
    values = [r["eval_return"] for r in rows if r["method"] == method and r["step"] == step]
    return float(np.mean(values)) if values else float("nan")


def markdown(args: Args, rows: list[dict], behaviour_return: float, wall: float, stages: dict[str, float]) -> str:
    """Table (means over seeds) and the run settings."""
    online_steps = sorted({r["step"] for r in rows if r["method"] == "wsrl"})
    after_start = [mean_at(rows, "wsrl", step) for step in online_steps if step > 0]
    offline = mean_at(rows, "wsrl", 0)
    warm = min((s for s in online_steps if s >= args.warmup_steps), default=args.warmup_steps)
    per_seed = lambda method: ", ".join(f"{r['eval_return']:.1f}" for r in rows if r["method"] == method and r["step"] == args.online_steps)
    lines = [
        f"# WSRL on orbit correction from a noisy SVD expert ({ENV_ID})",
        "",
        f"Logged data: {args.dataset_steps} transitions of the SVD expert (gain {EXPERT_GAIN}) with kick noise "
        f"{args.noise_std} and random kicks with probability {args.epsilon}; behaviour mean return {behaviour_return:.1f}. "
        f"Networks {args.hidden} x {args.hidden}, 2 LayerNorm critics; Cal-QL pre-training {args.offline_steps} steps "
        f"({args.num_sampled_actions} sampled actions of each kind, {args.num_backup_actions} backup action(s)), then {args.online_steps} online steps (warm-up {args.warmup_steps}, "
        f"UTD {args.utd_ratio}); seeds {list(args.seeds)}; {args.eval_episodes} evaluation episodes per seed. "
        "Evaluation return (mean over seeds; about 190 means every episode corrected in a few steps).",
        "",
        "| pretrained (step 0) | WSRL after warm-up | WSRL final | min WSRL after start / pretrained | SAC from scratch final |",
        "|---|---|---|---|---|",
        f"| {offline:.1f} | {mean_at(rows, 'wsrl', warm):.1f} | {mean_at(rows, 'wsrl', args.online_steps):.1f} | "
        f"{min(after_start) / offline if after_start and offline > 0 else float('nan'):.2f} | "
        f"{mean_at(rows, 'sac_scratch', args.online_steps):.1f} |",
        "",
        f"Per seed, final: WSRL {per_seed('wsrl')}; SAC from scratch {per_seed('sac_scratch')}.",
        "",
        f"Wall-clock of the whole pipeline (collection, pre-training, fine-tuning, baseline): {wall:.0f} s"
        + (" (" + ", ".join(f"{name} {stages[name]:.0f} s" for name in STAGE_ORDER if name in stages) + ")" if stages else "")
        + f"; online envs stepped on the {args.env_loop}.",
    ]
    return "\n".join(lines) + "\n"


def main(args: Args) -> list[dict]:
    """Collect, run the pipeline, write the outputs; returns the evaluation rows."""
    if not args.seeds:
        raise SystemExit("--seeds needs at least one seed")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.run_dir if args.run_dir is not None else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        dataset, behaviour_return = write_dataset(args, root / "orbit-noisy-svd.hdf5")
        print(f"logged {args.dataset_steps} transitions, behaviour return {behaviour_return:.1f}", flush=True)
        collection = time.perf_counter() - start
        runs = run(run_args(args, dataset, root / "o2o"))
        stages = {"collection": collection, **json.loads((runs / STAGE_SECONDS).read_text())}
        rows = evaluation_rows("wsrl", runs / "wsrl") + evaluation_rows("sac_scratch", runs / "sac_scratch")
        plot_runs([runs / "wsrl", runs / "sac_scratch"], args.out_dir / f"{args.name}.png", metric="eval_return",
                  title=f"{ENV_ID}: WSRL from a noisy SVD expert vs SAC from scratch")
    wall = time.perf_counter() - start
    write_csv(args.out_dir / f"{args.name}.csv", rows)
    report = markdown(args, rows, behaviour_return, wall, stages)
    (args.out_dir / f"{args.name}.md").write_text(report)
    write_result_record(args.out_dir / f"{args.name}_run.json", args)
    print(report)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
