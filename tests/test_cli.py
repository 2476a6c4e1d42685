"""The o2o command: train writes a reproducible run record; errors are one clear line; plot; resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.cli import main
from rl.logging import read_metrics

QUICK = [
    "--sac.actor-hidden-dims", "32", "32", "--sac.critic-hidden-dims", "32", "32", "--sac.batch-size", "32",
    "--online.warmup-steps", "100", "--online.eval-interval", "200", "--online.eval-episodes", "1",
    "--online.log-interval", "100",
]


def test_train_records_config_revision_versions_and_metrics(tmp_path, capsys):
    run_dir = tmp_path / "run"
    main(["train", "--env", "Pendulum-v1", "--steps", "200", "--run-dir", str(run_dir), *QUICK])
    record = json.loads((run_dir / "config.json").read_text())
    assert record["config"]["env"] == "Pendulum-v1"
    assert record["config"]["online"]["total_steps"] == 200
    assert record["config"]["sac"]["critic_hidden_dims"] == [32, 32]
    assert "git_revision" in record and record["packages"]["jax"] and record["threefry_unrolled_on_cpu"] is True
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if r["phase"] == "eval"] == [200]
    assert (run_dir / "metrics.csv").read_text().startswith("step,seed,phase")
    assert "final evaluation return" in capsys.readouterr().out


@pytest.fixture
def seen(monkeypatch):
    """What `o2o train` hands the online loop last: {"jax_env": the device env spec, or None}."""
    import experiments.cli as cli

    seen = {}
    train_online = cli.train_online

    def spy(*args, **kwargs):
        seen["jax_env"] = kwargs.get("jax_env")
        return train_online(*args, **kwargs)

    monkeypatch.setattr(cli, "train_online", spy)
    return seen


def test_off_policy_training_on_an_o2o_env_steps_its_jax_core_on_the_device(tmp_path, seen):
    run_dir = tmp_path / "run"
    main(["train", "--env", "o2o/OrbitCorrection-v0", "--steps", "200", "--run-dir", str(run_dir), *QUICK])
    assert type(seen["jax_env"].core).__name__ == "OrbitCorrectionCore"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if r["phase"] == "eval"] == [200]
    assert all("episode_return" in r for r in rows if r["phase"] == "train")

    # Its checkpoints hold device env states: resuming through the gymnasium face is refused by name.
    with pytest.raises(SystemExit) as stop:
        main(["train", "--env", "o2o/OrbitCorrection-v0", "--steps", "400", "--run-dir", str(run_dir), "--resume",
              "--env-loop", "host", *QUICK])
    assert "stepping on the device" in str(stop.value.code)
    main(["train", "--env", "o2o/OrbitCorrection-v0", "--steps", "200", "--run-dir", str(tmp_path / "host"),
          "--env-loop", "host", *QUICK])
    assert seen["jax_env"] is None


def test_env_kwargs_reach_the_device_core_of_an_o2o_env(tmp_path, seen):
    main(["train", "--env", "o2o/OrbitCorrection-v0", "--env-kwargs", '{"domain_randomisation": true}', "--steps", "200",
          "--run-dir", str(tmp_path / "run"), *QUICK])
    assert seen["jax_env"].core.domain_randomisation is True
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["env_kwargs"] == '{"domain_randomisation": true}'


def test_plot_writes_a_png_of_the_runs(tmp_path):
    run_dir = tmp_path / "run"
    main(["train", "--steps", "200", "--num-seeds", "2", "--run-dir", str(run_dir), *QUICK])
    out = tmp_path / "curves.png"
    main(["plot", str(run_dir), "--out", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--env", "NoSuchEnv-v0", "--steps", "10"], "unknown environment id 'NoSuchEnv-v0'"),
        (["train", "--env", "CartPole-v1", "--steps", "10"], "needs a 1-D Box action space"),
        (["train", "--sac.tau", "0", "--steps", "10"], "SACConfig.tau"),
        (["train", "--preset", "no_such_preset"], "unknown preset 'no_such_preset'"),
    ],
)
def test_bad_input_exits_with_a_message_naming_it(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--run-dir", str(tmp_path / "r")] if argv[-1] != "no_such_preset" else argv)
    assert stop.value.code != 0
    printed = capsys.readouterr()
    assert message in " ".join([str(stop.value.code), printed.out, printed.err])


def test_resume_without_a_checkpoint_and_reuse_of_a_run_dir_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        main(["train", "--steps", "10", "--run-dir", str(tmp_path / "empty"), "--resume"])
    run_dir = tmp_path / "used"
    main(["train", "--steps", "100", "--run-dir", str(run_dir), *QUICK])
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        main(["train", "--steps", "100", "--run-dir", str(run_dir), *QUICK])


def test_help_shows_every_config_field_docstring(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for phrase in ("Polyak rate of the target critics", "Deterministic evaluation episodes per seed", "Hidden layer widths of each Q network"):
        assert phrase in " ".join(text.split())


def test_killed_process_resumes_to_the_same_final_metrics(tmp_path):
    """A real SIGKILL after a checkpoint, then --resume, matches an uninterrupted run."""
    common = ["train", "--steps", "1200", *QUICK, "--online.checkpoint-interval", "300", "--online.eval-interval", "400"]
    command = [sys.executable, "-m", "experiments.cli"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([*command, *common, "--run-dir", str(tmp_path / "full")], check=True, env=env, capture_output=True)

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen([*command, *common, "--run-dir", str(killed_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed_dir / "checkpoints" / "600").exists():
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (killed_dir / "checkpoints" / "600").exists(), "the run never reached its checkpoint at step 600"
    subprocess.run([*command, *common, "--run-dir", str(killed_dir), "--resume"], check=True, env=env, capture_output=True)

    def final_rows(run_dir: Path):
        return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in read_metrics(run_dir)]

    assert final_rows(killed_dir) == final_rows(tmp_path / "full")


def test_on_policy_agents_train_from_the_same_command(tmp_path):
    run_dir = tmp_path / "ppo"
    main(["train", "--preset", "ppo_cartpole", "--steps", "800", "--on-policy.eval-interval", "800",
          "--on-policy.eval-episodes", "1", "--run-dir", str(run_dir)])
    record = json.loads((run_dir / "config.json").read_text())
    assert record["config"]["agent"] == "ppo" and record["config"]["on_policy"]["total_steps"] == 800
    assert any(r["phase"] == "eval" for r in read_metrics(run_dir))
