"""Blockwise (flash) softmax attention in pure JAX: the fast path on CPU, any backend.

Queries are cut into blocks of `block_q` rows; `lax.map` runs the blocks one after another and,
for each, a `fori_loop` with traced bounds visits only the key blocks that the causal mask and the
window leave visible, carrying the float32 online-softmax state. Live memory is
O(block_q * block_k) logits per head instead of O(T^2). Key blocks that every query of the block
sees run without any mask arithmetic; only the diagonal / window-edge blocks are masked
(`flash_common.blocks_loop`).

GQA is handled by folding the query heads of one kv head into the rows of the tile: a tile is
[b, kv_heads, group * block_q, d] against [b, kv_heads, block_k, d], so keys and values are
never repeated per query head.

The backward pass (jax.custom_vjp) recomputes the probabilities tile by tile from the saved
logsumexp. It runs once over the query blocks, accumulating dq per block and scattering dk / dv
into full-length float32 accumulators, so each tile costs four matmuls.

With `return_lse=True` the per-row logsumexp is a second, differentiable output. Its cotangent
enters the backward pass only through the softmax correction term: d lse_i / d s_ij = p_ij, so
ds_ij = p_ij * (dp_ij - delta_i) with delta_i = rowsum(dout * out)_i - dlse_i (the sink logit's
gradient uses the same delta).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from layers.kernels import flash_common as fc



@dataclasses.dataclass(frozen=True)
class _Static:
  """Static settings of one call (hashable: a nondiff argument of the custom_vjp)."""

  scale: float
  causal: bool
  window: int | None
  block_q: int
  block_k: int
  kv_len: int | None  # set when padded keys must be masked explicitly
  group: int
  with_lse: bool = False  # the custom_vjp also outputs (and takes the cotangent of) lse


def flash_attention_xla(q, k, v, *, scale: float, causal: bool = True, window: int | None = None,
                        segment_ids=None, sinks=None, block_size=None, return_lse: bool = False):
  """Flash attention on [b, t, h, d] queries and [b, t, kv_heads, d] keys/values.

  Arguments are assumed validated by `layers.softmax_attention.softmax_attention`.

  Args:
    q, k, v: inputs; h must be a multiple of kv_heads.
    scale: logit scale.
    causal, window: masking (window requires causal).
    segment_ids: optional int [b, t]; attention stays within a segment.
    sinks: optional float [h] sink logits.
    block_size: int or (block_q, block_k); None means flash_common.DEFAULT_BLOCKS["xla"].
      Shrunk for short inputs.
    return_lse: also return the per-row logsumexp of the scaled logits (sinks included).
  Returns:
    [b, t, h, d] in q's dtype; with return_lse a pair (that, lse [b, t, h] float32).
  """
  b, t, h, d = q.shape
  hk = k.shape[2]
  g = h // hk
  bq, bk = fc.resolve_blocks(block_size, t, "xla")
  tq, tk = fc.round_up(t, bq), fc.round_up(t, bk)
  nq = tq // bq
  # Under a causal mask padded keys (positions >= t) are invisible to every real query already.
  kv_len = t if (tk != t and not causal) else None
  # The scale is folded into q once (autodiff carries it into dq), not into every logits tile.
  st = _Static(1.0, causal, window, bq, bk, kv_len, g, bool(return_lse))
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)

  qb = fc.pad_axis(q, 1, tq).reshape(b, nq, bq, hk, g, d)
  qb = qb.transpose(1, 0, 3, 4, 2, 5).reshape(nq, b, hk, g * bq, d)
  kb = fc.pad_axis(k, 1, tk).transpose(0, 2, 1, 3)
  vb = fc.pad_axis(v, 1, tk).transpose(0, 2, 1, 3)
  q_seg = k_seg = None
  if segment_ids is not None:
    seg = segment_ids.astype(jnp.int32)
    q_seg = fc.pad_axis(seg, 1, tq, -1).reshape(b, nq, bq).transpose(1, 0, 2)
    k_seg = fc.pad_axis(seg, 1, tk, -1)
  sinks_hg = None if sinks is None else sinks.reshape(hk, g)

  res = _flash(st, qb, kb, vb, q_seg, k_seg, sinks_hg)
  ob = res[0] if return_lse else res
  out = ob.reshape(nq, b, hk, g, bq, d).transpose(1, 0, 4, 2, 3, 5).reshape(b, tq, h, d)[:, :t]
  if not return_lse:
    return out
  lse = res[1].reshape(nq, b, hk, g, bq).transpose(1, 0, 4, 2, 3).reshape(b, tq, h)
  return out, lse[:, :t]


def _tile_masks(st: _Static, qb_shape, q_seg_i, k_seg):
  """Closures giving the mask of tile (query block i, key block j), and row helpers."""
  nq, b, hk, rows, d = qb_shape
  row_off = jnp.arange(rows, dtype=jnp.int32) % st.block_q
  q_seg_rows = None
  if q_seg_i is not None:
    # Rows are group-major: the same block positions repeated for each query head of the group.
    q_seg_rows = jnp.tile(q_seg_i, (1, st.group))[:, None, :, None]

  def mask(i, j, edge):
    q_pos = (i * st.block_q + row_off)[:, None]
    k_pos = (j * st.block_k + jnp.arange(st.block_k, dtype=jnp.int32))[None, :]
    k_seg_j = None
    if k_seg is not None:
      k_seg_j = lax.dynamic_slice_in_dim(k_seg, j * st.block_k, st.block_k, 1)[:, None, None, :]
    return fc.block_mask(q_pos, k_pos, causal=st.causal, window=st.window, kv_len=st.kv_len,
                         q_seg=q_seg_rows, k_seg=k_seg_j, edge=edge)

  return mask


def _sink_rows(st: _Static, sinks_hg):
  """[hk, g] sinks -> [1, hk, g * block_q, 1] per tile row (None stays None)."""
  if sinks_hg is None:
    return None
  return jnp.repeat(sinks_hg.astype(jnp.float32), st.block_q, axis=1)[None, :, :, None]


def _forward(st: _Static, qb, kb, vb, q_seg, k_seg, sinks_hg):
  """Returns (out blocks [nq, b, hk, rows, d] in q's dtype, lse [nq, b, hk, rows, 1])."""
  nq, b, hk, rows, d = qb.shape
  nk = kb.shape[2] // st.block_k
  sink_rows = _sink_rows(st, sinks_hg)

  def one_block(args):
    i, q_i, q_seg_i = args
    mask = _tile_masks(st, qb.shape, q_seg_i, k_seg)
    bounds = fc.key_block_range(i * st.block_q, (i + 1) * st.block_q, st.block_k, nk,
                                causal=st.causal, window=st.window, kv_len=st.kv_len)

    def body(j, state, edge):
      k_j = lax.dynamic_slice_in_dim(kb, j * st.block_k, st.block_k, 2)
      v_j = lax.dynamic_slice_in_dim(vb, j * st.block_k, st.block_k, 2)
      return fc.online_update(state, q_i, k_j, v_j, mask(i, j, edge), st.scale)

    state = fc.init_state((b, hk, rows), d, sink_rows)
    out, lse = fc.finalize(fc.blocks_loop(bounds, body, state))
    return out.astype(qb.dtype), lse

  return lax.map(one_block, (jnp.arange(nq, dtype=jnp.int32), qb, q_seg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, qb, kb, vb, q_seg, k_seg, sinks_hg):
  return fc.with_optional_lse(*_forward(st, qb, kb, vb, q_seg, k_seg, sinks_hg), st.with_lse)


def _flash_fwd(st, qb, kb, vb, q_seg, k_seg, sinks_hg):
  out, lse = _forward(st, qb, kb, vb, q_seg, k_seg, sinks_hg)
  return (fc.with_optional_lse(out, lse, st.with_lse),
          (qb, kb, vb, q_seg, k_seg, sinks_hg, out, lse))


def _flash_bwd(st, res, cotangent):
  qb, kb, vb, q_seg, k_seg, sinks_hg, out, lse = res
  nq, b, hk, rows, d = qb.shape
  nk = kb.shape[2] // st.block_k
  dout, dlse = fc.split_cotangent(cotangent, st.with_lse)
  delta = fc.out_delta(out, dout, dlse)

  def one_block(carry, args):
    i, q_i, do_i, lse_i, delta_i, q_seg_i = args
    mask = _tile_masks(st, qb.shape, q_seg_i, k_seg)
    bounds = fc.key_block_range(i * st.block_q, (i + 1) * st.block_q, st.block_k, nk,
                                causal=st.causal, window=st.window, kv_len=st.kv_len)

    def body(j, c, edge):
      dq_i, dk, dv = c
      start = j * st.block_k
      k_j = lax.dynamic_slice_in_dim(kb, start, st.block_k, 2)
      v_j = lax.dynamic_slice_in_dim(vb, start, st.block_k, 2)
      p, ds = fc.backward_block(q_i, k_j, v_j, do_i, lse_i, delta_i, mask(i, j, edge), st.scale)
      dq_i = dq_i + fc.dq_part(ds, k_j, st.scale)
      # In-place accumulation into the full-length buffers (the loop carry is updated in place).
      dk = lax.dynamic_update_slice_in_dim(
          dk, lax.dynamic_slice_in_dim(dk, start, st.block_k, 2) + fc.dk_part(ds, q_i, st.scale),
          start, 2)
      dv = lax.dynamic_update_slice_in_dim(
          dv, lax.dynamic_slice_in_dim(dv, start, st.block_k, 2) + fc.dv_part(p, do_i), start, 2)
      return dq_i, dk, dv

    dq_i = jnp.zeros((b, hk, rows, d), jnp.float32)
    dq_i, dk, dv = fc.blocks_loop(bounds, body, (dq_i,) + carry)
    return (dk, dv), dq_i.astype(qb.dtype)

  zeros_kv = jnp.zeros(kb.shape, jnp.float32)
  xs = (jnp.arange(nq, dtype=jnp.int32), qb, dout, lse, delta, q_seg)
  (dk, dv), dq = lax.scan(one_block, (zeros_kv, zeros_kv), xs)
  dsinks = None
  if sinks_hg is not None:
    per_row = fc.sink_grad(_sink_rows(st, sinks_hg), lse, delta)  # [nq, b, hk, rows, 1]
    per_row = per_row.reshape(nq, b, hk, st.group, st.block_q)
    dsinks = per_row.sum(axis=(0, 1, 4)).astype(sinks_hg.dtype)
  return dq, dk.astype(kb.dtype), dv.astype(vb.dtype), None, None, dsinks


_flash.defvjp(_flash_fwd, _flash_bwd)
