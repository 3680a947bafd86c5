"""Which rows of a global [rows, length] batch a process holds, and its arrays from host data.

Under the batch sharding (rows over data x fsdp, length over seq) a process's devices hold a
contiguous block of rows, whole along the length where its devices span the `seq` axis and a
slice of it where the `seq` axis spans processes. A process loads its block of rows at full
length and `to_global` hands JAX only what each device needs.
"""

import jax
import numpy as np


def process_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[int, int]:
  """[start, stop) of the rows (dimension 0) of a `shape` array that this process's devices
  hold under `sharding`."""
  blocks = {(s.start or 0, shape[0] if s.stop is None else s.stop)
            for s, *_ in sharding.addressable_devices_indices_map(tuple(shape)).values()}
  start, stop = min(b[0] for b in blocks), max(b[1] for b in blocks)
  covered = np.zeros(stop - start, bool)
  for lo, hi in blocks:
    covered[lo - start:hi - start] = True
  if not covered.all():
    raise ValueError(f"the batch sharding {sharding} gives process {jax.process_index()} rows "
                     f"{sorted(blocks)} of {shape[0]}, which are not one contiguous block; use "
                     "a mesh whose data axes keep each process's devices together")
  return start, stop


def to_global(sharding: jax.sharding.Sharding, local: dict, global_rows: int) -> dict:
  """Global arrays from this process's rows (`process_rows`) of each [rows, length] array."""
  return {k: jax.make_array_from_process_local_data(
              sharding, np.asarray(v), (global_rows,) + np.shape(v)[1:])
          for k, v in local.items()}
