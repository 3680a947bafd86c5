"""Sequence-parallel (gated) linear attention: LASP-2 and ZeCO on the chunk summaries of a shard.

Both methods take GLOBAL arrays in layout order (sharding.layout) and run one `jax.shard_map`
over the mesh: batch over the data-parallel axes, length over `seq`, heads over `tensor`
(sharding.specs). Rank r of the P sequence shards holds `layout.chunks_per_shard` pieces of
c = T / num_chunks tokens (1 contiguous, 2 zigzag) whose global chunk ids are
`layout.local_chunk_ids(r)`. Per piece, with the inclusive in-piece cumulative log-gate
B_t = sum_{s<=t} g_s (per d_k, scalar, or 0 without a gate) and the recurrence
S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t:

  memory      M = sum_t exp(B_L - B_t) k_t^T v_t over the tokens after the piece's last segment
              reset: the piece's state started from zero (one einsum, computed first);
  transition  D = exp(B_L) (per d_k, scalar, or 1), zeroed when the state resets inside the piece
              or at its first token; the state leaving the piece is then D * S_in + M;
  intra       o_intra = linear_attention(piece, initial_state=None, segment_ids=piece ids): the
              exact output from a zero entering state, independent of any communication;
  inter       o_inter_t = scale (q_t * exp(B_t)) S_in for the tokens before the piece's first
              reset (zero after it); out = o_intra + o_inter.

B_t is never formed as one cumulative sum over the piece: over 8K tokens of log-gates near -10
it reaches -80000, where float32 keeps about three decimals and B_L - B_t would lose the decays
of the last tokens. Both exponents are split at the kernel's chunks (`piece_log_decays`):
B_L - B_t = (sum of the later chunks' totals) + (the chunk's total - its local cumsum at t) and
B_t = (sum of the earlier chunks' totals) + (its local cumsum at t), so no difference of large
numbers is ever taken and the cancellation is bounded by one chunk.

S_in, the global state entering the piece (initial_state for global chunk 0), is what the methods
communicate, by the schedules of sharding/: `combine(m, decay, h0, rank) -> (s_in, final)` is
`sharding.lasp2.prefix_combine` (one all-gather of [M | D], then the gated prefix combine) or
`sharding.zeco.all_scan_combine` (the pipelined All-Scan, one state per rank). Whether a piece's
first token starts a new document depends on the last token of the previous global chunk, which
lives on another rank: `sharding.layout.chunk_start_flags` computes it outside the shard_map from
the global segment ids and the flags enter sharded in layout order, one per piece.

`parallel_linear_attention(plan, ...)` is what the mixers call: the plan's method, or the
single-device op when the plan has none for linear layers.

States are kept per query head (GQA repeats k and v for M; the intra op repeats them itself), in
float32. A sequence-replicated `initial_state` enters every shard; the shard_map transpose sums
its cotangent over `seq` in the backward, so passing one costs one all-reduce of a state there.
The shard_map runs with check_vma=False because the single-device kernels it calls (chunked XLA,
Pallas) are not written for varying-axis types; the methods' collectives are explicit.
"""

import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from layers.linear_attention import check_arguments, kernel_log_gate, linear_attention, repeat_kv
from sharding import lasp2, specs, zeco
from sharding.layout import call_in_natural_order, chunk_start_flags, final_owner
from sharding.plan import ExecutionPlan

F32 = jnp.float32
log = logging.getLogger("lctx.sharding")


def piece_masks(seg, flags):
  """From piece ids [r, c] and start flags [r]: (before the first reset [r, c], after the last
  reset [r, c], the piece resets somewhere [r]); a start flag counts as a reset at token 0."""
  starts = jnp.concatenate([flags[:, None], seg[:, 1:] != seg[:, :-1]], axis=1)
  run = jnp.cumsum(starts.astype(jnp.int32), axis=1)
  return run == 0, run == run[:, -1:], run[:, -1] > 0


def piece_log_decays(gk, chunk: int):
  """Chunk-local forms of a piece's cumulative log-gates (see the module docstring).

  Args:
    gk: [r, c, h, dk or 1] log-gates of r pieces of c tokens (c a multiple of `chunk`).
    chunk: the chunk length the cumulative sums are taken within.
  Returns:
    (to_end [r, c, h, .] = B_L - B_t, from_start [r, c, h, .] = B_t, total [r, h, .] = B_L).
  """
  r, c = gk.shape[:2]
  x = gk.reshape((r, c // chunk, chunk) + gk.shape[2:])
  local = jnp.cumsum(x, axis=2)                            # within each chunk
  totals = local[:, :, -1]                                 # [r, n, h, .]
  zero = jnp.zeros_like(totals[:, :1])
  before = jnp.concatenate([zero, jnp.cumsum(totals, axis=1)[:, :-1]], axis=1)
  after = jnp.concatenate([jnp.cumsum(totals[:, ::-1], axis=1)[:, ::-1][:, 1:], zero], axis=1)
  to_end = after[:, :, None] + (totals[:, :, None] - local)
  from_start = before[:, :, None] + local
  flat = lambda y: y.reshape(gk.shape)
  return flat(to_end), flat(from_start), jnp.sum(totals, axis=1)


def memory_state(k, v, to_end, after):
  """M [r, h, dk, dv] = sum_t exp(B_L - B_t) k_t^T v_t over the tokens after the last reset."""
  k = k.astype(F32)
  if to_end is not None:
    k = k * jnp.exp(to_end)
  if after is not None:
    k = k * after[:, :, None, None]
  return jnp.einsum("rthk,rthv->rhkv", k, v.astype(F32))


def transition(total, reset, rows: int, heads: int):
  """D [r, h, dk or 1] = exp(B_L), zero where the piece resets."""
  decay = jnp.ones((rows, heads, 1), F32) if total is None else jnp.exp(total)
  return decay if reset is None else jnp.where(reset[:, None, None], 0.0, decay)


def inter_output(q, from_start, before, s_in, scale: float):
  """o_inter [r, c, h, dv] = scale (q_t * exp(B_t)) S_in before the piece's first reset."""
  q = q.astype(F32)
  if from_start is not None:
    q = q * jnp.exp(from_start)
  if before is not None:
    q = q * before[:, :, None, None]
  return scale * jnp.einsum("rthk,rhkv->rthv", q, s_in)


def _shard_body(args, *, combine, layout, scale, impl, chunk_size, with_final):
  q, k, v = args["q"], args["k"], args["v"]
  g, h0, seg, flags = (args.get(name) for name in ("g", "h0", "seg", "flags"))
  b, tl, h = q.shape[:3]
  n = layout.chunks_per_shard
  rows, c = b * n, tl // n
  pieces = lambda x: x.reshape((rows, c) + x.shape[2:])
  gk = kernel_log_gate(g, b, tl, h)
  to_end = from_start = total = None
  if gk is not None:
    to_end, from_start, total = piece_log_decays(pieces(gk), chunk_size)
  before = after = reset = None
  if seg is not None:
    before, after, reset = piece_masks(pieces(seg), flags.reshape(rows))
  # Local summaries first, then the communication, so the intra compute can overlap it.
  m = memory_state(pieces(repeat_kv(k, h)), pieces(repeat_kv(v, h)), to_end, after)
  decay = transition(total, reset, rows, h)
  s_in, final = combine(m.reshape((b, n) + m.shape[1:]), decay.reshape((b, n) + decay.shape[1:]),
                        h0, lax.axis_index(specs.SEQ_AXIS))
  o_intra = linear_attention(pieces(q), pieces(k), pieces(v),
                             g if g is None or g.ndim == 1 else pieces(g), scale=scale,
                             segment_ids=None if seg is None else pieces(seg), impl=impl,
                             chunk_size=chunk_size)
  s_in = s_in.reshape((rows,) + s_in.shape[2:])
  o_inter = inter_output(pieces(q), from_start, before, s_in, scale)
  o = (o_intra.astype(F32) + o_inter).reshape(b, tl, h, -1).astype(q.dtype)
  return (o, final[None]) if with_final else o


def token_spec(x, mesh):
  """The in-spec of a per-token input: [b, t, h, d] and [b, t, h] over the heads spec, a
  per-head [h] gate replicated along the sequence."""
  if x.ndim == 1:
    return specs.per_head_spec(mesh)
  heads = specs.heads_spec(mesh)
  return heads if x.ndim == 4 else P(*heads[:3])


def check_mesh_and_layout(q, k, *, layout, chunk_size, mesh, what):
  """The mesh and layout checks of a sequence-parallel op (ValueErrors naming the settings)."""
  specs.check_seq_mesh(mesh, what)
  if layout.shards != specs.seq_degree(mesh):
    raise ValueError(f"{what}: layout.shards={layout.shards} must equal the mesh's seq size "
                     f"{specs.seq_degree(mesh)} (MeshConfig.seq)")
  specs.check_divisible(mesh, batch=q.shape[0], heads=q.shape[2], kv_heads=k.shape[2], what=what)
  layout.check_length(q.shape[1], multiple=chunk_size, what=f"{what}: sequence length")


def shard_pieces(body, tensors, *, layout, mesh, initial_state, segment_ids,
                 output_final_state):
  """Runs `body(args)` once per shard: batch over the data axes, length over `seq`, heads over
  `tensor`.

  Args:
    body: the per-shard function; `args` holds the local blocks of `tensors` (None entries
      dropped), "h0" (the float32 initial state, if any), "seg" and "flags" (the piece start
      flags of sharding.layout.chunk_start_flags, if segment ids are given). It returns o, or
      (o, final [1, b, h, d_k, d_v]) when output_final_state.
    tensors: name -> per-token array in layout order ([b, t, h, d], [b, t, h] or a [h] gate).
  Returns:
    o (layout order) or (o, final_state of the rank holding the last global chunk).
  """
  heads = specs.heads_spec(mesh)
  args = {name: x for name, x in tensors.items() if x is not None}
  in_specs = {name: token_spec(x, mesh) for name, x in args.items()}
  if initial_state is not None:
    args["h0"], in_specs["h0"] = initial_state.astype(F32), specs.state_spec(mesh)
  if segment_ids is not None:
    args["seg"], in_specs["seg"] = segment_ids, specs.tokens_spec(mesh)
    args["flags"], in_specs["flags"] = chunk_start_flags(segment_ids, layout), in_specs["seg"]
  out_specs = heads
  if output_final_state:
    out_specs = (heads, P(specs.SEQ_AXIS, *specs.state_spec(mesh)))
  # check_vma=False: the single-device kernels (their scans' zero carries, custom_vjp cotangents,
  # pallas_call out_shapes) carry no varying-axis types. The transpose still sums the cotangents
  # of the seq-replicated inputs (initial_state, a [h] gate) over the axes they are replicated on.
  out = jax.shard_map(body, mesh=mesh, in_specs=(in_specs,), out_specs=out_specs,
                      check_vma=False)(args)
  if not output_final_state:
    return out
  o, finals = out
  return o, finals[final_owner(layout)[0]]


def sequence_parallel(combine, q, k, v, g, *, layout, scale, initial_state, output_final_state,
                      segment_ids, impl, chunk_size, mesh, what):
  """Validates, then runs the shared per-shard body with `combine` supplying S_in and the final
  state; returns o (layout order) or (o, final_state [b, h, d_k, d_v] float32)."""
  check_arguments(q, k, v, g, initial_state, segment_ids, chunk_size)
  check_mesh_and_layout(q, k, layout=layout, chunk_size=chunk_size, mesh=mesh, what=what)
  body = functools.partial(_shard_body, combine=combine, layout=layout,
                           scale=q.shape[3] ** -0.5 if scale is None else scale, impl=impl,
                           chunk_size=chunk_size, with_final=output_final_state)
  return shard_pieces(body, {"q": q, "k": k, "v": v, "g": g}, layout=layout, mesh=mesh,
                      initial_state=initial_state, segment_ids=segment_ids,
                      output_final_state=output_final_state)


def lasp2_linear_attention(q, k, v, g=None, *, layout, mesh, scale: float | None = None,
                           initial_state=None, output_final_state: bool = False,
                           segment_ids=None, impl: str = "auto", chunk_size: int = 64):
  """Sequence-parallel `layers.linear_attention.linear_attention` by LASP-2.

  Args:
    q, k, v, g, scale, initial_state, output_final_state, segment_ids, impl, chunk_size: as in
      linear_attention; q, k, v, [b,t,h(,d_k)] gates and segment ids are GLOBAL arrays in
      `layout` order along the length axis.
    layout: sharding.layout.SeqLayout; layout.shards must equal the mesh's seq size and the
      length must split into layout.num_chunks pieces of whole chunk_size chunks.
    mesh: a mesh with a `seq` axis.
  Returns:
    o [b, t, h, d_v] in layout order, or (o, final_state [b, h, d_k, d_v] float32).
  """
  return sequence_parallel(functools.partial(lasp2.prefix_combine, layout=layout), q, k, v, g,
                           layout=layout, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, segment_ids=segment_ids,
                           impl=impl, chunk_size=chunk_size, mesh=mesh,
                           what="lasp2_linear_attention")


def zeco_linear_attention(q, k, v, g=None, *, layout, mesh, scale: float | None = None,
                          initial_state=None, output_final_state: bool = False, segment_ids=None,
                          impl: str = "auto", chunk_size: int = 64, scan_blocks: int = 4):
  """Sequence-parallel `layers.linear_attention.linear_attention` by ZeCO's All-Scan.

  Arguments as in `lasp2_linear_attention`, plus scan_blocks: K, the number of pipelined blocks
  along d_k (clamped to the largest divisor of d_k that is <= scan_blocks). The contiguous layout
  gives the minimal volume; zigzag is correct with one state per neighbour.
  """
  if scan_blocks < 1:
    raise ValueError(f"zeco_linear_attention: scan_blocks={scan_blocks} "
                     "(SequenceParallelConfig.scan_blocks) must be >= 1")
  combine = functools.partial(zeco.all_scan_combine, layout=layout, scan_blocks=scan_blocks)
  return sequence_parallel(combine, q, k, v, g, layout=layout, scale=scale,
                           initial_state=initial_state, output_final_state=output_final_state,
                           segment_ids=segment_ids, impl=impl, chunk_size=chunk_size, mesh=mesh,
                           what="zeco_linear_attention")


def parallel_linear_attention(plan: ExecutionPlan | None, q, k, v, g=None, *, segment_ids=None,
                              impl="auto", chunk_size=64):
  """(Gated) linear attention of a layer, sequence-parallel when the plan says so."""
  return run_by_plan(plan, "linear attention", linear_attention,
                     {"lasp2": lasp2_linear_attention, "zeco": zeco_linear_attention},
                     (q, k, v, g), segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)


def run_by_plan(plan: ExecutionPlan | None, what, single, methods, arrays, *, segment_ids, impl,
                chunk_size):
  """A linear-family layer's op by its plan: methods[plan.linear_method] ("lasp2", "zeco") on the
  layout-order `arrays`, or `single` in natural order when the plan has no linear method.

  `single` and the methods take `*arrays` and segment_ids, impl and chunk_size keywords (the
  methods also layout, mesh and, for zeco, scan_blocks). The choice is logged as `what`.
  """
  method = None if plan is None else plan.linear_method
  if method is None:
    op = lambda *a: single(*a[:-1], segment_ids=a[-1], impl=impl, chunk_size=chunk_size)
    return call_in_natural_order(None if plan is None else plan.layout, op, *arrays, segment_ids,
                                 what=what)
  log.info("%s: sequence-parallel %s over %d ranks, %s layout", what, method, plan.layout.shards,
           plan.layout.kind)
  kwargs = dict(layout=plan.layout, mesh=plan.mesh, segment_ids=segment_ids, impl=impl,
                chunk_size=chunk_size)
  if method == "zeco":
    kwargs["scan_blocks"] = plan.scan_blocks
  return methods[method](*arrays, **kwargs)
