"""TBSAC vs SAC on beam orbit correction (``o2o/OrbitCorrection-v0``), with the SVD expert beside.

Both agents are trained online with ``rl.loops.train_online`` (seeds as a vmapped axis; the
training envs step on the device, a stretch of steps per compiled call, unless
``--env-loop host``) on the
TBSAC schedule of spec ``beam.md`` section 3: 20,000 steps, 500 uniform-random warm-up steps, a
3,000-transition FIFO buffer, one gradient step per env step, Adam 2e-4, batch 256. SAC is the
same agent with plain 256x256 MLPs on the same 30-D trend observation, so the comparison isolates
the trend convolutions. Training lattices: ``nominal`` (misalignments only) and/or ``randomised``
(domain randomisation: ±5 % solenoid scale, ±10 % corrector gains, 0.05 mm BPM noise).

After training every seed's deterministic policy, and the SVD expert (gain 0.7, nominal response
matrix), run the same ``--final-episodes`` episodes on each evaluation lattice:

- ``nominal``: the training lattice of the paper;
- ``solenoid_error``: all solenoid fields scaled by one factor in U(0.95, 1.05) per episode (the
  paper's "error mode"; zero-shot for agents trained on ``nominal``);
- ``randomised``: the full domain randomisation above.

Success means RMS < 0.5 mm within 50 steps. These episodes run as one jitted program per agent
(``vmap`` over seeds and episodes, ``lax.scan`` over steps) on the environment's functional core.
Acceptance targets (full run, 3 seeds): TBSAC >= 90 % success on ``nominal`` and >= 80 % zero-shot
on ``solenoid_error``.

Outputs in ``--out-dir``: ``<name>.csv`` (one row per agent x training lattice x evaluation
lattice x seed), ``<name>_curves.csv`` (evaluation returns during training), ``<name>.md`` and
``<name>.png``.

    python -m experiments.orbit_tbsac --steps 20000 --seeds 0 1 2
    python -m experiments.orbit_tbsac --steps 300 --warmup-steps 100 --seeds 0 --final-episodes 20  # smoke
"""

from __future__ import annotations

import csv
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from agents.sac import SAC, SACConfig
from agents.tbsac import TBSAC, TBSACConfig, tbsac_online_config
from envs.beam import expert_pseudo_inverse, svd_expert_action
from envs.registry import make, make_jax
from rl.logging import write_result_record
from rl.loops import train_online
from rl.rollouts import JaxEnvSpec

RESULTS = Path(__file__).resolve().parent / "results"
ENV_ID = "o2o/OrbitCorrection-v0"

AgentName = Literal["tbsac", "sac"]
TrainLattice = Literal["nominal", "randomised"]

LATTICES: dict[str, dict[str, Any]] = {
    "nominal": {"domain_randomisation": False},
    "solenoid_error": {"domain_randomisation": False, "solenoid_scale_halfwidth": 0.05},
    "randomised": {"domain_randomisation": True},
}
"""Keyword arguments of ``make(ENV_ID, ...)`` for every lattice."""

EXPERT_GAIN = 0.7
COLOURS = {"tbsac": "tab:blue", "sac": "tab:orange", "svd_expert": "tab:grey"}
TARGETS = {("tbsac", "nominal", "nominal"): 0.9, ("tbsac", "nominal", "solenoid_error"): 0.8}
"""(agent, training lattice, evaluation lattice) -> acceptance success rate of the full run."""


@dataclasses.dataclass(frozen=True)
class Args:
    """Options of the orbit-correction comparison."""

    steps: int = 20_000
    """Environment steps per seed."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Training seeds (one vmapped program per agent and training lattice)."""
    agents: tuple[AgentName, ...] = ("tbsac", "sac")
    """Agents to train."""
    train_lattices: tuple[TrainLattice, ...] = ("nominal",)
    """Lattices to train on; every agent is evaluated on all of LATTICES."""
    warmup_steps: int = 500
    """Uniform-random steps before learning starts."""
    buffer_capacity: int = 3_000
    """FIFO replay capacity per seed."""
    eval_interval: int = 1_000
    """Evaluate during training every this many steps."""
    eval_episodes: int = 5
    """Deterministic episodes per seed at each evaluation during training."""
    final_episodes: int = 100
    """Episodes per seed and evaluation lattice after training (the same episodes for every agent)."""
    out_dir: Path = RESULTS
    """Where the CSV / markdown / PNG go."""
    name: str = "orbit_tbsac"
    """File name stem of the outputs."""
    run_dir: Path | None = None
    """Where training logs and checkpoints go (a temporary directory if not given)."""
    env_loop: Literal["device", "host"] = "device"
    """Where the training envs step: on the device, a stretch of steps per compiled call (the
    env's functional core), or one step at a time through its gymnasium face on the host."""


def agent_factory(agent_name: AgentName) -> tuple[Callable, SACConfig]:
    """``(create(key, obs_space, act_space), config)``; SAC gets TBSAC's SAC hyperparameters."""
    tbsac_config = TBSACConfig()
    if agent_name == "tbsac":
        return (lambda key, obs, act: TBSAC.create(key, obs, act, tbsac_config)), tbsac_config
    sac_config = SACConfig(**{f.name: getattr(tbsac_config, f.name) for f in dataclasses.fields(SACConfig)})
    return (lambda key, obs, act: SAC.create(key, obs, act, sac_config)), sac_config


def episode_metrics(
    act: Callable[[jax.Array], jax.Array], core: Any, params: Any, keys: jax.Array, max_steps: int
) -> dict[str, jax.Array]:
    """Run one episode per key with deterministic ``act(obs) -> action``; per-episode success,
    steps taken, return and the true RMS (mm) at the episode's last step.

    Pure and jittable: episodes are vmapped and steps scanned to ``max_steps``; an episode stops
    accumulating at its first ``terminated`` or ``truncated``.
    """

    def one_episode(key: jax.Array) -> dict[str, jax.Array]:
        reset_key, steps_key = jax.random.split(key)
        observation, state = core.reset(reset_key, params)

        def body(carry, step_key):
            observation, state, active, metrics = carry
            result = core.step(step_key, state, act(observation), params)
            metrics = {
                "success": metrics["success"] | (active & result.terminated),
                "steps": metrics["steps"] + active.astype(jnp.int32),
                "return": metrics["return"] + jnp.where(active, result.reward, 0.0),
                "final_rms": jnp.where(active, result.info["true_rms"], metrics["final_rms"]),
            }
            active = active & ~(result.terminated | result.truncated)
            return (result.obs, result.state, active, metrics), None

        start = {"success": jnp.array(False), "steps": jnp.array(0), "return": jnp.array(0.0), "final_rms": jnp.array(0.0)}
        (_, _, _, metrics), _ = jax.lax.scan(
            body, (observation, state, jnp.array(True), start), jax.random.split(steps_key, max_steps)
        )
        return metrics

    return jax.vmap(one_episode)(keys)


def lattice_params(lattice: str) -> Any:
    """Environment parameters of an evaluation lattice (a pytree: one compiled program serves all)."""
    return make_jax(ENV_ID, **LATTICES[lattice])[1]


def evaluation_keys(lattice: str, episodes: int) -> jax.Array:
    """The evaluation episodes of ``lattice``, identical for every agent and seed."""
    return jax.random.split(jax.random.PRNGKey(1_000_003 + sorted(LATTICES).index(lattice)), episodes)


def evaluate_on_lattices(
    act: Callable[[Any, jax.Array], jax.Array], policy: Any, episodes: int
) -> dict[str, dict[str, np.ndarray]]:
    """Metrics of ``act(policy, obs)`` on every lattice of :data:`LATTICES`, arrays shaped
    (seeds, episodes); ``policy`` is a seed-stacked pytree (the lattice parameters are traced, so
    one compilation serves every lattice)."""
    core = make_jax(ENV_ID)[0]
    horizons = {int(lattice_params(lattice).max_steps) for lattice in LATTICES}
    if len(horizons) != 1:
        raise ValueError(f"evaluation lattices must share one horizon, got {sorted(horizons)}")
    (horizon,) = horizons

    @jax.jit
    def run(policy, params, keys):
        def per_seed(seed_policy):
            return episode_metrics(lambda obs: act(seed_policy, obs), core, params, keys, horizon)

        return jax.vmap(per_seed)(policy)

    return {
        lattice: jax.device_get(run(policy, lattice_params(lattice), evaluation_keys(lattice, episodes))) for lattice in LATTICES
    }


def evaluate_agent(agent: Any, episodes: int) -> dict[str, dict[str, np.ndarray]]:
    """Deterministic-policy metrics of a seed-stacked agent on every lattice, (seeds, episodes)."""
    return evaluate_on_lattices(lambda seed_agent, obs: seed_agent.act(obs, jax.random.PRNGKey(0), deterministic=True), agent, episodes)


def evaluate_expert(episodes: int) -> dict[str, dict[str, np.ndarray]]:
    """Metrics of the SVD expert (gain 0.7, nominal response matrix) on every lattice, (1, episodes)."""
    pseudo_inverse = expert_pseudo_inverse()[None]  # a one-"seed" policy pytree
    return evaluate_on_lattices(lambda matrix, obs: svd_expert_action(obs, matrix, EXPERT_GAIN), pseudo_inverse, episodes)


def summary_rows(agent: str, trained_on: str, lattice: str, seeds: list, metrics: dict[str, np.ndarray]) -> list[dict]:
    """One CSV row per seed from (seeds, episodes) metric arrays."""
    rows = []
    for index, seed in enumerate(seeds):
        success = metrics["success"][index]
        steps = metrics["steps"][index][success]
        rows.append(
            {
                "agent": agent,
                "trained_on": trained_on,
                "eval_lattice": lattice,
                "seed": seed,
                "episodes": success.size,
                "success_rate": float(success.mean()),
                "median_steps_to_success": float(np.median(steps)) if steps.size else float("nan"),
                "mean_final_rms_mm": float(metrics["final_rms"][index].mean()),
                "mean_return": float(metrics["return"][index].mean()),
            }
        )
    return rows


def train(args: Args, agent_name: AgentName, lattice: TrainLattice, run_root: Path) -> tuple[Any, list[dict], float]:
    """Train ``agent_name`` on ``lattice`` for all seeds at once; (agent, curve rows, seconds)."""
    create, config = agent_factory(agent_name)
    make_env = lambda: make(ENV_ID, **LATTICES[lattice])
    probe = make_env()
    online = tbsac_online_config(
        total_steps=args.steps,
        warmup_steps=args.warmup_steps,
        buffer_capacity=args.buffer_capacity,
        eval_interval=args.eval_interval,
        eval_episodes=args.eval_episodes,
        log_interval=min(1_000, args.steps),
        checkpoint_interval=0,
    )
    start = time.perf_counter()
    agent, evaluations = train_online(
        # jit: one compiled initialisation instead of op-by-op eager work under the loop's vmap
        create_agent=jax.jit(lambda key: create(key, probe.observation_space, probe.action_space)),
        make_env=make_env,
        config=online,
        seeds=list(args.seeds),
        run_dir=run_root / f"{agent_name}_{lattice}",
        run_config={"benchmark": dataclasses.asdict(args), "agent": config, "online": online},
        progress=False,
        jax_env=JaxEnvSpec(*make_jax(ENV_ID, **LATTICES[lattice])) if args.env_loop == "device" else None,
    )
    wall = time.perf_counter() - start
    curves = [
        {"agent": agent_name, "trained_on": lattice, "seed": r["seed"], "step": r["step"], "eval_return": r["eval_return"]}
        for r in evaluations
    ]
    return agent, curves, wall


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 0) -> str:
    values = np.asarray(values, float) * scale
    return f"{np.nanmean(values):.{digits}f} ± {np.nanstd(values):.{digits}f}" if np.isfinite(values).any() else "–"


def markdown(args: Args, rows: list[dict], walls: dict[str, float]) -> str:
    """Result table (mean ± std over seeds), acceptance checks and run settings."""
    full_budget = args.steps >= 20_000 and len(args.seeds) >= 3
    lines = [
        f"# TBSAC vs SAC on orbit correction ({ENV_ID})",
        "",
        f"{args.steps} env steps per seed, seeds {list(args.seeds)}, warm-up {args.warmup_steps}, buffer "
        f"{args.buffer_capacity}; {args.final_episodes} evaluation episodes per seed and lattice (the same for every "
        "agent). Success: RMS < 0.5 mm within 50 steps. Mean ± std over seeds.",
        "",
    ]
    if not full_budget:
        lines += ["**Reduced budget (smoke run): not comparable to the acceptance targets.**", ""]
    lines += [
        "| agent | trained on | eval lattice | success % | per-seed success % | median steps to success | final RMS (mm) | return |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["agent"], row["trained_on"], row["eval_lattice"]), []).append(row)
    for (agent, trained_on, lattice), group in groups.items():
        per_seed = ", ".join(f"{100 * r['success_rate']:.0f}" for r in group)
        lines.append(
            f"| {agent} | {trained_on} | {lattice} | {_mean_std([r['success_rate'] for r in group], 100)} | "
            f"{per_seed} | "
            f"{_mean_std([r['median_steps_to_success'] for r in group], digits=1)} | "
            f"{_mean_std([r['mean_final_rms_mm'] for r in group], digits=2)} | "
            f"{_mean_std([r['mean_return'] for r in group], digits=1)} |"
        )
    lines += ["", "Acceptance (full run: 20,000 steps, 3 seeds):", ""]
    for (agent, trained_on, lattice), target in TARGETS.items():
        group = groups.get((agent, trained_on, lattice))
        if group is None:
            continue
        rate = float(np.mean([r["success_rate"] for r in group]))
        verdict = ("met" if rate >= target else "missed") if full_budget else "not assessed (reduced budget)"
        lines.append(f"- {agent} trained on {trained_on}, {lattice}: {100 * rate:.1f} % (target >= {100 * target:.0f} %): {verdict}")
    lines += ["", "Training wall-clock (all seeds together, includes evaluation during training):", ""]
    lines += [f"- {name}: {seconds:.0f} s" for name, seconds in walls.items()]
    return "\n".join(lines) + "\n"


def plot(args: Args, curves: list[dict], rows: list[dict]) -> None:
    """Learning curves (left) and success rate per evaluation lattice (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curve_axes, bar_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in sorted({(c["agent"], c["trained_on"]) for c in curves}):
        mine = [c for c in curves if (c["agent"], c["trained_on"]) == key]
        steps = sorted({c["step"] for c in mine})
        table = np.array([[np.mean([c["eval_return"] for c in mine if c["step"] == t and c["seed"] == s]) for t in steps] for s in args.seeds])
        mean, std = table.mean(0), table.std(0)
        style = {"color": COLOURS[key[0]], "linestyle": "-" if key[1] == "nominal" else "--"}
        curve_axes.plot(steps, mean, marker="o", label=f"{key[0]} (trained on {key[1]})", **style)
        curve_axes.fill_between(steps, mean - std, mean + std, alpha=0.2, color=style["color"])
    curve_axes.set_xlabel("environment steps")
    curve_axes.set_ylabel(f"evaluation return ({args.eval_episodes} episodes)")
    curve_axes.set_title("training curves (mean ± std over seeds)")
    curve_axes.grid(alpha=0.3)
    curve_axes.legend()

    lattices = list(LATTICES)
    series = sorted({(r["agent"], r["trained_on"]) for r in rows}, key=lambda key: (list(COLOURS).index(key[0]), key[1]))
    width = 0.8 / len(series)
    for index, key in enumerate(series):
        rates = [100 * np.mean([r["success_rate"] for r in rows if (r["agent"], r["trained_on"]) == key and r["eval_lattice"] == lattice]) for lattice in lattices]
        label = key[0] if key[0] == "svd_expert" else f"{key[0]} ({key[1]})"
        offsets = np.arange(len(lattices)) + (index - (len(series) - 1) / 2) * width
        hatch = "//" if key[1] == "randomised" else None
        bar_axes.bar(offsets, rates, width, label=label, color=COLOURS[key[0]], hatch=hatch, edgecolor="white")
    bar_axes.axhline(90, color="grey", linestyle="--", linewidth=0.8)
    bar_axes.axhline(80, color="grey", linestyle=":", linewidth=0.8)
    bar_axes.set_xticks(np.arange(len(lattices)), lattices)
    bar_axes.set_ylabel("success rate (%)")
    bar_axes.set_ylim(0, 105)
    bar_axes.set_title(f"RMS < 0.5 mm within 50 steps ({args.final_episodes} episodes per seed)")
    bar_axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out_dir / f"{args.name}.png", dpi=120)
    plt.close(figure)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows with identical keys as CSV, written under a temporary name and then renamed."""
    temporary = path.with_suffix(".csv.tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(path)


def main(args: Args) -> list[dict]:
    """Train, evaluate, write the outputs; returns the per-seed result rows."""
    for name in ("steps", "final_episodes", "eval_episodes", "eval_interval", "buffer_capacity"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.seeds:
        raise SystemExit("--seeds needs at least one seed")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for lattice, metrics in evaluate_expert(args.final_episodes).items():
        rows += summary_rows("svd_expert", "-", lattice, ["-"], metrics)
    curves: list[dict] = []
    walls: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        run_root = args.run_dir if args.run_dir is not None else Path(scratch)
        for trained_on in args.train_lattices:
            for agent_name in args.agents:
                agent, agent_curves, wall = train(args, agent_name, trained_on, run_root)
                curves += agent_curves
                walls[f"{agent_name} on {trained_on}"] = wall
                for lattice, metrics in evaluate_agent(agent, args.final_episodes).items():
                    rows += summary_rows(agent_name, trained_on, lattice, list(args.seeds), metrics)
                print(f"{agent_name} trained on {trained_on}: {wall:.0f} s", flush=True)
    write_csv(args.out_dir / f"{args.name}.csv", rows)
    if curves:
        write_csv(args.out_dir / f"{args.name}_curves.csv", curves)
    report = markdown(args, rows, walls)
    (args.out_dir / f"{args.name}.md").write_text(report)
    write_result_record(args.out_dir / f"{args.name}_run.json", args)
    plot(args, curves, rows)
    print(report)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
