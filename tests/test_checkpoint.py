"""Checkpoints: shapes are checked before restoring; a partial restore reads a subset."""

import jax.numpy as jnp
import numpy as np
import pytest

from rl.checkpoint import CheckpointMismatch, Checkpointer


def _saved(tmp_path) -> Checkpointer:
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    checkpointer.save(3, {"buffer": jnp.arange(4.0), "envs": {"state": jnp.ones((2, 5))}}, {"step": 3})
    return checkpointer


def test_a_full_restore_refuses_a_checkpoint_holding_more_than_the_target(tmp_path):
    with pytest.raises(CheckpointMismatch, match="unexpected .*envs"):
        _saved(tmp_path).restore({"buffer": jnp.zeros(4)})


def test_a_partial_restore_reads_only_the_target_even_from_the_checkpointer_that_saved(tmp_path):
    state, host = _saved(tmp_path).restore({"buffer": jnp.zeros(4)}, partial=True)
    np.testing.assert_array_equal(state["buffer"], np.arange(4.0))
    assert set(state) == {"buffer"} and host["step"] == 3


def test_a_partial_restore_still_checks_the_shapes_it_reads(tmp_path):
    checkpointer = _saved(tmp_path)
    with pytest.raises(CheckpointMismatch, match="buffer"):
        checkpointer.restore({"buffer": jnp.zeros(5)}, partial=True)
    with pytest.raises(CheckpointMismatch, match="lacks"):
        checkpointer.restore({"agent": jnp.zeros(1)}, partial=True)


def test_a_run_resumes_only_in_the_env_loop_that_wrote_its_checkpoints():
    from rl.checkpoint import check_env_loop

    check_env_loop("device", "device", "run")
    check_env_loop(None, "host", "run")  # written before the record existed: nothing to compare
    with pytest.raises(CheckpointMismatch, match="run: .*stepping on the host.*--env-loop host"):
        check_env_loop("host", "device", "run")
