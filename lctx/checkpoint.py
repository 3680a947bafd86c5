"""Atomic, rotating, verified checkpoints of the train state and the data-iterator position (orbax).

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoints intact; the partial directory is removed on the
next start. Only the last `keep` checkpoints are kept.

Restoring verifies: `restore_newest_readable` reads the newest checkpoint's tree from its metadata
(compared with the configured model by the caller before anything is loaded), restores every
array and the data-iterator state, and lets the caller check what it got. A checkpoint that fails
any of this (a deleted `_METADATA` or array directory, an emptied OCDBT manifest, a missing or
garbled data item, non-finite parameters) is reported with its step and the reason, moved aside to
`<checkpoints>_unreadable/STEP` (never deleted) when the caller owns the workdir, and the next
newest is tried.
"""

import dataclasses
import glob
import json
import logging
import os
import shutil
import sys
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from lctx.compat import tree_signature
from lctx.errors import RunFailure

log = logging.getLogger("lctx")


class CheckpointUnreadable(Exception):
  """One checkpoint step cannot be read (the message says why)."""


class ProcessDataHandler(ocp.CheckpointHandler):
  """The data-iterator state of every process: each writes `process_I-of-N.json`; a restore
  reads them all and merges their "shards" (lctx/data/shards.py), so that any process count can
  pick the shards it reads. A checkpoint of a single process written before this handler (one
  JSON file, `metadata`) reads as that process's state."""

  def save(self, directory, args):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (directory / name).write_text(json.dumps(args.item))

  def restore(self, directory, args=None):
    del args
    files = sorted(glob.glob(os.path.join(os.fspath(directory), "process_*-of-*.json")))
    if not files:
      legacy = directory / "metadata"
      if not legacy.exists():
        raise FileNotFoundError(f"no data-iterator state (process_*-of-*.json) in {directory}")
      return json.loads(legacy.read_text())
    states = []
    for f in files:
      with open(f) as fh:
        states.append(json.load(fh))
    if not all(isinstance(s, dict) and "shards" in s for s in states):
      return states[0]  # not a state of data shards: the caller says whether it applies
    merged = {"data_shards": states[0].get("data_shards"), "shards": {}}
    for f, state in zip(files, states):
      if state.get("data_shards") != merged["data_shards"]:
        raise ValueError(f"{f} holds the state of {state.get('data_shards')} data shards, "
                         f"{files[0]} of {merged['data_shards']}")
      merged["shards"].update(state["shards"])
    return merged

  def structure(self, directory):
    return None

  def metadata(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(ProcessDataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(ProcessDataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any = None


# Orbax splits the writing of a replicated array across its replicas, slicing each array on the
# devices: one small compile per array shape, about 4 s per process for a small model on 8
# devices. Below this many bytes per replica one replica writes the whole array instead.
MIN_REPLICA_SLICE_BYTES = 16 * 2**20


def _register_array_handler() -> None:
  """jax.Array is saved by orbax's ArrayHandler with the replica-slice threshold above."""
  handler = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
  ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def _handler_registry():
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
    registry.add("state", args, ocp.StandardCheckpointHandler)
  registry.add("state", ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler)
  for args in (DataSave, DataRestore):
    registry.add("data", args, ProcessDataHandler)
  return registry


def _reason(e: BaseException) -> str:
  """The root cause of `e` in one line (orbax wraps tensorstore's message, which names the file)."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:400]}{'...' if len(text) > 400 else ''}"


def _drop_late_read_callbacks() -> None:
  """When a read fails, tensorstore still completes the other reads orbax issued; their callbacks
  find orbax's event loop closed and report it as unraisable exceptions, one traceback per array
  (even while the failing call is still unwinding), and the abandoned read coroutines report
  their closing when they are collected. Those (and only those) are dropped; any other
  unraisable exception is reported as before."""
  previous = sys.unraisablehook
  if getattr(previous, "_lctx", False):
    return

  def hook(unraisable):
    late_callback = (isinstance(unraisable.exc_value, RuntimeError)
                     and str(unraisable.exc_value) == "Event loop is closed")
    abandoned_read = (getattr(unraisable.object, "__qualname__", "")
                      == "_read_array_index_and_device_put")
    if not (late_callback or abandoned_read):
      previous(unraisable)

  hook._lctx = True
  sys.unraisablehook = hook


class Checkpointer:
  """Saves {"state": train state, "data": every process's data-iterator state} every step it is
  asked to. Every process of a run takes part in each save and restore (orbax writes each
  array's shards from the process that owns them; process 0 commits the step).

  With `async_save` a save returns once the arrays are copied off the devices and is written in
  the background, still into a temporary directory renamed when complete; the next save, and
  `close`, wait for it first (and report its failure).
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = False):
    self.directory = os.path.abspath(directory)
    self.unreadable_directory = self.directory + "_unreadable"
    self._async, self._pending = async_save, None
    _drop_late_read_callbacks()
    _register_array_handler()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            handler_registry=_handler_registry())
    except (OSError, ValueError) as e:
      raise RunFailure(f"cannot open the checkpoint directory {self.directory}: "
                       f"{_reason(e)}") from e

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict) -> None:
    self.wait()
    try:
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       data=DataSave(data_state)),
                         force=True)
      if self._async:
        self._pending = step
      else:
        self._manager.wait_until_finished()
    except Exception as e:  # a full disk, a vanished directory: the earlier steps stay intact
      raise self._failure(step, e) from e

  def wait(self) -> None:
    """Waits for a background save; RunFailure if it failed."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._failure(step, e) from e

  def _failure(self, step: int, e: BaseException) -> RunFailure:
    return RunFailure(f"saving the checkpoint of step {step} to {self.directory} failed "
                      f"({_reason(e)}); the earlier checkpoints {self.all_steps()} are kept")

  def choose_step(self, step: int | None, setting: str) -> int:
    """`step` if saved here (None: the newest); ValueError naming `setting` otherwise."""
    steps = self.all_steps()
    if not steps:
      raise ValueError(f"{setting}: no checkpoint in {self.directory}")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise ValueError(f"{setting}: {self.directory} holds steps {steps}, not {step}")
    return step

  def tree_signature(self, step: int) -> dict:
    """{path: shape} of the saved train state, from its metadata (no arrays are read)."""
    try:
      metadata = self._manager.item_metadata(step)["state"]
    except Exception as e:
      raise CheckpointUnreadable(f"its metadata cannot be read ({_reason(e)})") from e
    if metadata is None:
      raise CheckpointUnreadable("it has no train-state item")
    tree = getattr(metadata, "tree", metadata)
    signature = tree_signature(tree)
    if not signature:
      raise CheckpointUnreadable("its metadata lists no arrays")
    return signature

  def restore(self, abstract_state, step: int):
    """(state, data_state) of `step`; `abstract_state` gives shapes, dtypes and shardings."""
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        data=DataRestore()))
      state, data = restored["state"], restored["data"]
    except Exception as e:
      raise CheckpointUnreadable(f"restoring it failed ({_reason(e)})") from e
    if not isinstance(data, dict):
      raise CheckpointUnreadable(f"its data-iterator item is {type(data).__name__}, not a dict")
    return state, data

  def restore_params(self, abstract_params, step: int):
    """Only the parameters of `step` (for evaluation and generation)."""
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
              item={"params": abstract_params},
              restore_args=jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
                                        {"params": abstract_params}),
              partial_restore=True)))
      return restored["state"]["params"]
    except Exception as e:
      raise CheckpointUnreadable(f"restoring its parameters failed ({_reason(e)})") from e

  def move_aside(self, step: int, reason: str) -> str:
    """Moves an unreadable step out of the checkpoint directory (kept, never deleted); in a run
    of several processes process 0 moves it and the others wait for that."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      dest = f"{self.unreadable_directory} (by process 0)"
      if jax.process_index() == 0:
        dest = self._move(step, reason)
      multihost_utils.sync_global_devices(f"lctx move aside {step}")
      self._manager.reload()
      return dest
    return self._move(step, reason)

  def _move(self, step: int, reason: str) -> str:
    os.makedirs(self.unreadable_directory, exist_ok=True)
    dest, n = os.path.join(self.unreadable_directory, str(step)), 1
    while os.path.exists(dest):
      n += 1
      dest = os.path.join(self.unreadable_directory, f"{step}.{n}")
    shutil.move(self.step_dir(step), dest)
    with open(dest + ".reason.txt", "w") as f:
      f.write(reason + "\n")
    if jax.process_count() == 1:
      self._manager.reload()
    return dest

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


def restore_newest_readable(ckpt: Checkpointer, check_tree: Callable[[int, dict], None],
                            restore: Callable[[int], object], *, move_aside: bool):
  """(step, restore(step)) of the newest checkpoint that reads, or None if there is none.

  For each step, newest first: its metadata tree goes to `check_tree(step, signature)`, which
  raises (a ValueError naming the settings) when the checkpoint does not fit the configured model;
  that error propagates untouched, since an older step would not fit either. Then `restore(step)`
  loads it and may raise CheckpointUnreadable after checking what it loaded. Unreadable steps are
  reported, moved aside when `move_aside` (the caller holds the workdir), else skipped; if every
  step is unreadable, RunFailure lists them all.
  """
  failures = []
  for step in reversed(ckpt.all_steps()):
    try:
      signature = ckpt.tree_signature(step)
    except CheckpointUnreadable as e:
      failures.append(_unreadable(ckpt, step, str(e), move_aside))
      continue
    check_tree(step, signature)
    try:
      result = restore(step)
    except CheckpointUnreadable as e:
      failures.append(_unreadable(ckpt, step, str(e), move_aside))
      continue
    if failures:
      log.warning("restored the newest readable checkpoint, step %d", step)
    return step, result
  if failures:
    advice = (f"they are kept in {ckpt.unreadable_directory}; put a good copy back in "
              f"{ckpt.directory}, or run again to start afresh" if move_aside else
              "put a good copy there, or train again")
    raise RunFailure(f"no readable checkpoint in {ckpt.directory}: " + "; ".join(failures)
                     + f". {advice}")
  return None


def _unreadable(ckpt: Checkpointer, step: int, reason: str, move_aside: bool) -> str:
  message = f"step {step} ({ckpt.step_dir(step)}) is unreadable: {reason}"
  if move_aside:
    message += f"; moved to {ckpt.move_aside(step, reason)}"
  else:
    message += "; skipped"
  log.warning("checkpoint %s", message)
  return message
