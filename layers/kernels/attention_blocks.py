"""Blockwise causal attention between layout chunks: the xla block step of the
sequence-parallel softmax ops (layers/softmax_parallel.py: ring attention and LASP-2H), and the
pieces every block step shares (Tiles, the pair tables, the travelling [K; V] layout).
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

K and V travel and are stored stacked, [chunks, 2, b, hk, k_pad, d] (one message per ring step,
one all-gather), with their float32 gradient likewise. The pair loops update the query state,
dq and dK, dV tile by tile in place (dynamic slices of the full arrays), so no chunk-sized copies
are made.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from layers.kernels import flash_common as fc
from sharding import specs
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


def block_queries(st: Tiles, q):
  """[b, L, h, d] -> [chunks, nq, b, hk, group * block_q, d] (rows group-major)."""
  b, t, h, d = q.shape
  n, nq = t // st.chunk, st.q_pad // st.block_q
  x = fc.pad_axis(q.reshape(b, n, st.chunk, h, d), 2, st.q_pad)
  x = x.reshape(b, n, nq, st.block_q, h // st.group, st.group, d).transpose(1, 2, 0, 4, 5, 3, 6)
  return x.reshape(n, nq, b, h // st.group, st.group * st.block_q, d)


def unblock_queries(st: Tiles, x):
  """Inverse of block_queries."""
  n, nq, b, hk, _, d = x.shape
  x = x.reshape(n, nq, b, hk, st.group, st.block_q, d).transpose(2, 0, 1, 5, 3, 4, 6)
  x = x.reshape(b, n, st.q_pad, hk * st.group, d)[:, :, :st.chunk]
  return x.reshape(b, n * st.chunk, hk * st.group, d)


def chunk_kv(st: Tiles, k, v):
  """k, v [b, T, hk, d] -> one stacked [chunks, 2, b, hk, chunk, d] (block_kv without padding)."""
  b, t, hk, d = k.shape
  return jnp.stack([x.reshape(b, t // st.chunk, st.chunk, hk, d).transpose(1, 0, 3, 2, 4)
                    for x in (k, v)], axis=1)


def pad_kv(st: Tiles, x):
  """[chunks, 2, b, hk, chunk, d] -> [chunks, 2, b, hk, k_pad, d]."""
  return fc.pad_axis(x, 4, st.k_pad)


def block_kv(st: Tiles, k, v):
  """k, v [b, T, hk, d] -> [chunks, 2, b, hk, k_pad, d]: K and V of a chunk side by side."""
  return pad_kv(st, chunk_kv(st, k, v))


def unblock_kv(st: Tiles, x):
  """Inverse of block_kv: (k, v), each [b, T, hk, d]."""
  n, _, b, hk, _, d = x.shape
  x = x[:, :, :, :, :st.chunk].transpose(1, 2, 0, 4, 3, 5).reshape(2, b, n * st.chunk, hk, d)
  return x[0], x[1]


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


def sink_rows(st: Tiles, sinks_hg):
  """[hk, g] sinks -> [hk, g * block_q, 1] per tile row (None stays None)."""
  if sinks_hg is None:
    return None
  return jnp.repeat(sinks_hg.astype(jnp.float32), st.block_q, axis=1)[..., None]


def init_state(st: Tiles, qb, sinks_hg):
  """Online-softmax state (m, l, acc), each [chunks, nq, b, hk, rows, 1 or d], varying like qb."""
  state = fc.init_state(qb.shape[:-1], qb.shape[-1], sink_rows(st, sinks_hg))
  return specs.vary(state, specs.axes_of(qb))


def sinks_grad(st: Tiles, sinks_hg, lse, delta):
  """[hk, g] gradient of the sinks from lse, delta [chunks, nq, b, hk, rows, 1]."""
  per_row = fc.sink_grad(sink_rows(st, sinks_hg), lse, delta)
  per_row = per_row.reshape(lse.shape[:4] + (st.group, st.block_q))
  return per_row.sum(axis=(0, 1, 2, 5)).astype(sinks_hg.dtype)


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


def _put_tile(x, y, qi, i):
  return lax.dynamic_update_slice(x, y[None, None], (qi, i) + (0,) * y.ndim)


def _kv_start(st: Tiles, kj, j):
  return (kj, 0, 0, 0, j * st.block_k, 0)


def _kv_block(st: Tiles, kv, kj, j):
  """Key block j of key chunk kj of a stacked [chunks, 2, b, hk, k_pad, d] array: [2, b, hk,
  block_k, d]."""
  size = (1, 2) + kv.shape[2:4] + (st.block_k, kv.shape[-1])
  return lax.dynamic_slice(kv, _kv_start(st, kj, j), size)[0]


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
  """Folds the key chunks of kv [n, 2, b, hk, k_pad, d] (global chunk ids k_ids [n]) into the
  query state for the static (query slot, key slot) `pairs`; hidden pairs are skipped at run
  time. The state is updated tile by tile in place: no per-chunk copies."""

  def tile_step(qi, kj, i, mask, bounds, state):
    q_i = _tile(qb, qi, i)

    def body(j, s, edge):
      kv_j = _kv_block(st, kv, kj, j)
      return fc.online_update(s, q_i, kv_j[0], kv_j[1], mask(j, edge), 1.0)

    new = fc.blocks_loop(bounds, body, tuple(_tile(x, qi, i) for x in state))
    return tuple(_put_tile(x, y, qi, i) for x, y in zip(state, new))

  return _over_pairs(st, pairs, state, q_seg, q_ids, k_seg, k_ids, tile_step)


def attend_backward(st: Tiles, grads, qb, dob, lse, delta, q_seg, q_ids, kv, k_seg, k_ids,
                    pairs):
  """Adds the gradients of `attend_forward`'s pairs to grads = (dq [chunks, nq, ...], dkv
  [n, 2, b, hk, k_pad, d]), both float32, recomputing the probabilities from the saved
  logsumexp; updated tile by tile in place."""

  def tile_step(qi, kj, i, mask, bounds, grads):
    dq, dkv = grads
    q_i, do_i, lse_i, delta_i = (_tile(x, qi, i) for x in (qb, dob, lse, delta))

    def body(j, c, edge):
      dq_i, dkv = c
      kv_j = _kv_block(st, kv, kj, j)
      p, ds = fc.backward_block(q_i, kv_j[0], kv_j[1], do_i, lse_i, delta_i, mask(j, edge), 1.0)
      part = jnp.stack([fc.dk_part(ds, q_i, 1.0), fc.dv_part(p, do_i)])
      dkv = lax.dynamic_update_slice(dkv, (_kv_block(st, dkv, kj, j) + part)[None],
                                     _kv_start(st, kj, j))
      return dq_i + fc.dq_part(ds, kv_j[0], 1.0), dkv

    dq_i, dkv = fc.blocks_loop(bounds, body, (_tile(dq, qi, i), dkv))
    return _put_tile(dq, dq_i, qi, i), dkv

  return _over_pairs(st, pairs, grads, q_seg, q_ids, k_seg, k_ids, tile_step)


def finalize(state):
  """(out float32, lse) of the online-softmax state (m, l, acc)."""
  return fc.finalize(state)


def _at(x, i):
  return None if x is None else lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def block_scaled_queries(st: Tiles, q, scale: float):
  """block_queries of q * scale (the scale is folded into q once, not applied per tile)."""
  return block_queries(st, (q.astype(jnp.float32) * scale).astype(q.dtype))


def local_sinks(st: Tiles, sinks, like):
  """[h] sinks -> [hk, g], marked varying over the axes of `like` so that autodiff sums their
  per-rank gradients over the mesh (None stays None)."""
  return None if sinks is None else specs.vary(sinks.reshape(-1, st.group), specs.axes_of(like))

