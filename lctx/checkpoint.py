"""Atomic, rotating checkpoints of the train state and the data-iterator position (orbax)."""

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves {"state": train state, "data": data-iterator state} every step it is asked to.

  Orbax writes each step into a temporary directory and renames it when complete, so a process
  killed mid-save leaves the previous checkpoints intact; the partial directory is removed on the
  next start. Only the last `keep` checkpoints are kept.
  """

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data_state)),
                       force=True)
    self._manager.wait_until_finished()

  def restore(self, abstract_state, step: int | None = None):
    """Restores (step, state, data_state); `abstract_state` gives shapes, dtypes and shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint found in {self.directory}")
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return step, restored["state"], restored["data"]

  def restore_params(self, abstract_params, step: int | None = None):
    """Restores only the parameters of a checkpoint (for evaluation and generation)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint found in {self.directory}: train first (mode 'train')")
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": abstract_params},
            restore_args=jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
                                      {"params": abstract_params}),
            partial_restore=True)))
    return step, restored["state"]["params"]

  def close(self) -> None:
    self._manager.close()
