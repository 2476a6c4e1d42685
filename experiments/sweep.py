"""``o2o sweep``: search an o2o command's settings with Ray Tune, on one machine or a Ray cluster.

Every trial is the given ``o2o`` command (``train``, ``pretrain``, ``finetune`` or ``run``) with
the trial's flag values added, run as its own process in its own run directory under
``<out-dir>/trials/``: an ordinary o2o run (config, metrics, checkpoints, plots all as usual). The
trial reports every evaluation to Tune as it appears in the run's ``metrics.jsonl`` (the mean over
the run's seeds), so Tune's records hold the learning curve and its last report is the final
score. The sweep writes ``sweep.csv`` / ``sweep.json`` (every trial's values, final score, spread
over seeds and run directory, best first) and ``sweep.png`` (learning curves of the best trials).

Search space: ``FLAG=V1,V2,...`` is a grid over those values (each value passed to the flag as
written; a value with spaces gives the flag several words, e.g. ``sac.critic-hidden-dims=64 64,256
256``; an on-off flag takes ``True,False``); ``FLAG=uniform(a,b)``, ``loguniform(a,b)``, ``randint(a,b)`` (a <= n < b) and
``choice(v1,v2,...)`` draw a value per trial. Grids multiply; ``--num-samples`` repeats the whole
grid with new draws.

Ray Tune does the scheduling (concurrent trials within ``--cpus-per-trial`` / ``--gpus-per-trial``,
machines of a cluster with ``--address auto``, early stopping with ``--scheduler asha``, an
interrupted sweep continued with ``--resume``); this module only turns the space into Tune's and a
trial into an o2o process, and lists a grid itself only for ``--dry-run``, which needs no Ray. On a
cluster, ``--out-dir`` must be a directory every machine sees.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal

import tyro

from rl.extras import import_extra
from rl.logging import METRICS_JSONL, plot_runs, run_record, write_json_atomic

SWEEPABLE_COMMANDS = ("train", "pretrain", "finetune", "run")
"""o2o commands a sweep can run: those that take --run-dir and write evaluation metrics."""
RESERVED_FLAGS = ("--run-dir", "--resume", "--overwrite")
"""Flags the sweep sets itself (each trial has its own run directory; a resumed trial gets --resume)."""
SAMPLERS = ("uniform", "loguniform", "randint", "choice")
TRIALS_DIR = "trials"
TRIAL_LOG = "o2o.log"
PLOTTED_TRIALS = 6
"""sweep.png draws the learning curves of at most this many of the best trials."""


class SweepError(ValueError):
    """A sweep's command or search space cannot run; the message says why."""


@dataclasses.dataclass(frozen=True)
class SweepArgs:
    """Search an o2o command's settings with Ray Tune (needs the sweep extra): one o2o run per trial."""

    command: tyro.conf.Positional[str]
    """The o2o command every trial runs, quoted, without 'o2o' and without --run-dir, e.g. 'train --env Pendulum-v1 --steps 20000 --num-seeds 3'."""
    space: tuple[str, ...] = ()
    """Search space, one entry per flag: FLAG=V1,V2 (grid), FLAG=uniform(a,b) | loguniform(a,b) | randint(a,b) | choice(v1,v2) (drawn per trial); FLAG as on the command line, without the dashes."""
    num_samples: int = 1
    """Times the whole grid is run (with new draws of the sampled flags each time)."""
    metric: str = "eval_return"
    """Metric column scored, as its mean over the run's seeds."""
    score: Literal["final", "curve"] = "final"
    """Rank trials by the metric at their last evaluation (final), or by its mean over all their evaluations (curve: the area under the learning curve, which rewards learning fast)."""
    mode: Literal["max", "min"] = "max"
    """Whether a larger or a smaller metric is better."""
    metrics_from: str | None = None
    """Subdirectory of a trial's run directory whose metrics are scored (default: the run directory; 'wsrl' for 'run', 'online' for 'run --agent uni_o4')."""
    out_dir: Path | None = None
    """Sweep directory (default runs/sweep_<time>); trials go to <out-dir>/trials/<trial id>."""
    cpus_per_trial: float = 1.0
    """CPUs Ray reserves for each trial (trials run side by side while CPUs remain)."""
    gpus_per_trial: float = 0.0
    """GPUs Ray reserves for each trial (fractions share a GPU)."""
    max_concurrent_trials: int = 0
    """At most this many trials at once (0: as many as the reserved resources allow)."""
    address: str | None = None
    """Ray cluster to join ('auto' finds a running one); default: a Ray instance on this machine only."""
    scheduler: Literal["fifo", "asha"] = "fifo"
    """fifo: every trial runs to its end; asha: Tune's asynchronous successive halving stops trials whose evaluations trail the others' at the same step."""
    grace_steps: int = 0
    """asha: environment steps every trial runs before it may be stopped (default: a tenth of --max-steps)."""
    max_steps: int | None = None
    """asha: a trial's full length in environment steps (default: the command's --steps, or --finetune.steps for run)."""
    reduction_factor: int = 3
    """asha: roughly 1 in this many trials passes each rung."""
    seed: int = 0
    """Seed of the draws of the sampled flags (the trials' own seeds are the command's --seed)."""
    dry_run: bool = False
    """Check the command and list the trials without running them (needs no Ray)."""
    resume: bool = False
    """Continue the interrupted sweep in --out-dir (same command and space): unfinished and failed trials run again, each o2o run continuing from its last checkpoint (run trials start over)."""
    poll_seconds: float = 2.0
    """How often a trial looks for new evaluations in its run's metrics."""


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One flag of the search space: a grid of values, or a distribution drawn per trial."""

    flag: str
    kind: Literal["grid", "uniform", "loguniform", "randint", "choice"]
    values: tuple[str, ...]

    def describe(self) -> str:
        """The dimension as the user wrote it."""
        return ",".join(self.values) if self.kind == "grid" else f"{self.kind}({','.join(self.values)})"


def parse_dimension(entry: str) -> Dimension:
    """Parse one ``--space`` entry; errors name the entry."""
    flag, separator, spec = entry.partition("=")
    flag = flag.strip().removeprefix("--")
    if not separator or not flag or not spec.strip():
        raise SweepError(f"search space entry '{entry}' is not FLAG=VALUES (e.g. sac.actor-lr=1e-4,3e-4)")
    if f"--{flag}" in RESERVED_FLAGS:
        raise SweepError(f"search space entry '{entry}': the sweep sets --{flag} itself")
    match = re.fullmatch(r"\s*(\w+)\((.*)\)\s*", spec)
    if match and match.group(1) in SAMPLERS:
        kind, arguments = match.group(1), tuple(value.strip() for value in match.group(2).split(","))
        if kind == "choice":
            if not all(arguments):
                raise SweepError(f"search space entry '{entry}': choice() needs values")
        else:
            if len(arguments) != 2:
                raise SweepError(f"search space entry '{entry}': {kind}() takes a lower and an upper bound")
            try:
                low, high = (int(value) if kind == "randint" else float(value) for value in arguments)
            except ValueError:
                raise SweepError(f"search space entry '{entry}': {kind}() bounds must be {'integers' if kind == 'randint' else 'numbers'}") from None
            if not low < high or (kind == "loguniform" and low <= 0):
                raise SweepError(f"search space entry '{entry}': {kind}() needs {'0 < ' if kind == 'loguniform' else ''}low < high")
        return Dimension(flag, kind, arguments)
    values = tuple(value.strip() for value in spec.split(","))
    if not all(values):
        raise SweepError(f"search space entry '{entry}' has an empty value")
    return Dimension(flag, "grid", values)


def parse_space(entries: tuple[str, ...]) -> tuple[Dimension, ...]:
    """Parse every ``--space`` entry; a flag named twice is an error."""
    dimensions = tuple(parse_dimension(entry) for entry in entries)
    flags = [dimension.flag for dimension in dimensions]
    repeated = sorted({flag for flag in flags if flags.count(flag) > 1})
    if repeated:
        raise SweepError(f"search space names {', '.join(repeated)} more than once")
    return dimensions


def trial_argv(base: list[str], values: dict[str, Any], run_dir: Path) -> list[str]:
    """The o2o command line of one trial: the base command, each flag with its value (a value with
    spaces as several words; True / False of an on-off flag as ``--flag`` / ``--…no-flag``), and
    the trial's run directory."""
    argv = list(base)
    for flag, value in values.items():
        text = str(value)
        if text.lower() in ("true", "false") and is_switch(base[0], flag):
            head, _, last = flag.rpartition(".")
            argv.append(f"--{flag}" if text.lower() == "true" else f"--{head + '.' if head else ''}no-{last}")
        else:
            argv += [f"--{flag}", *shlex.split(text)]
    return argv + ["--run-dir", str(run_dir)]


@functools.lru_cache(maxsize=None)
def is_switch(command: str, flag: str) -> bool:
    """Whether ``flag`` of an o2o command is an on-off switch (a plain ``bool`` field, which the
    command line sets as ``--flag`` / ``--no-flag`` rather than with a value)."""
    import typing

    from experiments.cli import command_args_types

    owner: Any = command_args_types().get(command)
    for part in flag.split("."):
        hints = typing.get_type_hints(owner) if dataclasses.is_dataclass(owner) else {}
        owner = hints.get(part.replace("-", "_"))
        if owner is None:
            return False
    return owner is bool


def with_wandb_group(base: list[str], group: str) -> list[str]:
    """A command that logs to W&B gets the sweep as its W&B group (unless it names one), so a
    sweep's trials appear together."""
    flags = {word.split("=")[0] for word in base}
    if "--log.wandb-project" in flags and "--log.wandb-group" not in flags:
        return [*base, "--log.wandb-group", group]
    return base


def check_command(base: list[str]) -> None:
    """Refuse commands a sweep cannot run and flags it sets itself."""
    if not base or base[0] not in SWEEPABLE_COMMANDS:
        given = base[0] if base else "nothing"
        raise SweepError(f"a sweep runs one of {', '.join(SWEEPABLE_COMMANDS)}; the command starts with {given}")
    for word in base:
        if word.split("=")[0] in RESERVED_FLAGS:
            raise SweepError(f"the sweep's command must not set {word.split('=')[0]}: every trial gets its own run directory")


def default_metrics_from(base: list[str]) -> str:
    """Where a command's scored metrics are: its run directory, or the fine-tuning stage of ``run``."""
    if base[0] != "run":
        return "."
    words = " ".join(base)
    return "online" if re.search(r"--agent[ =]uni_o4", words) else "wsrl"


def representative_values(dimensions: tuple[Dimension, ...]) -> list[dict[str, str]]:
    """Value sets that together use every grid value and one value of each distribution: enough to
    check every flag and value before any trial starts."""
    longest = max((len(d.values) for d in dimensions if d.kind in ("grid", "choice")), default=1)
    return [
        {d.flag: d.values[min(index, len(d.values) - 1)] if d.kind in ("grid", "choice") else d.values[0] for d in dimensions}
        for index in range(longest)
    ]


def validate_trials(base: list[str], dimensions: tuple[Dimension, ...], out_dir: Path) -> None:
    """Parse the trials' command lines as ``o2o`` would, so that a misspelt flag or a bad value stops
    the sweep before Ray starts (tyro's message names it)."""
    from experiments.cli import parse_args

    for values in representative_values(dimensions):
        parse_args(trial_argv(base, values, out_dir / TRIALS_DIR / "check"))


def grid_trials(dimensions: tuple[Dimension, ...], num_samples: int) -> list[dict[str, str]]:
    """The grid values of every trial a sweep runs (the drawn flags are drawn when it runs)."""
    grids = [[(d.flag, value) for value in d.values] for d in dimensions if d.kind == "grid"]
    combinations = [dict(combination) for combination in itertools.product(*grids)]
    return [combination for _ in range(num_samples) for combination in combinations]


def evaluation_summaries(rows: list[dict[str, Any]], metric: str, complete_through: float) -> list[dict[str, Any]]:
    """Per logged step up to ``complete_through``: the step, the metric's mean over seeds, its
    standard deviation, the seed count and the mean of the means so far (rows without the metric
    are skipped)."""
    by_step: dict[int, list[float]] = {}
    for row in rows:
        value = row.get(metric)
        if isinstance(value, (int, float)) and row["step"] <= complete_through:
            by_step.setdefault(int(row["step"]), []).append(float(value))
    summaries = []
    for step in sorted(by_step):
        values = by_step[step]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((value - mean) ** 2 for value in values) / len(values))
        summaries.append({"step": step, metric: mean, f"{metric}_std": std, "seeds": len(values)})
    for index, summary in enumerate(summaries):
        summary[curve_key(metric)] = sum(s[metric] for s in summaries[: index + 1]) / (index + 1)
    return summaries


def curve_key(metric: str) -> str:
    """Report key of a metric's mean over the evaluations so far (the area under its curve)."""
    return f"{metric}_curve_mean"


def scored_key(args: SweepArgs) -> str:
    """The report key a sweep ranks its trials by."""
    return args.metric if args.score == "final" else curve_key(args.metric)


def written_rows(path: Path) -> list[dict[str, Any]]:
    """The metric rows a running o2o process has written whole so far (none before the file exists;
    a line still being written is left for the next look)."""
    if not path.exists():
        return []
    text = path.read_text()
    complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


TRIAL_CHILD = "import sys; from experiments.sweep import trial_child_main; trial_child_main(sys.argv[1:])"
"""What a trial's child process runs: the o2o command line given as its arguments."""


def trial_child_main(argv: list[str]) -> None:
    """A trial's o2o process: on Linux it first asks the kernel to kill it when the trial's process
    ends (Tune may end a stopped trial's worker without running its cleanup), then runs ``o2o
    argv``. Done in the child after it started, not between fork and exec, where a process with
    JAX's threads must not run Python."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    from experiments.cli import main

    main(argv)


def run_trial(
    argv: list[str],
    metrics_dir: Path,
    metric: str,
    report: Callable[[dict[str, Any]], None],
    log_path: Path,
    poll_seconds: float = 2.0,
) -> dict[str, Any]:
    """Run one o2o command line as a child process; ``report`` every evaluation of ``metrics_dir``
    (the seeds' mean) once all seeds have logged it; return the last one.

    A step counts as complete once a later step is in the file or the process has ended, since
    the seeds' rows of one step are written one after another. A failed run raises with the end
    of its output (kept whole in ``log_path``); if the caller stops the trial (Tune raises out of
    ``report``), the child is killed.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    reported_through = -1
    last: dict[str, Any] | None = None
    with log_path.open("w") as log:
        child = subprocess.Popen([sys.executable, "-c", TRIAL_CHILD, *argv], stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                finished = child.poll() is not None
                rows = written_rows(metrics_dir / METRICS_JSONL)
                steps = sorted({int(row["step"]) for row in rows if metric in row})
                complete_through = steps[-1] if finished and steps else (steps[-2] if len(steps) > 1 else -1)
                for summary in evaluation_summaries(rows, metric, complete_through):
                    if summary["step"] > reported_through:
                        report(summary)
                        reported_through, last = summary["step"], summary
                if finished:
                    break
                time.sleep(poll_seconds)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    if child.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        raise RuntimeError(f"o2o {shlex.join(argv)} exited with status {child.returncode}; its output ends:\n{tail}")
    if last is None:
        raise RuntimeError(f"o2o {shlex.join(argv)} logged no '{metric}' in {metrics_dir / METRICS_JSONL}")
    return last


def continuation_flags(command: str, run_dir: Path) -> list[str]:
    """Flags for a trial started again in a run directory an earlier attempt wrote: ``--resume``
    from its last checkpoint; ``--overwrite`` for ``run``, which cannot resume; none where no
    checkpoint was written (o2o starts such a directory afresh)."""
    if not run_dir.exists():
        return []
    if command == "run":
        return ["--overwrite"]
    committed = any(path.name.isdigit() for path in (run_dir / "checkpoints").glob("*"))  # not orbax's *-tmp
    return ["--resume"] if committed else []


def _tune_trial(values: dict[str, Any], base: list[str], out_dir: Path, metrics_from: str, metric: str, poll_seconds: float) -> None:
    """Tune's trainable: one trial's o2o process in <out-dir>/trials/<trial id>."""
    from ray import tune

    run_dir = out_dir / TRIALS_DIR / tune.get_context().get_trial_id()
    argv = trial_argv(base, values, run_dir) + continuation_flags(base[0], run_dir)
    run_trial(argv, run_dir / metrics_from, metric, tune.report, run_dir / TRIAL_LOG, poll_seconds)


def trial_directory_name(trial: Any) -> str:
    """Tune's name and directory of a trial: its id, which also names its o2o run directory."""
    return trial.trial_id


def _search_space(dimensions: tuple[Dimension, ...], tune: Any) -> dict[str, Any]:
    def converted(dimension: Dimension) -> Any:
        if dimension.kind == "grid":
            return tune.grid_search(list(dimension.values))
        if dimension.kind == "choice":
            return tune.choice(list(dimension.values))
        if dimension.kind == "randint":
            return tune.randint(int(dimension.values[0]), int(dimension.values[1]))
        low, high = (float(value) for value in dimension.values)
        return (tune.uniform if dimension.kind == "uniform" else tune.loguniform)(low, high)

    return {dimension.flag: converted(dimension) for dimension in dimensions}


def command_steps(base: list[str]) -> int | None:
    """A command's length in environment steps as its own flags give it (``--steps``, or
    ``--finetune.steps`` for ``run`` / ``finetune``), else None."""
    flags = ("--finetune.steps",) if base[0] in ("run", "finetune") else ("--steps",)
    for index, word in enumerate(base):
        name, _, value = word.partition("=")
        if name in flags:
            value = value or (base[index + 1] if index + 1 < len(base) else "")
            return int(value) if value.isdigit() else None
    return None


def asha_steps(args: SweepArgs, base: list[str]) -> tuple[int, int]:
    """ASHA's (full trial length, grace period) in environment steps, checked."""
    max_steps = args.max_steps or command_steps(base)
    if not max_steps:
        raise SweepError("--scheduler asha needs the trials' length: give --max-steps (or --steps in the command)")
    grace_steps = args.grace_steps or max(1, max_steps // 10)
    if not 0 < grace_steps <= max_steps:
        raise SweepError(f"--grace-steps must lie in 1..{max_steps}, got {grace_steps}")
    if args.reduction_factor < 2:
        raise SweepError(f"--reduction-factor must be >= 2, got {args.reduction_factor}")
    return max_steps, grace_steps


def trial_table(results: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """The trials best first: those that ran to the end by their final score, then those a
    scheduler stopped early or an interruption cut short by their last score, then those with
    no score."""
    def order(row: dict[str, Any]) -> tuple[int, float]:
        score = row.get(metric)
        if score is None or (isinstance(score, float) and math.isnan(score)):
            return (2, 0.0)
        complete = row.get("finished", True) and not row.get("stopped_early")
        return (0 if complete else 1, -score if mode == "max" else score)

    return sorted(results, key=order)


def _label(row: dict[str, Any], flags: list[str]) -> str:
    return " ".join(f"{flag}={_short(row[flag])}" for flag in flags) or row["trial"]


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trial_status(row: dict[str, Any]) -> str:
    """ok, stopped early (by the scheduler), unfinished (the sweep was interrupted) or error."""
    if row.get("error"):
        return "error"
    if row.get("stopped_early"):
        return "stopped early"
    return "ok" if row.get("finished", True) else "unfinished"


def _print_table(rows: list[dict[str, Any]], flags: list[str], metric: str, ranked_by: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"o2o sweep: {metric} (mean over seeds), best {ranked_by} first")
    for column in ["trial", *flags, "step", f"final {metric}", "± std", "curve mean", "status"]:
        table.add_column(column)
    for row in rows:
        score, curve = row.get(metric), row.get(curve_key(metric))
        table.add_row(
            row["trial"], *(_short(row[flag]) for flag in flags), "-" if row.get("step") is None else str(row["step"]),
            "-" if score is None else f"{score:.2f}", "-" if score is None else f"{row[f'{metric}_std']:.2f}",
            "-" if curve is None else f"{curve:.2f}",
            row["status"],
        )
    # Piped output gets a wide table rather than rich's 80 columns with truncated flag names.
    Console(width=None if sys.stdout.isatty() else 200).print(table)


SPEC_FIELDS = ("command", "space", "num_samples", "metric", "score", "mode", "metrics_from", "scheduler", "grace_steps",
               "max_steps", "reduction_factor", "seed")
"""SweepArgs fields that define a sweep's trials and scores: a resumed sweep must repeat them."""
SPEC_JSON = "sweep_spec.json"
TUNE_DIR = "tune"


def _make_out_dir(args: SweepArgs) -> Path:
    """A new sweep's directory with its spec written, or (``--resume``) the interrupted sweep's,
    checked against its spec."""
    if args.resume:
        if args.out_dir is None:
            raise SweepError("--resume needs the --out-dir of the sweep to continue")
        out_dir = args.out_dir.resolve()
        if not (out_dir / SPEC_JSON).is_file() or not (out_dir / TUNE_DIR).is_dir():
            raise SweepError(f"{out_dir} holds no sweep to resume (no {SPEC_JSON} and {TUNE_DIR}/)")
        recorded = json.loads((out_dir / SPEC_JSON).read_text())
        given = json.loads(json.dumps({name: getattr(args, name) for name in SPEC_FIELDS}))
        changed = [name for name in SPEC_FIELDS if recorded.get(name) != given[name]]
        if changed:
            details = "; ".join(f"--{name.replace('_', '-')} was {recorded.get(name)!r}, now {given[name]!r}" for name in changed)
            raise SweepError(f"a resumed sweep must repeat its command and search: {details}")
        return out_dir
    out_dir = (args.out_dir or Path("runs") / f"sweep_{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if (out_dir / SPEC_JSON).exists() or (out_dir / TRIALS_DIR).exists():
        raise SweepError(f"{out_dir} already holds a sweep: --resume continues it, or choose another --out-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / SPEC_JSON, {name: getattr(args, name) for name in SPEC_FIELDS})
    return out_dir


def sweep(args: SweepArgs) -> Path | None:
    """Run ``o2o sweep``; returns the sweep directory (None for a dry run)."""
    base = shlex.split(args.command)
    if base[:1] == ["o2o"]:
        base = base[1:]
    check_command(base)
    dimensions = parse_space(args.space)
    if not dimensions:
        raise SweepError("the search space is empty: give --space FLAG=V1,V2 ...")
    if args.num_samples < 1:
        raise SweepError(f"--num-samples must be >= 1, got {args.num_samples}")
    metrics_from = args.metrics_from or default_metrics_from(base)
    max_steps, grace_steps = asha_steps(args, base) if args.scheduler == "asha" else (None, None)
    planned = grid_trials(dimensions, args.num_samples)
    validate_trials(base, dimensions, args.out_dir or Path("runs"))
    if args.dry_run:
        drawn = " ".join(f"--{d.flag} ~{d.describe()}" for d in dimensions if d.kind != "grid")
        for index, values in enumerate(planned):
            command = shlex.join(trial_argv(base, values, Path("<out-dir>/trials/<trial id>")))
            print(f"trial {index}: o2o {command}" + (f"  (drawn: {drawn})" if drawn else ""))
        scored = f"final '{args.metric}'" if args.score == "final" else f"'{args.metric}' averaged over the evaluations"
        print(f"{len(planned)} trials; scored: {scored} of <run dir>/{metrics_from}, {args.mode}imised")
        return None

    ray = import_extra("ray", "sweep", "o2o sweep")
    tune = import_extra("ray.tune", "sweep", "o2o sweep")
    out_dir = _make_out_dir(args)
    base = with_wandb_group(base, out_dir.name)
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    trainable = tune.with_resources(
        functools.partial(_tune_trial, base=base, out_dir=out_dir, metrics_from=metrics_from, metric=args.metric, poll_seconds=args.poll_seconds),
        {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial},
    )
    if args.resume:
        tuner = tune.Tuner.restore(str(out_dir / TUNE_DIR), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(args, trainable, dimensions, out_dir, tune, max_steps, grace_steps)
    flags = [dimension.flag for dimension in dimensions]
    results = [_trial_result(result, flags, base, out_dir, args.metric, max_steps) for result in tuner.fit()]
    rows = [{**row, "status": trial_status(row)} for row in trial_table(results, scored_key(args), args.mode)]
    _write_outputs(out_dir, args, rows, flags, metrics_from)
    _print_table(rows, flags, args.metric, "final" if args.score == "final" else "curve mean")
    best = next((row for row in rows if row.get(scored_key(args)) is not None), None)
    if best is not None:
        print(f"best: {best['command']}")
    print(f"sweep directory: {out_dir} (sweep.csv, sweep.json, sweep.png)")
    unfinished = [row["trial"] for row in rows if row["status"] in ("unfinished", "error")]
    if unfinished:
        print(f"{len(unfinished)} trials did not finish; the same command with --resume runs them again")
    if best is None:
        raise SweepError(f"no trial finished; first error: {rows[0]['error']} (each trial's output: {out_dir / TRIALS_DIR}/*/{TRIAL_LOG})")
    return out_dir


def _trial_result(result: Any, flags: list[str], base: list[str], out_dir: Path, metric: str, max_steps: int | None) -> dict[str, Any]:
    """One trial's row from Tune's result: its flag values, last report, run directory, error and
    the command that reruns it."""
    trial_id = Path(result.path).name  # named by trial_directory_name
    run_dir = out_dir / TRIALS_DIR / trial_id
    metrics = result.metrics or {}
    values = {flag: result.config[flag] for flag in flags}
    return {
        "trial": trial_id, **values, "step": metrics.get("step"),
        **{key: metrics.get(key) for key in (metric, f"{metric}_std", curve_key(metric), "seeds")},
        "run_dir": str(run_dir), "error": trial_error(result.error, run_dir / TRIAL_LOG),
        "stopped_early": bool(max_steps and metrics.get("step") is not None and metrics["step"] < max_steps),
        "finished": bool(metrics.get("done")) and not result.error,
        "command": "o2o " + shlex.join(trial_argv(base, values, run_dir)),
    }


def _new_tuner(args: SweepArgs, trainable: Any, dimensions: tuple[Dimension, ...], out_dir: Path, tune: Any,
               max_steps: int | None, grace_steps: int | None) -> Any:
    """Tune's tuner for a new sweep: the search space, seeded draws, the scheduler, trial names."""
    scheduler = None
    if args.scheduler == "asha":  # over the environment steps the trials report
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="step", max_t=max_steps, grace_period=grace_steps, reduction_factor=args.reduction_factor
        )
    return tune.Tuner(
        trainable,
        param_space=_search_space(dimensions, tune),
        tune_config=tune.TuneConfig(
            metric=scored_key(args), mode=args.mode, num_samples=args.num_samples, scheduler=scheduler,
            search_alg=tune.search.BasicVariantGenerator(random_state=args.seed),
            max_concurrent_trials=args.max_concurrent_trials or None,
            trial_name_creator=trial_directory_name, trial_dirname_creator=trial_directory_name,
        ),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(out_dir), verbose=1),
    )


def trial_error(error: BaseException | None, log_path: Path) -> str | None:
    """What stopped a trial in one line: the o2o run's own last line of output when it has one
    (e.g. "o2o: unknown environment ..."), else the end of Tune's error."""
    if error is None:
        return None
    lines = [line for line in (log_path.read_text().splitlines() if log_path.exists() else []) if line.strip()]
    if lines:
        return lines[-1].strip()
    return str(error).strip().splitlines()[-1]


def _write_outputs(out_dir: Path, args: SweepArgs, rows: list[dict[str, Any]], flags: list[str], metrics_from: str) -> None:
    import csv

    columns = ["trial", *flags, "step", args.metric, f"{args.metric}_std", curve_key(args.metric), "seeds", "status", "error",
               "run_dir", "command"]
    temporary = out_dir / ".sweep.csv.tmp"
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(out_dir / "sweep.csv")
    write_json_atomic(out_dir / "sweep.json", {**run_record(args), "command": sys.argv, "trials": rows})
    plotted = [row for row in rows if row.get(scored_key(args)) is not None][:PLOTTED_TRIALS]
    if plotted:
        plot_runs(
            [Path(row["run_dir"]) / metrics_from for row in plotted], out_dir / "sweep.png", metric=args.metric,
            title=f"o2o sweep: {len(plotted)} best of {len(rows)} trials", labels=[_label(row, flags) for row in plotted],
        )
