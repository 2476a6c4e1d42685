"""o2o sweep: the search-space grammar, the trials' command lines, a trial's reports (the seeds'
mean at every evaluation of its run), clear refusals, and a whole sweep through Ray Tune."""

import csv
import json
import math
import sys
from pathlib import Path

import pytest

from experiments.cli import main
from experiments.sweep import (
    Dimension,
    SweepArgs,
    SweepError,
    asha_steps,
    check_command,
    command_steps,
    continuation_flags,
    default_metrics_from,
    evaluation_summaries,
    grid_trials,
    is_switch,
    parse_dimension,
    parse_space,
    run_trial,
    trial_argv,
    trial_table,
    validate_trials,
    with_wandb_group,
    written_rows,
)
from rl.logging import read_metrics

TINY_TRAIN = (
    "train --env Pendulum-v1 --steps 300 --num-seeds 2 --online.warmup-steps 100 --online.eval-interval 100 "
    "--online.eval-episodes 1 --online.log-interval 100 --sac.actor-hidden-dims 16 16 --sac.critic-hidden-dims 16 16 "
    "--sac.batch-size 16"
)


@pytest.mark.parametrize(
    "entry, expected",
    [
        ("sac.actor-lr=1e-4,3e-4", Dimension("sac.actor-lr", "grid", ("1e-4", "3e-4"))),
        ("--sac.critic-hidden-dims=64 64,256 256", Dimension("sac.critic-hidden-dims", "grid", ("64 64", "256 256"))),
        ("sac.tau=loguniform(0.001, 0.05)", Dimension("sac.tau", "loguniform", ("0.001", "0.05"))),
        ("sac.utd-ratio=randint(1,5)", Dimension("sac.utd-ratio", "randint", ("1", "5"))),
        ("sac.critic-layer-norm=choice(True,False)", Dimension("sac.critic-layer-norm", "choice", ("True", "False"))),
        ("sac.gamma=0.99", Dimension("sac.gamma", "grid", ("0.99",))),
    ],
)
def test_space_entries_parse_to_grids_and_distributions(entry, expected):
    assert parse_dimension(entry) == expected


@pytest.mark.parametrize(
    "entries, message",
    [
        (("sac.actor-lr",), "is not FLAG=VALUES"),
        (("sac.actor-lr=1e-4,,3e-4",), "has an empty value"),
        (("sac.tau=uniform(0.1)",), "takes a lower and an upper bound"),
        (("sac.tau=loguniform(0,1)",), "needs 0 < low < high"),
        (("sac.utd-ratio=randint(1.5,4)",), "bounds must be integers"),
        (("run-dir=a,b",), "sets --run-dir itself"),
        (("sac.tau=0.1", "sac.tau=0.2"), "names sac.tau more than once"),
    ],
)
def test_bad_space_entries_are_refused_naming_the_entry(entries, message):
    with pytest.raises(SweepError, match=message):
        parse_space(entries)


def test_only_run_directory_commands_are_swept_and_the_sweep_owns_run_dir():
    check_command(["train", "--env", "Pendulum-v1"])
    with pytest.raises(SweepError, match="one of train, pretrain, finetune, run; the command starts with plot"):
        check_command(["plot", "runs/a"])
    with pytest.raises(SweepError, match="must not set --resume"):
        check_command(["train", "--resume"])
    with pytest.raises(SweepError, match="must not set --run-dir"):
        check_command(["train", "--run-dir=x"])


def test_trial_command_line_gives_multi_word_values_several_words(tmp_path):
    argv = trial_argv(["train", "--env", "Pendulum-v1"], {"sac.critic-hidden-dims": "64 64", "sac.tau": 0.01}, tmp_path / "t")
    assert argv == ["train", "--env", "Pendulum-v1", "--sac.critic-hidden-dims", "64", "64", "--sac.tau", "0.01", "--run-dir", str(tmp_path / "t")]


def test_trials_logging_to_wandb_share_the_sweeps_group_unless_the_command_names_one():
    assert with_wandb_group(["train", "--log.wandb-project", "p"], "sweep_1")[-2:] == ["--log.wandb-group", "sweep_1"]
    assert with_wandb_group(["train", "--log.wandb-project=p", "--log.wandb-group", "g"], "sweep_1")[-1] == "g"
    assert with_wandb_group(["train"], "sweep_1") == ["train"]


def test_on_off_flags_take_true_and_false_as_their_two_forms(tmp_path):
    argv = trial_argv(["train"], {"sac.critic-layer-norm": "True", "sac.backup-entropy": "false", "progress": "True"}, tmp_path)
    assert argv[:5] == ["train", "--sac.critic-layer-norm", "--sac.no-backup-entropy", "--progress", "True"]  # progress: bool | None
    assert is_switch("run", "pretrain.cql.sac.critic-layer-norm") and not is_switch("train", "sac.tau")
    validate_trials(["train"], parse_space(("sac.critic-layer-norm=True,False", "sac.backup-entropy=False")), tmp_path)


def test_grid_multiplies_and_num_samples_repeats_it():
    space = parse_space(("a=1,2", "b=x,y,z", "c=uniform(0,1)"))
    trials = grid_trials(space, num_samples=2)
    assert len(trials) == 12 and trials[0] == {"a": "1", "b": "x"} and trials[6] == trials[0]


def test_scored_metrics_default_to_the_fine_tuning_stage_of_run():
    assert default_metrics_from(["train", "--env", "Hopper-v5"]) == "."
    assert default_metrics_from(["run", "--dataset", "d.hdf5"]) == "wsrl"
    assert default_metrics_from(["run", "--dataset", "d.hdf5", "--agent", "uni_o4"]) == "online"


def test_asha_takes_the_trials_length_from_the_command_or_asks_for_it():
    assert command_steps(["train", "--steps", "20000"]) == 20000
    assert command_steps(["train", "--steps=500"]) == 500
    assert command_steps(["run", "--dataset", "d", "--finetune.steps", "3000", "--pretrain.steps", "9"]) == 3000
    assert command_steps(["train", "--env", "Pendulum-v1"]) is None
    assert asha_steps(SweepArgs("train --steps 1000"), ["train", "--steps", "1000"]) == (1000, 100)
    assert asha_steps(SweepArgs("train", max_steps=500, grace_steps=50), ["train"]) == (500, 50)
    with pytest.raises(SweepError, match="needs the trials' length"):
        asha_steps(SweepArgs("train"), ["train"])
    with pytest.raises(SweepError, match="--grace-steps must lie in 1..500"):
        asha_steps(SweepArgs("train", max_steps=500, grace_steps=600), ["train"])


def test_a_trial_started_again_continues_its_run_from_its_last_checkpoint(tmp_path):
    run_dir = tmp_path / "trial"
    assert continuation_flags("train", run_dir) == []
    (run_dir / "checkpoints" / "500.orbax-checkpoint-tmp").mkdir(parents=True)
    assert continuation_flags("train", run_dir) == []  # nothing committed: o2o starts afresh
    (run_dir / "checkpoints" / "500").mkdir()
    assert continuation_flags("train", run_dir) == ["--resume"]
    assert continuation_flags("run", run_dir) == ["--overwrite"]  # o2o run cannot resume


def test_a_resumed_sweep_must_repeat_its_command_and_space(tmp_path, monkeypatch):
    pytest.importorskip("ray.tune", reason="Ray Tune is the sweep extra (pip install 'o2o[sweep]'), not in the test extra")
    out_dir = tmp_path / "sweep"
    with pytest.raises(SystemExit, match="holds no sweep to resume"):
        main(["sweep", TINY_TRAIN, "--space", "sac.actor-lr=1e-4", "--out-dir", str(out_dir), "--resume"])
    out_dir.mkdir()
    (out_dir / "tune").mkdir()
    (out_dir / "sweep_spec.json").write_text(json.dumps({
        "command": TINY_TRAIN, "space": ["sac.actor-lr=1e-4"], "num_samples": 1, "metric": "eval_return", "mode": "max",
        "metrics_from": None, "scheduler": "fifo", "grace_steps": 0, "max_steps": None, "reduction_factor": 3, "seed": 0,
    }))
    with pytest.raises(SystemExit, match=r"--space was \['sac.actor-lr=1e-4'\], now \['sac.actor-lr=3e-4'\]"):
        main(["sweep", TINY_TRAIN, "--space", "sac.actor-lr=3e-4", "--out-dir", str(out_dir), "--resume"])
    with pytest.raises(SystemExit, match="already holds a sweep: --resume continues it"):
        main(["sweep", TINY_TRAIN, "--space", "sac.actor-lr=1e-4", "--out-dir", str(out_dir)])


def test_a_misspelt_flag_stops_the_sweep_before_any_trial(tmp_path, capsys):
    validate_trials(["train"], parse_space(("sac.actor-lr=1e-4,3e-4",)), tmp_path)
    with pytest.raises(SystemExit):
        validate_trials(["train"], parse_space(("sac.actor-lrr=1e-4",)), tmp_path)
    assert "sac.actor-lrr" in capsys.readouterr().err


def test_evaluation_summaries_average_the_seeds_of_complete_steps_only():
    rows = [
        {"step": 100, "seed": 0, "eval_return": -10.0}, {"step": 100, "seed": 1, "eval_return": -20.0},
        {"step": 100, "seed": 0, "loss": 1.0},
        {"step": 200, "seed": 0, "eval_return": -5.0},
    ]
    (summary,) = evaluation_summaries(rows, "eval_return", complete_through=100)
    assert summary == {"step": 100, "eval_return": -15.0, "eval_return_std": 5.0, "seeds": 2, "eval_return_curve_mean": -15.0}
    both = evaluation_summaries(rows, "eval_return", complete_through=math.inf)
    assert [s["step"] for s in both] == [100, 200] and both[1]["eval_return_curve_mean"] == -10.0  # (-15 + -5) / 2


def test_trials_rank_by_the_chosen_score_finished_before_stopped_before_unscored():
    rows = [
        {"trial": "slow", "eval_return": -100.0, "eval_return_curve_mean": -900.0},
        {"trial": "fast", "eval_return": -150.0, "eval_return_curve_mean": -400.0},
        {"trial": "cut", "eval_return": -90.0, "eval_return_curve_mean": -300.0, "stopped_early": True},
        {"trial": "broken", "eval_return": None, "error": "o2o: ..."},
    ]
    assert [r["trial"] for r in trial_table(rows, "eval_return", "max")] == ["slow", "fast", "cut", "broken"]
    assert [r["trial"] for r in trial_table(rows, "eval_return_curve_mean", "max")] == ["fast", "slow", "cut", "broken"]
    assert [r["trial"] for r in trial_table(rows, "eval_return", "min")][:2] == ["fast", "slow"]


def test_a_half_written_metrics_line_waits_for_the_next_look(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert written_rows(path) == []
    path.write_text('{"step": 1, "x": 1}\n{"step": 2, "x"')
    assert written_rows(path) == [{"step": 1, "x": 1}]


def test_a_trial_reports_the_seeds_mean_at_every_evaluation_of_its_run(tmp_path):
    run_dir = tmp_path / "trial"
    argv = trial_argv(TINY_TRAIN.split(), {"sac.actor-lr": "1e-3"}, run_dir)
    reports = []
    last = run_trial(argv, run_dir, "eval_return", reports.append, run_dir / "o2o.log", poll_seconds=0.2)
    expected = evaluation_summaries(read_metrics(run_dir), "eval_return", complete_through=math.inf)
    assert [r["step"] for r in expected] == [100, 200, 300] and all(r["seeds"] == 2 for r in expected)
    assert reports == expected and last == expected[-1]
    assert json.loads((run_dir / "config.json").read_text())["config"]["sac"]["actor_lr"] == 1e-3


def test_a_failed_trial_raises_with_the_runs_own_message(tmp_path):
    run_dir = tmp_path / "trial"
    with pytest.raises(RuntimeError, match="unknown environment id 'NoSuchEnv-v9'"):
        run_trial(["train", "--env", "NoSuchEnv-v9", "--run-dir", str(run_dir)], run_dir, "eval_return", print, run_dir / "o2o.log", poll_seconds=0.2)


def test_dry_run_lists_the_trials_without_ray(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    main(["sweep", "train --env Pendulum-v1 --steps 1000", "--space", "sac.actor-lr=1e-4,3e-4", "sac.tau=loguniform(0.001,0.05)", "--dry-run"])
    out = capsys.readouterr().out
    assert "trial 1: o2o train --env Pendulum-v1 --steps 1000 --sac.actor-lr 3e-4 --run-dir" in out
    assert "(drawn: --sac.tau ~loguniform(0.001,0.05))" in out and "2 trials" in out


def test_a_sweep_without_ray_stops_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(SystemExit, match=r"o2o sweep needs the sweep extra: pip install 'o2o\[sweep\]'"):
        main(["sweep", TINY_TRAIN, "--space", "sac.actor-lr=1e-4,3e-4", "--out-dir", str(tmp_path / "sweep")])


def test_a_sweep_through_ray_tune_scores_every_trial_from_its_run(tmp_path):
    pytest.importorskip("ray.tune", reason="Ray Tune is the sweep extra (pip install 'o2o[sweep]'), not in the test extra")
    out_dir = tmp_path / "sweep"
    main(["sweep", TINY_TRAIN, "--space", "sac.actor-lr=1e-4,1e-3", "--out-dir", str(out_dir), "--poll-seconds", "0.2"])
    with (out_dir / "sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["sac.actor-lr"] for row in rows) == ["1e-3", "1e-4"]
    for row in rows:
        final = evaluation_summaries(read_metrics(row["run_dir"]), "eval_return", complete_through=math.inf)[-1]
        assert final["step"] == 300 and float(row["eval_return"]) == pytest.approx(final["eval_return"])
    scores = [float(row["eval_return"]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert (out_dir / "sweep.png").stat().st_size > 0
    assert json.loads((out_dir / "sweep.json").read_text())["config"]["space"] == ["sac.actor-lr=1e-4,1e-3"]


def test_asha_stops_trials_at_their_rungs_and_leaves_no_o2o_process_behind(tmp_path):
    pytest.importorskip("ray.tune", reason="Ray Tune is the sweep extra (pip install 'o2o[sweep]'), not in the test extra")
    out_dir = tmp_path / "sweep"
    command = TINY_TRAIN.replace("--steps 300", "--steps 600").replace("--num-seeds 2", "--num-seeds 1")
    main(["sweep", command, "--space", "sac.actor-lr=1e-6,1e-5,1e-3,3e-3", "--scheduler", "asha", "--grace-steps", "100",
          "--reduction-factor", "2", "--out-dir", str(out_dir), "--poll-seconds", "0.2"])
    with (out_dir / "sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    finished = [row["status"] == "ok" for row in rows]
    assert finished == sorted(finished, reverse=True)  # trials that ran to the end rank first
    for row in rows:
        logged = max(r["step"] for r in read_metrics(row["run_dir"]) if "eval_return" in r)
        assert logged >= int(row["step"])  # a stopped run may have logged on until it was killed
        assert row["status"] in ("ok", "stopped early") and (int(row["step"]) == 600) == (row["status"] == "ok")
    running = [path for path in Path("/proc").glob("[0-9]*/cmdline") if _reads(path).find(str(out_dir)) >= 0]
    assert running == []


def _reads(path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""
