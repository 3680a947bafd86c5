"""Collective operations of an optimized HLO module and the bytes each device sends.

`collectives(hlo_text)` lists every all-gather, reduce-scatter, all-reduce, all-to-all and
collective-permute of a compiled program's text (`jax.jit(f).lower(...).compile().as_text()`).
`bytes_sent_per_device(ops, num_devices)` counts what each device puts on the wire, with the
bandwidth-optimal (ring) algorithm for the grouped collectives of n devices:
  all-gather      (n-1)/n x the gathered result
  reduce-scatter  (n-1)   x the scattered result   (= (n-1)/n x the input)
  all-reduce      2(n-1)/n x the array             (reduce-scatter + all-gather)
  all-to-all      (n-1)/n x the array
  collective-permute  the array once per (source -> target) pair the device is a source of.
Only the synchronous forms that XLA:CPU emits are parsed; async `-start`/`-done` pairs (GPU, TPU)
are reported as unparsed so a count never silently drops them.
"""

import dataclasses
import re

import numpy as np

_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "s32": 4, "s16": 2, "s8": 1,
                "u64": 8, "u32": 4, "u16": 2, "u8": 1, "pred": 1}
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?(\S+)\s*=\s*(.+?)\s+(" + "|".join(_KINDS)
                 + r")(-start|-done)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction: its kind, result bytes and the devices taking part."""

  name: str
  kind: str
  result_bytes: int
  groups: tuple[tuple[int, ...], ...]  # replica groups; empty for collective-permute
  pairs: tuple[tuple[int, int], ...]  # source -> target pairs of a collective-permute


def _array_bytes(type_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(type_text):
    if dtype not in _DTYPE_BYTES:
      raise ValueError(f"hlo_collectives: unknown element type {dtype!r} in {type_text!r}")
    n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    total += n * _DTYPE_BYTES[dtype]
  return total


def _groups(line: str, num_devices: int) -> tuple[tuple[int, ...], ...]:
  explicit = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
  if explicit:
    return tuple(tuple(int(x) for x in g.split(",") if x)
                 for g in re.findall(r"\{([\d,]*)\}", explicit.group(1)))
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](T\(([\d,]+)\))?", line)
  if iota:
    g, n = int(iota.group(1)), int(iota.group(2))
    dims = [int(x) for x in iota.group(3).split(",")]
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    if iota.group(5):
      ids = ids.transpose([int(x) for x in iota.group(5).split(",")])
    return tuple(tuple(int(x) for x in row) for row in ids.reshape(g, n))
  return (tuple(range(num_devices)),)


def collectives(hlo_text: str, num_devices: int) -> tuple[list[Collective], list[str]]:
  """(parsed collectives, lines of async collectives that were not parsed)."""
  ops, unparsed = [], []
  for line in hlo_text.splitlines():
    m = _OP.match(line)
    if not m:
      continue
    name, type_text, kind, phase = m.groups()
    if phase:
      unparsed.append(line.strip())
      continue
    pairs = ()
    if kind == "collective-permute":
      stp = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
      pairs = tuple((int(a), int(b)) for a, b in re.findall(r"\{(\d+),(\d+)\}", stp.group(1)))
      groups = ()
    else:
      groups = _groups(line, num_devices)
    ops.append(Collective(name, kind, _array_bytes(type_text), groups, pairs))
  return ops, unparsed


def bytes_sent_per_device(ops: list[Collective], num_devices: int) -> np.ndarray:
  """float [num_devices]: bytes each device sends over all `ops`."""
  sent = np.zeros(num_devices)
  for op in ops:
    if op.kind == "collective-permute":
      for src, _ in op.pairs:
        sent[src] += op.result_bytes
      continue
    for group in op.groups:
      n = len(group)
      factor = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1, "all-reduce": 2 * (n - 1) / n,
                "all-to-all": (n - 1) / n}[op.kind]
      for d in group:
        sent[d] += factor * op.result_bytes
  return sent


def count(ops: list[Collective], kind: str) -> int:
  return sum(op.kind == kind for op in ops)
