"""Extra metric sinks: TensorBoard event files and W&B rows carry the same numbers as metrics.jsonl,
one tag per seed, chosen per command (``--log.*``) without the training loops carrying them."""

import struct
import sys
import types
from pathlib import Path

import pytest

from experiments.cli import main
from rl.extras import MissingExtra, import_extra
from rl.logging import LogSinks, RunLogger, current_sinks, metric_sinks, read_metrics, tagged_scalars

QUICK = [
    "--sac.actor-hidden-dims", "32", "32", "--sac.critic-hidden-dims", "32", "32", "--sac.batch-size", "32",
    "--online.warmup-steps", "100", "--online.eval-interval", "200", "--online.eval-episodes", "1",
    "--online.log-interval", "100",
]


def read_tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows from the event files under ``log_dir``: tag -> [(step, value)].

    Event files are TFRecord framed (length, length CRC, payload, payload CRC); the payload is an
    ``Event`` protocol buffer, whose class tensorboardX ships. Files are read in the order they were
    written; a session start at step s (a resumed writer's purge step) hides the points at s and
    after, as TensorBoard does."""
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2", reason="reading event files needs tensorboardX (the test extra)")
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(log_dir.rglob("events.out.tfevents.*"), key=lambda path: path.stat().st_mtime_ns):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                scalars = {tag: [point for point in points if point[0] < event.step] for tag, points in scalars.items()}
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tagged_scalars_keep_each_seeds_row_apart_and_drop_text():
    row = {"step": 300, "seed": 2, "phase": "eval", "eval_return": -150.5, "episodes": 3, "on_target": True}
    assert tagged_scalars(row) == {"eval_return/seed2": -150.5, "episodes/seed2": 3.0, "on_target/seed2": 1.0}
    assert tagged_scalars({"step": 1, "loss": 0.5}) == {"loss": 0.5}


def test_sinks_apply_inside_their_scope_only(tmp_path):
    assert current_sinks() == LogSinks()
    with metric_sinks(LogSinks(tensorboard=True)) as sinks:
        assert current_sinks() is sinks
        with metric_sinks(LogSinks()):
            assert current_sinks() == LogSinks()
        assert current_sinks() is sinks
    assert current_sinks() == LogSinks()
    logger = RunLogger(tmp_path / "plain", {"a": 1})
    logger.log({"step": 1, "loss": 0.5})
    logger.close()
    assert not (tmp_path / "plain" / "tensorboard").exists()


def test_train_with_log_tensorboard_writes_the_metrics_rows_as_event_scalars(tmp_path):
    pytest.importorskip("tensorboardX", reason="TensorBoard logging needs tensorboardX (the test extra)")
    run_dir = tmp_path / "run"
    main(["train", "--env", "Pendulum-v1", "--steps", "400", "--num-seeds", "2", "--run-dir", str(run_dir), "--log.tensorboard", *QUICK])
    scalars = read_tensorboard_scalars(run_dir / "tensorboard")
    for seed in (0, 1):
        evaluations = [(row["step"], row["eval_return"]) for row in read_metrics(run_dir) if row["phase"] == "eval" and row["seed"] == seed]
        assert [step for step, _ in evaluations] == [200, 400]
        logged = scalars[f"eval_return/seed{seed}"]
        assert [step for step, _ in logged] == [200, 400]
        assert [value for _, value in logged] == pytest.approx([value for _, value in evaluations], rel=1e-6)


def test_a_resumed_runs_tensorboard_hides_what_the_killed_attempt_logged_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboardX", reason="TensorBoard logging needs tensorboardX (the test extra)")
    with metric_sinks(LogSinks(tensorboard=True)):
        first = RunLogger(tmp_path, {})
        for step in (1, 2, 3, 4):
            first.log({"step": step, "loss": float(step)})
        first.close()
        resumed = RunLogger(tmp_path, {}, resume_step=2)  # the last checkpoint was at step 2
        for step in (3, 4):
            resumed.log({"step": step, "loss": 10.0 * step})
        resumed.close()
    assert read_tensorboard_scalars(tmp_path / "tensorboard")["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [row["loss"] for row in read_metrics(tmp_path)] == [1.0, 2.0, 30.0, 40.0]


def test_wandb_receives_every_row_tagged_per_seed_against_the_logged_step(tmp_path, monkeypatch):
    calls: dict[str, list] = {"init": [], "log": [], "define_metric": [], "finish": []}

    class FakeRun:
        def define_metric(self, name, step_metric=None):
            calls["define_metric"].append((name, step_metric))

        def log(self, payload):
            calls["log"].append(payload)

        def finish(self):
            calls["finish"].append(True)

    def init(**kwargs):
        calls["init"].append(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with metric_sinks(LogSinks(wandb_project="lasers", wandb_group="sweep-1")):
        logger = RunLogger(tmp_path / "stage" / "finetune", {"lr": 3e-4})
    logger.log({"step": 100, "seed": 0, "phase": "eval", "eval_return": -10.0})
    logger.log({"step": 100, "seed": 1, "phase": "eval", "eval_return": -20.0})
    logger.close()
    (init_kwargs,) = calls["init"]
    assert init_kwargs["project"] == "lasers" and init_kwargs["group"] == "sweep-1"
    assert init_kwargs["name"] == "stage/finetune" and init_kwargs["config"]["config"] == {"lr": 3e-4}
    assert calls["define_metric"] == [("*", "step")]
    assert calls["log"] == [{"step": 100, "eval_return/seed0": -10.0}, {"step": 100, "eval_return/seed1": -20.0}]
    assert calls["finish"] == [True]


def test_a_sink_whose_extra_is_missing_stops_the_command_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(SystemExit) as stop:
        main(["train", "--env", "Pendulum-v1", "--steps", "200", "--run-dir", str(tmp_path / "run"), "--log.wandb-project", "x", *QUICK])
    assert "pip install 'o2o[wandb]'" in str(stop.value)
    with pytest.raises(MissingExtra, match=r"o2o sweep needs the sweep extra: pip install 'o2o\[sweep\]'"):
        import_extra("o2o_no_such_module", "sweep", "o2o sweep")
