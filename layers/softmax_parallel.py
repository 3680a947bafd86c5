"""Sequence-parallel causal softmax attention: ring attention and LASP-2H (all-gathered K, V).

Both take GLOBAL [b, t, ...] arrays in a layout's order (sharding/layout.py) and run one
`jax.shard_map` over the plan's mesh: batch over the data-parallel axes, length over `seq`, heads
over `tensor` (sharding/specs.py). Inside, a rank runs a chunk-pair block step against the keys
that the communication schedule brings it: `impl="xla"`, the tile loops of
layers/kernels/attention_blocks.py, or `impl="pallas"`, the flash kernels per chunk pair
(layers/kernels/attention_blocks_pallas.py; both modules have the same functions, each over its
own layouts of the queries and of the travelling stacked [K; V] shard):

ring       sharding/ring.py rotates the [K; V] shard (and the keys' segment ids) around the ring
           with one ppermute per step; the backward rotates K, V again with the float32 [dK; dV]
           accumulator of the held shard travelling alongside and returning to its owner. At
           ring step s a rank holds the shard of rank (r - s) mod P; the keys' global positions
           follow from that rank's chunk ids, so positions are never sent. Sliding windows stop
           the rotation after the largest needed offset (`sharding.ring.plan_chains`).
allgather  sharding/lasp2.py's all-gather of the chunk-major [K; V] (Q stays local); autodiff
           transposes it into a reduce-scatter of [dK; dV]. Works for any layout.

Zigzag balances causal work: rank r holds chunks r and 2P-1-r; at every ring step s >= 1 exactly
two of its four (query chunk, key chunk) pairs are fully visible and two hidden.

Communication per rank (B, T global; Hk kv heads, d head dim):
  ring       forward 2 (P-1)/P B Hk T d elements of K, V (plus (P-1)/P B T segment ids);
             backward as many of K, V and of dK, dV (XLA merges the backward's first K, V send
             with the forward's identical one). A window sends (a + b) / (P - 1) of that.
  allgather  forward one all-gather of [K; V], 2 (P-1)/P B Hk T d; backward one reduce-scatter
             of [dK; dV], the same. A window does not shrink it.

`return_lse=True` also returns each row's logsumexp [b, t, h] (differentiably: its cotangent
enters through the softmax correction term, as in the single-device flash paths), which is how
sink tokens are merged in under sequence parallelism. A row that sees no key has lse = -inf.

`parallel_softmax_attention(plan, ...)` is what the mixers call: it runs the plan's method, or the
single-device op when the plan has no sequence parallelism for softmax layers, and logs which.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from layers.kernels import attention_blocks as ab
from layers.kernels import attention_blocks_pallas as abp
from layers.kernels import dispatch
from layers.kernels import flash_common as fc
from layers.kernels import flash_pallas as fp
from layers.sink_tokens import check_sink_tokens, merge_sink_tokens, sink_token_attention
from layers.softmax_attention import softmax_attention, validate_arguments
from sharding import lasp2, ring, specs
from sharding.layout import SeqLayout, call_in_natural_order
from sharding.plan import ExecutionPlan

log = logging.getLogger("lctx.sharding")


_STEPS = {"xla": ab, "pallas": abp}


def _step(st: ab.Tiles):
  """The block step module of st.impl (the same functions over each one's blocked layout)."""
  return _STEPS[st.impl]


def _prepare(what, q, k, v, *, layout, scale, window, segment_ids, sinks, mesh, block_size,
             impl, interpret):
  """Validates a call; returns the Tiles (the scale in them). Raises ValueErrors naming the
  settings."""
  if impl not in _STEPS:
    raise ValueError(f"{what}: impl={impl!r} must be one of {tuple(_STEPS)} (the block step)")
  validate_arguments(q, k, v, scale, True, window, segment_ids, sinks, block_size)
  if not isinstance(layout, SeqLayout):
    raise ValueError(f"{what}: layout must be a sharding.layout.SeqLayout, got {layout!r}")
  b, t, h, _ = q.shape
  layout.check_length(t, what=f"{what}: sequence length")
  specs.check_seq_mesh(mesh, what)
  if layout.shards != specs.seq_degree(mesh):
    raise ValueError(f"{what}: SeqLayout.shards={layout.shards} must equal the mesh's 'seq' size "
                     f"MeshConfig.seq={specs.seq_degree(mesh)}")
  specs.check_divisible(mesh, batch=b, heads=h, kv_heads=k.shape[2], what=what)
  chunk = t // layout.num_chunks
  block_q, block_k = fc.resolve_blocks(block_size, chunk,
                                       "xla_blocks" if impl == "xla" else impl)
  if impl == "pallas":
    interpret, block_q, block_k, _ = fp.fit_blocks(interpret, block_q, block_k, q.shape[-1])
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  window = None if window is None else int(window)
  return ab.Tiles(layout, window, chunk, block_q, block_k, h // k.shape[2], impl, interpret,
                  scale)


def _run_sharded(st: ab.Tiles, mesh, local_fn, q, k, v, segment_ids, sinks, with_lse: bool):
  """jax.shard_map of local_fn(q, k, v, segment_ids, sinks) with the activation specs.

  The Pallas step runs with check_vma=False: JAX's Pallas interpreter cannot evaluate
  scalar-prefetched index maps on varying values. The schedules' collectives are explicit either
  way, and the replicated sinks' cotangent is still summed over the mesh by the transpose.
  """
  hs = specs.heads_spec(mesh)
  out_specs = (hs, jax.P(*hs[:3])) if with_lse else hs
  fn = jax.shard_map(local_fn, mesh=mesh, out_specs=out_specs,
                     in_specs=(hs, hs, hs, specs.tokens_spec(mesh), specs.per_head_spec(mesh)),
                     check_vma=st.impl == "xla")
  return fn(q, k, v, segment_ids, sinks)


def _outputs(st: ab.Tiles, out, lse, dtype, with_lse: bool):
  """Unblocks the finalized (out, lse [chunks, nq, b, hk, rows, 1]) into [b, L, h, d] (and
  [b, L, h] float32 with with_lse)."""
  blk = _step(st)
  out = blk.unblock_queries(st, out.astype(dtype))
  if not with_lse:
    return out
  return out, blk.unblock_queries(st, lse)[..., 0]


def _deltas(st: ab.Tiles, out, cotangent, with_lse: bool):
  """Blocked (dout, delta) of the backward; lse's cotangent folds into delta."""
  blk = _step(st)
  dout, dlse = fc.split_cotangent(cotangent, with_lse)
  delta = fc.out_delta(out, dout, None if dlse is None else dlse[..., None])
  return blk.block_queries(st, dout), blk.block_queries(st, delta)


def ring_attention(q, k, v, *, layout, mesh, scale=None, window=None, segment_ids=None,
                   sinks=None, block_size=None, return_lse: bool = False, impl: str = "xla",
                   interpret=None):
  """Causal (GQA) softmax self-attention by ring attention over the mesh's `seq` axis.

  Args:
    q: queries [b, t, h, d], GLOBAL, length axis in `layout` order.
    k, v: keys and values [b, t, hk, d]; h must be a multiple of hk.
    layout: sharding.layout.SeqLayout; layout.shards must equal the mesh's `seq` size.
    mesh: a mesh with a `seq` axis.
    scale: logit scale; None means d**-0.5.
    window: a query sees itself plus `window` earlier keys; None: unbounded.
    segment_ids: optional int [b, t] (layout order); queries see only keys of their segment.
    sinks: optional float [h] sink logits (join every row's softmax denominator, no value).
    block_size: tile size, an int or (block_q, block_k); None: the block step's entry of
      flash_common.DEFAULT_BLOCKS ("xla_blocks" or "pallas"), shrunk to the chunk length.
    return_lse: also return the rows' logsumexp [b, t, h] float32 (layout order).
    impl: the block step, "xla" (tile loops in JAX) or "pallas" (the flash kernels per chunk
      pair, layers/kernels/attention_blocks_pallas.py).
    interpret: the Pallas step's interpret setting (None: interpret exactly on CPU).
  Returns:
    [b, t, h, d] in q's dtype, in layout order; with return_lse the pair (that, lse).
  """
  st = _prepare("ring_attention", q, k, v, layout=layout, scale=scale, window=window,
                       segment_ids=segment_ids, sinks=sinks, mesh=mesh, block_size=block_size,
                       impl=impl, interpret=interpret)
  with_lse = bool(return_lse)

  def local(q, k, v, seg, sinks):
    return _ring(st, with_lse, q, k, v, seg, ab.local_sinks(st, sinks, q))

  return _run_sharded(st, mesh, local, q, k, v, segment_ids, sinks, with_lse)


def _ring_pairs(st: ab.Tiles, offset: int):
  """Static (query slot, key slot) pairs worth tracing when holding the shard `offset` back."""
  p = st.layout.shards
  return ab.static_pairs(st, lambda r: st.layout.chunk_ids((r - offset) % p))


@functools.lru_cache(maxsize=None)
def ring_chains(st: ab.Tiles) -> tuple[tuple[int, int], ...]:
  """The rotation chains covering every ring offset that holds visible keys for some rank."""
  p = st.layout.shards
  return ring.plan_chains([o for o in range(1, p) if len(_ring_pairs(st, o))], p)


def _chain_pairs(st: ab.Tiles, direction: int, steps: int):
  """The pairs worth tracing at any ring offset of a chain (hidden ones are skipped at run time)."""
  pairs = np.concatenate([_ring_pairs(st, direction * j) for j in range(1, steps + 1)])
  return np.unique(pairs, axis=0)


def _src_ids(st: ab.Tiles, r, offset):
  return st.layout.local_chunk_ids((r - offset) % st.layout.shards)


def _keys(st: ab.Tiles, k, v, seg):
  """The own shard as it travels: (stacked K, V in the block step's layout, key segment ids or
  None)."""
  blk = _step(st)
  return blk.block_kv(st, k, v), blk.block_segments(st, seg, queries=False)


def _ring_forward(st: ab.Tiles, q, k, v, seg, sinks_hg):
  """Returns the finalized blocked (out float32, lse [chunks, nq, b, hk, rows, 1])."""
  blk = _step(st)
  r = lax.axis_index(specs.SEQ_AXIS)
  q_ids = st.layout.local_chunk_ids(r)
  qb, q_seg = blk.block_scaled_queries(st, q), blk.block_segments(st, seg, queries=True)
  keys = _keys(st, k, v, seg)
  # The own pairs read K, V as they are (blk.own_kv): the stacked copy is only sent.
  state = blk.attend_forward(st, blk.init_state(st, qb, sinks_hg), qb, q_seg, q_ids,
                             blk.own_kv(st, k, v), keys[1], q_ids, _ring_pairs(st, 0))
  for direction, steps in ring_chains(st):
    pairs = _chain_pairs(st, direction, steps)

    def attend(state, held, j, direction=direction, pairs=pairs):
      return blk.attend_forward(st, state, qb, q_seg, q_ids, *held,
                                _src_ids(st, r, direction * j), pairs)

    state = ring.rotate(direction, steps, state, keys, attend, shards=st.layout.shards)
  return blk.finalize(state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring(st, with_lse, q, k, v, seg, sinks_hg):
  return _outputs(st, *_ring_forward(st, q, k, v, seg, sinks_hg), q.dtype, with_lse)


def _primal_and_output(st: ab.Tiles, finalized, dtype, with_lse: bool):
  """(the custom_vjp's primal output, the unblocked attention output the backward saves)."""
  res = _outputs(st, *finalized, dtype, with_lse)
  return res, (res[0] if with_lse else res)


def _ring_fwd(st, with_lse, q, k, v, seg, sinks_hg):
  finalized = _ring_forward(st, q, k, v, seg, sinks_hg)
  res, out = _primal_and_output(st, finalized, q.dtype, with_lse)
  return res, (q, k, v, seg, sinks_hg, out, finalized[1])


def _ring_bwd(st, with_lse, res, cotangent):
  """Rotates K, V again; the float32 dK, dV accumulator of the held shard travels with it and
  returns to its owner at the end of each chain, where the rank's own (offset 0) pairs are added
  last (so no separate own dK, dV is alive during the rotation), reading the own K, V as they
  are (blk.own_kv). dq stays local. Only the [b, L, ...] inputs are saved; their blocked copies
  are rebuilt here."""
  blk = _step(st)
  q, k, v, seg, sinks_hg, out, lse = res
  r = lax.axis_index(specs.SEQ_AXIS)
  q_ids = st.layout.local_chunk_ids(r)
  qb = blk.block_scaled_queries(st, q)
  dob, delta = _deltas(st, out, cotangent, with_lse)
  common = (qb, dob, lse, delta, blk.block_segments(st, seg, queries=True), q_ids)
  axes = specs.axes_of(qb)
  dq, dkv = specs.vary(jnp.zeros(qb.shape, jnp.float32), axes), None
  keys = _keys(st, k, v, seg)
  for direction, steps in ring_chains(st):
    pairs = _chain_pairs(st, direction, steps)

    def attend(grads, held, j, direction=direction, pairs=pairs):
      return blk.attend_backward(st, grads, *common, *held, _src_ids(st, r, direction * j), pairs)

    acc = specs.vary(jnp.zeros(keys[0].shape, jnp.float32), axes)
    dq, back = ring.rotate_accumulate(direction, steps, dq, acc, keys, attend,
                                      shards=st.layout.shards)
    dkv = back if dkv is None else dkv + back
  if dkv is None:  # a single rank
    dkv = specs.vary(jnp.zeros(keys[0].shape, jnp.float32), axes)
  dq, dkv = blk.attend_backward(st, (dq, dkv), *common, blk.own_kv(st, k, v), keys[1], q_ids,
                                _ring_pairs(st, 0))
  dsinks = None if sinks_hg is None else blk.sinks_grad(st, sinks_hg, lse, delta)
  dk, dv = blk.unblock_kv(st, dkv)
  return ((blk.unblock_queries(st, dq) * st.scale).astype(q.dtype), dk.astype(k.dtype),
          dv.astype(v.dtype), None, dsinks)


_ring.defvjp(_ring_fwd, _ring_bwd)


def allgather_attention(q, k, v, *, layout, mesh, scale=None, window=None, segment_ids=None,
                        sinks=None, block_size=None, return_lse: bool = False,
                        impl: str = "xla", interpret=None):
  """Causal (GQA) softmax self-attention with all-gathered K, V over the mesh's `seq` axis.

  Arguments and result as in `ring_attention`.
  """
  st = _prepare("allgather_attention", q, k, v, layout=layout, scale=scale, window=window,
                       segment_ids=segment_ids, sinks=sinks, mesh=mesh, block_size=block_size,
                       impl=impl, interpret=interpret)
  with_lse = bool(return_lse)

  def local(q, k, v, seg, sinks):
    # K and V are gathered stacked, in chunk-slot order: the T-sized keys exist once, in the
    # block step's layout, and their gradient is reduce-scattered in that layout.
    kv = _step(st).gather_kv(st, k, v)
    k_seg = None if seg is None else lasp2.all_gather_seq(seg, axis=1)
    return _gathered(st, with_lse, q, kv, seg, k_seg, ab.local_sinks(st, sinks, q))

  return _run_sharded(st, mesh, local, q, k, v, segment_ids, sinks, with_lse)


def _gathered_pairs(st: ab.Tiles):
  return ab.static_pairs(st, lambda r: tuple(st.layout.chunk_table().reshape(-1)))


def _gathered_forward(st: ab.Tiles, q, kv, seg, k_seg, sinks_hg):
  blk = _step(st)
  q_ids = st.layout.local_chunk_ids(lax.axis_index(specs.SEQ_AXIS))
  qb = blk.block_scaled_queries(st, q)
  state = blk.attend_forward(st, blk.init_state(st, qb, sinks_hg), qb,
                             blk.block_segments(st, seg, queries=True), q_ids, kv,
                             blk.block_segments(st, k_seg, queries=False),
                             jnp.asarray(st.layout.chunk_table().reshape(-1)),
                             _gathered_pairs(st))
  return blk.finalize(state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gathered(st, with_lse, q, kv, seg, k_seg, sinks_hg):
  return _outputs(st, *_gathered_forward(st, q, kv, seg, k_seg, sinks_hg), q.dtype, with_lse)


def _gathered_fwd(st, with_lse, q, kv, seg, k_seg, sinks_hg):
  finalized = _gathered_forward(st, q, kv, seg, k_seg, sinks_hg)
  res, out = _primal_and_output(st, finalized, q.dtype, with_lse)
  return res, (q, kv, seg, k_seg, sinks_hg, out, finalized[1])


def _gathered_bwd(st, with_lse, res, cotangent):
  blk = _step(st)
  q, kv, seg, k_seg, sinks_hg, out, lse = res
  q_ids = st.layout.local_chunk_ids(lax.axis_index(specs.SEQ_AXIS))
  qb = blk.block_scaled_queries(st, q)
  dob, delta = _deltas(st, out, cotangent, with_lse)
  axes = specs.axes_of(qb)
  grads = specs.vary((jnp.zeros(qb.shape, jnp.float32), jnp.zeros(kv.shape, jnp.float32)), axes)
  dq, dkv = blk.attend_backward(st, grads, qb, dob, lse, delta,
                                blk.block_segments(st, seg, queries=True), q_ids, kv,
                                blk.block_segments(st, k_seg, queries=False),
                                jnp.asarray(st.layout.chunk_table().reshape(-1)),
                                _gathered_pairs(st))
  dsinks = None if sinks_hg is None else blk.sinks_grad(st, sinks_hg, lse, delta)
  return ((blk.unblock_queries(st, dq) * st.scale).astype(q.dtype), dkv.astype(kv.dtype), None,
          None, dsinks)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)

METHODS = {"ring": ring_attention, "allgather": allgather_attention}


def parallel_softmax_attention(plan: ExecutionPlan | None, q, k, v, *, window=None,
                               segment_ids=None, sinks=None, sink_tokens=None, impl="auto",
                               block_size=None):
  """Causal softmax attention of a layer, sequence-parallel when the plan says so.

  Arrays are in the plan's layout order (the model permutes its inputs once). `sink_tokens` is
  None or a pair (sink keys, sink values) [n, kv_heads, d] of learnable tokens every query sees;
  under sequence parallelism they are merged by logsumexp weights after the parallel op (they
  are parameters, replicated on every rank, so they need no communication).
  """
  method = None if plan is None else plan.softmax_method
  if method is None:
    def op(q, k, v, seg):
      if sink_tokens is not None:
        return sink_token_attention(q, k, v, *sink_tokens, window=window, segment_ids=seg,
                                    sinks=sinks, impl=impl, block_size=block_size)
      return softmax_attention(q, k, v, window=window, segment_ids=seg, sinks=sinks, impl=impl,
                               block_size=block_size)
    return call_in_natural_order(None if plan is None else plan.layout, op, q, k, v, segment_ids,
                                 what="softmax attention")
  chosen = dispatch.resolve_impl("softmax_attention", impl)
  step = chosen
  if chosen == "reference":
    # The oracle is a dense single-device softmax: there is no reference block step.
    log.warning("softmax attention: sequence-parallel %s has no reference block step; "
                "impl='reference' runs the xla block step", method)
    step = "xla"
  log.info("softmax attention: sequence-parallel %s over %d ranks, %s layout, %s block step",
           method, plan.layout.shards, plan.layout.kind, step)
  fn = METHODS[method]
  kwargs = dict(layout=plan.layout, mesh=plan.mesh, window=window, segment_ids=segment_ids,
                sinks=sinks, block_size=block_size, impl=step)
  if sink_tokens is None:
    return fn(q, k, v, **kwargs)
  check_sink_tokens(*sink_tokens, q.shape[2], q.shape[3], k.shape[2])
  out, lse = fn(q, k, v, return_lse=True, **kwargs)
  return merge_sink_tokens(out, lse, q, *sink_tokens, scale=None)
