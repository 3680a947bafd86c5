"""ZeCO's communication: the pipelined All-Scan of the linear layers' piece states.

`all_scan_combine` is the schedule; layers/linear_parallel.py calls it with the summaries it
computed. Each rank summarizes each of its pieces by its state from zero M and its
transition D (sharding/states.py): exp of the piece's cumulative log-gate, per d_k or scalar, 1
without a gate, 0 where the state resets in the piece or at its first token; or the delta rule's
full [d_k, d_k] matrix. The state entering global chunk c obeys
  S_in(0) = initial_state (or 0),   S_in(c+1) = D_c S_in(c) + M_c,
so the state leaving a chunk, OUT_c = D_c S_in(c) + M_c, is what the next chunk's rank needs.
A diagonal D leaves the rows of the [d_k, d_v] state independent, a matrix D (left-multiplying)
its columns, so the recurrence splits into K independent blocks of rows (diagonal) or of columns
(matrix; D stays on its rank, only state blocks travel). K = `scan_blocks`, clamped to the largest
divisor of the split dimension that is <= scan_blocks, so that all blocks have one shape (d = 5
gives K = 1, d = 128 with scan_blocks = 4 gives K = 4).

All-Scan schedule. Number the transitions between consecutive global chunks held by different
ranks m = 0, 1, ... in chunk order. Block k of transition m is sent at time step tau = m + k by one
`lax.ppermute` whose static permutation holds only the pairs active at tau (ranks outside it
receive zeros); the receiver stores it as block k of its S_in, combines it with its own D and M and
forwards block k of its OUT at tau + 1. Consecutive chunks on the same rank (zigzag's turn at rank
P-1) combine locally. The chain takes (#transitions + K - 1) steps of one block each, about
tau(S) + (P-2) tau(S) / K for a state transfer time tau(S) against LASP-1's (P-1) tau(S); the
intra-piece attention never depends on it, so it can hide the scan.
  contiguous  transitions r -> r+1 for r = 0..P-2: P-1+K-1 steps; every rank but the last sends
              exactly ONE state (its K blocks, B*H*d_k*d_v floats) and every rank but the first
              receives one: the minimal volume.
  zigzag      global order visits ranks 0..P-1 (first pieces) then P-1..0 (second pieces): a +1
              leg and a -1 leg, 2(P-1)+K-1 steps, one ppermute per active direction and step;
              each rank sends one state per neighbour (inner ranks two states in all).
The final state (after the last global token) is formed on the rank holding the last chunk
(P-1 contiguous, 0 zigzag).

Backward: by autodiff. Each ppermute transposes into the reversed pairs at the mirrored time
step, which is exactly the reverse scan of the state cotangents: again one state per rank and
leg. An `initial_state` adds one all-reduce of its state cotangent.
"""

import jax.numpy as jnp
import numpy as np
from jax import lax

from sharding import specs
from sharding.layout import final_owner
from sharding.states import advance, is_matrix


def scan_block_count(scan_blocks: int, size: int) -> int:
  """The largest divisor of the split dimension `size` that is <= scan_blocks (equal-shape
  blocks for ppermute)."""
  return max(d for d in range(1, min(scan_blocks, size) + 1) if size % d == 0)


def schedule(layout, blocks: int) -> list[list[tuple]]:
  """Static All-Scan steps; each step lists (pairs, send_slot [P], recv_slot [P]) per direction.

  A slot is piece * blocks + block of a rank's [pieces * blocks] state blocks; -1: not involved.
  """
  table = layout.chunk_table()
  owner = {int(c): (r, j) for (r, j), c in np.ndenumerate(table)}
  remote = [c for c in range(layout.num_chunks - 1) if owner[c][0] != owner[c + 1][0]]
  steps = []
  for tau in range(len(remote) + blocks - 1 if remote else 0):
    groups = {}
    for m, c in enumerate(remote):
      k = tau - m
      if 0 <= k < blocks:
        (src, j), (dst, j_next) = owner[c], owner[c + 1]
        pairs, send, recv = groups.setdefault(
            dst - src, ([], np.full(layout.shards, -1), np.full(layout.shards, -1)))
        pairs.append((src, dst))
        send[src], recv[dst] = j * blocks + k, j_next * blocks + k
    steps.append(list(groups.values()))
  return steps


def _local_turns(layout) -> np.ndarray:
  """bool [P]: the rank's second piece directly follows its first in global order."""
  table = layout.chunk_table()
  if layout.chunks_per_shard == 1:
    return np.zeros(layout.shards, bool)
  return table[:, 1] == table[:, 0] + 1


def all_scan_combine(m, decay, h0, rank, *, layout, scan_blocks: int):
  """All-Scan of the piece states (arguments as in sharding.lasp2.prefix_combine); returns this
  rank's S_in [b, n, h, dk, dv] and its OUT of the piece position that holds the last global
  chunk on its owner (the final state there; `final_owner` says which rank's is meant)."""
  b, n, h, dk, dv = m.shape
  matrix = is_matrix(decay, m)
  # Blocks of rows for a diagonal transition, of columns for a matrix one: [b, n, h, K, x, y].
  blocks = scan_block_count(scan_blocks, dv if matrix else dk)
  if matrix:
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[:-1] + (blocks, dv // blocks)), -2, -3)
    merge = lambda x: jnp.moveaxis(x, -3, -2).reshape(x.shape[:-3] + (dk, dv))
    d_blocks = jnp.broadcast_to(decay[:, :, :, None], (b, n, h, blocks, dk, dk))
  else:
    split = lambda x: x.reshape(x.shape[:-2] + (blocks, dk // blocks, dv))
    merge = lambda x: x.reshape(x.shape[:-3] + (dk, dv))
    d_blocks = (jnp.broadcast_to(decay[:, :, :, None], (b, n, h, blocks, 1))
                if decay.shape[-1] == 1 else decay.reshape(b, n, h, blocks, dk // blocks))

  def slots(x):
    """[b, n, h, blocks, ...] -> [n * blocks, b, h, ...] (slot = piece * blocks + block)."""
    x = jnp.moveaxis(x, (1, 3), (0, 1))
    return x.reshape((n * blocks,) + x.shape[2:])

  m_slots, d_slots = slots(split(m)), slots(d_blocks)
  turn = jnp.asarray(_local_turns(layout))[rank]
  take = lambda x, i: lax.dynamic_index_in_dim(x, i, keepdims=False)

  def out_block(inbuf, slot):
    """Block `slot` of the state leaving the piece (after the rank's local turn if any)."""
    x = take(inbuf, slot)
    if n > 1:
      first = slot % blocks
      x = jnp.where(turn & (slot >= blocks),
                    advance(take(d_slots, first), take(inbuf, first), take(m_slots, first)), x)
    return advance(take(d_slots, slot), x, take(m_slots, slot))

  inbuf = jnp.zeros_like(m_slots)
  if h0 is not None:  # global chunk 0 is rank 0's first piece in every layout
    h0_blocks = jnp.moveaxis(split(h0), 2, 0)
    inbuf = inbuf.at[:blocks].set(jnp.where(rank == 0, h0_blocks, 0.0))
  for step in schedule(layout, blocks):
    received = []
    for pairs, send, recv in step:
      value = out_block(inbuf, jnp.maximum(jnp.asarray(send)[rank], 0))
      received.append((lax.ppermute(value, specs.SEQ_AXIS, perm=pairs), jnp.asarray(recv)[rank]))
    for value, slot in received:
      index = jnp.maximum(slot, 0)
      kept = jnp.where(slot >= 0, value, take(inbuf, index))
      inbuf = lax.dynamic_update_index_in_dim(inbuf, kept, index, 0)
  s_in = merge(jnp.moveaxis(inbuf.reshape((n, blocks) + inbuf.shape[1:]), (0, 1), (1, 3)))
  if n > 1:
    after_first = advance(decay[:, 0], s_in[:, 0], m[:, 0])
    s_in = s_in.at[:, 1].set(jnp.where(turn, after_first, s_in[:, 1]))
  j = final_owner(layout)[1]
  return s_in, advance(decay[:, j], s_in[:, j], m[:, j])
