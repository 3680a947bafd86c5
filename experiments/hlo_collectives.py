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
A collective inside a while loop (a `lax.scan` / `fori_loop` body) runs once per iteration: it is
counted `known_trip_count` times (nested loops multiply); a loop without a known trip count is an
error rather than a guess. Only the synchronous forms that XLA:CPU emits are parsed; async
`-start`/`-done` pairs (GPU, TPU) are reported as unparsed so a count never silently drops them.
"""

import dataclasses
import functools
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
  executions: int = 1  # times it runs per program execution (loop trip counts)


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


_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_CALLEES = re.compile(r"(?:body|condition|to_apply|calls|true_computation|false_computation)="
                      r"%?([^\s,}]+)")


def _executions(hlo_text: str) -> dict[str, int | None]:
  """Computation name -> times it runs per execution of the entry computation (None: unknown,
  inside a loop with a data-dependent trip count)."""
  calls: dict[str, list[tuple[str, int | None]]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(2)
      calls.setdefault(current, [])
      if header.group(1):
        entry = current
      continue
    if current is None or "=" not in line:
      continue
    trips = 1
    if re.search(r"\swhile\(", line):
      known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
      trips = int(known.group(1)) if known else None
    callees = _CALLEES.findall(line)
    branches = re.search(r"branch_computations=\{([^}]*)\}", line)
    if branches:
      callees += [c.strip().lstrip("%") for c in branches.group(1).split(",")]
    for callee in callees:
      calls[current].append((callee, trips))
  callers: dict[str, list[tuple[str, int | None]]] = {}
  for caller, edges in calls.items():
    for callee, trips in edges:
      callers.setdefault(callee, []).append((caller, trips))

  @functools.cache
  def runs(name):
    if name == entry:
      return 1
    total = 0
    for caller, trips in callers.get(name, []):
      outer = runs(caller)
      if outer is None or trips is None:
        return None
      total += outer * trips
    return total

  return {name: runs(name) for name in calls}


def collectives(hlo_text: str, num_devices: int) -> tuple[list[Collective], list[str]]:
  """(parsed collectives, lines of async collectives that were not parsed)."""
  ops, unparsed = [], []
  runs = _executions(hlo_text)
  current = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(2)
      continue
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
    executions = runs.get(current, 1)
    if executions is None:
      raise ValueError(f"hlo_collectives: {name} runs inside a loop without a known trip count "
                       "(its bytes cannot be counted)")
    ops.append(Collective(name, kind, _array_bytes(type_text), groups, pairs, executions))
  return ops, unparsed


def bytes_sent_per_device(ops: list[Collective], num_devices: int) -> np.ndarray:
  """float [num_devices]: bytes each device sends over all `ops`."""
  sent = np.zeros(num_devices)
  for op in ops:
    if op.kind == "collective-permute":
      for src, _ in op.pairs:
        sent[src] += op.result_bytes * op.executions
      continue
    for group in op.groups:
      n = len(group)
      factor = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1, "all-reduce": 2 * (n - 1) / n,
                "all-to-all": (n - 1) / n}[op.kind]
      for d in group:
        sent[d] += factor * op.result_bytes * op.executions
  return sent


def count(ops: list[Collective], kind: str) -> int:
  """Executions of `kind` collectives (loop bodies counted once per iteration)."""
  return sum(op.executions for op in ops if op.kind == kind)
