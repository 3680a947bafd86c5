"""The Pallas block step of the sequence-parallel softmax ops: the same interface as
layers/kernels/attention_blocks.py (the xla step), running the flash kernels of
layers/kernels/flash_pallas.py on each (query chunk, key chunk) pair.

A rank's queries are held per chunk, head-major, [chunks, b, h, q_pad, d] (the scale folded in);
K and V travel stacked per chunk, [chunks, 2, b, hk, k_pad, d] (one message per ring step, one
all-gather), with their float32 gradient likewise. For a visible pair the forward kernel runs with
rel = (query chunk id - key chunk id) * chunk and returns the pair's normalized output and
logsumexp, which are merged into the query chunk's running (out, lse) by logsumexp weights
(`flash_common.merge_partials`); hidden pairs are skipped with `lax.cond`. The state starts from
out = 0 and lse = the sink logit (or -inf), so sinks enter exactly once. The backward runs the dq
and dk/dv kernels on each visible pair with the rows' final lse and delta, adding the pair's
float32 dq and dK, dV into the accumulators.
"""

import jax.numpy as jnp
from jax import lax

from layers.kernels import attention_blocks as ab
from layers.kernels import flash_common as fc
from layers.kernels import flash_pallas as fp
from sharding import lasp2, specs


def _static(st: ab.Tiles, has_seg: bool) -> fp.Static:
  return fp.make_static(scale=1.0, causal=True, window=st.window, block_q=st.block_q,
                        block_k=st.block_k, kv_len=st.kv_len, group=st.group, has_seg=has_seg,
                        has_sinks=False, interpret=st.interpret, f32_out=True)


def block_queries(st: ab.Tiles, x):
  """[b, L, h, e] -> [chunks, b, h, q_pad, e]."""
  b, t, h, e = x.shape
  x = fc.pad_axis(x.reshape(b, t // st.chunk, st.chunk, h, e), 2, st.q_pad)
  return x.transpose(1, 0, 3, 2, 4)


def unblock_queries(st: ab.Tiles, x):
  """Inverse of block_queries."""
  n, b, h, _, e = x.shape
  return x[:, :, :, :st.chunk].transpose(1, 0, 3, 2, 4).reshape(b, n * st.chunk, h, e)


def block_scaled_queries(st: ab.Tiles, q):
  """block_queries of q * st.scale (the scale folded into the queries once)."""
  return block_queries(st, (q.astype(jnp.float32) * st.scale).astype(q.dtype))


def _chunk_kv(st: ab.Tiles, k, v):
  """k, v [b, T, hk, d] -> one stacked [chunks, 2, b, hk, chunk, d]."""
  b, t, hk, d = k.shape
  return jnp.stack([x.reshape(b, t // st.chunk, st.chunk, hk, d).transpose(1, 0, 3, 2, 4)
                    for x in (k, v)], axis=1)


def _pad_kv(st: ab.Tiles, x):
  """[chunks, 2, b, hk, chunk, d] -> [chunks, 2, b, hk, k_pad, d]."""
  return fc.pad_axis(x, 4, st.k_pad)


def block_kv(st: ab.Tiles, k, v):
  """k, v [b, T, hk, d] -> [chunks, 2, b, hk, k_pad, d]: K and V of a chunk side by side."""
  return _pad_kv(st, _chunk_kv(st, k, v))


def own_kv(st: ab.Tiles, k, v):
  """The rank's own K, V for its own pairs: the kernels read the stacked layout."""
  return block_kv(st, k, v)


def gather_kv(st: ab.Tiles, k, v):
  """Every rank's K, V, chunk-major, [P * chunks, 2, b, hk, k_pad, d] from one all-gather
  (inside a shard_map over `seq`)."""
  return _pad_kv(st, lasp2.all_gather_seq(_chunk_kv(st, k, v), axis=0))


def unblock_kv(st: ab.Tiles, x):
  """Inverse of block_kv: (k, v), each [b, T, hk, d]."""
  n, _, b, hk, _, d = x.shape
  x = x[:, :, :, :, :st.chunk].transpose(1, 2, 0, 4, 3, 5).reshape(2, b, n * st.chunk, hk, d)
  return x[0], x[1]


def block_segments(st: ab.Tiles, seg, *, queries: bool):
  """[b, T] -> queries: [chunks, b, q_pad, lanes]; keys: [chunks, b, sublanes, k_pad]."""
  if seg is None:
    return None
  ps = _static(st, True)
  b, t = seg.shape
  x = seg.reshape(b * (t // st.chunk), st.chunk)
  x = fp.query_segments(ps, x, st.q_pad) if queries else fp.key_segments(ps, x, st.k_pad)
  return x.reshape((b, t // st.chunk) + x.shape[1:]).swapaxes(0, 1)


def _head_sinks(sinks_hg):
  return None if sinks_hg is None else sinks_hg.reshape(-1).astype(jnp.float32)


def init_state(st: ab.Tiles, qb, sinks_hg):
  """(out float32 [chunks, b, h, q_pad, d], lse [chunks, b, h, q_pad, 1]), varying like qb."""
  rows = qb.shape[:-1] + (1,)
  sinks = _head_sinks(sinks_hg)
  lse = (jnp.full(rows, -jnp.inf, jnp.float32) if sinks is None
         else jnp.broadcast_to(sinks[:, None, None], rows))
  return specs.vary((jnp.zeros(qb.shape, jnp.float32), lse), specs.axes_of(qb))


def finalize(state):
  """The state already is the normalized (out, lse)."""
  return state


def sinks_grad(st: ab.Tiles, sinks_hg, lse, delta):
  """[hk, g] gradient of the sinks from lse, delta [chunks, b, h, q_pad, 1]."""
  per_row = fc.sink_grad(_head_sinks(sinks_hg)[:, None, None], lse, delta)
  return per_row.sum(axis=(0, 1, 3, 4)).reshape(sinks_hg.shape).astype(sinks_hg.dtype)


def _pad_d(ps: fp.Static, x):
  d = x.shape[-1]
  return fc.pad_axis(x, x.ndim - 1, fp.head_dim_for(ps.target, d))


def _at(x, i):
  return None if x is None else lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def _put(x, y, i):
  return lax.dynamic_update_index_in_dim(x, y, i, 0)


def attend_forward(st: ab.Tiles, state, qb, q_seg, q_ids, kv, k_seg, k_ids, pairs):
  """Merges the key chunks of kv (global chunk ids k_ids) into the query state for the static
  (query slot, key slot) `pairs`, one forward kernel per visible pair."""
  ps = _static(st, q_seg is not None)
  d = qb.shape[-1]

  def pair_step(qi, kj, rel, state):
    out, lse = state
    kv_j = _at(kv, kj)
    part, part_lse = fp.block_forward(ps, rel[None], _pad_d(ps, _at(qb, qi)),
                                      _pad_d(ps, kv_j[0]), _pad_d(ps, kv_j[1]), _at(q_seg, qi),
                                      _at(k_seg, kj), None)
    merged, merged_lse = fc.merge_partials(_at(out, qi), _at(lse, qi), part[..., :d],
                                           part_lse[..., :1])
    return _put(out, merged, qi), _put(lse, merged_lse, qi)

  return ab.over_visible_pairs(st, pairs, state, q_ids, k_ids, pair_step)


def attend_backward(st: ab.Tiles, grads, qb, dob, lse, delta, q_seg, q_ids, kv, k_seg, k_ids,
                    pairs):
  """Adds the gradients of `attend_forward`'s pairs to grads = (dq [chunks, b, h, q_pad, d],
  dkv [n, 2, b, hk, k_pad, d]), both float32, one dq and one dk/dv kernel per visible pair."""
  ps = _static(st, q_seg is not None)
  d = qb.shape[-1]

  def pair_step(qi, kj, rel, grads):
    dq, dkv = grads
    kv_j = _at(kv, kj)
    dq_p, dk_p, dv_p = fp.block_backward(
        ps, rel[None], _pad_d(ps, _at(qb, qi)), _pad_d(ps, kv_j[0]), _pad_d(ps, kv_j[1]),
        _at(q_seg, qi), _at(k_seg, kj), _pad_d(ps, _at(dob, qi)),
        fp.lane_rows(ps, _at(lse, qi)), fp.lane_rows(ps, _at(delta, qi)))
    dq = _put(dq, _at(dq, qi) + dq_p[..., :d], qi)
    dkv = _put(dkv, _at(dkv, kj) + jnp.stack([dk_p[..., :d], dv_p[..., :d]]), kj)
    return dq, dkv

  return ab.over_visible_pairs(st, pairs, grads, q_ids, k_ids, pair_step)
