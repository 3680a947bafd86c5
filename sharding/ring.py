"""The ring rotation of sequence parallelism: shards travel around the `seq` axis step by step.

A rank keeps its own data and, at ring step j of a chain with direction +1 (-1), holds the shard
of the rank j places behind (ahead of) it, received with one `lax.ppermute` per step. The caller
supplies the per-step compute, `attend(carry, held, j)`; this module only moves the shards.
Ring attention (layers/softmax_parallel.py) is the user: its forward rotates K, V (`rotate`), its
custom backward rotates K, V again with the float32 dK, dV accumulator of the held shard
travelling alongside and returning to its owner at the end (`rotate_accumulate`).

Memory. The steps run in a lax.scan whose carry holds the held shard, so a rank keeps O(1) shards
(the held one and the incoming one) whatever P; the next shard's ppermute depends only on the
held one, so it can overlap the step's compute. (Unrolled steps would let XLA issue the whole
rotation up front and keep every received shard alive.)

Chains. A sliding window needs only nearby shards: `plan_chains` covers the ring offsets that hold
needed data with a +1 chain over offsets 1..a and a -1 chain over offsets -1..-b, a + b minimal
(a single +1 chain of P - 1 steps when that is no longer).
"""

import jax
import jax.numpy as jnp
from jax import lax

from sharding.specs import SEQ_AXIS


def shift(tree, distance: int, shards: int):
  """Sends every leaf of `tree` `distance` ranks along the ring of `shards` ranks."""
  perm = [(i, (i + distance) % shards) for i in range(shards)]
  return jax.tree.map(lambda x: lax.ppermute(x, SEQ_AXIS, perm), tree)


def plan_chains(needed_offsets, shards: int) -> tuple[tuple[int, int], ...]:
  """((direction, steps), ...): +1 / -1 chains whose offsets cover `needed_offsets` (in 1..P-1,
  offset o meaning the shard of rank r - o), with the fewest steps in all."""
  need = sorted(set(int(o) for o in needed_offsets))
  if any(not 0 < o < shards for o in need):
    raise ValueError(f"ring offsets {need} must lie in 1..{shards - 1}")
  best = (shards - 1, 0) if need else (0, 0)
  for a in range(shards - 1, -1, -1):
    rest = [o for o in need if o > a]
    b = shards - min(rest) if rest else 0
    if a + b < sum(best):
      best = (a, b)
  return tuple((d, n) for d, n in zip((1, -1), best) if n)


def _run(direction: int, steps: int, carry, held, attend, shards: int, send_carry: bool):
  def step(c, j):
    carry, held = c
    incoming = shift(held, direction, shards)
    carry = attend(carry, held, j)
    if send_carry:
      carry = (carry[0], shift(carry[1], direction, shards))
    return (carry, incoming), None

  c = (carry, shift(held, direction, shards))
  (carry, held), _ = lax.scan(step, c, jnp.arange(1, steps, dtype=jnp.int32))
  return attend(carry, held, steps)


def rotate(direction: int, steps: int, carry, held, attend, *, shards: int):
  """Runs one chain: at step j = 1..steps the rank holds the shard sent j ranks along the ring
  (`direction` +1 or -1) and computes carry = attend(carry, held, j); returns the final carry."""
  return _run(direction, steps, carry, held, attend, shards, False)


def rotate_accumulate(direction: int, steps: int, carry, acc, held, attend, *, shards: int):
  """`rotate` in which (carry, acc) = attend((carry, acc), held, j) and `acc`, an accumulator
  belonging to the held shard, travels with it; after the last step it is sent back to the
  shard's owner. Returns (carry, the accumulator of this rank's own shard)."""
  carry, acc = _run(direction, steps, (carry, acc), held, attend, shards, True)
  return carry, shift(acc, -direction * steps, shards)
