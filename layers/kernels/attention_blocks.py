"""Blockwise causal attention between layout chunks: the xla block step of the
sequence-parallel softmax ops (layers/softmax_parallel.py: ring attention and LASP-2H), and the
pieces every block step shares (Tiles, the pair tables, the loop over visible pairs).
attention_blocks_pallas.py is the Pallas step with the same functions.

Inside jax.shard_map a rank holds `layout.chunks_per_shard` query chunks of `chunk` tokens each;
the keys it attends to come in chunks of the same length (one shard per ring step, or all of them
after an all-gather). Every chunk covers contiguous global positions, so a (query chunk, key chunk)
pair is described by one traced number, rel = (query chunk id - key chunk id) * chunk: the
position of the query chunk's first token relative to the key chunk's first token. A pair is
  hidden        rel < 0, or its closest (query, key) pair is farther apart than the window:
                `lax.cond` skips it, nothing is computed;
  fully visible every key block lies before every query of a query block (and inside the
                window): the key blocks run without any mask arithmetic;
  diagonal      rel == 0 (or a window edge): only the blocks that straddle the edge are masked.
The last two fall out of `flash_common.key_block_range` evaluated at positions relative to the
key chunk, so the same tile loop serves both. The pairs worth tracing at all (visible on at least
one rank) are found statically; the rest are left out of the program.

Tiles follow layers/kernels/flash_xla.py: the query heads of one kv head are folded into the rows,
a tile is [b, hk, group * block_q, d] against [b, hk, block_k, d], logits and the online-softmax
state (m, l, acc) are float32 and live memory per rank is O(rows * block_k), not O(L^2). Chunks
are padded to whole blocks: padded keys are masked (kv_len), padded query rows are dropped (their
output cotangent is zero, so they add nothing to dk, dv or the sink gradient).

Layouts. Every array keeps the natural [b, length, heads, e] order (length = chunks x padded
chunk): the queries, the output cotangent, the state, lse, delta and dq per query head; K and V
per kv head, travelling stacked as [2, b, length, hk, d] (one message per ring step, one
all-gather), with their float32 gradient likewise. A tile is sliced out and transposed into its
rows as it is read, and written back the same way, and the logit scale is applied to each query
tile as it is read (Tiles.scale). So no layout copy of any chunk-sized array is made: when the
chunk is a whole number of blocks, the rank's own queries, K, V and output cotangent are read
where they are, and the pair loops update the state, dq and dK, dV tile by tile in place. That
is what keeps ring attention's per-device memory near its K, V shards (experiments/audit.py).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from layers.kernels import flash_common as fc
from sharding import lasp2, specs
from sharding.layout import SeqLayout



@dataclasses.dataclass(frozen=True)
class Tiles:
  """Static shape of a rank's work (hashable: a nondiff argument of the custom_vjps)."""

  layout: SeqLayout
  window: int | None
  chunk: int  # tokens per layout chunk
  block_q: int
  block_k: int
  group: int  # query heads per kv head
  impl: str = "xla"  # the block step: "xla" (this module) or "pallas" (attention_blocks_pallas)
  interpret: Any = None  # the Pallas step's interpret setting (None: where Pallas cannot compile)
  scale: float = 1.0  # the logit scale, applied to the queries by the block step

  @property
  def q_pad(self) -> int:
    return fc.round_up(self.chunk, self.block_q)

  @property
  def k_pad(self) -> int:
    return fc.round_up(self.chunk, self.block_k)

  @property
  def kv_len(self) -> int | None:
    return self.chunk if self.k_pad != self.chunk else None


def visible(st: Tiles, rel):
  """Whether some query of a chunk sees some key of a chunk starting `rel` tokens earlier."""
  vis = rel >= 0
  if st.window is not None:
    vis = vis & (rel - (st.chunk - 1) <= st.window)
  return vis


def static_pairs(st: Tiles, key_chunk_ids) -> np.ndarray:
  """int32 [n, 2]: the (query slot, key slot) pairs visible on at least one rank, where rank r
  holds the keys of global chunks key_chunk_ids(r)."""
  pairs = {(qi, kj) for r in range(st.layout.shards)
           for qi, cq in enumerate(st.layout.chunk_ids(r))
           for kj, ck in enumerate(key_chunk_ids(r)) if visible(st, (cq - ck) * st.chunk)}
  return np.array(sorted(pairs), np.int32).reshape(-1, 2)


def _chunks_padded(st: Tiles, x, axis: int, size: int):
  """x [..., L, ...] (length on `axis`, whole chunks) with every chunk padded to `size` tokens
  (x itself when size == chunk)."""
  if size == st.chunk:
    return x
  n = x.shape[axis] // st.chunk
  y = x.reshape(x.shape[:axis] + (n, st.chunk) + x.shape[axis + 1:])
  y = fc.pad_axis(y, axis + 1, size)
  return y.reshape(x.shape[:axis] + (n * size,) + x.shape[axis + 1:])


def _chunks_unpadded(st: Tiles, x, axis: int, size: int):
  """Inverse of _chunks_padded."""
  if size == st.chunk:
    return x
  n = x.shape[axis] // size
  y = x.reshape(x.shape[:axis] + (n, size) + x.shape[axis + 1:])
  y = lax.slice_in_dim(y, 0, st.chunk, axis=axis + 1)
  return y.reshape(x.shape[:axis] + (n * st.chunk,) + x.shape[axis + 1:])


def block_queries(st: Tiles, x):
  """[b, L, h, e] -> [b, chunks * q_pad, h, e]: the natural layout, every chunk padded to whole
  query blocks (x itself when the chunk is a whole number of blocks)."""
  return _chunks_padded(st, x, 1, st.q_pad)


def unblock_queries(st: Tiles, x):
  """Inverse of block_queries."""
  return _chunks_unpadded(st, x, 1, st.q_pad)


def block_scaled_queries(st: Tiles, q):
  """block_queries of q; the tiles apply st.scale as they are read, so no scaled copy of the
  queries is made."""
  return block_queries(st, q)


def block_kv(st: Tiles, k, v):
  """k, v [b, T, hk, d] -> stacked [2, b, chunks * k_pad, hk, d]: the travelling shard (one
  message per ring step), every chunk padded to whole key blocks."""
  return jnp.stack([_chunks_padded(st, x, 1, st.k_pad) for x in (k, v)])


def own_kv(st: Tiles, k, v):
  """The rank's own K, V for its own pairs without a stacked copy: (k, v) [b, chunks * k_pad,
  hk, d] (the inputs themselves when the chunk is a whole number of key blocks)."""
  return tuple(_chunks_padded(st, x, 1, st.k_pad) for x in (k, v))


def gather_kv(st: Tiles, k, v):
  """Every rank's K, V stacked in rank (chunk-slot) order: [2, b, P * chunks * k_pad, hk, d]
  from one all-gather (inside a shard_map over `seq`)."""
  return _chunks_padded(st, lasp2.all_gather_seq(jnp.stack([k, v]), axis=2), 2, st.k_pad)


def unblock_kv(st: Tiles, x):
  """Inverse of block_kv: (k, v), each [b, T, hk, d]."""
  return tuple(_chunks_unpadded(st, x[i], 1, st.k_pad) for i in range(2))


def block_segments(st: Tiles, seg, *, queries: bool):
  """[b, T] -> queries: [chunks, nq, b, block_q]; keys: [chunks, b, k_pad] (None stays None)."""
  if seg is None:
    return None
  b, t = seg.shape
  x = seg.astype(jnp.int32).reshape(b, t // st.chunk, st.chunk)
  if not queries:
    return fc.pad_axis(x, 2, st.k_pad, -1).transpose(1, 0, 2)
  x = fc.pad_axis(x, 2, st.q_pad, -1).reshape(b, t // st.chunk, -1, st.block_q)
  return x.transpose(1, 2, 0, 3)


def _head_sinks(sinks_hg):
  """[hk, g] sinks -> [h, 1] float32, one per query head (None stays None)."""
  return None if sinks_hg is None else sinks_hg.reshape(-1, 1).astype(jnp.float32)


def init_state(st: Tiles, qb, sinks_hg):
  """Online-softmax state (m, l, acc), each [b, chunks * q_pad, h, 1 or d], varying like qb."""
  state = fc.init_state(qb.shape[:-1], qb.shape[-1], _head_sinks(sinks_hg))
  return specs.vary(state, specs.axes_of(qb))


def sinks_grad(st: Tiles, sinks_hg, lse, delta):
  """[hk, g] gradient of the sinks from lse, delta [b, chunks * q_pad, h, 1] (padded rows have
  delta 0)."""
  per_row = fc.sink_grad(_head_sinks(sinks_hg), lse, delta)
  return per_row.sum(axis=(0, 1, 3)).reshape(sinks_hg.shape).astype(sinks_hg.dtype)


def _tile_fns(st: Tiles, rel, i, q_seg_i, k_seg):
  """(mask(j, edge), key block bounds) of query block i against a key chunk `rel` tokens back."""
  row_off = jnp.arange(st.group * st.block_q, dtype=jnp.int32) % st.block_q
  q_start = rel + i * st.block_q
  q_pos = (q_start + row_off)[:, None]
  q_seg_rows = None if q_seg_i is None else jnp.tile(q_seg_i, (1, st.group))[:, None, :, None]

  def mask(j, edge):
    k_pos = (j * st.block_k + jnp.arange(st.block_k, dtype=jnp.int32))[None, :]
    k_seg_j = None
    if k_seg is not None:
      k_seg_j = lax.dynamic_slice_in_dim(k_seg, j * st.block_k, st.block_k, 1)[:, None, None, :]
    return fc.block_mask(q_pos, k_pos, causal=True, window=st.window, kv_len=st.kv_len,
                         q_seg=q_seg_rows, k_seg=k_seg_j, edge=edge)

  bounds = fc.key_block_range(q_start, q_start + st.block_q, st.block_k, st.k_pad // st.block_k,
                              causal=True, window=st.window, kv_len=st.kv_len)
  return mask, bounds


def _tile(x, qi, i):
  """Query tile i of query chunk qi of a [chunks, nq, ...] array (None stays None)."""
  if x is None:
    return None
  return lax.dynamic_index_in_dim(lax.dynamic_index_in_dim(x, qi, 0, False), i, 0, False)


def _to_rows(st: Tiles, x):
  """[b, block_q, h, e] -> the tile's [b, hk, group * block_q, e] (rows group-major)."""
  b, bq, h, e = x.shape
  x = x.reshape(b, bq, h // st.group, st.group, e).transpose(0, 2, 3, 1, 4)
  return x.reshape(b, h // st.group, st.group * bq, e)


def _from_rows(st: Tiles, x):
  """Inverse of _to_rows."""
  b, hk, _, e = x.shape
  x = x.reshape(b, hk, st.group, st.block_q, e).transpose(0, 3, 1, 2, 4)
  return x.reshape(b, st.block_q, hk * st.group, e)


def _q_start(st: Tiles, qi, i):
  return qi * st.q_pad + i * st.block_q


def _q_tile(st: Tiles, x, qi, i):
  """Query block i of query chunk qi of a [b, chunks * q_pad, h, e] array, as tile rows."""
  return _to_rows(st, lax.dynamic_slice_in_dim(x, _q_start(st, qi, i), st.block_q, 1))


def _put_q_tile(st: Tiles, x, y, qi, i):
  return lax.dynamic_update_slice_in_dim(x, _from_rows(st, y).astype(x.dtype),
                                         _q_start(st, qi, i), 1)


def _scaled_q_tile(st: Tiles, qb, qi, i):
  q_i = _q_tile(st, qb, qi, i)
  return (q_i.astype(jnp.float32) * st.scale).astype(q_i.dtype)


def _kv_block(st: Tiles, kv, kj, j):
  """(K, V) of key block j of key chunk kj, each [b, hk, block_k, d], from the stacked
  [2, b, n * k_pad, hk, d] shard or the pair (k, v) of `own_kv`."""
  start = kj * st.k_pad + j * st.block_k
  if isinstance(kv, tuple):
    return tuple(lax.dynamic_slice_in_dim(x, start, st.block_k, 1).swapaxes(1, 2) for x in kv)
  block = lax.dynamic_slice_in_dim(kv, start, st.block_k, 2).swapaxes(2, 3)
  return block[0], block[1]


def _add_kv_block(st: Tiles, dkv, kj, j, part):
  """dkv [2, b, n * k_pad, hk, d] with part [2, b, hk, block_k, d] added at key block j of key
  chunk kj, in place."""
  start = kj * st.k_pad + j * st.block_k
  cur = lax.dynamic_slice_in_dim(dkv, start, st.block_k, 2)
  return lax.dynamic_update_slice_in_dim(dkv, cur + part.swapaxes(2, 3), start, 2)


def over_visible_pairs(st: Tiles, pairs, carry, q_ids, k_ids, pair_step):
  """carry = pair_step(qi, kj, rel, carry) over the static (query slot qi, key slot kj) `pairs`,
  rel being the query chunk's start minus the key chunk's; pairs hidden on this rank are
  skipped at run time (`lax.cond`). Shared by the xla and Pallas block steps."""
  if not len(pairs):
    return carry
  table = jnp.asarray(pairs)

  def pair(n, carry):
    qi, kj = table[n, 0], table[n, 1]
    rel = (q_ids[qi] - k_ids[kj]) * st.chunk
    return lax.cond(visible(st, rel), lambda c: pair_step(qi, kj, rel, c), lambda c: c, carry)

  return lax.fori_loop(0, len(pairs), pair, carry)


def _over_pairs(st: Tiles, pairs, carry, q_seg, q_ids, k_seg, k_ids, tile_step):
  """Runs carry = tile_step(qi, kj, i, mask, bounds, carry) over the query blocks i of every
  visible (query slot qi, key slot kj) pair.

  `mask(j, edge)` and `bounds` are the tile's mask and key block range (`_tile_fns`)."""

  def pair_step(qi, kj, rel, carry):
    k_seg_j = _at(k_seg, kj)

    def q_block(i, carry):
      mask, bounds = _tile_fns(st, rel, i, _tile(q_seg, qi, i), k_seg_j)
      return tile_step(qi, kj, i, mask, bounds, carry)

    return lax.fori_loop(0, st.q_pad // st.block_q, q_block, carry)

  return over_visible_pairs(st, pairs, carry, q_ids, k_ids, pair_step)


def attend_forward(st: Tiles, state, qb, q_seg, q_ids, kv, k_seg, k_ids, pairs):
  """Folds the key chunks of kv (block_kv's stacked shard or own_kv's pair; global chunk ids
  k_ids [n]) into the query state for the static (query slot, key slot) `pairs`; hidden pairs
  are skipped at run time. The state is updated tile by tile in place: no per-chunk copies."""

  def tile_step(qi, kj, i, mask, bounds, state):
    q_i = _scaled_q_tile(st, qb, qi, i)

    def body(j, s, edge):
      k_j, v_j = _kv_block(st, kv, kj, j)
      return fc.online_update(s, q_i, k_j, v_j, mask(j, edge), 1.0)

    new = fc.blocks_loop(bounds, body, tuple(_q_tile(st, x, qi, i) for x in state))
    return tuple(_put_q_tile(st, x, y, qi, i) for x, y in zip(state, new))

  return _over_pairs(st, pairs, state, q_seg, q_ids, k_seg, k_ids, tile_step)


def attend_backward(st: Tiles, grads, qb, dob, lse, delta, q_seg, q_ids, kv, k_seg, k_ids,
                    pairs):
  """Adds the gradients of `attend_forward`'s pairs to grads = (dq [b, chunks * q_pad, h, d],
  dkv [2, b, n * k_pad, hk, d]), both float32, recomputing the probabilities from the saved
  logsumexp; updated tile by tile in place. dq is the gradient of the scaled queries."""

  def tile_step(qi, kj, i, mask, bounds, grads):
    dq, dkv = grads
    q_i = _scaled_q_tile(st, qb, qi, i)
    do_i, lse_i, delta_i = (_q_tile(st, x, qi, i) for x in (dob, lse, delta))

    def body(j, c, edge):
      dq_i, dkv = c
      k_j, v_j = _kv_block(st, kv, kj, j)
      p, ds = fc.backward_block(q_i, k_j, v_j, do_i, lse_i, delta_i, mask(j, edge), 1.0)
      part = jnp.stack([fc.dk_part(ds, q_i, 1.0), fc.dv_part(p, do_i)])
      return dq_i + fc.dq_part(ds, k_j, 1.0), _add_kv_block(st, dkv, kj, j, part)

    dq_i, dkv = fc.blocks_loop(bounds, body, (_q_tile(st, dq, qi, i), dkv))
    return _put_q_tile(st, dq, dq_i, qi, i), dkv

  return _over_pairs(st, pairs, grads, q_seg, q_ids, k_seg, k_ids, tile_step)


def finalize(state):
  """(out float32, lse) of the online-softmax state (m, l, acc)."""
  return fc.finalize(state)


def _at(x, i):
  return None if x is None else lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def local_sinks(st: Tiles, sinks, like):
  """[h] sinks -> [hk, g], marked varying over the axes of `like` so that autodiff sums their
  per-rank gradients over the mesh (None stays None)."""
  return None if sinks is None else specs.vary(sinks.reshape(-1, st.group), specs.axes_of(like))

