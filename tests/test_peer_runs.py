"""The benchmark scripts' runs of SBX leave nothing in the system's temporary directory (SB3's
default logger makes an empty ``SB3-<time>`` directory there on every ``learn()`` call)."""

import tempfile

import pytest

pytest.importorskip("sbx", reason="SBX comes with the bench extra, which the default test install leaves out")

from experiments import bench_updates, sac_hopper  # noqa: E402


def test_sbx_training_and_update_cells_write_nothing_to_the_temporary_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    args = sac_hopper.Args(env="Pendulum-v1", steps=200, seeds=(0,), warmup_steps=100, eval_interval=100,
                           eval_episodes=1)
    rows, _ = sac_hopper.run_sbx(args, seed=0)
    for cell in bench_updates.sbx_cells(bench_updates.Args(k=2)):
        assert cell.call() in (1, 2)
    assert [row["step"] for row in rows] == [100, 200]
    assert list(tmp_path.iterdir()) == []
