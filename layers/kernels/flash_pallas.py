"""Pallas flash attention: forward, dq and dk/dv kernels behind a jax.custom_vjp.

Layout inside the kernels is head-major: q [b, h, t, d], k / v [b, kv_heads, t, d]. Each program
of the forward and dq kernels owns one (batch, query head, query block) and keeps that head's
whole K / V resident; a `fori_loop` with traced bounds walks only the key blocks that the causal
mask and the sliding window leave visible (`pl.ds` slices), so masked blocks cost nothing. The
dk/dv kernel owns one (batch, kv head, key block), keeps the whole Q / dO of the kv head's query
group resident and walks the visible query blocks of every head of the group, so GQA gradients
are summed in the kernel.

The per-tile math (masks, online softmax, backward formulas) is `layers.kernels.flash_common`,
the same code the pure-JAX path runs. Only generic `pl.pallas_call` / `pl.BlockSpec` machinery is
used; compiled, the kernels go through Mosaic on TPU and the Triton backend on GPU (both
lowerings are checked on CPU by tests/test_softmax_attention.py, though never run on a device
here); on CPU they run in interpret mode. On TPU the resident K / V (and Q / dO in the dk/dv
kernel) live in VMEM, which bounds the sequence length (roughly 2 * t * d * bytes * 2 buffers per
array); that is the price of skipping masked blocks with plain loops.

With `return_lse=True` the forward kernel's logsumexp rows become a second, differentiable
output; their cotangent is subtracted from delta = rowsum(dout * out) before the dq and dk/dv
kernels run (d lse_i / d s_ij = p_ij), so the kernels themselves are the same.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from layers.kernels import dispatch
from layers.kernels import flash_common as fc

_SQ = pl.squeezed


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
  has_seg: bool
  has_sinks: bool
  interpret: Any
  target: str | None  # "gpu" or "tpu" when compiled, None when interpreted
  with_lse: bool = False  # the custom_vjp also outputs (and takes the cotangent of) lse


def _target(interpret) -> str | None:
  if interpret:
    return None
  backend = jax.default_backend()
  return backend if backend in ("gpu", "tpu") else None


def _fit_to_target(target: str | None, bq: int, bk: int, d: int) -> tuple[int, int, int]:
  """Block sizes and head_dim the target's lowering accepts (interpret mode takes any).

  Triton (GPU) wants power-of-two tiles of at least 16 (the head_dim is zero-padded, which
  changes no logit); Mosaic (TPU) wants the key block, the lane dimension of the logits tile
  and of the key segment ids, to be a multiple of 128.
  """
  if target == "gpu":
    pow2 = lambda n: max(16, 1 << (n - 1).bit_length())
    return pow2(bq), pow2(bk), pow2(d)
  if target == "tpu":
    return bq, fc.round_up(bk, 128), d
  return bq, bk, d


def _compiler_params(target: str | None, head_dim: int):
  # Every grid axis is independent (no accumulation across programs), so all may run in
  # parallel. On GPU the Triton backend: resident K / V are read from global memory tile by
  # tile, which Mosaic GPU's shared-memory blocks could not hold. Warps and stages as JAX's own
  # Triton flash attention sets them (4 warps up to head_dim 64, else 8; 2 stages).
  if target == "gpu":
    return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
  if target == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)
  return None


def flash_attention_pallas(q, k, v, *, scale: float, causal: bool = True,
                           window: int | None = None, segment_ids=None, sinks=None,
                           block_size=None, interpret=None, return_lse: bool = False):
  """Pallas flash attention on [b, t, h, d] queries and [b, t, kv_heads, d] keys/values.

  Arguments are assumed validated by `layers.softmax_attention.softmax_attention`.

  Args:
    q, k, v, scale, causal, window, segment_ids, sinks: as in `flash_attention_xla`.
    block_size: int or (block_q, block_k); None means flash_common.DEFAULT_BLOCKS["pallas"].
      Shrunk for short inputs.
    interpret: None (interpret exactly where Pallas cannot compile: CPU), a bool, or
      `jax.experimental.pallas.tpu.InterpretParams()` for the TPU-semantics interpreter.
    return_lse: also return the per-row logsumexp of the scaled logits (sinks included).
  Returns:
    [b, t, h, d] in q's dtype; with return_lse a pair (that, lse [b, t, h] float32).
  """
  b, t, h, d = q.shape
  hk = k.shape[2]
  interpret = dispatch.pallas_interpret() if interpret is None else interpret
  target = _target(interpret)
  bq, bk = fc.resolve_blocks(block_size, t, "pallas")
  bq, bk, dp = _fit_to_target(target, bq, bk, d)
  tq, tk = fc.round_up(t, bq), fc.round_up(t, bk)
  kv_len = t if (tk != t and not causal) else None
  st = _Static(float(scale), causal, window, bq, bk, kv_len, h // hk, segment_ids is not None,
               sinks is not None, interpret, target, bool(return_lse))
  pad = lambda x, length: fc.pad_axis(fc.pad_axis(x, 1, length), 3, dp).transpose(0, 2, 1, 3)
  qh, kh, vh = pad(q, tq), pad(k, tk), pad(v, tk)
  q_seg = k_seg = None
  if segment_ids is not None:
    seg = segment_ids.astype(jnp.int32)
    # Query ids as a column and key ids as a row, so a tile's comparison is a plain broadcast.
    q_seg = fc.pad_axis(seg, 1, tq, -1)[:, :, None]
    k_seg = fc.pad_axis(seg, 1, tk, -1)[:, None, :]
  sinks3 = None if sinks is None else sinks.reshape(h, 1, 1)
  res = _flash(st, qh, kh, vh, q_seg, k_seg, sinks3)
  out = (res[0] if return_lse else res).transpose(0, 2, 1, 3)[:, :t, :, :d]
  if not return_lse:
    return out
  return out, res[1][:, :, :t, 0].transpose(0, 2, 1)


def _seg_specs(st: _Static, q_full: bool, k_full: bool, tq: int, tk: int):
  """BlockSpecs of the [b, tq, 1] query ids and [b, 1, tk] key ids for a (b, head, blk) grid."""
  if q_full:
    q_spec = pl.BlockSpec((_SQ, tq, 1), lambda b, h, i: (b, 0, 0))
  else:
    q_spec = pl.BlockSpec((_SQ, st.block_q, 1), lambda b, h, i: (b, i, 0))
  if k_full:
    k_spec = pl.BlockSpec((_SQ, 1, tk), lambda b, h, i: (b, 0, 0))
  else:
    k_spec = pl.BlockSpec((_SQ, 1, st.block_k), lambda b, h, i: (b, 0, i))
  return [q_spec, k_spec]


def _tile_mask(st: _Static, q_start, k_start, q_seg, k_seg, edge: bool):
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, (st.block_q, 1), 0)
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, (1, st.block_k), 1)
  return fc.block_mask(q_pos, k_pos, causal=st.causal, window=st.window, kv_len=st.kv_len,
                       q_seg=q_seg, k_seg=k_seg, edge=edge)


def _forward_kernel(*refs, st: _Static, num_k_blocks: int):
  q_ref, k_ref, v_ref, *rest = refs
  q_seg_ref = k_seg_ref = sink_ref = None
  if st.has_seg:
    q_seg_ref, k_seg_ref, *rest = rest
  if st.has_sinks:
    sink_ref, *rest = rest
  o_ref, lse_ref = rest
  i = pl.program_id(2)
  q_start = i * st.block_q
  q = q_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]
  bounds = fc.key_block_range(q_start, q_start + st.block_q, st.block_k, num_k_blocks,
                              causal=st.causal, window=st.window, kv_len=st.kv_len)

  def body(j, state, edge):
    k_start = pl.multiple_of(j * st.block_k, st.block_k)
    keys = pl.ds(k_start, st.block_k)
    k_seg = None if k_seg_ref is None else k_seg_ref[:, keys]
    mask = _tile_mask(st, q_start, k_start, q_seg, k_seg, edge)
    return fc.online_update(state, q, k_ref[keys, :], v_ref[keys, :], mask, st.scale)

  sink = None if sink_ref is None else sink_ref[...]
  state = fc.init_state((st.block_q,), q.shape[-1], sink)
  out, lse = fc.finalize(fc.blocks_loop(bounds, body, state))
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def _forward(st: _Static, q, k, v, q_seg, k_seg, sinks3):
  b, h, tq, d = q.shape
  tk = k.shape[2]
  g = st.group
  q_spec = pl.BlockSpec((_SQ, _SQ, st.block_q, d), lambda b, h, i: (b, h, i, 0))
  kv_spec = pl.BlockSpec((_SQ, _SQ, tk, d), lambda b, h, i: (b, h // g, 0, 0))
  in_specs, args = [q_spec, kv_spec, kv_spec], [q, k, v]
  if st.has_seg:
    in_specs += _seg_specs(st, False, True, tq, tk)
    args += [q_seg, k_seg]
  if st.has_sinks:
    in_specs.append(pl.BlockSpec((_SQ, 1, 1), lambda b, h, i: (h, 0, 0)))
    args.append(sinks3)
  row_spec = pl.BlockSpec((_SQ, _SQ, st.block_q, 1), lambda b, h, i: (b, h, i, 0))
  kernel = functools.partial(_forward_kernel, st=st, num_k_blocks=tk // st.block_k)
  return pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, tq, 1), jnp.float32)),
      grid=(b, h, tq // st.block_q),
      in_specs=in_specs,
      out_specs=(q_spec, row_spec),
      interpret=st.interpret,
      compiler_params=_compiler_params(st.target, d),
      name="flash_attention_fwd",
  )(*args)


def _dq_kernel(*refs, st: _Static, num_k_blocks: int):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest = refs
  q_seg_ref = k_seg_ref = None
  if st.has_seg:
    q_seg_ref, k_seg_ref, *rest = rest
  (dq_ref,) = rest
  i = pl.program_id(2)
  q_start = i * st.block_q
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]
  bounds = fc.key_block_range(q_start, q_start + st.block_q, st.block_k, num_k_blocks,
                              causal=st.causal, window=st.window, kv_len=st.kv_len)

  def body(j, dq, edge):
    k_start = pl.multiple_of(j * st.block_k, st.block_k)
    keys = pl.ds(k_start, st.block_k)
    k_seg = None if k_seg_ref is None else k_seg_ref[:, keys]
    mask = _tile_mask(st, q_start, k_start, q_seg, k_seg, edge)
    k = k_ref[keys, :]
    _, ds = fc.backward_block(q, k, v_ref[keys, :], do, lse, delta, mask, st.scale)
    return dq + fc.dq_part(ds, k, st.scale)

  dq = fc.blocks_loop(bounds, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(*refs, st: _Static, num_q_blocks: int):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest = refs
  q_seg_ref = k_seg_ref = None
  if st.has_seg:
    q_seg_ref, k_seg_ref, *rest = rest
  dk_ref, dv_ref = rest
  j = pl.program_id(2)
  k_start = j * st.block_k
  k, v = k_ref[...], v_ref[...]
  k_seg = None if k_seg_ref is None else k_seg_ref[...]
  bounds = fc.query_block_range(k_start, k_start + st.block_k, st.block_q, num_q_blocks,
                                causal=st.causal, window=st.window, kv_len=st.kv_len)

  def head(g, acc):
    def body(i, acc, edge):
      dk, dv = acc
      q_start = pl.multiple_of(i * st.block_q, st.block_q)
      rows = pl.ds(q_start, st.block_q)
      q_seg = None if q_seg_ref is None else q_seg_ref[rows, :]
      mask = _tile_mask(st, q_start, k_start, q_seg, k_seg, edge)
      q, do = q_ref[g, rows, :], do_ref[g, rows, :]
      p, ds = fc.backward_block(q, k, v, do, lse_ref[g, rows, :], delta_ref[g, rows, :], mask,
                                st.scale)
      return dk + fc.dk_part(ds, q, st.scale), dv + fc.dv_part(p, do)

    return fc.blocks_loop(bounds, body, acc)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, st.group, head, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(st: _Static, q, k, v, q_seg, k_seg, out, lse, dout, dlse=None):
  b, h, tq, d = q.shape
  hk, tk = k.shape[1], k.shape[2]
  g, bq, bk = st.group, st.block_q, st.block_k
  delta = fc.out_delta(out, dout, dlse)
  seg_args = [q_seg, k_seg] if st.has_seg else []

  q_blk = pl.BlockSpec((_SQ, _SQ, bq, d), lambda b, h, i: (b, h, i, 0))
  row_blk = pl.BlockSpec((_SQ, _SQ, bq, 1), lambda b, h, i: (b, h, i, 0))
  kv_full = pl.BlockSpec((_SQ, _SQ, tk, d), lambda b, h, i: (b, h // g, 0, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, num_k_blocks=tk // bk),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(b, h, tq // bq),
      in_specs=[q_blk, kv_full, kv_full, q_blk, row_blk, row_blk]
      + (_seg_specs(st, False, True, tq, tk) if st.has_seg else []),
      out_specs=q_blk,
      interpret=st.interpret,
      compiler_params=_compiler_params(st.target, d),
      name="flash_attention_dq",
  )(q, k, v, dout, lse, delta, *seg_args)

  # The block index along the head axis is the kv head: a block of `g` query heads is its group.
  q_grp = pl.BlockSpec((_SQ, g, tq, d), lambda b, kh, j: (b, kh, 0, 0))
  row_grp = pl.BlockSpec((_SQ, g, tq, 1), lambda b, kh, j: (b, kh, 0, 0))
  kv_blk = pl.BlockSpec((_SQ, _SQ, bk, d), lambda b, kh, j: (b, kh, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, num_q_blocks=tq // bq),
      out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      grid=(b, hk, tk // bk),
      in_specs=[q_grp, kv_blk, kv_blk, q_grp, row_grp, row_grp]
      + (_seg_specs(st, True, False, tq, tk) if st.has_seg else []),
      out_specs=(kv_blk, kv_blk),
      interpret=st.interpret,
      compiler_params=_compiler_params(st.target, d),
      name="flash_attention_dkv",
  )(q, k, v, dout, lse, delta, *seg_args)
  return dq, dk, dv, delta


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, q_seg, k_seg, sinks3):
  return fc.with_optional_lse(*_forward(st, q, k, v, q_seg, k_seg, sinks3), st.with_lse)


def _flash_fwd(st, q, k, v, q_seg, k_seg, sinks3):
  out, lse = _forward(st, q, k, v, q_seg, k_seg, sinks3)
  return fc.with_optional_lse(out, lse, st.with_lse), (q, k, v, q_seg, k_seg, sinks3, out, lse)


def _flash_bwd(st, res, cotangent):
  q, k, v, q_seg, k_seg, sinks3, out, lse = res
  dout, dlse = fc.split_cotangent(cotangent, st.with_lse)
  dq, dk, dv, delta = _backward(st, q, k, v, q_seg, k_seg, out, lse, dout, dlse)
  dsinks = None
  if sinks3 is not None:
    # [h, 1, 1] broadcasts against the [b, h, t, 1] rows; padded rows have delta 0.
    per_row = fc.sink_grad(sinks3, lse, delta)
    dsinks = per_row.sum(axis=(0, 2)).reshape(sinks3.shape).astype(sinks3.dtype)
  return dq, dk, dv, None, None, dsinks


_flash.defvjp(_flash_fwd, _flash_bwd)
