"""Orbax checkpoints: train state + loop position + early-stopping record + resolved config.

Two managers: `ckpt/` keeps the latest N states (resume), `best/` keeps the state with the best
validation AUC (final evaluation and export). Restoring takes abstract arrays that carry the
*current* mesh's shardings, so a checkpoint written on one mesh restores onto another.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  def __init__(self, workdir: str, keep: int):
    workdir = os.path.abspath(workdir)
    # Orbax names its cross-process barriers after the step only: two managers saving the same
    # step at once (best and latest at the end of an epoch) collide ("Barrier
    # _async_commit_complete.<step> is already ongoing") and hang multi-process runs, unless
    # each manager has its own barrier prefix.
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix="mscenario_latest"))
    self.latest = ocp.CheckpointManager(os.path.join(workdir, "ckpt"), options=opts)
    best_opts = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, enable_async_checkpointing=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix="mscenario_best"))
    self.best = ocp.CheckpointManager(os.path.join(workdir, "best"), options=best_opts)

  @staticmethod
  def _save(manager, step: int, state, meta: dict) -> None:
    """A step already committed is not written again: after a crash the resumed run redoes
    the same (deterministic) steps and may reach a save that had completed."""
    if step in manager.all_steps():
      return
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)), force=True)

  def save_latest(self, step: int, state, meta: dict) -> None:
    self._save(self.latest, step, state, meta)

  def save_best(self, step: int, state, meta: dict) -> None:
    self._save(self.best, step, state, meta)

  @staticmethod
  def _restore(manager, abstract_state, step=None):
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_latest(self, abstract_state):
    return self._restore(self.latest, abstract_state)

  def restore_best(self, abstract_state):
    return self._restore(self.best, abstract_state)

  def latest_step(self):
    return self.latest.latest_step()

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` that carry `shardings` (the mesh to restore onto)."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
