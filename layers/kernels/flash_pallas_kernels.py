"""The kernel bodies of the Pallas flash attention (layers/kernels/flash_pallas.py holds the
pallas_call plumbing, the custom_vjp and the entry).

Each kernel exists in two walks with the same tile math (`layers.kernels.flash_common`):
  *_loop  (Triton, GPU): one program per (batch, head, query block) (forward) or (batch, kv
          head, key block) (the fused backward) loops over the visible blocks of the other side
          with traced bounds;
  *_grid  (Mosaic, TPU, and the interpreters): the grid walks those blocks along its last,
          sequential axis and the running state is VMEM scratch; blocks outside the visible
          range are skipped by `pl.when` (their index_map repeats a fetched block).
Positions: query row r of the call is at `rel + r`, key c at c (rel is the first ref, an int32
[1] array; scalar-prefetched in the grid walk).
"""

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from layers.kernels import flash_common as fc


def key_range(st, q_start, num_k_blocks: int):
  """(lo, full_lo, full_hi, hi) key blocks of the query block starting at position q_start."""
  return fc.key_block_range(q_start, q_start + st.block_q, st.block_k, num_k_blocks,
                            causal=st.causal, window=st.window, kv_len=st.kv_len)


def query_range(st, rel, k_start, num_q_blocks: int):
  """(lo, full_lo, full_hi, hi) query blocks that see the key block starting at key k_start."""
  kv_len = None if st.kv_len is None else st.kv_len - rel
  return fc.query_block_range(k_start - rel, k_start - rel + st.block_k, st.block_q,
                              num_q_blocks, causal=st.causal, window=st.window, kv_len=kv_len)


def _col(x):
  """A lane-dense [rows, lanes] row array as its [rows, 1] column (no slice when lanes == 1)."""
  return x if x.shape[-1] == 1 else x[:, :1]


def _row(x):
  """A [sublanes, cols] key segment-id block as its [1, cols] row."""
  return x if x.shape[0] == 1 else x[:1, :]


def _tile_mask(st, q_start, k_start, q_seg, k_seg, edge: bool):
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, (st.block_q, 1), 0)
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, (1, st.block_k), 1)
  return fc.block_mask(q_pos, k_pos, causal=st.causal, window=st.window, kv_len=st.kv_len,
                       q_seg=q_seg, k_seg=k_seg, edge=edge)


def _split(st, rest, with_sinks: bool):
  """(q_seg_ref, k_seg_ref, sink_ref, remaining refs) from the refs after the fixed inputs."""
  q_seg = k_seg = sink = None
  if st.has_seg:
    q_seg, k_seg, *rest = rest
  if with_sinks and st.has_sinks:
    sink, *rest = rest
  return q_seg, k_seg, sink, rest


def _grid_tiles(bounds, j, tile):
  """Runs tile(edge) for grid step j when block j is visible: edge=False inside the fully
  visible range, True on the masked edges."""
  lo, full_lo, full_hi, hi = bounds
  full = (j >= full_lo) & (j < full_hi)
  pl.when((j >= lo) & (j < hi) & jnp.logical_not(full))(lambda: tile(True))
  pl.when(full)(lambda: tile(False))


# ------------------------------------------------------------------------------------------------
# Forward.


def forward_loop(rel_ref, q_ref, k_ref, v_ref, *rest, st, num_k_blocks: int):
  q_seg_ref, k_seg_ref, sink_ref, (o_ref, lse_ref) = _split(st, rest, True)
  q_start = rel_ref[0] + pl.program_id(2) * st.block_q
  q = q_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]

  def body(j, state, edge):
    k_start = pl.multiple_of(j * st.block_k, st.block_k)
    keys = pl.ds(k_start, st.block_k)
    k_seg = None if k_seg_ref is None else k_seg_ref[:, keys]
    mask = _tile_mask(st, q_start, k_start, q_seg, k_seg, edge)
    return fc.online_update(state, q, k_ref[keys, :], v_ref[keys, :], mask, st.scale)

  sink = None if sink_ref is None else sink_ref[...]
  state = fc.init_state((st.block_q,), q.shape[-1], sink)
  out, lse = fc.finalize(fc.blocks_loop(key_range(st, q_start, num_k_blocks), body, state))
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def forward_grid(rel_ref, q_ref, k_ref, v_ref, *rest, st, num_k_blocks: int):
  q_seg_ref, k_seg_ref, sink_ref, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = _split(st, rest, True)
  j = pl.program_id(3)
  q_start = rel_ref[0] + pl.program_id(2) * st.block_q

  @pl.when(j == 0)
  def _init():
    sink = None if sink_ref is None else sink_ref[...]
    m_ref[...], l_ref[...], acc_ref[...] = fc.init_state((st.block_q,), acc_ref.shape[-1], sink)

  def tile(edge):
    q_seg = None if q_seg_ref is None else _col(q_seg_ref[...])
    k_seg = None if k_seg_ref is None else _row(k_seg_ref[...])
    mask = _tile_mask(st, q_start, j * st.block_k, q_seg, k_seg, edge)
    state = (m_ref[...], l_ref[...], acc_ref[...])
    m_ref[...], l_ref[...], acc_ref[...] = fc.online_update(state, q_ref[...], k_ref[...],
                                                            v_ref[...], mask, st.scale)

  _grid_tiles(key_range(st, q_start, num_k_blocks), j, tile)

  @pl.when(j == num_k_blocks - 1)
  def _finish():
    out, lse = fc.finalize((m_ref[...], l_ref[...], acc_ref[...]))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


# ------------------------------------------------------------------------------------------------
# Backward: dq (the grid walk; the Triton walk's dq is fused into bwd_loop).


def dq_grid(rel_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, st,
            num_k_blocks: int):
  q_seg_ref, k_seg_ref, _, (dq_ref, acc_ref) = _split(st, rest, False)
  j = pl.program_id(3)
  q_start = rel_ref[0] + pl.program_id(2) * st.block_q

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def tile(edge):
    q_seg = None if q_seg_ref is None else _col(q_seg_ref[...])
    k_seg = None if k_seg_ref is None else _row(k_seg_ref[...])
    mask = _tile_mask(st, q_start, j * st.block_k, q_seg, k_seg, edge)
    k = k_ref[...]
    _, ds = fc.backward_block(q_ref[...], k, v_ref[...], do_ref[...], _col(lse_ref[...]),
                              _col(delta_ref[...]), mask, st.scale)
    acc_ref[...] += fc.dq_part(ds, k, st.scale)

  _grid_tiles(key_range(st, q_start, num_k_blocks), j, tile)

  @pl.when(j == num_k_blocks - 1)
  def _finish():
    dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


# ------------------------------------------------------------------------------------------------
# Backward: dk, dv (summed over the query heads of a kv head's group).


def bwd_loop(rel_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, st,
             num_q_blocks: int):
  """The fused backward of the Triton walk: the program of one key block of a kv head walks the
  visible query blocks of every head of the group, accumulates that block's dk, dv and adds
  each tile's dq part to the float32 dq (zero-initialized, aliased) with atomic adds: five
  matmuls per tile, against seven for separate dq and dk/dv kernels that each recompute p."""
  q_seg_ref, k_seg_ref, _, (_, dq_ref, dk_ref, dv_ref) = _split(st, rest, False)
  rel = rel_ref[0]
  k_start = pl.program_id(2) * st.block_k
  k, v = k_ref[...], v_ref[...]
  k_seg = None if k_seg_ref is None else k_seg_ref[...]
  bounds = query_range(st, rel, k_start, num_q_blocks)

  def head(g, acc):
    def body(i, acc, edge):
      dk, dv = acc
      rows = pl.ds(pl.multiple_of(i * st.block_q, st.block_q), st.block_q)
      q_seg = None if q_seg_ref is None else q_seg_ref[rows, :]
      mask = _tile_mask(st, rel + i * st.block_q, k_start, q_seg, k_seg, edge)
      q, do = q_ref[g, rows, :], do_ref[g, rows, :]
      p, ds = fc.backward_block(q, k, v, do, lse_ref[g, rows, :], delta_ref[g, rows, :], mask,
                                st.scale)
      pltriton.atomic_add(dq_ref, (g, rows, slice(None)), fc.dq_part(ds, k, st.scale))
      return dk + fc.dk_part(ds, q, st.scale), dv + fc.dv_part(p, do)

    return fc.blocks_loop(bounds, body, acc)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, st.group, head, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def dkv_grid(rel_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, st,
             num_q_blocks: int):
  q_seg_ref, k_seg_ref, _, (dk_ref, dv_ref, dk_acc, dv_acc) = _split(st, rest, False)
  rel = rel_ref[0]
  m = pl.program_id(3)
  i = m % num_q_blocks
  k_start = pl.program_id(2) * st.block_k

  @pl.when(m == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def tile(edge):
    q_seg = None if q_seg_ref is None else _col(q_seg_ref[...])
    k_seg = None if k_seg_ref is None else _row(k_seg_ref[...])
    mask = _tile_mask(st, rel + i * st.block_q, k_start, q_seg, k_seg, edge)
    q, do = q_ref[...], do_ref[...]
    p, ds = fc.backward_block(q, k_ref[...], v_ref[...], do, _col(lse_ref[...]),
                              _col(delta_ref[...]), mask, st.scale)
    dk_acc[...] += fc.dk_part(ds, q, st.scale)
    dv_acc[...] += fc.dv_part(p, do)

  _grid_tiles(query_range(st, rel, k_start, num_q_blocks), i, tile)

  @pl.when(m == st.group * num_q_blocks - 1)
  def _finish():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)
