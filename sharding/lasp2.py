"""LASP-2 sequence-parallel (gated) linear attention: one all-gather of the piece states.

Each rank summarizes each of its pieces (sharding.linear_shard) by the memory state
M_c = sum_t exp(B_L - B_t) k_t^T v_t (from zero, after the piece's last segment reset) and the
transition D_c = exp(B_L) (per d_k or scalar; 1 without a gate; 0 where the state resets in the
piece or at its first token). ONE `lax.all_gather` over `seq` of the packed [M_c | D_c] of every
local piece gives every rank every chunk's summary; each rank then runs the causal prefix combine
in GLOBAL chunk order,
  S_in(0) = initial_state (or 0),   S_in(c+1) = D_c * S_in(c) + M_c,
i.e. S_in(c) = sum_{j<c} (prod_{i=j+1}^{c-1} D_i) M_j + (prod_{i<c} D_i) initial_state,
and keeps S_in of its own chunks. Because every rank receives every summary this works for any
assignment of chunks to ranks, zigzag included, and the final state S_in(num_chunks) is formed on
every rank. The all-gather is issued before the intra-piece attention in program order and nothing
of that compute depends on it, so XLA may overlap the two.

Communication, forward: one all-gather; each rank contributes chunks_per_shard pieces of
B*H*(d_k*d_v + d_g) float32 (d_g = d_k for a GLA gate, else 1) and receives (P-1) times that.
Backward: by autodiff. Each rank transposes the prefix loop locally: the suffix combine
dS(c) = D_c * dS(c+1) + dS_in(c) of its own chunks' cotangents dS_in (from q^T do of the inter
term), giving dM_c = dS(c+1) and dD_c for EVERY chunk; the transpose of the all-gather is then
one reduce-scatter (psum_scatter) that sums those over ranks and hands each rank its own pieces'
dM, dD: the same volume as the forward, one collective. An `initial_state` adds one all-reduce
of its state cotangent.
"""

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

from sharding import specs
from sharding.linear_shard import sequence_parallel


def _combine(m, decay, h0, rank, *, layout):
  """All-gather the piece summaries, prefix-combine in global chunk order, keep the local S_in."""
  b, n, h, dk, dv = m.shape
  packed = jnp.concatenate([m.reshape(b, n, h, dk * dv), decay], axis=-1)
  gathered = lax.all_gather(packed, specs.SEQ_AXIS)          # [P, b, n, h, dk*dv + d_g]
  state = jnp.zeros((b, h, dk, dv), m.dtype) if h0 is None else h0
  entering = []
  for c in range(layout.num_chunks):
    r, j = np.argwhere(layout.chunk_table() == c)[0]
    summary = gathered[r, :, j]
    entering.append(state)
    state = summary[..., dk * dv:, None] * state + summary[..., :dk * dv].reshape(b, h, dk, dv)
  s_in = jnp.take(jnp.stack(entering, axis=1), layout.local_chunk_ids(rank), axis=1)
  return s_in, state


def lasp2_linear_attention(q, k, v, g=None, *, layout, scale: float | None = None,
                           initial_state=None, output_final_state: bool = False,
                           segment_ids=None, impl: str = "auto", chunk_size: int = 64,
                           mesh=None):
  """Sequence-parallel `layers.linear_attention.linear_attention` by LASP-2.

  Args:
    q, k, v, g, scale, initial_state, output_final_state, segment_ids, impl, chunk_size: as in
      linear_attention; q, k, v, [b,t,h(,d_k)] gates and segment ids are GLOBAL arrays in
      `layout` order along the length axis.
    layout: sharding.layout.SeqLayout; layout.shards must equal the mesh's seq size and the
      length must split into layout.num_chunks pieces of whole chunk_size chunks.
    mesh: a mesh with a `seq` axis; default the mesh of the surrounding `jax.set_mesh`.
  Returns:
    o [b, t, h, d_v] in layout order, or (o, final_state [b, h, d_k, d_v] float32).
  """
  return sequence_parallel(functools.partial(_combine, layout=layout), q, k, v, g, layout=layout,
                           scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, segment_ids=segment_ids,
                           impl=impl, chunk_size=chunk_size, mesh=mesh,
                           what="lasp2_linear_attention")
