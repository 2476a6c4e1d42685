"""SAC and LOOP on laser pulse shaping (``o2o/LaserPulse-v0``, TempoRL v2 MDP, B = 2).

SAC follows the released TempoRL model of spec ``laser.md`` section 4.4 (discount 0.9, Adam 3e-4,
batch 256, tau 0.005, automatic temperature, 2 x 256 ReLU, one gradient step per env step, learning
from step 100), trained with ``rl.loops.train_online`` (seeds as a vmapped axis; the training envs
step on the device, a stretch of steps per compiled call, unless ``--env-loop host``). LOOP (spec ``loop.md``) trains fully jitted on the environment's
functional core: each task is one reset seed, its K rollouts start from the same stretcher setting.

After training, every seed's deterministic policy runs the same ``--final-episodes`` episodes on the
functional core (one jitted program: ``vmap`` over seeds and episodes, ``lax.scan`` over the 50
steps). Reported per seed: peak-intensity ratio x and FWHM after 10 steps and at the end of the
episode, and the first step at which the episode-mean x reaches the target with FWHM within its
bound. The reference optimum (x*, FWHM*) is computed in the same run by bounded Nelder-Mead over the
stretcher box. Acceptance (measured files, 3 seeds, SAC): x >= 0.83 (95 % of x* = 0.870) with
FWHM <= 1.63 ps, reached within 10 steps, after at most 300,000 env steps.

    python -m experiments.laser_sac                                  # measured files next to the repo
    python -m experiments.laser_sac --agents sac --sac-steps 2000 --seeds 0 --final-episodes 4  # smoke

Outputs in ``--out-dir``: ``<name>.csv`` (one row per agent x seed), ``<name>_curves.csv``
(evaluation returns during training), ``<name>_steps.csv`` (per-step mean x / FWHM of the final
episodes), ``<name>.md`` and ``<name>.png``.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import tyro

from agents.loop import LOOPConfig
from agents.sac import SAC, SACConfig
from envs.registry import make, make_jax
from experiments.on_policy import agent_factory as on_policy_agent_factory
from experiments.orbit_tbsac import write_csv
from rl.logging import read_metrics, write_result_record
from rl.loops import OnlineConfig, train_online
from rl.rollouts import JaxEnvSpec, OnPolicyConfig, train_on_policy

RESULTS = Path(__file__).resolve().parent / "results"
ENV_ID = "o2o/LaserPulse-v0"
MEASURED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "temporl"
"""Where the measured TempoRL spectrum and gain files live beside a checkout (not vendored)."""

AgentName = Literal["sac", "loop"]
COLOURS = {"sac": "tab:blue", "loop": "tab:green"}
X_FRACTION = 0.95
"""Target peak-intensity ratio as a fraction of the best reachable x*."""
MEASURED_X_TARGET = 0.83
"""Peak-intensity target of the acceptance list on the measured files (95 % of x* = 0.870, rounded up)."""
MEASURED_FWHM_BOUND_PS = 1.63
"""FWHM bound of the acceptance list (measured files; FWHM* = 1.557 ps there)."""
WITHIN_STEPS = 10


def released_sac_config() -> SACConfig:
    """The released TempoRL SAC (spec laser.md 4.4) in o2o's SAC."""
    return SACConfig(discount=0.9, actor_lr=3e-4, critic_lr=3e-4, temperature_lr=3e-4, batch_size=256, tau=0.005)


@dataclasses.dataclass(frozen=True)
class Args:
    """Options of the laser pulse-shaping benchmark."""

    agents: tuple[AgentName, ...] = ("sac", "loop")
    """Agents to train."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Training seeds (one vmapped program per agent)."""
    data_dir: Path | None = MEASURED_DATA
    """Directory with the measured spectrum and gain files; None for the built-in parametric model."""
    b_integral: float = 2.0
    """B-integral of the amplifier (the acceptance is stated for B = 2)."""
    sac_steps: int = 150_000
    """SAC environment steps per seed (acceptance allows at most 300,000)."""
    sac_buffer_capacity: int | None = 100_000
    """SAC replay capacity (FIFO); None keeps every transition of ``--sac-steps``."""
    sac_warmup_steps: int = 100
    """Uniform-random steps before SAC learns (SB3's learning_starts of the released model)."""
    sac: SACConfig = dataclasses.field(default_factory=released_sac_config)
    """SAC hyperparameters."""
    loop_steps: int = 300_000
    """LOOP environment steps per seed."""
    loop: LOOPConfig = LOOPConfig()
    """LOOP hyperparameters."""
    eval_interval: int = 10_000
    """Evaluate during training every this many env steps."""
    eval_episodes: int = 10
    """Deterministic episodes per seed at each evaluation during training."""
    final_episodes: int = 20
    """Episodes per seed after training (the same reset states for every agent)."""
    out_dir: Path = RESULTS
    """Where the CSV / markdown / PNG go."""
    name: str = "laser_sac"
    """File name stem of the outputs."""
    run_dir: Path | None = None
    """Where training logs and checkpoints go (a temporary directory if not given)."""
    resume: bool = False
    """Continue the runs in ``--run-dir`` from their last checkpoints, e.g. with a larger
    ``--sac-steps`` (keep ``--sac-buffer-capacity`` as before); finished runs are only evaluated."""
    env_loop: Literal["device", "host"] = "device"
    """Where the training envs step: on the device, a stretch of steps per compiled call (the
    env's functional core), or one step at a time through its gymnasium face on the host."""


def env_kwargs(args: Args) -> dict[str, Any]:
    """Keyword arguments of ``make(ENV_ID, ...)`` for this benchmark."""
    kwargs: dict[str, Any] = {"b_integral": args.b_integral}
    if args.data_dir is not None:
        kwargs["data_dir"] = args.data_dir
    return kwargs


def reference_optimum(core: Any, params: Any) -> tuple[float, float, np.ndarray]:
    """(x*, FWHM* in ps, psi*): bounded Nelder-Mead on x over the stretcher box from psi = 1/2."""
    evaluate = jax.jit(lambda psi: core.evaluate(psi, jnp.asarray(params.b_integral, jnp.float32))[0])

    def negative_ratio(psi: np.ndarray) -> float:
        return -float(evaluate(jnp.asarray(psi, jnp.float32)).peak_intensity_ratio)

    result = scipy.optimize.minimize(
        negative_ratio, np.full(3, 0.5), method="Nelder-Mead", bounds=[(0.0, 1.0)] * 3, options={"xatol": 1e-4, "fatol": 1e-6}
    )
    metrics = evaluate(jnp.asarray(result.x, jnp.float32))
    return float(metrics.peak_intensity_ratio), float(metrics.fwhm_ps), np.asarray(result.x)


def targets(args: Args, x_star: float, fwhm_star: float) -> tuple[float, float]:
    """(x target, FWHM bound): the acceptance's x >= 0.83 and FWHM <= 1.63 ps on the measured files;
    for other models 95 % of x* and the same relative margin over FWHM* (1.63 / 1.557)."""
    if args.data_dir is not None:
        return MEASURED_X_TARGET, MEASURED_FWHM_BOUND_PS
    return X_FRACTION * x_star, fwhm_star * MEASURED_FWHM_BOUND_PS / 1.557


def episode_traces(act: Callable[[Any, jax.Array], jax.Array], policy: Any, core: Any, params: Any, keys: jax.Array) -> dict[str, np.ndarray]:
    """Per-step x, FWHM, reward and an ``active`` mask, arrays shaped (seeds, episodes, steps), for
    the deterministic ``act(policy, obs)`` of every seed of the seed-stacked ``policy``.

    After an episode ends (termination) its later steps repeat the last values with ``active`` False.
    """
    horizon = int(params.max_steps)

    def one_episode(seed_policy: Any, key: jax.Array) -> dict[str, jax.Array]:
        observation, state = core.reset(key, params)

        def body(carry, _):
            observation, state, active, last = carry
            result = core.step(key, state, act(seed_policy, observation), params)
            now = {
                "x": result.info["peak_intensity_ratio"],
                "fwhm_ps": result.info["fwhm_ps"],
                "reward": result.reward,
            }
            kept = jax.tree.map(lambda new, old: jnp.where(active, new, old), now, last)
            next_active = active & ~(result.terminated | result.truncated)
            return (result.obs, result.state, next_active, kept), {**kept, "active": active}

        start = {"x": jnp.array(0.0), "fwhm_ps": jnp.array(0.0), "reward": jnp.array(0.0)}
        _, trace = jax.lax.scan(body, (observation, state, jnp.array(True), start), None, length=horizon)
        return trace

    run = jax.jit(jax.vmap(lambda seed_policy: jax.vmap(lambda key: one_episode(seed_policy, key))(keys)))
    with core.trace_scope():
        return jax.device_get(run(policy))


def first_step_reaching(x_mean: np.ndarray, fwhm_mean: np.ndarray, x_target: float, fwhm_bound: float) -> float:
    """1-based first step at which the episode-mean x >= target and FWHM <= bound (nan if never)."""
    reached = np.flatnonzero((x_mean >= x_target) & (fwhm_mean <= fwhm_bound))
    return float(reached[0] + 1) if reached.size else float("nan")


def summary_rows(agent: str, seeds: list[int], traces: dict[str, np.ndarray], x_target: float, fwhm_bound: float) -> list[dict]:
    """One row per seed: x / FWHM after ``WITHIN_STEPS`` steps and at the episode end (means over
    episodes), first step reaching the target, return, and whether the seed meets the acceptance."""
    rows = []
    for index, seed in enumerate(seeds):
        x, fwhm = traces["x"][index], traces["fwhm_ps"][index]
        x_mean, fwhm_mean = x.mean(0), fwhm.mean(0)
        within = WITHIN_STEPS - 1
        meets = bool(x_mean[within] >= x_target and fwhm_mean[within] <= fwhm_bound and x_mean[-1] >= x_target and fwhm_mean[-1] <= fwhm_bound)
        episodes_on_target = (x[:, within] >= x_target) & (fwhm[:, within] <= fwhm_bound) & (x[:, -1] >= x_target) & (fwhm[:, -1] <= fwhm_bound)
        rows.append(
            {
                "agent": agent,
                "seed": seed,
                "episodes": x.shape[0],
                f"x_at_{WITHIN_STEPS}": float(x_mean[within]),
                f"fwhm_ps_at_{WITHIN_STEPS}": float(fwhm_mean[within]),
                "x_final": float(x_mean[-1]),
                "fwhm_ps_final": float(fwhm_mean[-1]),
                "first_step_on_target": first_step_reaching(x_mean, fwhm_mean, x_target, fwhm_bound),
                "episodes_on_target": int(episodes_on_target.sum()),
                "terminated_episodes": int((~traces["active"][index][:, -1]).sum()),
                "mean_return": float((traces["reward"][index] * traces["active"][index]).sum(1).mean()),
                "meets_target": meets,
            }
        )
    return rows


def train_sac(args: Args, run_root: Path) -> tuple[Any, list[dict], float]:
    """SAC for all seeds at once; (agent, curve rows, seconds)."""
    make_env = lambda: make(ENV_ID, **env_kwargs(args))
    probe = make_env()
    config = args.sac
    online = OnlineConfig(
        total_steps=args.sac_steps,
        warmup_steps=args.sac_warmup_steps,
        buffer_capacity=args.sac_buffer_capacity or args.sac_steps,
        checkpoint_interval=args.eval_interval,
        eval_interval=args.eval_interval,
        eval_episodes=args.eval_episodes,
        log_interval=min(5_000, args.sac_steps),
    )
    start = time.perf_counter()
    agent, _ = train_online(
        create_agent=jax.jit(lambda key: SAC.create(key, probe.observation_space, probe.action_space, config)),
        make_env=make_env,
        config=online,
        seeds=list(args.seeds),
        run_dir=run_root / "sac",
        run_config={"benchmark": dataclasses.asdict(args), "agent": config, "online": online},
        resume=args.resume,
        progress=False,
        jax_env=JaxEnvSpec(*make_jax(ENV_ID, **env_kwargs(args))) if args.env_loop == "device" else None,
    )
    return agent, curve_rows("sac", run_root / "sac"), time.perf_counter() - start


def train_loop(args: Args, run_root: Path) -> tuple[Any, list[dict], float]:
    """LOOP for all seeds at once, fully jitted on the functional core; (agent, curve rows, seconds)."""
    core, params = make_jax(ENV_ID, **env_kwargs(args))
    schedule = OnPolicyConfig(
        total_steps=args.loop_steps,
        eval_interval=args.eval_interval,
        eval_episodes=args.eval_episodes,
        log_interval=min(10_000, args.loop_steps),
        max_episode_steps=int(params.max_steps),
    )
    create = on_policy_agent_factory("loop", args.loop, core.observation_space(params), core.action_space(params), args.loop_steps)
    start = time.perf_counter()
    agent, _ = train_on_policy(
        create,
        config=schedule,
        seeds=list(args.seeds),
        run_dir=run_root / "loop",
        jax_env=JaxEnvSpec(core, params),
        run_config={"benchmark": dataclasses.asdict(args), "agent": args.loop, "on_policy": schedule},
        resume=args.resume,
        progress=False,
    )
    return agent, curve_rows("loop", run_root / "loop"), time.perf_counter() - start


def curve_rows(agent: str, run_dir: Path) -> list[dict]:
    """Evaluation returns logged in ``run_dir`` (all of them, also those of a resumed run's first part)."""
    return [
        {"agent": agent, "seed": row["seed"], "step": row["step"], "eval_return": row["eval_return"]}
        for row in read_metrics(run_dir)
        if row.get("phase") == "eval"
    ]


TRAINERS = {"sac": train_sac, "loop": train_loop}


def _mean_std(values: list[float], digits: int = 3) -> str:
    values = np.asarray(values, float)
    return f"{np.nanmean(values):.{digits}f} ± {np.nanstd(values):.{digits}f}" if np.isfinite(values).any() else "–"


def markdown(args: Args, rows: list[dict], optimum: tuple[float, float], goal: tuple[float, float], walls: dict[str, float]) -> str:
    """Result table (mean ± std over seeds), per-seed verdicts and run settings."""
    x_star, fwhm_star = optimum
    x_target, fwhm_bound = goal
    model = "measured TempoRL files" if args.data_dir is not None else "built-in parametric model"
    lines = [
        f"# SAC and LOOP on laser pulse shaping ({ENV_ID}, B = {args.b_integral:g})",
        "",
        f"Model: {model}. Best reachable (bounded Nelder-Mead on x): x* = {x_star:.3f} at FWHM* = {fwhm_star:.3f} ps. "
        f"Target: x >= {x_target:.3f} with FWHM <= {fwhm_bound:.3f} ps within {WITHIN_STEPS} steps and held to the "
        f"episode's end; {args.final_episodes} deterministic episodes per seed (the same reset states for every agent). "
        f"Seeds {list(args.seeds)}; "
        + ", ".join(f"{name.upper()} {getattr(args, f'{name}_steps')} env steps" for name in args.agents)
        + " per seed. Mean ± std over seeds.",
        "",
        f"| agent | env steps | x @ {WITHIN_STEPS} | FWHM @ {WITHIN_STEPS} (ps) | x final | FWHM final (ps) | first step on target | return | seeds on target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for agent in dict.fromkeys(r["agent"] for r in rows):
        group = [r for r in rows if r["agent"] == agent]
        steps = args.sac_steps if agent == "sac" else args.loop_steps
        lines.append(
            f"| {agent} | {steps} | {_mean_std([r[f'x_at_{WITHIN_STEPS}'] for r in group])} | "
            f"{_mean_std([r[f'fwhm_ps_at_{WITHIN_STEPS}'] for r in group])} | {_mean_std([r['x_final'] for r in group])} | "
            f"{_mean_std([r['fwhm_ps_final'] for r in group])} | {_mean_std([r['first_step_on_target'] for r in group], 1)} | "
            f"{_mean_std([r['mean_return'] for r in group], 1)} | {sum(r['meets_target'] for r in group)}/{len(group)} |"
        )
    lines += ["", "Per seed (x / FWHM after 10 steps, first step on target):", ""]
    for row in rows:
        lines.append(
            f"- {row['agent']} seed {row['seed']}: x {row[f'x_at_{WITHIN_STEPS}']:.3f}, FWHM {row[f'fwhm_ps_at_{WITHIN_STEPS}']:.3f} ps, "
            f"first step on target {row['first_step_on_target']:g}, {'meets' if row['meets_target'] else 'misses'} the target; "
            f"{row['episodes_on_target']} of {row['episodes']} episodes on target by themselves, {row['terminated_episodes']} terminated "
            "(the pulse stretched past the env's FWHM limit; its last pulse stays in the means)"
        )
    lines += ["", "Training wall-clock of this invocation (all seeds together, includes evaluation during training"
              + ("; a resumed run counts only its continuation" if args.resume else "") + "):", ""]
    lines += [f"- {name}: {seconds:.0f} s" for name, seconds in walls.items()]
    return "\n".join(lines) + "\n"


def per_step_rows(agent: str, traces: dict[str, np.ndarray]) -> list[dict]:
    """Mean over seeds and episodes of x and FWHM at every episode step."""
    x, fwhm = traces["x"].mean((0, 1)), traces["fwhm_ps"].mean((0, 1))
    return [{"agent": agent, "step": t + 1, "x": float(x[t]), "fwhm_ps": float(fwhm[t])} for t in range(x.size)]


def plot(args: Args, curves: list[dict], step_rows: list[dict], goal: tuple[float, float]) -> None:
    """Training curves (left) and x / FWHM along the final episodes (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curve_axes, x_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for agent in dict.fromkeys(c["agent"] for c in curves):
        mine = [c for c in curves if c["agent"] == agent]
        steps = sorted({c["step"] for c in mine})
        table = np.array([[np.mean([c["eval_return"] for c in mine if c["step"] == t and c["seed"] == s] or [np.nan]) for t in steps] for s in args.seeds])
        mean, std = np.nanmean(table, 0), np.nanstd(table, 0)
        curve_axes.plot(steps, mean, marker="o", color=COLOURS[agent], label=agent)
        curve_axes.fill_between(steps, mean - std, mean + std, alpha=0.2, color=COLOURS[agent])
    curve_axes.set_xlabel("environment steps")
    curve_axes.set_ylabel(f"evaluation return ({args.eval_episodes} episodes)")
    curve_axes.set_title("training (mean ± std over seeds)")
    curve_axes.grid(alpha=0.3)
    curve_axes.legend()

    fwhm_axes = x_axes.twinx()
    for agent in dict.fromkeys(r["agent"] for r in step_rows):
        mine = [r for r in step_rows if r["agent"] == agent]
        steps = [r["step"] for r in mine]
        x_axes.plot(steps, [r["x"] for r in mine], color=COLOURS[agent], label=f"{agent}: x")
        fwhm_axes.plot(steps, [r["fwhm_ps"] for r in mine], color=COLOURS[agent], linestyle="--", label=f"{agent}: FWHM")
    x_axes.axhline(goal[0], color="grey", linestyle=":", linewidth=0.8)
    fwhm_axes.axhline(goal[1], color="grey", linestyle="-.", linewidth=0.8)
    x_axes.axvline(WITHIN_STEPS, color="grey", linewidth=0.5)
    x_axes.set_xlabel("step of the episode")
    x_axes.set_ylabel("peak-intensity ratio x (solid)")
    fwhm_axes.set_ylabel("FWHM in ps (dashed)")
    fwhm_axes.set_ylim(1.3, 3.0)
    x_axes.set_ylim(0.0, 1.0)
    x_axes.set_title(f"final policies, {args.final_episodes} episodes per seed")
    x_axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out_dir / f"{args.name}.png", dpi=120)
    plt.close(figure)


def main(args: Args) -> list[dict]:
    """Train, evaluate and write the outputs; returns the per-seed rows."""
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise SystemExit(f"--data-dir {args.data_dir} does not exist (pass --data-dir None for the parametric model)")
    for name in ("sac_steps", "loop_steps", "eval_interval", "eval_episodes", "final_episodes"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.seeds:
        raise SystemExit("--seeds needs at least one seed")
    if args.resume and args.run_dir is None:
        raise SystemExit("--resume needs the --run-dir of the runs to continue")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    core, params = make_jax(ENV_ID, **env_kwargs(args))
    x_star, fwhm_star, psi_star = reference_optimum(core, params)
    goal = targets(args, x_star, fwhm_star)
    print(f"optimum x* {x_star:.4f}, FWHM* {fwhm_star:.4f} ps at psi {np.round(psi_star, 4)}; target x >= {goal[0]:.3f}, FWHM <= {goal[1]:.3f}", flush=True)
    keys = jax.random.split(jax.random.PRNGKey(20_261_128), args.final_episodes)
    rows: list[dict] = []
    curves: list[dict] = []
    step_rows: list[dict] = []
    walls: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        run_root = args.run_dir if args.run_dir is not None else Path(scratch)
        for agent_name in args.agents:
            agent, agent_curves, wall = TRAINERS[agent_name](args, run_root)
            walls[agent_name] = wall
            curves += agent_curves
            traces = episode_traces(lambda policy, obs: policy.act(obs, jax.random.PRNGKey(0), deterministic=True), agent, core, params, keys)
            rows += summary_rows(agent_name, list(args.seeds), traces, *goal)
            step_rows += per_step_rows(agent_name, traces)
            print(f"{agent_name}: {wall:.0f} s; " + "; ".join(f"seed {r['seed']} x@10 {r['x_at_10']:.3f} FWHM@10 {r['fwhm_ps_at_10']:.3f}" for r in rows if r["agent"] == agent_name), flush=True)
    write_csv(args.out_dir / f"{args.name}.csv", rows)
    if curves:
        write_csv(args.out_dir / f"{args.name}_curves.csv", curves)
    write_csv(args.out_dir / f"{args.name}_steps.csv", step_rows)
    report = markdown(args, rows, (x_star, fwhm_star), goal, walls)
    (args.out_dir / f"{args.name}.md").write_text(report)
    write_result_record(args.out_dir / f"{args.name}_run.json", args)
    plot(args, curves, step_rows, goal)
    print(report)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
