"""LASP-2's communication: one all-gather over `seq`, and the gated prefix combine of the states.

`all_gather_seq` is the one all-gather pattern of LASP-2 and LASP-2H: the linear layers gather the
piece summaries with it, the softmax layers of a hybrid their chunk-major [K; V]
(layers/softmax_parallel.py); autodiff transposes it into a reduce-scatter.

`prefix_combine` is the linear layers' schedule (layers/linear_parallel.py calls it with the
summaries it computed). Each rank summarizes each of its pieces by the memory state
M_c = sum_t exp(B_L - B_t) k_t^T v_t (from zero, after the piece's last segment reset) and the
transition D_c = exp(B_L) (per d_k or scalar; 1 without a gate; 0 where the state resets in the
piece or at its first token), or, for the delta rule, the piece's full [d_k, d_k] transition
(sharding/states.py). ONE `lax.all_gather` over `seq` of the packed [M_c | D_c] of every
local piece gives every rank every chunk's summary; each rank then runs the causal prefix combine
in GLOBAL chunk order,
  S_in(0) = initial_state (or 0),   S_in(c+1) = D_c S_in(c) + M_c,
i.e. S_in(c) = sum_{j<c} (prod_{i=j+1}^{c-1} D_i) M_j + (prod_{i<c} D_i) initial_state,
and keeps S_in of its own chunks. Because every rank receives every summary this works for any
assignment of chunks to ranks, zigzag included, and the final state S_in(num_chunks) is formed on
every rank. The all-gather is issued before the intra-piece attention in program order and nothing
of that compute depends on it, so XLA may overlap the two.

Communication, forward: one all-gather; each rank contributes chunks_per_shard pieces of
B*H*(d_k*d_v + d_D) float32 (d_D = d_k for a GLA gate, d_k^2 for the delta rule's matrix, else 1)
and receives (P-1) times that.
Backward: by autodiff. Each rank transposes the prefix loop locally: the suffix combine
dS(c) = D_c^T dS(c+1) + dS_in(c) of its own chunks' cotangents dS_in (from q^T do of the inter
term), giving dM_c = dS(c+1) and dD_c for EVERY chunk; the transpose of the all-gather is then
one reduce-scatter (psum_scatter) that sums those over ranks and hands each rank its own pieces'
dM, dD: the same volume as the forward, one collective. An `initial_state` adds one all-reduce
of its state cotangent.
"""

import jax.numpy as jnp
import numpy as np
from jax import lax

from sharding import specs
from sharding.states import advance


def all_gather_seq(x, axis: int):
  """Concatenates every rank's `x` along `axis` in rank order (inside a shard_map over `seq`)."""
  return lax.all_gather(x, specs.SEQ_AXIS, axis=axis, tiled=True)


def prefix_combine(m, decay, h0, rank, *, layout):
  """All-gathers the piece summaries and prefix-combines them in global chunk order.

  Args:
    m: [b, n, h, dk, dv] memory states of this rank's n pieces (float32).
    decay: their transitions (sharding/states.py): [b, n, h, dk or 1] diagonal, or
      [b, n, h, dk, dk] full matrices (the delta rule).
    h0: [b, h, dk, dv] state entering global chunk 0, or None (zeros).
    rank: this rank's index on `seq` (lax.axis_index).
    layout: the sharding.layout.SeqLayout of the pieces.
  Returns:
    (S_in [b, n, h, dk, dv] entering this rank's pieces, the state after the last chunk).
  """
  b, n, h, dk, dv = m.shape
  d_shape = decay.shape[3:]
  packed = jnp.concatenate([m.reshape(b, n, h, dk * dv), decay.reshape(b, n, h, -1)], axis=-1)
  gathered = lax.all_gather(packed, specs.SEQ_AXIS)          # [P, b, n, h, dk*dv + d_D]
  state = jnp.zeros((b, h, dk, dv), m.dtype) if h0 is None else h0
  entering = []
  for c in range(layout.num_chunks):
    r, j = np.argwhere(layout.chunk_table() == c)[0]
    summary = gathered[r, :, j]
    entering.append(state)
    state = advance(summary[..., dk * dv:].reshape((b, h) + d_shape), state,
                    summary[..., :dk * dv].reshape(b, h, dk, dv))
  s_in = jnp.take(jnp.stack(entering, axis=1), layout.local_chunk_ids(rank), axis=1)
  return s_in, state
