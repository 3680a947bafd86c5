"""Sequence-parallel (gated) delta rule: LASP-2 and ZeCO on the affine summaries of a shard.

The delta rule's state leaves a piece of tokens as an affine function of the state entering it,
  S_out = A S_in + M,   A = prod_t a_t (I - beta_t k_t k_t^T)  (later tokens on the left),
with M the piece's state from zero and A a full [d_k, d_k] transition (sharding/states.py), and
every token's state inside the piece is S_t = A_t S_in + M_t, so its output is
  o_t = scale S_t^T q_t = o_intra_t + S_in^T q~_t,   q~_t = scale A_t^T q_t.
The delta rule's columns are independent (each column of S follows its own recurrence with the
same k, beta, g), so ONE call of the single-device op on the widened values [v | 0] from the
widened state [0 | I] gives all four at once: its output is [o_intra | q~] and its final state
[M | A]. Where a piece's first token starts a new document (sharding.layout.chunk_start_flags)
the identity block is zero (the entering state never reaches it), and a reset inside the piece
zeroes both from there on, as the op's segment ids do.

The methods then combine the summaries in global chunk order, S_in(c+1) = A_c S_in(c) + M_c:
  lasp2  one all-gather of every piece's [M | A] (sharding/lasp2.py): (P-1) B H (d_k d_v + d_k^2)
         floats received per rank, any layout; the backward's reduce-scatter moves the same;
  zeco   the pipelined All-Scan (sharding/zeco.py) in blocks of COLUMNS of the state (A stays on
         its rank): one state, B H d_k d_v floats, per rank and leg.
Unlike linear attention, the summaries come from the same scan as the intra output, so the
communication follows the local pass instead of overlapping it; only S_in^T q~ waits for it.
The widened pass costs d_v + d_k columns of state instead of d_v.

Backward: by autodiff (the single-device op's, and the collectives' transposes). Arguments are
GLOBAL arrays in layout order (sharding/layout.py), as in layers/linear_parallel.py, whose
shard_map runner and checks are shared.
"""

import functools

import jax.numpy as jnp
from jax import lax

from layers.delta_rule import check_arguments, delta_rule
from layers.linear_attention import repeat_kv
from layers.linear_parallel import check_mesh_and_layout, run_by_plan, shard_pieces
from sharding import lasp2, specs, zeco
from sharding.plan import ExecutionPlan

F32 = jnp.float32


def piece_summaries(q, k, v, beta, g, seg, flags, *, scale, impl, chunk_size):
  """One widened delta-rule pass over r pieces (see the module docstring).

  Args:
    q, k: [r, c, h, d_k]; v: [r, c, h, d_v] (heads matched); beta, g: [r, c, h] or g None;
    seg: [r, c] piece segment ids or None; flags: [r] bool (the piece starts a document) or None.
  Returns:
    (o_intra [r, c, h, d_v], q~ [r, c, h, d_k], M [r, h, d_k, d_v], A [r, h, d_k, d_k]) float32.
  """
  r, c, h, dk = q.shape
  dv = v.shape[-1]
  wide_v = jnp.concatenate([v.astype(F32), jnp.zeros((r, c, h, dk), F32)], axis=-1)
  eye = jnp.broadcast_to(jnp.eye(dk, dtype=F32), (r, h, dk, dk))
  if flags is not None:
    eye = jnp.where(flags[:, None, None, None], 0.0, eye)
  start = jnp.concatenate([jnp.zeros((r, h, dk, dv), F32), eye], axis=-1)
  out, state = delta_rule(q.astype(F32), k, wide_v, beta, g, scale=scale, initial_state=start,
                          output_final_state=True, segment_ids=seg, impl=impl,
                          chunk_size=chunk_size)
  return out[..., :dv], out[..., dv:], state[..., :dv], state[..., dv:]


def _shard_body(args, *, combine, layout, scale, impl, chunk_size, with_final):
  q, k, v, beta = args["q"], args["k"], args["v"], args["beta"]
  g, h0, seg, flags = (args.get(name) for name in ("g", "h0", "seg", "flags"))
  b, tl, h, dk = q.shape
  n = layout.chunks_per_shard
  rows, c = b * n, tl // n
  pieces = lambda x: None if x is None else x.reshape((rows, c) + x.shape[2:])
  o_intra, q_inter, m, a = piece_summaries(
      pieces(q), pieces(repeat_kv(k, h)), pieces(repeat_kv(v, h)), pieces(beta), pieces(g),
      pieces(seg), None if flags is None else flags.reshape(rows), scale=scale, impl=impl,
      chunk_size=chunk_size)
  s_in, final = combine(m.reshape((b, n) + m.shape[1:]), a.reshape((b, n) + a.shape[1:]), h0,
                        lax.axis_index(specs.SEQ_AXIS))
  o_inter = jnp.einsum("rthk,rhkv->rthv", q_inter, s_in.reshape((rows,) + s_in.shape[2:]),
                       precision=lax.Precision.HIGHEST)
  o = (o_intra + o_inter).reshape(b, tl, h, -1).astype(q.dtype)
  return (o, final[None]) if with_final else o


def _sequence_parallel(combine, q, k, v, beta, g, *, layout, mesh, scale, initial_state,
                       output_final_state, segment_ids, impl, chunk_size, what):
  check_arguments(q, k, v, beta, g, initial_state, segment_ids, chunk_size)
  check_mesh_and_layout(q, k, layout=layout, chunk_size=chunk_size, mesh=mesh, what=what)
  body = functools.partial(_shard_body, combine=combine, layout=layout,
                           scale=q.shape[3] ** -0.5 if scale is None else scale, impl=impl,
                           chunk_size=chunk_size, with_final=output_final_state)
  return shard_pieces(body, {"q": q, "k": k, "v": v, "beta": beta, "g": g}, layout=layout,
                      mesh=mesh, initial_state=initial_state, segment_ids=segment_ids,
                      output_final_state=output_final_state)


def lasp2_delta_rule(q, k, v, beta, g=None, *, layout, mesh, scale: float | None = None,
                     initial_state=None, output_final_state: bool = False, segment_ids=None,
                     impl: str = "auto", chunk_size: int = 64):
  """Sequence-parallel `layers.delta_rule.delta_rule` by LASP-2.

  Args:
    q, k, v, beta, g, scale, initial_state, output_final_state, segment_ids, impl, chunk_size: as
      in delta_rule; the per-token arrays are GLOBAL and in `layout` order along the length.
    layout: sharding.layout.SeqLayout; layout.shards must equal the mesh's seq size and the
      length must split into layout.num_chunks pieces of whole chunk_size chunks.
    mesh: a mesh with a `seq` axis.
  Returns:
    o [b, t, h, d_v] in layout order, or (o, final_state [b, h, d_k, d_v] float32).
  """
  return _sequence_parallel(functools.partial(lasp2.prefix_combine, layout=layout), q, k, v,
                            beta, g, layout=layout, mesh=mesh, scale=scale,
                            initial_state=initial_state, output_final_state=output_final_state,
                            segment_ids=segment_ids, impl=impl, chunk_size=chunk_size,
                            what="lasp2_delta_rule")


def zeco_delta_rule(q, k, v, beta, g=None, *, layout, mesh, scale: float | None = None,
                    initial_state=None, output_final_state: bool = False, segment_ids=None,
                    impl: str = "auto", chunk_size: int = 64, scan_blocks: int = 4):
  """Sequence-parallel `layers.delta_rule.delta_rule` by ZeCO's All-Scan.

  Arguments as in `lasp2_delta_rule`, plus scan_blocks: K, the number of pipelined blocks of
  state columns (along d_v; clamped to the largest divisor of d_v that is <= scan_blocks).
  """
  if scan_blocks < 1:
    raise ValueError(f"zeco_delta_rule: scan_blocks={scan_blocks} "
                     "(SequenceParallelConfig.scan_blocks) must be >= 1")
  combine = functools.partial(zeco.all_scan_combine, layout=layout, scan_blocks=scan_blocks)
  return _sequence_parallel(combine, q, k, v, beta, g, layout=layout, mesh=mesh, scale=scale,
                            initial_state=initial_state, output_final_state=output_final_state,
                            segment_ids=segment_ids, impl=impl, chunk_size=chunk_size,
                            what="zeco_delta_rule")


def parallel_delta_rule(plan: ExecutionPlan | None, q, k, v, beta, g=None, *, segment_ids=None,
                        impl="auto", chunk_size=64):
  """The (gated) delta rule of a layer, sequence-parallel when the plan says so (its linear
  layers' method: LASP-2 or ZeCO)."""
  return run_by_plan(plan, "delta rule", delta_rule,
                     {"lasp2": lasp2_delta_rule, "zeco": zeco_delta_rule}, (q, k, v, beta, g),
                     segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)
