"""The training rows of one process: data shards, independent of how many processes read them.

The training data is cut into `DataConfig.data_shards` shards (0: one per process). Shard `s`
yields rows `s * B/S .. (s+1) * B/S` of every global batch of B rows (its documents are
`lctx.data.pipeline.train_iterator`'s shard `s` of S). A process reads the shards that overlap
the rows its devices hold (`sharding.hosts.process_rows`) and yields exactly those rows, so the
global batch is the same whether one process or several read it: 2 processes x 4 devices train
on the batches of 1 process x 8 devices. (Processes that hold the same rows, as when the `seq`
axis spans processes, read the same shards.)

The state (`get_state`) is {"data_shards": S, "shards": {"s": state of shard s}} for the shards
this process reads; every process saves its own (lctx/checkpoint.py writes one file per process)
and a restore gathers all of them, so a run saved by N processes continues with M processes when S
is the same (fix `DataConfig.data_shards` to resume with another process count).
"""

from __future__ import annotations

import numpy as np

from lctx.data import pipeline
from lctx.data.config import DataConfig


class DataShardsMismatch(ValueError):
  """A saved data state cannot continue in this run (another shard count)."""


def resolve_shards(cfg: DataConfig, process_count: int) -> int:
  """DataConfig.data_shards, with 0 meaning one shard per process; checked against the batch."""
  shards = cfg.data_shards or process_count
  if cfg.batch_size % shards:
    raise ValueError(f"DataConfig.batch_size={cfg.batch_size} must divide into "
                     f"DataConfig.data_shards={cfg.data_shards} data shards"
                     + (f" (0: one per process, {process_count} here)" if not cfg.data_shards
                        else ""))
  return shards


class ProcessRows:
  """Iterator over this process's rows [start, stop) of every global training batch."""

  def __init__(self, cfg: DataConfig, tokenizer, rows: tuple[int, int], shards: int):
    start, stop = rows
    per = cfg.batch_size // shards
    self.shards = shards
    self.indices = list(range(start // per, -(-stop // per)))
    self._offset, self._rows = start - self.indices[0] * per, stop - start
    self._iters = {s: pipeline.train_iterator(cfg, tokenizer, shard_index=s, shard_count=shards)
                   for s in self.indices}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(self._iters[s]) for s in self.indices]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return {k: v[self._offset:self._offset + self._rows] for k, v in batch.items()}

  def get_state(self) -> dict:
    return {"data_shards": self.shards,
            "shards": {str(s): it.get_state() for s, it in self._iters.items()}}

  def set_state(self, state: dict) -> None:
    """Continues from a saved state: the union of every saving process's shards."""
    if "data_shards" not in state:  # a state saved before data shards: one shard, one process
      state = {"data_shards": 1, "shards": {"0": state}}
    saved = int(state["data_shards"])
    if saved != self.shards:
      raise DataShardsMismatch(
          f"the checkpoint's data-iterator state is of {saved} data shards, this run reads "
          f"{self.shards} (DataConfig.data_shards=0 means one per process): set "
          f"--gin.DataConfig.data_shards={saved} to continue the saved data order with this "
          "process count")
    missing = [s for s in self.indices if str(s) not in state["shards"]]
    if missing:
      raise DataShardsMismatch(f"the checkpoint holds no data-iterator state of data shards "
                               f"{missing}, which this process reads")
    for s, it in self._iters.items():
      it.set_state(state["shards"][str(s)])
