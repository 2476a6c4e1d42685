"""Learning to Relax, setup A: online choice of SOR's ω over a sequence of shifted Laplacians.

Reproduces the comparison of spec ``solver_bandit.md`` section 7.2 on both shift distributions:
total SOR iterations over T instances of fixed ω, the best fixed ω in hindsight, the
instance-optimal ω (Young's formula), the per-instance best arm, Tsallis-INF, Tsallis-INF-CB and
ChebCB, averaged over runs. Costs are deterministic given the instance, so the full 20-arm cost
table of each instance set is computed once (``envs.solver.sor_cost_table``) and every learner is
replayed on it with bandit feedback (``agents.bandits.run_on_cost_table``; each run permutes the
instance order with numpy ``default_rng(1000 + run)``).

Usage::

    python -m experiments.solver_bandits --runs 10 --T 5000 --out-dir experiments/results

Writes ``solver_bandits.csv`` (one row per distribution × method), ``solver_bandits.md`` (tables,
ratios against the spec's reference numbers, acceptance checks) and ``solver_bandits.png``
(cumulative cost per instance and ratio to the instance-optimal policy).

Adding a learner (e.g. a SAC or PPO agent acting on the context): register a factory in
:data:`LEARNERS` that returns an object with the ``agents.bandits.BanditLearner`` interface
(``act(context, key) -> arm``, ``update(context, arm, loss) -> (learner, metrics)``, pure and
scannable); an RL agent needs a thin adapter that turns the loss into a reward and its
transition into an ``agent.update``. It is then run, tabulated and plotted like the others.
"""

from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from agents.bandits import (
    ChebCB,
    ChebCBConfig,
    TsallisINF,
    TsallisINFCB,
    TsallisINFCBConfig,
    TsallisINFConfig,
    best_fixed_arm,
    float64_scope,
    per_instance_best_costs,
    run_on_cost_table,
)
from envs.solver import (
    CONTEXT_DISTRIBUTIONS,
    OMEGA_GRID,
    SHIFT_CONTEXT_INTERVAL,
    numpy_instances,
    sor_cost_table,
    sor_iterations_many,
    young_omega,
)
from rl.logging import write_result_record

INSTANCE_SEEDS = {"high": 12345, "low": 54321}
"""numpy seeds of the two reference instance sequences (spec 7.2)."""
FIXED_OMEGAS = (1.0, 1.2, 1.4, 1.6, 1.8)
"""The reference script's fixed comparators (all on the 20-arm grid)."""

# Spec 7.2 reference means (iterations per instance) and ratios, for the report.
SPEC_MEANS: dict[str, dict[str, str]] = {
    "high": {
        "best fixed ω (hindsight)": "103.5",
        "instance-optimal (Young ω*)": "56.7",
        "per-instance best arm": "59.2",
        "Tsallis-INF": "122.0",
        "Tsallis-INF (reference normaliser)": "120.8 / 123.3",
        "Tsallis-INF-CB": "103.7",
        "Tsallis-INF-CB (reference normaliser)": "96.6 / 100.9",
        "ChebCB": "66.5",
        "ChebCB (observed Lipschitz)": "66.6 / 66.8",
        "ω = 1.0": "618.6",
        "ω = 1.2": "410.4",
        "ω = 1.4": "260.1",
        "ω = 1.6": "152.9",
        "ω = 1.8": "103.5",
    },
    "low": {
        "best fixed ω (hindsight)": "60.5",
        "instance-optimal (Young ω*)": "42.3",
        "per-instance best arm": "43.8",
        "Tsallis-INF": "68.4",
        "Tsallis-INF (reference normaliser)": "68.8 / 68.9",
        "Tsallis-INF-CB": "65.0",
        "Tsallis-INF-CB (reference normaliser)": "63.5 / 63.2",
        "ChebCB": "47.1",
        "ChebCB (observed Lipschitz)": "47.0 / 47.2",
        "ω = 1.0": "279.6",
        "ω = 1.2": "184.2",
        "ω = 1.4": "113.8",
        "ω = 1.6": "65.1",
        "ω = 1.8": "86.0",
    },
}
SPEC_RATIOS = {"high": {"tsallis": 1.18, "chebcb": 1.18}, "low": {"tsallis": 1.13, "chebcb": 1.11}}

LearnerFactory = Callable[[jax.Array, int], Any]
"""(key, horizon T) -> a learner with the ``agents.bandits.BanditLearner`` interface."""

_LOW, _HIGH = SHIFT_CONTEXT_INTERVAL
LEARNERS: dict[str, LearnerFactory] = {
    "Tsallis-INF": lambda key, horizon: TsallisINF.create(key, TsallisINFConfig(normalisation="exact")),
    "Tsallis-INF (reference normaliser)": lambda key, horizon: TsallisINF.create(key, TsallisINFConfig(normalisation="reference")),
    "Tsallis-INF-CB": lambda key, horizon: TsallisINFCB.create(key, TsallisINFCBConfig(5, _LOW, _HIGH, TsallisINFConfig(normalisation="exact"))),
    "Tsallis-INF-CB (reference normaliser)": lambda key, horizon: TsallisINFCB.create(
        key, TsallisINFCBConfig(5, _LOW, _HIGH, TsallisINFConfig(normalisation="reference"))
    ),
    "ChebCB": lambda key, horizon: ChebCB.create(key, ChebCBConfig(context_low=_LOW, context_high=_HIGH, horizon=horizon, lipschitz="reference")),
    "ChebCB (observed Lipschitz)": lambda key, horizon: ChebCB.create(
        key, ChebCBConfig(context_low=_LOW, context_high=_HIGH, horizon=horizon, lipschitz="observed")
    ),
}
"""Online learners of the benchmark; add contextual RL agents here (see the module docstring)."""


@dataclasses.dataclass
class Args:
    """Learning to Relax (setup A) benchmark."""

    runs: int = 10
    """Independent runs (instance order and learner randomness) per distribution."""
    T: int = 5000
    """Instances per run (at most 5,000, the size of each reference instance set)."""
    out_dir: Path = Path("experiments/results")
    """Directory for solver_bandits.{csv,md,png}."""
    distributions: tuple[str, ...] = ("high", "low")
    """Shift distributions to run ("high": Beta(0.5, 1.5), "low": Beta(2, 6))."""
    learners: tuple[str, ...] = tuple(LEARNERS)
    """Learners to run (keys of LEARNERS)."""
    instances: int = 5000
    """Size of each instance set (cost table rows)."""
    plot: bool = True
    """Write the PNG."""


@dataclasses.dataclass
class MethodResult:
    """Per-run, per-round costs of one method on one distribution."""

    name: str
    costs: np.ndarray  # (runs, T)
    kind: str  # "learner" or "comparator"


def instance_costs(distribution: str, count: int) -> dict[str, np.ndarray]:
    """The reference instance set of a distribution and its cost table and instance-optimal costs."""
    beta_a, beta_b = CONTEXT_DISTRIBUTIONS[distribution]
    shifts, rhs = numpy_instances(INSTANCE_SEEDS[distribution], count, beta_a, beta_b)
    table = sor_cost_table(shifts, rhs)
    optimal = sor_iterations_many(shifts, rhs, young_omega(shifts))
    return {"shifts": shifts, "table": table, "instance_optimal": optimal}


def run_permutations(runs: int, count: int, horizon: int) -> np.ndarray:
    """Instance order of each run: numpy ``default_rng(1000 + run).permutation``, first T."""
    return np.stack([np.random.default_rng(1000 + run).permutation(count)[:horizon] for run in range(runs)])


def run_learner(factory: LearnerFactory, contexts: np.ndarray, tables: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Per-round costs (runs, T) of a learner; runs go through ``lax.map`` (sequential inside one
    jitted program, so the learners' ``lax.cond`` branches stay real branches)."""
    horizon = contexts.shape[1]

    def one_run(inputs):
        context, table, seed = inputs
        key = jax.random.PRNGKey(seed)
        _, result = run_on_cost_table(factory(key, horizon), context, table, key)
        return result.costs

    with float64_scope():
        program = jax.jit(lambda c, t, s: jax.lax.map(one_run, (c, t, s)))
        return np.asarray(program(jnp.asarray(contexts), jnp.asarray(tables), jnp.asarray(seeds)))


def evaluate_distribution(distribution: str, args: Args) -> tuple[list[MethodResult], dict[str, Any]]:
    """All comparators and learners on one distribution."""
    started = time.perf_counter()
    data = instance_costs(distribution, args.instances)
    table_seconds = time.perf_counter() - started
    order = run_permutations(args.runs, args.instances, args.T)
    tables = data["table"][order]  # (runs, T, arms)
    contexts = data["shifts"][order]
    results: list[MethodResult] = []
    for omega in FIXED_OMEGAS:
        arm = int(np.argmin(np.abs(OMEGA_GRID - omega)))
        results.append(MethodResult(f"ω = {omega:.1f}", tables[..., arm], "comparator"))
    best_arm, best_costs = best_fixed_arm(tables)
    results.append(MethodResult("best fixed ω (hindsight)", np.asarray(best_costs), "comparator"))
    results.append(MethodResult("instance-optimal (Young ω*)", data["instance_optimal"][order], "comparator"))
    results.append(MethodResult("per-instance best arm", np.asarray(per_instance_best_costs(tables)), "comparator"))
    learner_seconds = {}
    for name in args.learners:
        if name not in LEARNERS:
            raise SystemExit(f"unknown learner '{name}'; known: {', '.join(LEARNERS)}")
        started = time.perf_counter()
        costs = run_learner(LEARNERS[name], contexts, tables, 1000 + np.arange(args.runs))
        learner_seconds[name] = time.perf_counter() - started
        results.append(MethodResult(name, costs, "learner"))
    info = {
        "best_fixed_omegas": sorted({round(float(OMEGA_GRID[int(a)]), 2) for a in np.atleast_1d(np.asarray(best_arm))}),
        "table_seconds": table_seconds,
        "learner_seconds": learner_seconds,
        "arm_means": data["table"].mean(axis=0),
    }
    return results, info


def summarise(distribution: str, results: list[MethodResult]) -> list[dict[str, Any]]:
    """One row per method: mean cost per instance (mean and std over runs), totals and ratios."""
    by_name = {result.name: result for result in results}
    best_fixed = by_name["best fixed ω (hindsight)"].costs.sum(axis=1).mean()
    optimal = by_name["instance-optimal (Young ω*)"].costs.sum(axis=1).mean()
    rows = []
    for result in results:
        totals = result.costs.sum(axis=1).astype(np.float64)
        horizon = result.costs.shape[1]
        rows.append(
            {
                "distribution": distribution,
                "method": result.name,
                "kind": result.kind,
                "runs": result.costs.shape[0],
                "T": horizon,
                "mean_iterations_per_instance": totals.mean() / horizon,
                "run_std_per_instance": totals.std(ddof=1) / horizon if len(totals) > 1 else 0.0,
                "total_iterations": totals.mean(),
                "ratio_to_best_fixed": totals.mean() / best_fixed,
                "ratio_to_instance_optimal": totals.mean() / optimal,
                "spec_mean_per_instance": SPEC_MEANS[distribution].get(result.name, ""),
            }
        )
    return rows


def acceptance(rows: list[dict[str, Any]], infos: dict[str, dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """Spec section 9 checks 8 and 9 on the measured rows: (check, measured, passed)."""
    checks = []
    for distribution in infos:
        value = {row["method"]: row for row in rows if row["distribution"] == distribution}
        tsallis = value["Tsallis-INF"]["ratio_to_best_fixed"] if "Tsallis-INF" in value else float("nan")
        chebcb = value["ChebCB"]["ratio_to_instance_optimal"] if "ChebCB" in value else float("nan")
        beats = value["ChebCB"]["total_iterations"] < value["best fixed ω (hindsight)"]["total_iterations"] if "ChebCB" in value else False
        spec = SPEC_RATIOS[distribution]
        best = infos[distribution]["best_fixed_omegas"]
        allowed = {"high": [1.8], "low": [1.65, 1.7]}[distribution]
        best_mean = value["best fixed ω (hindsight)"]["mean_iterations_per_instance"]
        spec_best = float(SPEC_MEANS[distribution]["best fixed ω (hindsight)"])
        optimal_mean = value["instance-optimal (Young ω*)"]["mean_iterations_per_instance"]
        spec_optimal = float(SPEC_MEANS[distribution]["instance-optimal (Young ω*)"])
        checks += [
            (f"{distribution}: best fixed ω ∈ {allowed}", f"{best}", all(any(abs(b - a) < 1e-9 for a in allowed) for b in best)),
            (f"{distribution}: best-fixed mean within 5 % of {spec_best}", f"{best_mean:.2f}", abs(best_mean / spec_best - 1) <= 0.05),
            (f"{distribution}: instance-optimal mean within 5 % of {spec_optimal}", f"{optimal_mean:.2f}", abs(optimal_mean / spec_optimal - 1) <= 0.05),
            (f"{distribution}: Tsallis-INF / best fixed ∈ [1.05, 1.30] (spec ≈ {spec['tsallis']})", f"{tsallis:.3f}", 1.05 <= tsallis <= 1.30),
            (f"{distribution}: ChebCB / instance-optimal ∈ [1.05, 1.30] (spec ≈ {spec['chebcb']})", f"{chebcb:.3f}", 1.05 <= chebcb <= 1.30),
            (f"{distribution}: ChebCB beats the best fixed ω", f"{bool(beats)}", bool(beats)),
        ]
    return checks


COLUMNS = (
    "distribution",
    "method",
    "kind",
    "runs",
    "T",
    "mean_iterations_per_instance",
    "run_std_per_instance",
    "total_iterations",
    "ratio_to_best_fixed",
    "ratio_to_instance_optimal",
    "spec_mean_per_instance",
)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """All rows, full precision."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def format_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table lines of the summary rows."""
    lines = [
        "| distribution | method | mean iterations / instance | run std | total iterations | / best fixed | / instance-optimal | spec mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['distribution']} | {row['method']} | {row['mean_iterations_per_instance']:.2f} | {row['run_std_per_instance']:.2f} | "
            f"{row['total_iterations']:.0f} | {row['ratio_to_best_fixed']:.3f} | {row['ratio_to_instance_optimal']:.3f} | {row['spec_mean_per_instance']} |"
        )
    return lines


def write_markdown(path: Path, args: Args, rows: list[dict[str, Any]], infos: dict[str, dict[str, Any]], checks: list[tuple[str, str, bool]]) -> None:
    """The summary table, arm means, ratios against the spec and the acceptance checks."""
    lines = [
        "# Learning to Relax, setup A: SOR ω selection (solver_bandits)",
        "",
        f"Command: `python -m experiments.solver_bandits --runs {args.runs} --T {args.T}`; {args.runs} runs × T = {args.T} instances "
        f"drawn (permuted per run) from one {args.instances}-instance set per distribution (numpy seeds {INSTANCE_SEEDS}).",
        "",
        *format_table(rows),
        "",
        "## Ratios against the spec (section 7.2)",
        "",
        "| distribution | Tsallis-INF / best fixed (spec) | ChebCB / instance-optimal (spec) |",
        "|---|---|---|",
    ]
    for distribution in infos:
        value = {row["method"]: row for row in rows if row["distribution"] == distribution}
        spec = SPEC_RATIOS[distribution]
        tsallis = value.get("Tsallis-INF", {}).get("ratio_to_best_fixed", float("nan"))
        chebcb = value.get("ChebCB", {}).get("ratio_to_instance_optimal", float("nan"))
        lines.append(f"| {distribution} | {tsallis:.3f} ({spec['tsallis']}) | {chebcb:.3f} ({spec['chebcb']}) |")
    lines += ["", "## Mean cost of every arm over the instance set", "", "| ω | " + " | ".join(f"{w:.2f}" for w in OMEGA_GRID) + " |"]
    lines.append("|---" * (len(OMEGA_GRID) + 1) + "|")
    for distribution, info in infos.items():
        lines.append(f"| {distribution} | " + " | ".join(f"{m:.1f}" for m in info["arm_means"]) + " |")
    lines += ["", "## Acceptance checks (spec section 9, checks 8 and 9)", "", "| check | measured | pass |", "|---|---|---|"]
    lines += [f"| {name} | {measured} | {'yes' if passed else 'NO'} |" for name, measured, passed in checks]
    lines += ["", "## Timing (this machine, CPU)", ""]
    for distribution, info in infos.items():
        learners = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in info["learner_seconds"].items())
        lines.append(f"- {distribution}: cost table + instance-optimal {info['table_seconds']:.1f} s; learners ({args.runs} runs, incl. compile): {learners}")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, all_results: dict[str, list[MethodResult]]) -> None:
    """Running mean cost per instance (top) and cumulative cost / instance-optimal (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["best fixed ω (hindsight)", "instance-optimal (Young ω*)", "Tsallis-INF", "Tsallis-INF-CB", "ChebCB", "ChebCB (observed Lipschitz)"]
    figure, axes = plt.subplots(2, len(all_results), figsize=(6 * len(all_results), 8), squeeze=False)
    for column, (distribution, results) in enumerate(all_results.items()):
        by_name = {result.name: result for result in results}
        optimal = np.cumsum(by_name["instance-optimal (Young ω*)"].costs, axis=1).mean(axis=0)
        for name in shown:
            if name not in by_name:
                continue
            cumulative = np.cumsum(by_name[name].costs, axis=1).mean(axis=0)
            rounds = np.arange(1, len(cumulative) + 1)
            style = "--" if "observed" in name else "-"
            axes[0, column].plot(rounds, cumulative / rounds, style, label=name)
            axes[1, column].plot(rounds, cumulative / optimal, style, label=name)
        axes[0, column].set(title=f"{distribution}-variance shifts", ylabel="mean iterations per instance so far", ylim=(30, 200))
        axes[1, column].set(xlabel="instances", ylabel="cumulative cost / instance-optimal", ylim=(0.9, 2.5))
        axes[0, column].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(args: Args | None = None) -> list[dict[str, Any]]:
    """Run the benchmark, print the table and write the result files; returns the summary rows."""
    args = tyro.cli(Args) if args is None else args
    if not 1 <= args.T <= args.instances:
        raise SystemExit(f"--T must be in [1, {args.instances}], got {args.T}")
    if args.runs < 1:
        raise SystemExit(f"--runs must be >= 1, got {args.runs}")
    unknown = set(args.distributions) - set(INSTANCE_SEEDS)
    if unknown:
        raise SystemExit(f"unknown distribution(s) {sorted(unknown)}; choose from {sorted(INSTANCE_SEEDS)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    infos: dict[str, dict[str, Any]] = {}
    all_results: dict[str, list[MethodResult]] = {}
    for distribution in args.distributions:
        results, infos[distribution] = evaluate_distribution(distribution, args)
        all_results[distribution] = results
        rows += summarise(distribution, results)
    checks = acceptance(rows, infos)
    print("\n".join(format_table(rows)))
    print()
    for name, measured, passed in checks:
        print(f"[{'pass' if passed else 'FAIL'}] {name}: {measured}")
    write_csv(args.out_dir / "solver_bandits.csv", rows)
    write_markdown(args.out_dir / "solver_bandits.md", args, rows, infos, checks)
    write_result_record(args.out_dir / "solver_bandits_run.json", args)
    if args.plot:
        write_plot(args.out_dir / "solver_bandits.png", all_results)
    return rows


if __name__ == "__main__":
    main()
