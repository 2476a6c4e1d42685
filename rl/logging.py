"""Run records: config + provenance, metrics (JSONL and CSV), optional TensorBoard / W&B,
rich progress bars, and learning-curve plots."""

from __future__ import annotations

import contextlib
import contextvars
import csv
import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np

from rl.extras import import_extra
from rl.host import cpuinfo_lines
from rl.prng import unrolled_threefry

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CONFIG_JSON = "config.json"
TRACKED_PACKAGES = ("o2o", "jax", "jaxlib", "flax", "optax", "distrax", "gymnasium", "mujoco", "orbax-checkpoint", "numpy")


RESULTS_DIR = "experiments/results"
"""Where the benchmark scripts write their outputs, inside the repository."""


def git_revision(source: Path | None = None) -> str | None:
    """The git commit of the repository holding ``source`` (default: o2o's source tree), with
    ``-dirty`` if a tracked file is modified, or None outside git.

    Changes under :data:`RESULTS_DIR` do not count: a benchmark that rewrites its committed
    outputs there has not changed the code that produced them."""
    source = source or Path(__file__).resolve().parent
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", f":(top,exclude){RESULTS_DIR}"],
            cwd=source, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision + ("-dirty" if dirty else "")


def package_versions(names: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed versions of the packages that decide a run's numbers."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux's ``cpuinfo``; elsewhere what ``platform`` reports)."""
    for line in cpuinfo_lines(("model name",), cpuinfo):
        return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_record(config: Any, packages: Iterable[str] = TRACKED_PACKAGES) -> dict[str, Any]:
    """What decides a run's numbers, to store next to them: the config, git revision, package
    versions, threefry lowering, Python, platform, CPU and JAX device, and the start time."""
    device = jax.devices()[0]
    return {
        "config": config,
        "git_revision": git_revision(),
        "packages": package_versions(packages),
        "threefry_unrolled_on_cpu": unrolled_threefry(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": {"model": cpu_model(), "count": os.cpu_count()},
        "device": {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def result_record(settings: Any, extra_packages: Iterable[str] = ()) -> dict[str, Any]:
    """A benchmark's :func:`run_record`: its settings as the config, the peer libraries in
    ``extra_packages`` among the versions. Committed results must not name the machine's paths, so
    every path in ``settings`` is kept by its last component and no command line is stored."""
    return run_record(to_jsonable(settings, path_as=lambda path: path.name), (*TRACKED_PACKAGES, *extra_packages))


def write_result_record(path: Path, settings: Any, extra_packages: Iterable[str] = ()) -> None:
    """Write :func:`result_record` to ``path`` (JSON, atomically)."""
    write_json_atomic(Path(path), result_record(settings, extra_packages))


def to_jsonable(value: Any, path_as: Callable[[Path], str] = str) -> Any:
    """Dataclasses, paths (written by ``path_as``), tuples and numpy scalars/arrays as plain JSON
    values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name), path_as) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, path_as) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, path_as) for v in value]
    if isinstance(value, Path):
        return path_as(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return np.asarray(value).tolist()
    if hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    return value


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON under a temporary name, then rename over ``path``."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(to_jsonable(payload), indent=2, sort_keys=True))
    os.replace(temporary, path)


@dataclasses.dataclass(frozen=True)
class LogSinks:
    """Where metric rows go besides the run directory's ``metrics.jsonl`` / ``metrics.csv``."""

    tensorboard: bool = False
    """Also write TensorBoard event files to <run dir>/tensorboard (needs the tensorboard extra)."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs the wandb extra; WANDB_MODE=offline works without a network)."""
    wandb_group: str | None = None
    """W&B group of the runs (default: none); every stage of a command is its own W&B run."""


_CURRENT_SINKS: contextvars.ContextVar[LogSinks] = contextvars.ContextVar("o2o_log_sinks", default=LogSinks())


@contextlib.contextmanager
def metric_sinks(sinks: LogSinks) -> Iterator[LogSinks]:
    """Every :class:`RunLogger` opened inside this block (and given no sinks) also writes to ``sinks``.

    A scope rather than a parameter of every training loop: where the metrics go is the command's
    choice, and the loops, which only open a logger, need not carry it.
    """
    token = _CURRENT_SINKS.set(sinks)
    try:
        yield sinks
    finally:
        _CURRENT_SINKS.reset(token)


def current_sinks() -> LogSinks:
    """The sinks of the innermost :func:`metric_sinks` block (none outside any)."""
    return _CURRENT_SINKS.get()


class RunLogger:
    """Writes ``config.json`` once and appends metric rows to ``metrics.jsonl`` / ``metrics.csv``.

    On resume, rows logged after the checkpoint step are dropped first, so a resumed run's files
    read exactly like an uninterrupted run's. TensorBoard (``tensorboardX``) and W&B also receive
    every row when ``sinks`` (default: :func:`current_sinks`) asks for them; a missing extra is an
    error that names it. TensorBoard tags are ``<metric>/seed<k>`` for per-seed rows.
    """

    def __init__(
        self,
        run_dir: Path,
        config: Any,
        resume_step: int | None = None,
        sinks: LogSinks | None = None,
    ) -> None:
        sinks = current_sinks() if sinks is None else sinks
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / METRICS_JSONL
        self.csv_path = self.run_dir / METRICS_CSV
        record = {**run_record(config), "command": sys.argv}
        write_json_atomic(self.run_dir / CONFIG_JSON, record)
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.jsonl_path.exists():
            self.rows = [row for row in read_metrics(self.run_dir) if row.get("step", 0) <= resume_step]
            self._rewrite()
        elif self.jsonl_path.exists():
            self.jsonl_path.unlink()
        self._tensorboard = _open_tensorboard(self.run_dir, resume_step) if sinks.tensorboard else None
        self._wandb = _open_wandb(sinks, self.run_dir, record) if sinks.wandb_project else None

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one metric row (must contain ``step``)."""
        clean = {key: _scalar(value) for key, value in row.items()}
        self.rows.append(clean)
        with self.jsonl_path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")
        if self._tensorboard is not None:
            for tag, value in tagged_scalars(clean).items():
                self._tensorboard.add_scalar(tag, value, clean["step"])
        if self._wandb is not None:
            self._wandb.log({"step": clean["step"], **tagged_scalars(clean)})

    def close(self) -> None:
        """Write the CSV view and close optional sinks."""
        self._write_csv()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()

    def _rewrite(self) -> None:
        with self.jsonl_path.open("w") as handle:
            for row in self.rows:
                handle.write(json.dumps(row) + "\n")
        self._write_csv()

    def _write_csv(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns.extend(key for key in row if key not in columns)
        temporary = self.csv_path.with_name(f".{self.csv_path.name}.tmp")
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(temporary, self.csv_path)


def _scalar(value: Any) -> Any:
    if hasattr(value, "item") and np.ndim(value) == 0:
        return value.item()
    return value


def tagged_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A metric row's numbers under TensorBoard / W&B tags: ``<metric>/seed<k>`` for a seed's row,
    so the seeds' rows of one step stay apart (step, seed and text fields are not scalars)."""
    suffix = f"/seed{row['seed']}" if "seed" in row else ""
    return {
        f"{key}{suffix}": float(value)
        for key, value in row.items()
        if isinstance(value, (int, float)) and key not in ("step", "seed")
    }


def _open_tensorboard(run_dir: Path, resume_step: int | None):
    tensorboardx = import_extra("tensorboardX", "tensorboard", "TensorBoard logging")
    # A resumed run has TensorBoard hide what the killed attempt logged after the checkpoint, as the
    # metric files drop those rows.
    purge_step = None if resume_step is None or resume_step >= np.iinfo(np.int32).max else resume_step + 1
    # Event files are named by the second they were opened in: a suffix keeps a quick restart's
    # writer from replacing the first one's file.
    return tensorboardx.SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step, filename_suffix=f".{time.time_ns()}")


def _open_wandb(sinks: LogSinks, run_dir: Path, record: Mapping[str, Any]):
    wandb = import_extra("wandb", "wandb", "W&B logging")
    # Rows arrive per seed and per stage, not in step order: W&B's own step only counts rows, and
    # every chart plots against the logged "step".
    run = wandb.init(
        project=sinks.wandb_project,
        group=sinks.wandb_group,
        dir=str(run_dir),
        config=to_jsonable(record),
        name=f"{run_dir.parent.name}/{run_dir.name}",
        reinit="create_new",
    )
    run.define_metric("*", step_metric="step")
    return run


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All metric rows of a run directory, in logged order."""
    path = Path(run_dir) / METRICS_JSONL
    if not path.exists():
        raise FileNotFoundError(f"no {METRICS_JSONL} in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- progress


class Progress:
    """A rich progress bar showing phase, steps, steps/s and the latest return.

    Disabled (a no-op) when ``enabled`` is False, e.g. under CI or when stderr is not a terminal.
    """

    def __init__(self, total: int, description: str, enabled: bool | None = None, completed: int = 0) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress = None
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

        self._progress = RichProgress(
            TextColumn("[bold]{task.fields[phase]:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>7.0f} steps/s"),
            TextColumn("return {task.fields[score]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, completed=completed, phase=description, rate=0.0, score="-")

    def update(self, completed: int, rate: float, score: float | None = None, phase: str | None = None) -> None:
        """Move the bar to ``completed`` steps."""
        if self._progress is None:
            return
        fields: dict[str, Any] = {"rate": rate}
        if score is not None:
            fields["score"] = f"{score:.1f}"
        if phase is not None:
            fields["phase"] = phase
        self._progress.update(self._task, completed=completed, **fields)

    def close(self) -> None:
        """Stop drawing."""
        if self._progress is not None:
            self._progress.stop()


# ----------------------------------------------------------------------------- plots


def learning_curves(
    run_dirs: Sequence[str | os.PathLike], metric: str = "eval_return", labels: Sequence[str] | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per run directory (keyed by ``labels``, default the directory names): (steps,
    values[seed, step]) of ``metric``, seeds aligned on steps."""
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} run directories")
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for index, run_dir in enumerate(run_dirs):
        rows = [row for row in read_metrics(run_dir) if metric in row and row[metric] is not None]
        if not rows:
            raise ValueError(f"{run_dir} has no '{metric}' rows")
        steps = np.array(sorted({row["step"] for row in rows}))
        seeds = sorted({row.get("seed", 0) for row in rows})
        values = np.full((len(seeds), len(steps)), np.nan)
        for row in rows:
            values[seeds.index(row.get("seed", 0)), np.searchsorted(steps, row["step"])] = row[metric]
        curves[Path(run_dir).name if labels is None else labels[index]] = (steps, values)
    return curves


def plot_runs(
    run_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    metric: str = "eval_return",
    title: str | None = None,
    labels: Sequence[str] | None = None,
) -> Path:
    """Draw mean ± std over seeds (and the min-max band) of ``metric`` for each run to a PNG
    (legend: ``labels``, default the directory names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, (steps, values) in learning_curves(run_dirs, metric, labels).items():
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0)
        line, = axes.plot(steps, mean, label=f"{label} (n={values.shape[0]})")
        axes.fill_between(steps, mean - std, mean + std, alpha=0.25, color=line.get_color())
        axes.fill_between(steps, np.nanmin(values, 0), np.nanmax(values, 0), alpha=0.08, color=line.get_color())
    axes.set_xlabel("environment steps")
    axes.set_ylabel(metric.replace("_", " "))
    axes.set_title("\n".join(textwrap.wrap(title or metric, 64)))  # long titles wrap instead of running off the figure
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
