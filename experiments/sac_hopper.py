"""SAC on Hopper-v5 for 100k steps: o2o next to SBX, same settings and seeds, same script.

Settings shared by both: 2 critics, 256x256 MLPs, batch 256, Adam 3e-4, tau 0.005, gamma 0.99,
auto temperature with target entropy -|A|, 5,000 uniform-random warm-up steps, one gradient step
per environment step. Every 5,000 steps each seed runs 10 deterministic evaluation episodes whose
reset seeds are the same for both libraries; wall-clock includes evaluation for both. o2o trains all seeds as one vmapped program; SBX
runs one seed after another. Each library's rows are saved to ``<name>_<library>.json`` as soon
as it finishes, so the libraries can run as separate jobs (``--libraries sbx``); the table, CSVs
and PNG are then built from every library saved so far. Output: curves CSV, summary CSV, a
markdown table and a PNG.

    python -m experiments.sac_hopper --steps 100000 --seeds 0 1 2
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

from agents.sac import SAC, SACConfig
from envs.registry import env_factory
from rl.evaluation import episode_seed, run_episodes, summarise
from rl.logging import result_record
from rl.loops import EVAL_STREAM, OnlineConfig, train_online

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Args:
    """Options of the Hopper SAC comparison."""

    env: str = "Hopper-v5"
    """Gymnasium id."""
    steps: int = 100_000
    """Environment steps per seed."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds (the same for both libraries)."""
    warmup_steps: int = 5_000
    """Uniform-random steps before learning starts."""
    eval_interval: int = 5_000
    """Evaluate every this many steps."""
    eval_episodes: int = 10
    """Deterministic evaluation episodes per seed."""
    libraries: tuple[Literal["o2o", "sbx"], ...] = ("o2o", "sbx")
    """Which libraries to run now (the outputs include every library saved before too)."""
    out_dir: Path = RESULTS
    """Where the CSV / markdown / PNG go."""
    name: str = "sac_hopper"
    """File name stem of the outputs."""


def run_o2o(args: Args, run_root: Path) -> tuple[list[dict], float]:
    """All seeds as one vmapped o2o run; returns evaluation rows and wall-clock seconds."""
    make_env = env_factory(args.env, rescale_actions=True)
    probe = make_env()
    config = SACConfig()
    online = OnlineConfig(
        total_steps=args.steps,
        warmup_steps=args.warmup_steps,
        eval_interval=args.eval_interval,
        eval_episodes=args.eval_episodes,
        log_interval=args.eval_interval,
    )
    start = time.perf_counter()
    _, evaluations = train_online(
        create_agent=lambda key: SAC.create(key, probe.observation_space, probe.action_space, config),
        make_env=make_env,
        config=online,
        seeds=list(args.seeds),
        run_dir=run_root / "o2o",
        run_config={"benchmark": dataclasses.asdict(args), "sac": config, "online": online},
        progress=False,
    )
    wall = time.perf_counter() - start
    return [{"library": "o2o", "seed": r["seed"], "step": r["step"], "eval_return": r["eval_return"]} for r in evaluations], wall


def run_sbx(args: Args, seed: int) -> tuple[list[dict], float]:
    """One SBX SAC seed with the same schedule and evaluation episodes; rows and wall-clock."""
    import gymnasium as gym
    from sbx import SAC as SBXSAC
    from stable_baselines3.common.logger import Logger

    env = gym.make(args.env)
    model = SBXSAC(
        "MlpPolicy",
        env,
        learning_rate=3e-4,
        buffer_size=min(1_000_000, args.steps),
        learning_starts=args.warmup_steps,
        batch_size=256,
        tau=0.005,
        gamma=0.99,
        train_freq=1,
        gradient_steps=1,
        ent_coef="auto",
        policy_kwargs={"net_arch": [256, 256], "n_critics": 2},
        seed=seed,
        verbose=0,
    )
    # Without a logger of its own every learn() call makes an empty SB3-<time> directory in the
    # system's temporary directory (SB3's default logger); this one records nowhere.
    model.set_logger(Logger(folder=None, output_formats=[]))
    eval_envs = [[gym.make(args.env) for _ in range(args.eval_episodes)]]
    rows, steps_done, eval_round = [], 0, 0
    start = time.perf_counter()
    while steps_done < args.steps:
        chunk = min(args.eval_interval, args.steps - steps_done)
        model.learn(total_timesteps=chunk, reset_num_timesteps=steps_done == 0, progress_bar=False)
        steps_done += chunk
        reset_seeds = [[episode_seed(seed, EVAL_STREAM, eval_round * args.eval_episodes + j) for j in range(args.eval_episodes)]]
        returns = run_episodes(lambda obs: model.predict(obs[0], deterministic=True)[0][None], eval_envs, reset_seeds)
        eval_round += 1
        rows.append({"library": "sbx", "seed": seed, "step": steps_done, "eval_return": float(returns.mean())})
    return rows, time.perf_counter() - start


def write_outputs(args: Args, rows: list[dict], walls: dict[str, float]) -> None:
    """Curves CSV, summary CSV + markdown, and the PNG."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (args.out_dir / f"{args.name}_curves.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["library", "seed", "step", "eval_return"])
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| library | seeds | final eval return (mean ± std) | 95% CI | per-seed final | wall-clock (s) |",
        "|---|---|---|---|---|---|",
    ]
    summary_rows = []
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for library in sorted({r["library"] for r in rows}):
        mine = [r for r in rows if r["library"] == library]
        steps = sorted({r["step"] for r in mine})
        seeds = sorted({r["seed"] for r in mine})
        curve = np.array([[next(r["eval_return"] for r in mine if r["seed"] == s and r["step"] == t) for t in steps] for s in seeds])
        final = curve[:, -1]
        stats = summarise(final)
        summary_rows.append({"library": library, "seeds": len(seeds), "final_mean": stats.mean, "final_std": stats.std, "wall_s": walls[library]})
        lines.append(
            f"| {library} | {len(seeds)} | {stats.mean:.0f} ± {stats.std:.0f} | [{stats.ci_low:.0f}, {stats.ci_high:.0f}] | "
            f"{', '.join(f'{v:.0f}' for v in final)} | {walls[library]:.0f} |"
        )
        mean, std = curve.mean(0), curve.std(0)
        line, = axes.plot(steps, mean, label=f"{library} (n={len(seeds)})")
        axes.fill_between(steps, mean - std, mean + std, alpha=0.25, color=line.get_color())
    with (args.out_dir / f"{args.name}_summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(summary_rows[0]))
        writer.writeheader()
        writer.writerows(summary_rows)
    (args.out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    axes.set_xlabel("environment steps")
    axes.set_ylabel("evaluation return (10 episodes)")
    axes.set_title(f"SAC on {args.env}: o2o vs SBX (mean ± std over seeds)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.out_dir / f"{args.name}.png", dpi=120)
    print("\n".join(lines))


def save_library(args: Args, library: str, rows: list[dict], wall_s: float) -> None:
    """Store one library's evaluation rows, wall-clock and run record (the settings among it) as
    ``<name>_<library>.json``."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    peers = ("sbx-rl", "stable-baselines3", "torch") if library == "sbx" else ()
    payload = {"library": library, "wall_s": wall_s, "record": result_record(args, peers), "rows": rows}
    (args.out_dir / f"{args.name}_{library}.json").write_text(json.dumps(payload, default=str, indent=1))


def load_libraries(args: Args) -> tuple[list[dict], dict[str, float]]:
    """Rows and wall-clock of every library saved under ``args.out_dir`` for ``args.name``."""
    rows, walls = [], {}
    for library in ("o2o", "sbx"):
        path = args.out_dir / f"{args.name}_{library}.json"
        if path.exists():
            payload = json.loads(path.read_text())
            rows += payload["rows"]
            walls[library] = payload["wall_s"]
    return rows, walls


def main(args: Args) -> None:
    """Run the selected libraries, save each, and write the outputs from all saved libraries."""
    import tempfile

    if "o2o" in args.libraries:
        with tempfile.TemporaryDirectory() as run_root:
            o2o_rows, wall = run_o2o(args, Path(run_root))
        save_library(args, "o2o", o2o_rows, wall)
        print(f"o2o done in {wall:.0f} s", flush=True)
    if "sbx" in args.libraries:
        sbx_rows, total = [], 0.0
        for seed in args.seeds:
            seed_rows, wall = run_sbx(args, seed)
            sbx_rows += seed_rows
            total += wall
            print(f"sbx seed {seed} done in {wall:.0f} s", flush=True)
        save_library(args, "sbx", sbx_rows, total)
    rows, walls = load_libraries(args)
    write_outputs(args, rows, walls)


if __name__ == "__main__":
    main(tyro.cli(Args))
