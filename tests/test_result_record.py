"""Benchmark results carry their provenance: settings, git revision, package versions (o2o's and the
peers'), CPU and device, but no path of the machine that produced them."""

import dataclasses
import json
import subprocess
from pathlib import Path

from rl.logging import git_revision, result_record


@dataclasses.dataclass(frozen=True)
class _Settings:
    out_dir: Path
    runs: tuple[Path, ...]
    seeds: tuple[int, ...] = (0, 1)


def test_result_record_keeps_paths_by_name_and_lists_peer_versions():
    settings = _Settings(Path("/home/someone/results"), (Path("/tmp/a/run0"), Path("run1")))
    record = json.loads(json.dumps(result_record(settings, ("d3rlpy", "no-such-package-o2o-test"))))
    assert record["config"] == {"out_dir": "results", "runs": ["run0", "run1"], "seeds": [0, 1]}
    assert "/home/someone" not in json.dumps(record) and "command" not in record
    assert record["packages"]["jax"] and "d3rlpy" in record["packages"]
    assert record["packages"]["no-such-package-o2o-test"] is None  # recorded as absent, not dropped
    assert record["git_revision"] is None or len(record["git_revision"].split("-")[0]) == 40
    assert record["device"]["platform"] == "cpu" and record["cpu"]["count"] >= 1 and record["cpu"]["model"]


def test_a_benchmark_writes_its_record_beside_its_outputs(tmp_path):
    from experiments import solver_bandits

    args = solver_bandits.Args(
        runs=1, T=20, instances=20, out_dir=tmp_path, distributions=("high",), learners=("Tsallis-INF",), plot=False
    )
    solver_bandits.main(args)
    record = json.loads((tmp_path / "solver_bandits_run.json").read_text())
    assert record["config"]["T"] == 20 and record["config"]["out_dir"] == tmp_path.name
    assert (tmp_path / "solver_bandits.csv").exists()


def test_revision_is_dirty_for_changed_code_but_not_for_rewritten_results(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=o2o", "-c", "user.email=o2o@example.org", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "rl").mkdir()
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    (tmp_path / "rl" / "code.py").write_text("x = 1\n")
    (tmp_path / "experiments" / "results" / "table.csv").write_text("a,b\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    clean = git_revision(tmp_path / "rl")
    assert clean is not None and len(clean) == 40
    (tmp_path / "experiments" / "results" / "table.csv").write_text("a,b\n1,2\n")
    assert git_revision(tmp_path / "rl") == clean
    (tmp_path / "rl" / "code.py").write_text("x = 2\n")
    assert git_revision(tmp_path / "rl") == clean + "-dirty"
