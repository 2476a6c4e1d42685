"""The offline-to-online commands end to end through the ``o2o`` CLI: collect -> pretrain ->
finetune killed by SIGKILL after its first checkpoint -> ``--resume`` gives exactly the metrics of
an uninterrupted fine-tuning run; and bad inputs stop before any training with a message naming
the mismatch and a non-zero exit."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments.cli import main
from rl.checkpoint import Checkpointer
from rl.logging import read_metrics

TINY_NETS = ["--pretrain.cql.sac.actor-hidden-dims", "16", "16", "--pretrain.cql.sac.critic-hidden-dims", "16", "16",
             "--pretrain.cql.sac.num-critics", "4", "--pretrain.cql.sac.batch-size", "8"]
PRETRAIN = ["--pretrain.steps", "10", "--pretrain.cql.num-sampled-actions", "3", "--pretrain.cql.num-backup-actions", "2",
            "--pretrain.eval-interval", "10", "--pretrain.eval-episodes", "1", "--pretrain.log-interval", "5",
            "--pretrain.updates-per-call", "5", *TINY_NETS]
FINETUNE_STEPS = 300
FINETUNE = ["--finetune.steps", str(FINETUNE_STEPS), "--finetune.warmup-steps", "20", "--finetune.utd-ratio", "2",
            "--finetune.batch-size", "8", "--finetune.eval-interval", "150", "--finetune.eval-episodes", "1",
            "--finetune.log-interval", "50", "--finetune.checkpoint-interval", "100"]
CLI = [sys.executable, "-m", "experiments.cli"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny Pendulum dataset and a CQL run pretrained on it, both made through the CLI."""
    root = tmp_path_factory.mktemp("o2o_cli")
    main(["collect", "--env", "Pendulum-v1", "--policy", "random", "--steps", "300", "--out-dir", str(root / "data")])
    dataset = root / "data" / "Pendulum-v1-random.hdf5"
    main(["pretrain", "--dataset", str(dataset), "--run-dir", str(root / "pretrain"), *PRETRAIN])
    return root, dataset, root / "pretrain"


def _rows_without_timing(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "steps_per_s"} for row in read_metrics(run_dir)]


class Crash(Exception):
    """Stands in for a crash of the process right after a checkpoint was committed."""


def test_finetune_crashed_after_its_first_checkpoint_resumes_to_the_same_metrics(pretrained, tmp_path, monkeypatch):
    """In-process variant of the SIGKILL test below (fast enough for the default run)."""
    _, _, pretrain_dir = pretrained
    finetune = ["finetune", "--from", str(pretrain_dir), *FINETUNE]
    main([*finetune, "--run-dir", str(tmp_path / "full")])

    original_save = Checkpointer.save

    def save_then_crash(self, step, state, host):
        original_save(self, step, state, host)
        raise Crash(f"crashed after the checkpoint of step {step}")

    monkeypatch.setattr(Checkpointer, "save", save_then_crash)
    with pytest.raises(Crash, match="step 100"):
        main([*finetune, "--run-dir", str(tmp_path / "crashed")])
    monkeypatch.undo()
    assert max(row["step"] for row in read_metrics(tmp_path / "crashed")) < FINETUNE_STEPS
    main([*finetune, "--run-dir", str(tmp_path / "crashed"), "--resume"])
    assert _rows_without_timing(tmp_path / "crashed") == _rows_without_timing(tmp_path / "full")


@pytest.mark.slow
def test_killed_finetune_resumes_to_the_metrics_of_an_uninterrupted_run(pretrained, tmp_path):
    """A real SIGKILL of the ``o2o finetune`` process after its first checkpoint, then --resume."""
    _, _, pretrain_dir = pretrained
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    finetune = [*CLI, "finetune", "--from", str(pretrain_dir), *FINETUNE]
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full_log = (tmp_path / "full.log").open("w")
    uninterrupted = subprocess.Popen([*finetune, "--run-dir", str(full_dir)], env=env, stdout=full_log, stderr=subprocess.STDOUT)
    process = subprocess.Popen([*finetune, "--run-dir", str(killed_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = killed_dir / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoints / "100").exists():
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (checkpoints / "100").exists(), "the fine-tuning run never wrote its first checkpoint"
    written = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert written[-1] < FINETUNE_STEPS, f"the run finished before the kill (checkpoints {written})"
    rows_before = read_metrics(killed_dir)
    assert rows_before and max(row["step"] for row in rows_before) < FINETUNE_STEPS

    subprocess.run([*finetune, "--run-dir", str(killed_dir), "--resume"], check=True, env=env, capture_output=True)
    assert uninterrupted.wait(timeout=300) == 0, (tmp_path / "full.log").read_text()[-2000:]
    full_log.close()
    resumed, reference = _rows_without_timing(killed_dir), _rows_without_timing(full_dir)
    assert resumed == reference
    evals = [row for row in reference if row["phase"] == "eval"]
    assert sorted({row["step"] for row in evals}) == [0, 150, 300]
    assert any("critic_loss" in row for row in reference)  # updates happened after the warm-up


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code not in (0, None)
    printed = capsys.readouterr()
    return " ".join([str(stop.value.code), printed.out, printed.err])


def test_cli_refuses_a_dataset_of_another_observation_width(tmp_path, capsys, write_pendulum_hdf5):
    path = write_pendulum_hdf5(tmp_path / "wide.hdf5", np.zeros((20, 4), np.float32), np.zeros(20, np.float32))
    message = _refused(["pretrain", "--dataset", str(path), "--run-dir", str(tmp_path / "run"), *PRETRAIN], capsys)
    assert "'observations' have width 4" in message and "3" in message
    assert not (tmp_path / "run").exists()


def test_cli_refuses_nan_rewards(tmp_path, capsys, write_pendulum_hdf5):
    rewards = np.zeros(20, np.float32)
    rewards[3] = np.nan
    path = write_pendulum_hdf5(tmp_path / "nan.hdf5", np.zeros((20, 3), np.float32), rewards)
    message = _refused(["pretrain", "--dataset", str(path), "--run-dir", str(tmp_path / "run"), *PRETRAIN], capsys)
    assert "'rewards' contains 1 NaN" in message
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_checkpoint_of_another_agent(tmp_path, capsys):
    sac_run = tmp_path / "sac_run"  # what `o2o train` leaves: config.json and checkpoints/, no pretrain.json
    (sac_run / "checkpoints").mkdir(parents=True)
    (sac_run / "config.json").write_text(json.dumps({"config": {"agent": "sac", "env": "Pendulum-v1"}}))
    message = _refused(["finetune", "--from", str(sac_run), "--run-dir", str(tmp_path / "wsrl"), *FINETUNE], capsys)
    assert "not a pretraining run" in message
    assert not (tmp_path / "wsrl").exists()


def test_cli_refuses_a_checkpoint_of_another_network_shape(pretrained, tmp_path, capsys):
    _, _, pretrain_dir = pretrained
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "checkpoints").symlink_to(pretrain_dir / "checkpoints")
    record = json.loads((pretrain_dir / "pretrain.json").read_text())
    record["cql"]["sac"]["critic_hidden_dims"] = [32, 32]
    (edited / "pretrain.json").write_text(json.dumps(record))
    message = _refused(["finetune", "--from", str(edited), "--run-dir", str(tmp_path / "wsrl"), *FINETUNE], capsys)
    assert "critic" in message and "16" in message and "32" in message
    assert not (tmp_path / "wsrl").exists()


@pytest.mark.slow
def test_wsrl_locomotion_comparison_writes_every_output(pretrained, tmp_path):
    """The locomotion comparison script end to end at a toy scale on the Pendulum dataset, then a
    rerun that reuses every finished run."""
    import csv

    from experiments import wsrl_locomotion as wl

    _, dataset, _ = pretrained
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "Pendulum-v1-random.hdf5").symlink_to(dataset)
    scale = wl.Scale(hidden=16, num_critics=3, batch_size=8, utd_ratio=2, cql_online_utd_ratio=1, pretrain_steps=20,
                     num_sampled_actions=2, num_backup_actions=2, warmup_steps=20, online_steps=40, eval_interval=20,
                     eval_episodes=1, checkpoint_interval=20)
    args = wl.Args(envs=("Pendulum-v1",), datasets=("random",), seeds=(0, 1), data_dir=data_dir, out_dir=tmp_path / "out",
                   run_dir=tmp_path / "runs", progress=False)
    summary = wl.run(args, scale)
    assert set(summary) == {(method, "Pendulum-v1", "random") for method in wl.METHODS}
    with (tmp_path / "out" / "wsrl_locomotion.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(wl.METHODS) * 2 * 3  # methods x seeds x evaluations at steps 0, 20, 40
    assert {row["step"] for row in rows} == {"0", "20", "40"}
    starts = {row["method"]: row["eval_return"] for row in rows if row["step"] == "0" and row["seed"] == "0"}
    assert starts["wsrl"] == starts["cql"]  # both start from the same pretrained agent
    report = (tmp_path / "out" / "wsrl_locomotion.md").read_text()
    assert "WSRL final" in report and "threshold 0.8" in report
    assert (tmp_path / "out" / "wsrl_locomotion.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "wsrl_locomotion_curves.csv").read_text().startswith("env,dataset,method,step")
    rerun = wl.run(args, scale)  # finished runs are reused, not retrained
    assert {key: (v["start"], v["final"]) for key, v in rerun.items()} == {key: (v["start"], v["final"]) for key, v in summary.items()}


def test_wsrl_locomotion_reward_scale_reaches_training_env_and_is_undone_in_reports(tmp_path):
    """With ``reward_scale`` the training env pays scale x reward, and the evaluation rows the
    comparison reports are back in raw rewards."""
    from experiments import wsrl_locomotion as wl

    scale = dataclasses.replace(wl.SCALES["cpu"], reward_scale=0.1)
    make_env, _ = wl._training_env("Pendulum-v1", scale)
    raw_env, _ = wl.o2o._make_env_checked("Pendulum-v1")
    scaled, raw = make_env(), raw_env()
    scaled.reset(seed=3), raw.reset(seed=3)
    action = np.full(scaled.action_space.shape, 0.5, np.float32)
    assert scaled.step(action)[1] == pytest.approx(0.1 * raw.step(action)[1])

    row = {"phase": "eval", "step": 0, "seed": 0, "eval_return": -12.5, "eval_return_std": 2.0}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({"phase": "train", "step": 0}) + "\n")
    (reported,) = wl._eval_rows(tmp_path, scale.reward_scale)
    assert (reported["eval_return"], reported["eval_return_std"]) == pytest.approx((-125.0, 20.0))


def test_wsrl_locomotion_online_batch_applies_to_every_online_method_not_pretraining():
    from experiments import wsrl_locomotion as wl

    scale = dataclasses.replace(wl.SCALES["cpu"], batch_size=128, online_batch_size=256)
    pretrain, online, rlpd = wl.method_configs(scale)
    assert pretrain.sac.batch_size == 128
    assert online.batch_size == rlpd.batch_size == 256
    assert dataclasses.replace(scale, online_batch_size=None).online_batch == 128
    docs = dict(zip([field.name for field in dataclasses.fields(wl.Scale)], wl._field_docs()))  # the report's settings lines
    assert docs["hidden"] == "Width of both hidden layers of actor and critics."
    assert docs["reward_scale"].startswith("Training reward multiplier (dataset and training env, every method); the initial")
    assert all(docs.values())


def test_wsrl_locomotion_dip_check_passes_misses_and_does_not_apply_to_non_positive_starts():
    from experiments import wsrl_locomotion as wl

    def rows(method, returns):
        return [{"method": method, "env": "E", "dataset": "d", "seed": 0, "step": 500 * i, "eval_return": value}
                for i, value in enumerate(returns)]

    def dip_line(wsrl_returns):
        summary = wl.summarise(rows("wsrl", wsrl_returns) + rows("sac", [0.0, 1.0, 2.0]), warmup_steps=500)
        return wl.acceptance_lines(summary)[-1]

    assert dip_line([100.0, 85.0, 120.0]).endswith("0.85 x the pretrained policy's 100.0 (threshold 0.8): PASS")
    assert dip_line([100.0, 70.0, 120.0]).endswith(": MISS")
    negative = dip_line([-1133.7, -1581.6, -900.0])
    assert negative.endswith(": N/A") and "nan" not in negative


def test_run_on_an_o2o_env_fine_tunes_on_the_device_with_the_scaled_rewards_and_times_its_stages(tmp_path, monkeypatch):
    import experiments.offline_to_online as o2o
    from envs.jax_env import RewardTransformed

    cores = []

    def spy(*args, **kwargs):
        cores.append(kwargs.get("jax_env"))
        return loop(*args, **kwargs)

    loop = o2o.train_online
    monkeypatch.setattr(o2o, "train_online", spy)
    monkeypatch.setattr("agents.wsrl.train_online", spy)
    env = "o2o/OrbitCorrection-v0"
    main(["collect", "--env", env, "--policy", "random", "--steps", "200", "--out-dir", str(tmp_path / "data")])
    dataset = next((tmp_path / "data").glob("*.hdf5"))
    root = tmp_path / "run"
    main(["run", "--dataset", str(dataset), "--run-dir", str(root), "--scratch-baseline", *PRETRAIN,
          "--pretrain.reward-scale", "0.5", FINETUNE[0], "200", *FINETUNE[2:]])
    assert len(cores) == 2  # WSRL fine-tuning, then SAC from scratch
    assert all(isinstance(spec.core, RewardTransformed) and spec.core.scale == 0.5 for spec in cores)
    assert json.loads((root / "wsrl" / "finetune.json").read_text())["env_loop"] == "device"
    assert set(json.loads((root / "stage_seconds.json").read_text())) == {"pre-training", "fine-tuning", "SAC from scratch"}
    for stage in ("wsrl", "sac_scratch"):
        final = [row for row in read_metrics(root / stage) if row["phase"] == "eval" and row["step"] == 200]
        assert len(final) == 1 and np.isfinite(final[0]["eval_return"])
