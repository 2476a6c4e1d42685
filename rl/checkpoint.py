"""Orbax checkpoints of a whole run: agent, buffer, RNG key, step and host-side loop state.

Orbax writes each checkpoint into a temporary directory and commits it by rename, so a crash
never leaves a half-written checkpoint where a good one was; :meth:`Checkpointer.latest_step`
only sees committed ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from rl.types import PyTree


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the agent being restored into."""


def tree_signature(tree: PyTree) -> dict[str, list[int]]:
    """``{path: shape}`` of every array leaf, to compare checkpoints before restoring."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): list(np.shape(leaf)) for path, leaf in flat}


def check_signature(expected: Mapping[str, list[int]], found: Mapping[str, list[int]], what: str) -> None:
    """Raise :class:`CheckpointMismatch` naming the first parameter whose presence or shape differs."""
    for path in sorted(set(expected) | set(found)):
        if path not in found:
            raise CheckpointMismatch(f"{what}: checkpoint lacks '{path}' (expected shape {expected[path]})")
        if path not in expected:
            raise CheckpointMismatch(f"{what}: checkpoint has unexpected '{path}' with shape {found[path]}")
        if list(expected[path]) != list(found[path]):
            raise CheckpointMismatch(
                f"{what}: '{path}' has shape {found[path]} in the checkpoint but {expected[path]} here"
            )


def check_env_loop(recorded: str | None, current: str, what: str) -> None:
    """Raise :class:`CheckpointMismatch` when a run's checkpoints were written with its training
    envs stepping elsewhere (``"device"`` or ``"host"``) than where this resume would step them: the
    two loops checkpoint different env state. ``recorded`` None (no record) passes."""
    if recorded is not None and recorded != current:
        raise CheckpointMismatch(
            f"{what}: its checkpoints were written with the training envs stepping on the {recorded}; resume it the "
            f"same way (--env-loop {recorded} on the command line, --finetune.env-loop {recorded} for o2o finetune, "
            f"or {'a' if recorded == 'device' else 'no'} jax_env in the Python API)"
        )


class Checkpointer:
    """Saves and restores ``(state pytree, host JSON)`` pairs under ``directory/<step>``."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2) -> None:
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False),
        )

    def save(self, step: int, state: PyTree, host: Mapping[str, Any]) -> None:
        """Write a checkpoint for ``step`` and wait until it is committed."""
        host = {**host, "signature": tree_signature(state)}
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(dict(host))),
            force=True,
        )
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        return self._manager.latest_step()

    def restore_host(self, step: int | None = None) -> dict[str, Any]:
        """Only the host JSON of a checkpoint (cheap; used to check compatibility first)."""
        step = self._require_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore()))
        return dict(restored["host"])

    def restore(
        self, target: PyTree, step: int | None = None, what: str = "checkpoint", partial: bool = False
    ) -> tuple[PyTree, dict[str, Any]]:
        """Restore into the structure of ``target`` after checking every shape matches.

        With ``partial`` the checkpoint may hold more than ``target`` (a run's env states, say, when
        only its buffer is wanted): only ``target``'s entries are checked and read.
        """
        step = self._require_step(step)
        host = self.restore_host(step)
        expected, found = tree_signature(target), host.get("signature", {})
        if partial:
            found = {path: shape for path, shape in found.items() if path in expected}
        check_signature(expected, found, what)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        if not partial:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()),
            )
            return restored["state"], dict(restored["host"])
        # A manager of its own: orbax refuses another restore kind for an item this one has saved.
        manager = ocp.CheckpointManager(self.directory)
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True
                    ),
                    host=ocp.args.JsonRestore(),
                ),
            )
        finally:
            manager.close()
        return restored["state"], dict(restored["host"])

    def _require_step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step

    def close(self) -> None:
        """Release orbax resources."""
        self._manager.close()
