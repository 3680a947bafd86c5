"""Pallas flash attention: the block step (forward, dq and dk/dv kernels) and single-device flash.

Layout inside the kernels is head-major: q [b, h, tq, d], k / v [b, kv_heads, tk, d]. Positions
are given relative to the keys: query row r sits at position `rel + r` and key c at position c,
where `rel` is a traced int32 [1] array. Single-device flash passes rel = 0; the
sequence-parallel block step (layers/kernels/attention_blocks_pallas.py) calls the same kernels
on a (query chunk, key chunk) pair with rel = the query chunk's start minus the key chunk's.

How the blocks are walked on each target (`Static.target`):
  tpu (Mosaic) and the interpreters: the grid is (batch, head, query block, key block) with the
    key axis "arbitrary" (sequential): K / V stream through VMEM one block at a time and the
    online-softmax state m, l, acc lives in VMEM scratch across that axis. The index_map clamps
    the key block to the range the causal mask and the window leave visible (computed from the
    scalar-prefetched rel), so a skipped block repeats the previous block index and is never
    copied, and `pl.when` skips its compute. The dq kernel walks the same grid; the dk/dv kernel
    has grid (batch, kv head, key block, group head x query block) with dk, dv in scratch, so
    GQA gradients are summed in the kernel. lse, delta and the query segment ids are lane-dense
    ([..., 128]: Mosaic would pad a width-1 block 128x anyway) and the key segment ids come as
    8 sublanes; every call sets vmem_limit_bytes and a cost estimate.
  gpu (Triton backend): the forward's grid is (batch, head, query block); each program reads
    K / V from global memory tile by tile in a `fori_loop` whose traced bounds skip masked
    blocks. The backward is one fused kernel over (batch, kv head, key block): each program
    walks the visible query blocks of every head of its group, keeps dk, dv in registers and
    adds dq atomically into a float32 buffer (five matmuls per tile). Power-of-two tiles >= 16
    (head_dim zero-padded), explicit num_warps / num_stages, no static value slices.

The per-tile math (masks, online softmax, backward formulas) is `layers.kernels.flash_common`,
the same code the pure-JAX paths run. With `return_lse=True` the logsumexp rows become a second,
differentiable output; their cotangent is subtracted from delta = rowsum(dout * out) before the
backward kernels run (d lse_i / d s_ij = p_ij), so the kernels themselves are the same.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from layers.kernels import dispatch
from layers.kernels import flash_common as fc
from layers.kernels import flash_pallas_kernels as fk
from sharding import specs

F32 = jnp.float32
_SQ = pl.squeezed


@dataclasses.dataclass(frozen=True)
class Static:
  """Static settings of one call (hashable: a nondiff argument of the custom_vjps)."""

  scale: float
  causal: bool
  window: int | None
  block_q: int
  block_k: int
  kv_len: int | None  # keys at index >= kv_len are padding and masked explicitly
  group: int
  has_seg: bool
  has_sinks: bool
  interpret: Any
  target: str | None  # "gpu" or "tpu" when compiled, None when interpreted
  with_lse: bool = False  # the custom_vjp also outputs (and takes the cotangent of) lse
  f32_out: bool = False  # out, dq, dk, dv in float32 (partial results that the caller sums)

  @property
  def loop(self) -> bool:
    """Programs loop over their blocks (Triton) instead of the grid walking them."""
    return self.target == "gpu"

  @property
  def mosaic(self) -> bool:
    """Compiled by Mosaic (TPU) or run by its interpreter: the TPU conventions apply."""
    return self.target == "tpu" or isinstance(self.interpret, pltpu.InterpretParams)

  @property
  def lanes(self) -> int:
    """Width of the row arrays (lse, delta, query segment ids): lane-dense on TPU."""
    return 128 if self.mosaic and not self.loop else 1

  @property
  def sublanes(self) -> int:
    """Rows of the key segment-id array."""
    return 8 if self.lanes > 1 else 1


def _target(interpret) -> str | None:
  if interpret:
    return None
  backend = jax.default_backend()
  return backend if backend in ("gpu", "tpu") else None


def _pow2(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def head_dim_for(target: str | None, d: int) -> int:
  """The head_dim the kernels run at: a power of two >= 16 on GPU (zero-padded), else d."""
  return _pow2(d) if target == "gpu" else d


def _fit_to_target(target: str | None, bq: int, bk: int, d: int) -> tuple[int, int, int]:
  """Block sizes and head_dim the target's lowering accepts (interpret mode takes any).

  Triton (GPU) wants power-of-two tiles of at least 16 (the head_dim is zero-padded, which
  changes no logit); Mosaic (TPU) wants the key block, the lane dimension of the logits tile
  and of the key segment ids, to be a multiple of 128.
  """
  if target == "gpu":
    return _pow2(bq), _pow2(bk), head_dim_for(target, d)
  if target == "tpu":
    return bq, fc.round_up(bk, 128), d
  return bq, bk, d


def _resolve(interpret):
  return dispatch.pallas_interpret() if interpret is None else interpret


def fit_blocks(interpret, bq: int, bk: int, d: int):
  """(interpret, block_q, block_k, padded head_dim) for this backend; interpret None means
  interpret exactly where Pallas cannot compile (CPU)."""
  interpret = _resolve(interpret)
  return (interpret,) + _fit_to_target(_target(interpret), bq, bk, d)


def make_static(*, scale, causal, window, block_q, block_k, kv_len, group, has_seg, has_sinks,
                interpret, with_lse=False, f32_out=False) -> Static:
  """A Static for the current backend (`interpret` None: interpret exactly where needed)."""
  interpret = _resolve(interpret)
  return Static(float(scale), causal, window, block_q, block_k, kv_len, group, has_seg,
                has_sinks, interpret, _target(interpret), with_lse, f32_out)


# ------------------------------------------------------------------------------------------------
# Inputs in the kernels' layout.


def query_segments(st: Static, seg, length: int):
  """[b, t] query segment ids -> [b, length, lanes] int32 (padded rows get -1)."""
  x = fc.pad_axis(seg.astype(jnp.int32), 1, length, -1)[:, :, None]
  return jnp.broadcast_to(x, x.shape[:2] + (st.lanes,))


def key_segments(st: Static, seg, length: int):
  """[b, t] key segment ids -> [b, sublanes, length] int32 (padded keys get -1)."""
  x = fc.pad_axis(seg.astype(jnp.int32), 1, length, -1)[:, None, :]
  return jnp.broadcast_to(x, (x.shape[0], st.sublanes, length))


def lane_rows(st: Static, x):
  """[..., rows, 1] float32 -> [..., rows, lanes]."""
  return jnp.broadcast_to(x, x.shape[:-1] + (st.lanes,))


# ------------------------------------------------------------------------------------------------
# pallas_call plumbing.


def _compiler_params(st: Static, head_dim: int):
  # GPU: warps and stages as JAX's own Triton flash attention sets them (4 warps up to head_dim
  # 64, else 8; 2 stages). TPU: the last grid axis carries the scratch state; the limit leaves
  # room for double-buffered tiles, the logits temporaries and the scratch.
  if st.target == "gpu":
    return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
  if st.mosaic:
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * 3 + ("arbitrary",),
                                vmem_limit_bytes=_vmem_limit(st, head_dim))
  return None


def _vmem_limit(st: Static, d: int) -> int:
  tiles = 2 * 4 * (2 * st.block_q + 2 * st.block_k) * d  # q, do, k, v; 2 buffers, <= 4 bytes
  logits = 4 * 4 * st.block_q * st.block_k  # s, p, dp, ds
  scratch = 4 * (st.block_q * (d + 2 * 128) + 2 * st.block_k * d)
  rows = 2 * 4 * 4 * st.block_q * 128
  return max(16 << 20, fc.round_up(2 * (tiles + logits + scratch + rows), 1 << 20))


def _cost(st: Static, b, h, tq, tk, d, matmuls: int, arrays) -> pl.CostEstimate:
  """Useful work of one call: `matmuls` [rows, keys, d] products over the visible pairs."""
  pairs = tq * tk * (0.5 if st.causal else 1.0)
  if st.window is not None:
    pairs = min(pairs, tq * (st.window + 1))
  moved = sum(x.size * x.dtype.itemsize for x in arrays)
  return pl.CostEstimate(flops=int(2 * matmuls * b * h * pairs * d),
                         transcendentals=int(b * h * pairs), bytes_accessed=int(moved))


def _clamped(j, lo, hi, n):
  """Block index j kept inside [lo, hi) (and [0, n)): skipped steps repeat a fetched block."""
  return jnp.clip(jnp.minimum(jnp.maximum(j, lo), hi - 1), 0, n - 1)


def _kv_index(st: Static, nk: int):
  """The grid walk's K / V index_map: key block j of query block i, clamped to the visible
  range (from the scalar-prefetched rel), so a skipped step re-uses the fetched block."""

  def index(b, h, i, j, rel_ref):
    lo, _, _, hi = fk.key_range(st, rel_ref[0] + i * st.block_q, nk)
    return b, h // st.group, _clamped(j, lo, hi, nk), 0

  return index


def _call(st: Static, name, kernel, grid, in_specs, out_shape, out_specs, scratch, args, cost,
          d, aliases=None):
  # Inside jax.shard_map (check_vma=True) the outputs must say over which mesh axes they vary:
  # the union of the operands' axes, to which every operand is cast.
  axes = frozenset().union(*(specs.axes_of(x) for x in args))
  args = specs.vary(args, axes)
  mat = jax.typeof(args[0]).manual_axis_type
  out_shape = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat), out_shape)
  common = dict(out_shape=out_shape, interpret=st.interpret, name=name,
                compiler_params=_compiler_params(st, d), cost_estimate=cost,
                input_output_aliases=aliases or {})
  if st.loop:
    rel_spec = pl.BlockSpec((1,), lambda *_: (0,))
    return pl.pallas_call(kernel, grid=grid, in_specs=[rel_spec] + in_specs,
                          out_specs=out_specs, **common)(*args)
  grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                           out_specs=out_specs, scratch_shapes=scratch)
  return pl.pallas_call(kernel, grid_spec=grid_spec, **common)(*args)


def block_forward(st: Static, rel, q, k, v, q_seg, k_seg, sinks3):
  """One block step's forward: (out [b, h, tq, d], lse [b, h, tq, lanes] float32).

  q [b, h, tq, d], k / v [b, hk, tk, d] with tq, tk whole blocks; q_seg / k_seg from
  `query_segments` / `key_segments` (or None); sinks3 [h, 1, 1] float or None; rel int32 [1].
  """
  b, h, tq, d = q.shape
  tk, g, bq, bk, lanes = k.shape[2], st.group, st.block_q, st.block_k, st.lanes
  nq, nk = tq // bq, tk // bk
  out_shape = (jax.ShapeDtypeStruct(q.shape, F32 if st.f32_out else q.dtype),
               jax.ShapeDtypeStruct((b, h, tq, lanes), F32))
  args = [rel, q, k, v] + ([q_seg, k_seg] if st.has_seg else [])
  args += [sinks3] if st.has_sinks else []
  cost = _cost(st, b, h, tq, tk, d, 2, args[1:])
  if st.loop:
    q_spec = pl.BlockSpec((_SQ, _SQ, bq, d), lambda b, h, i: (b, h, i, 0))
    in_specs = [q_spec] + [pl.BlockSpec((_SQ, _SQ, tk, d), lambda b, h, i: (b, h // g, 0, 0))] * 2
    if st.has_seg:
      in_specs += [pl.BlockSpec((_SQ, bq, 1), lambda b, h, i: (b, i, 0)),
                   pl.BlockSpec((_SQ, 1, tk), lambda b, h, i: (b, 0, 0))]
    if st.has_sinks:
      in_specs.append(pl.BlockSpec((_SQ, 1, 1), lambda b, h, i: (h, 0, 0)))
    out_specs = (q_spec, pl.BlockSpec((_SQ, _SQ, bq, 1), lambda b, h, i: (b, h, i, 0)))
    kernel = functools.partial(fk.forward_loop, st=st, num_k_blocks=nk)
    return _call(st, "flash_attention_fwd", kernel, (b, h, nq), in_specs, out_shape, out_specs,
                 [], args, cost, d)

  kv_block = _kv_index(st, nk)
  q_spec = pl.BlockSpec((_SQ, _SQ, bq, d), lambda b, h, i, j, r: (b, h, i, 0))
  in_specs = [q_spec] + [pl.BlockSpec((_SQ, _SQ, bk, d), kv_block)] * 2
  if st.has_seg:
    in_specs += [pl.BlockSpec((_SQ, bq, lanes), lambda b, h, i, j, r: (b, i, 0)),
                 pl.BlockSpec((_SQ, st.sublanes, bk),
                              lambda b, h, i, j, r: (b, 0, kv_block(b, h, i, j, r)[2]))]
  if st.has_sinks:
    in_specs.append(pl.BlockSpec((_SQ, 1, 1), lambda b, h, i, j, r: (h, 0, 0)))
  out_specs = (q_spec, pl.BlockSpec((_SQ, _SQ, bq, lanes), lambda b, h, i, j, r: (b, h, i, 0)))
  scratch = [pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, d), F32)]
  kernel = functools.partial(fk.forward_grid, st=st, num_k_blocks=nk)
  return _call(st, "flash_attention_fwd", kernel, (b, h, nq, nk), in_specs, out_shape,
               out_specs, scratch, args, cost, d)


def block_backward(st: Static, rel, q, k, v, q_seg, k_seg, do, lse, delta):
  """One block step's backward: (dq, dk, dv) of the pair, from the rows' final lse and delta
  ([b, h, tq, lanes] float32; delta = rowsum(dout * out) - dlse)."""
  b, h, tq, d = q.shape
  hk, tk, g, bq, bk, lanes = k.shape[1], k.shape[2], st.group, st.block_q, st.block_k, st.lanes
  nq, nk = tq // bq, tk // bk
  seg_args = [q_seg, k_seg] if st.has_seg else []
  args = [rel, q, k, v, do, lse, delta] + seg_args
  out_dtype = lambda x: F32 if st.f32_out else x.dtype
  dq_shape = jax.ShapeDtypeStruct(q.shape, out_dtype(q))
  dkv_shape = (jax.ShapeDtypeStruct(k.shape, out_dtype(k)),
               jax.ShapeDtypeStruct(v.shape, out_dtype(v)))

  if st.loop:
    # One fused kernel: the program of (batch, kv head, key block) covers the kv head's group
    # (a block of g query heads along the head axis) and adds dq atomically into a zeroed,
    # aliased float32 buffer.
    q_grp = pl.BlockSpec((_SQ, g, tq, d), lambda b, kh, j: (b, kh, 0, 0))
    row_grp = pl.BlockSpec((_SQ, g, tq, 1), lambda b, kh, j: (b, kh, 0, 0))
    kv_blk = pl.BlockSpec((_SQ, _SQ, bk, d), lambda b, kh, j: (b, kh, j, 0))
    segs = [pl.BlockSpec((_SQ, tq, 1), lambda b, kh, j: (b, 0, 0)),
            pl.BlockSpec((_SQ, 1, bk), lambda b, kh, j: (b, 0, j))] if st.has_seg else []
    dq, dk, dv = _call(
        st, "flash_attention_bwd", functools.partial(fk.bwd_loop, st=st, num_q_blocks=nq),
        (b, hk, nk), [q_grp, kv_blk, kv_blk, q_grp, row_grp, row_grp] + segs + [q_grp],
        (jax.ShapeDtypeStruct(q.shape, F32),) + dkv_shape, (q_grp, kv_blk, kv_blk), [],
        args + [jnp.zeros(q.shape, F32)], _cost(st, b, h, tq, tk, d, 5, args[1:]), d,
        aliases={len(args): 0})
    return dq.astype(dq_shape.dtype), dk, dv

  kv_block = _kv_index(st, nk)
  q_blk = pl.BlockSpec((_SQ, _SQ, bq, d), lambda b, h, i, j, r: (b, h, i, 0))
  row_blk = pl.BlockSpec((_SQ, _SQ, bq, lanes), lambda b, h, i, j, r: (b, h, i, 0))
  kv_blk = pl.BlockSpec((_SQ, _SQ, bk, d), kv_block)
  segs = []
  if st.has_seg:
    segs = [pl.BlockSpec((_SQ, bq, lanes), lambda b, h, i, j, r: (b, i, 0)),
            pl.BlockSpec((_SQ, st.sublanes, bk),
                         lambda b, h, i, j, r: (b, 0, kv_block(b, h, i, j, r)[2]))]
  dq = _call(st, "flash_attention_dq", functools.partial(fk.dq_grid, st=st, num_k_blocks=nk),
             (b, h, nq, nk), [q_blk, kv_blk, kv_blk, q_blk, row_blk, row_blk] + segs, dq_shape,
             q_blk, [pltpu.VMEM((bq, d), F32)], args, _cost(st, b, h, tq, tk, d, 3, args[1:]), d)

  # dk/dv: the last grid axis walks (group head, query block) pairs, m = head_in_group * nq + i.
  def q_block(b, kh, j, m, rel_ref):
    lo, _, _, hi = fk.query_range(st, rel_ref[0], j * bk, nq)
    return b, kh * g + m // nq, _clamped(m % nq, lo, hi, nq), 0

  q_grp = pl.BlockSpec((_SQ, _SQ, bq, d), q_block)
  row_grp = pl.BlockSpec((_SQ, _SQ, bq, lanes), q_block)
  kv_own = pl.BlockSpec((_SQ, _SQ, bk, d), lambda b, kh, j, m, r: (b, kh, j, 0))
  segs = []
  if st.has_seg:
    segs = [pl.BlockSpec((_SQ, bq, lanes), lambda b, kh, j, m, r: (b, q_block(b, kh, j, m, r)[2],
                                                                  0)),
            pl.BlockSpec((_SQ, st.sublanes, bk), lambda b, kh, j, m, r: (b, 0, j))]
  scratch = [pltpu.VMEM((bk, d), F32), pltpu.VMEM((bk, d), F32)]
  dk, dv = _call(st, "flash_attention_dkv",
                 functools.partial(fk.dkv_grid, st=st, num_q_blocks=nq), (b, hk, nk, g * nq),
                 [q_grp, kv_own, kv_own, q_grp, row_grp, row_grp] + segs, dkv_shape,
                 (kv_own, kv_own), scratch, args, _cost(st, b, h, tq, tk, d, 4, args[1:]), d)
  return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# Single-device flash attention.


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
  interpret, bq, bk, dp = fit_blocks(interpret, *fc.resolve_blocks(block_size, t, "pallas"), d)
  tq, tk = fc.round_up(t, bq), fc.round_up(t, bk)
  # Under a causal mask with rel = 0, padded keys (index >= t) are invisible to every real query.
  kv_len = t if (tk != t and not causal) else None
  st = make_static(scale=scale, causal=causal, window=window, block_q=bq, block_k=bk,
                   kv_len=kv_len, group=h // hk, has_seg=segment_ids is not None,
                   has_sinks=sinks is not None, interpret=interpret, with_lse=return_lse)
  pad = lambda x, length: fc.pad_axis(fc.pad_axis(x, 1, length), 3, dp).transpose(0, 2, 1, 3)
  qh, kh, vh = pad(q, tq), pad(k, tk), pad(v, tk)
  q_seg = k_seg = None
  if segment_ids is not None:
    q_seg, k_seg = query_segments(st, segment_ids, tq), key_segments(st, segment_ids, tk)
  sinks3 = None if sinks is None else sinks.reshape(h, 1, 1)
  res = _flash(st, jnp.zeros((1,), jnp.int32), qh, kh, vh, q_seg, k_seg, sinks3)
  out = (res[0] if return_lse else res).transpose(0, 2, 1, 3)[:, :t, :, :d]
  if not return_lse:
    return out
  return out, res[1][:, :, :t, 0].transpose(0, 2, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, rel, q, k, v, q_seg, k_seg, sinks3):
  return fc.with_optional_lse(*block_forward(st, rel, q, k, v, q_seg, k_seg, sinks3),
                              st.with_lse)


def _flash_fwd(st, rel, q, k, v, q_seg, k_seg, sinks3):
  out, lse = block_forward(st, rel, q, k, v, q_seg, k_seg, sinks3)
  return (fc.with_optional_lse(out, lse, st.with_lse),
          (rel, q, k, v, q_seg, k_seg, sinks3, out, lse))


def _flash_bwd(st, res, cotangent):
  rel, q, k, v, q_seg, k_seg, sinks3, out, lse = res
  dout, dlse = fc.split_cotangent(cotangent, st.with_lse)
  delta = fc.out_delta(out, dout, None if dlse is None else dlse[..., :1])
  dq, dk, dv = block_backward(st, rel, q, k, v, q_seg, k_seg, dout, lse, lane_rows(st, delta))
  dsinks = None
  if sinks3 is not None:
    # [h, 1, 1] broadcasts against the [b, h, t, 1] rows; padded rows have delta 0.
    per_row = fc.sink_grad(sinks3, lse[..., :1], delta)
    dsinks = per_row.sum(axis=(0, 2)).reshape(sinks3.shape).astype(sinks3.dtype)
  return None, dq, dk, dv, None, None, dsinks


_flash.defvjp(_flash_fwd, _flash_bwd)
