"""Trained policies out of run directories: every loadable run kind replays its own final
evaluation exactly; load_policy acts in the environment's units; o2o evaluate reports and records
every seed; paths that hold no run are refused by name."""

import json

import jax
import numpy as np
import pytest

from envs.wrappers import unit_to_bounds
from experiments.cli import main
from experiments.policy import PolicyLoadError, evaluate_run, load_policy, load_run_agents, locate_run
from rl.evaluation import episode_seed
from rl.logging import read_metrics

EVAL_STREAM = 1
TINY_SAC = ["--sac.actor-hidden-dims", "16", "16", "--sac.critic-hidden-dims", "16", "16", "--sac.batch-size", "16",
            "--online.warmup-steps", "100", "--online.eval-interval", "100", "--online.eval-episodes", "2",
            "--online.log-interval", "100"]
TINY_CQL = ["--pretrain.steps", "10", "--pretrain.cql.num-sampled-actions", "3", "--pretrain.cql.num-backup-actions", "2",
            "--pretrain.eval-interval", "10", "--pretrain.eval-episodes", "2", "--pretrain.log-interval", "5",
            "--pretrain.updates-per-call", "5", "--pretrain.cql.sac.actor-hidden-dims", "16", "16",
            "--pretrain.cql.sac.critic-hidden-dims", "16", "16", "--pretrain.cql.sac.num-critics", "2",
            "--pretrain.cql.sac.batch-size", "8"]
TINY_WSRL = ["--finetune.steps", "200", "--finetune.warmup-steps", "20", "--finetune.batch-size", "8",
             "--finetune.eval-interval", "100", "--finetune.eval-episodes", "2", "--finetune.log-interval", "50"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-seed SAC training run, and pretrain / WSRL / scratch-SAC runs of one `o2o run`, all on Pendulum."""
    root = tmp_path_factory.mktemp("policy_runs")
    main(["train", "--env", "Pendulum-v1", "--steps", "200", "--seed", "3", "--num-seeds", "2", "--run-dir", str(root / "train"), *TINY_SAC])
    main(["collect", "--env", "Pendulum-v1", "--policy", "random", "--steps", "300", "--out-dir", str(root / "data")])
    main(["run", "--dataset", str(root / "data" / "Pendulum-v1-random.hdf5"), "--num-seeds", "2", "--run-dir", str(root / "o2o"),
          "--scratch-baseline", "--pretrain.reward-scale", "0.5", *TINY_CQL, *TINY_WSRL])
    return {"train": root / "train", "pretrain": root / "o2o" / "pretrain", "wsrl": root / "o2o" / "wsrl", "sac": root / "o2o" / "sac_scratch"}


@pytest.mark.parametrize("kind", ["train", "pretrain", "wsrl", "sac"])
def test_a_restored_run_replays_its_final_evaluation_exactly(runs, kind):
    run_dir = runs[kind]
    rows = [row for row in read_metrics(run_dir) if "eval_return" in row]
    final_step = max(row["step"] for row in rows)
    final_round = len({row["step"] for row in rows}) - 1  # the loop's evaluator draws new reset seeds every round
    run = load_run_agents(run_dir)
    assert run.kind == {"train": "sac", "pretrain": "cql", "wsrl": "wsrl", "sac": "sac"}[kind]
    assert run.step == final_step and run.env_id == "Pendulum-v1"
    recorded = {row["seed"]: row["eval_return"] for row in rows if row["step"] == final_step}
    assert sorted(recorded) == list(run.seeds)
    episodes = 2
    reset_seeds = [[episode_seed(seed, EVAL_STREAM, final_round * episodes + j) for j in range(episodes)] for seed in run.seeds]
    returns = evaluate_run(run, reset_seeds)  # of the env's own rewards
    # Online runs evaluate on their training env, whose rewards the fine-tuning scaled by 0.5.
    scale = 0.5 if kind in ("wsrl", "sac") else 1.0
    assert run.reward_transform == ((1.0, 0.0) if kind == "train" else (0.5, 0.0))
    assert scale * returns.mean(axis=1) == pytest.approx([recorded[seed] for seed in run.seeds], rel=1e-5)


def test_any_path_inside_a_run_finds_it_and_a_step_directory_names_its_step(runs):
    run_dir = runs["wsrl"]
    assert locate_run(run_dir) == (run_dir, None)
    assert locate_run(run_dir / "checkpoints") == (run_dir, None)
    assert locate_run(run_dir / "checkpoints" / "100") == (run_dir, 100)
    assert load_run_agents(run_dir / "checkpoints" / "200").step == 200


def test_load_policy_acts_in_the_environments_own_units(runs):
    run = load_run_agents(runs["train"])
    policy = load_policy(runs["train"], seed_index=1)
    observations = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    agent = jax.tree.map(lambda leaf: leaf[1], run.agents)
    unit = np.asarray(agent.act(observations, jax.random.PRNGKey(0), deterministic=True))
    batch = policy(observations)
    assert batch.shape == (5, 1) and np.all(np.abs(batch) <= 2.0)  # Pendulum's torque bounds are +-2
    np.testing.assert_allclose(batch, unit_to_bounds(unit, -2.0, 2.0), rtol=1e-6)
    np.testing.assert_allclose(policy(observations[2]), batch[2], rtol=1e-6)


def test_a_stochastic_policy_replays_its_draws_from_the_same_key_seed(runs):
    observation = np.zeros(3, np.float32)
    first, second = (load_policy(runs["train"], deterministic=False) for _ in range(2))
    draws = np.stack([first(observation) for _ in range(3)])
    np.testing.assert_array_equal(np.stack([second(observation) for _ in range(3)]), draws)
    assert len(set(draws[:, 0].tolist())) == 3


def test_evaluate_prints_and_records_every_seed(runs, tmp_path, capsys):
    out = tmp_path / "evaluation.json"
    main(["evaluate", str(runs["train"]), "--episodes", "3", "--out", str(out)])
    record = json.loads(out.read_text())
    assert [entry["seed"] for entry in record["seeds"]] == [3, 4] and all(len(entry["returns"]) == 3 for entry in record["seeds"])
    assert record["mean_over_seeds"] == pytest.approx(np.mean([entry["mean"] for entry in record["seeds"]]))
    assert record["kind"] == "sac" and record["step"] == 200 and record["config"]["episodes"] == 3
    printed = capsys.readouterr().out
    assert "seed 3: return" in printed and "seed 4: return" in printed


def test_paths_without_a_run_and_bad_seed_indices_are_refused(runs, tmp_path, capsys):
    with pytest.raises(PolicyLoadError, match="is not a run directory"):
        load_run_agents(tmp_path)
    with pytest.raises(PolicyLoadError, match="seed_index 2 out of range: the run has 2 seeds"):
        load_policy(runs["train"], seed_index=2)
    with pytest.raises(SystemExit, match="is not a run directory"):
        main(["evaluate", str(tmp_path)])


def test_an_on_policy_run_gives_a_discrete_policy_replaying_its_final_evaluation(tmp_path):
    from rl.rollouts import eval_seeds

    run_dir = tmp_path / "ppo"
    main(["train", "--agent", "ppo", "--env", "CartPole-v1", "--steps", "256", "--run-dir", str(run_dir),
          "--ppo.num-envs", "2", "--ppo.num-steps", "64", "--on-policy.eval-episodes", "2"])
    run = load_run_agents(run_dir)
    rows = [row for row in read_metrics(run_dir) if "eval_return" in row]
    final_round = len({row["step"] for row in rows}) - 1
    assert run.kind == "ppo" and evaluate_run(run, [eval_seeds(0, final_round, 2)]).mean() == pytest.approx(rows[-1]["eval_return"])
    action = load_policy(run_dir)(np.zeros(4, np.float32))
    assert action.shape == () and int(action) in (0, 1)


def test_a_trend_sac_run_on_an_o2o_env_replays_its_final_evaluation(tmp_path):
    run_dir = tmp_path / "tbsac"
    main(["train", "--agent", "tbsac", "--env", "o2o/OrbitCorrection-v0", "--steps", "150", "--run-dir", str(run_dir),
          "--tbsac.actor-hidden-dims", "16", "--tbsac.critic-hidden-dims", "16", "--tbsac.batch-size", "16",
          "--online.warmup-steps", "100", "--online.eval-interval", "150", "--online.eval-episodes", "2", "--online.log-interval", "50"])
    run = load_run_agents(run_dir)
    rows = [row for row in read_metrics(run_dir) if "eval_return" in row]
    reset_seeds = [[episode_seed(0, EVAL_STREAM, j) for j in range(2)]]
    assert run.kind == "tbsac" and evaluate_run(run, reset_seeds).mean() == pytest.approx(rows[-1]["eval_return"], rel=1e-5)


USER_ENV = """
import gymnasium as gym
import numpy as np


class ScaledRewardEnv(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)

    def __init__(self, scale=1.0, length=5):
        self.scale, self.length, self.t = scale, length, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.zeros(2, np.float32), self.scale, False, self.t >= self.length, {}
"""


def test_environment_kwargs_reach_training_and_come_back_for_evaluation(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_scaled_env.py").write_text(USER_ENV)
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = tmp_path / "run"
    main(["train", "--env", "my_scaled_env:ScaledRewardEnv", "--env-kwargs", '{"scale": 3.0, "length": 4}', "--steps", "200",
          "--run-dir", str(run_dir), *TINY_SAC])
    assert [row["eval_return"] for row in read_metrics(run_dir) if row["phase"] == "eval"] == [12.0, 12.0]  # 4 steps of reward 3
    run = load_run_agents(run_dir)
    assert run.env_kwargs == {"scale": 3.0, "length": 4} and evaluate_run(run, [[0]]).tolist() == [[12.0]]
    assert load_policy(run_dir)(np.zeros(2, np.float32)).shape == (1,)
    out = tmp_path / "other.json"
    main(["evaluate", str(run_dir), "--episodes", "2", "--env-kwargs", '{"scale": 7.0}', "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["env_kwargs"] == {"scale": 7.0} and record["seeds"][0]["returns"] == [35.0, 35.0]  # default length 5


@pytest.mark.parametrize("text", ["[1, 2]", "{scale: 3}"])
def test_environment_kwargs_that_are_not_a_json_object_are_refused(tmp_path, text):
    with pytest.raises(SystemExit, match="--env-kwargs must be a JSON object"):
        main(["train", "--env", "Pendulum-v1", "--env-kwargs", text, "--steps", "200", "--run-dir", str(tmp_path / "run"), *TINY_SAC])
