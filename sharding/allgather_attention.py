"""LASP-2H attention: the softmax layers of a hybrid model under sequence parallelism.

Algorithm (per rank r of P, inside jax.shard_map). K and V (and the segment ids, for the keys)
are all-gathered over the `seq` axis once, K and V stacked in one chunk-major array (so the
T-sized keys exist once per rank, in the tile layout); Q stays local. The gathered chunks are in
layout order: slot m holds global chunk layout.chunk_table().reshape(-1)[m], so every key's
global position is known statically
(= layout.local_positions of each rank). The rank then runs blockwise causal attention of its
query chunks against all key chunks with the tile loop that ring attention uses
(sharding/attention_blocks.py): hidden chunk pairs are skipped (and pairs hidden on every rank,
e.g. beyond a sliding window, are not even traced), fully visible ones run without masks, logits
stay O(L * block) per rank. The local attention has a custom_vjp that recomputes the
probabilities from the saved logsumexp; autodiff transposes the all-gather into a
reduce-scatter (psum_scatter) of dK, dV.

Because every rank receives every key, this works for any chunk-to-rank assignment, the zigzag
layout included, and one all-gather pattern serves the linear layers (LASP-2) and the softmax
layers of a hybrid alike.

Communication per rank (B, T global; Hk kv heads, d head dim):
  forward   one all-gather of [K; V] (and one of the int segment ids when given):
            2 (P-1)/P * B Hk T d elements, the same volume as ring attention, in one collective
            instead of P - 1 dependent steps (at the cost of O(T) key memory per rank);
  backward  one reduce-scatter of [dK; dV]: 2 (P-1)/P * B Hk T d elements.
A sliding window does not shrink the all-gather (use ring_attention for windowed layers).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from layers.kernels import flash_common as fc
from sharding import attention_blocks as ab
from sharding.specs import SEQ_AXIS


def allgather_attention(q, k, v, *, layout, scale=None, window=None, segment_ids=None,
                        sinks=None, mesh=None, block_size=None):
  """Causal (GQA) softmax self-attention with all-gathered K, V over the mesh's `seq` axis.

  Arguments and result as in sharding.ring_attention.ring_attention: GLOBAL [b, t, ...] arrays
  in `layout` order in, [b, t, h, d] in layout order out.
  """
  st, mesh, scale = ab.prepare("allgather_attention", q, k, v, layout=layout, scale=scale,
                               window=window, segment_ids=segment_ids, sinks=sinks, mesh=mesh,
                               block_size=block_size)

  def local(q, k, v, seg, sinks):
    # K and V are gathered stacked and already chunk-major: the T-sized keys exist once, in the
    # tiles' layout, and their gradient is reduce-scattered in that layout.
    kv = ab.pad_kv(st, lax.all_gather(ab.chunk_kv(st, k, v), SEQ_AXIS, axis=0, tiled=True))
    k_seg = None if seg is None else lax.all_gather(seg, SEQ_AXIS, axis=1, tiled=True)
    return _local(st, scale, q, kv, seg, k_seg, ab.local_sinks(st, sinks, q))

  return ab.run_sharded(mesh, local, q, k, v, segment_ids, sinks)


def _key_chunk_ids(st: ab.Tiles) -> np.ndarray:
  """Global chunk id of each chunk slot of the gathered keys."""
  return st.layout.chunk_table().reshape(-1)


def _pairs(st: ab.Tiles):
  return ab.static_pairs(st, lambda r: tuple(_key_chunk_ids(st)))


def _forward(st: ab.Tiles, scale, q, kv, seg, k_seg, sinks_hg):
  """Returns (out [b, L, h, d] in q's dtype, lse [chunks, nq, b, hk, rows, 1])."""
  q_ids = st.layout.local_chunk_ids(lax.axis_index(SEQ_AXIS))
  qb = ab.block_scaled_queries(st, q, scale)
  state = ab.attend_forward(st, ab.init_state(st, qb, sinks_hg), qb,
                            ab.block_segments(st, seg, queries=True), q_ids, kv,
                            ab.block_segments(st, k_seg, queries=False),
                            jnp.asarray(_key_chunk_ids(st)), _pairs(st))
  out, lse = fc.finalize(state)
  return ab.unblock_queries(st, out.astype(q.dtype)), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _local(st, scale, q, kv, seg, k_seg, sinks_hg):
  return _forward(st, scale, q, kv, seg, k_seg, sinks_hg)[0]


def _local_fwd(st, scale, q, kv, seg, k_seg, sinks_hg):
  out, lse = _forward(st, scale, q, kv, seg, k_seg, sinks_hg)
  return out, (q, kv, seg, k_seg, sinks_hg, out, lse)


def _local_bwd(st, scale, res, dout):
  q, kv, seg, k_seg, sinks_hg, out, lse = res
  q_ids = st.layout.local_chunk_ids(lax.axis_index(SEQ_AXIS))
  qb, dob = ab.block_scaled_queries(st, q, scale), ab.block_queries(st, dout)
  delta = ab.block_queries(st, fc.out_delta(out, dout))
  axes = ab.axes_of(qb)
  grads = ab.vary((jnp.zeros(qb.shape, jnp.float32), jnp.zeros(kv.shape, jnp.float32)), axes)
  dq, dkv = ab.attend_backward(st, grads, qb, dob, lse, delta,
                               ab.block_segments(st, seg, queries=True), q_ids, kv,
                               ab.block_segments(st, k_seg, queries=False),
                               jnp.asarray(_key_chunk_ids(st)), _pairs(st))
  dsinks = None if sinks_hg is None else ab.sinks_grad(st, sinks_hg, lse, delta)
  return ((ab.unblock_queries(st, dq) * scale).astype(q.dtype), dkv.astype(kv.dtype), None,
          None, dsinks)


_local.defvjp(_local_fwd, _local_bwd)
