"""Ring attention: causal softmax self-attention with the sequence split over the `seq` mesh axis.

Algorithm (per rank r of P, inside jax.shard_map). The rank keeps its query shard; the key/value
shards (and the keys' segment ids, when given) travel around the ring with `lax.ppermute`. At ring
step s the rank holds the shard of rank (r - s) mod P; the global positions of those keys follow
from the source rank's chunk ids (`layout.local_chunk_ids`, what `layout.local_positions` is
built from), so positions are never sent. Each step folds the held keys into a float32 online
softmax (m, l, acc) tile by tile (sharding/attention_blocks.py): chunk pairs that the causal
mask hides entirely are skipped by lax.cond, fully visible pairs run without mask arithmetic.
Sinks enter the softmax denominator once, through the initial state.

Memory. The ring steps of a chain run in a lax.scan whose carry holds the current K, V shard
(and, backward, the travelling dK, dV accumulator), so a rank holds O(1) shards (the held one and
the incoming one) plus the O(rows * block_k) tile working set, whatever P; the next step's
ppermute depends only on the held shard, so it can overlap the step's compute. (Unrolled steps
would let XLA issue the whole rotation up front and keep every received shard alive.) The
custom_vjp saves only q, k, v, the output and the logsumexp; the backward rebuilds the blocked
copies.

Layouts. contiguous: rank r holds chunk r; ranks before it hold visible keys, so the work per
rank grows with r. zigzag: rank r holds chunks r and 2P-1-r; at every ring step s >= 1 exactly two
of its four (query chunk, key chunk) pairs are fully visible and the other two hidden, so all
ranks do the same work.

Sliding windows: a token sees itself plus `window` earlier keys, so only nearby chunks matter.
Which ring offsets hold visible keys for some rank is decided statically (from the window, the
chunk length and the layout), and the rotation stops after the largest needed offset
(contiguous: ceil(window / L) steps instead of P - 1). With zigzag the second chunk of rank r
(chunk 2P-1-r) needs the second chunk of rank r+1, i.e. offset -1, so windowed zigzag layers run
two chains: a +1 chain over offsets 1..a and a -1 chain over offsets -1..-b, with a + b minimal
(covering every needed offset; a single +1 chain of P - 1 steps when that is no longer).

Communication per rank (B, T global; Hk kv heads, d head dim; L = T / P):
  forward   one ppermute of ([K; V][, segment ids]) per ring step: P - 1 steps for full causal,
            i.e. 2 (P-1)/P * B Hk T d elements sent (plus (P-1)/P * B T segment ids);
  backward  the same [K; V] rotation again, plus the float32 [dK; dV] accumulator of the held
            shard travels with it (steps 2..n of a chain) and returns to its owner with one final
            ppermute: 2 (P-1)/P * B Hk T d elements of K, V and as many of dK, dV. (XLA merges
            the backward's first [K; V] send with the forward's identical one, so one shard per
            chain is kept from the forward instead of being sent again.)
A windowed layer sends (a + b) / (P - 1) of that.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from layers.kernels import flash_common as fc
from sharding import attention_blocks as ab
from sharding.specs import SEQ_AXIS


def ring_attention(q, k, v, *, layout, scale=None, window=None, segment_ids=None, sinks=None,
                   mesh=None, block_size=None):
  """Causal (GQA) softmax self-attention by ring attention over the mesh's `seq` axis.

  Args:
    q: queries [b, t, h, d], GLOBAL, length axis in `layout` order.
    k, v: keys and values [b, t, hk, d]; h must be a multiple of hk.
    layout: sharding.layout.SeqLayout; layout.shards must equal the mesh's `seq` size.
    scale: logit scale; None means d**-0.5.
    window: a query sees itself plus `window` earlier keys; None: unbounded.
    segment_ids: optional int [b, t] (layout order); queries see only keys of their segment.
    sinks: optional float [h] sink logits (join every row's softmax denominator, no value).
    mesh: the mesh; None uses the one of the surrounding jax.set_mesh.
    block_size: tile size, an int or (block_q, block_k); None: 512, shrunk to the chunk length.
  Returns:
    [b, t, h, d] in q's dtype, in layout order.
  """
  st, mesh, scale = ab.prepare("ring_attention", q, k, v, layout=layout, scale=scale,
                               window=window, segment_ids=segment_ids, sinks=sinks, mesh=mesh,
                               block_size=block_size)

  def local(q, k, v, seg, sinks):
    return _ring(st, scale, q, k, v, seg, ab.local_sinks(st, sinks, q))

  return ab.run_sharded(mesh, local, q, k, v, segment_ids, sinks)


def _pairs(st: ab.Tiles, offset: int):
  """Static (query slot, key slot) pairs worth tracing when holding the shard `offset` back."""
  p = st.layout.shards
  return ab.static_pairs(st, lambda r: st.layout.chunk_ids((r - offset) % p))


@functools.lru_cache(maxsize=None)
def ring_chains(st: ab.Tiles) -> tuple[tuple[int, int], ...]:
  """((direction, steps), ...): the +1 / -1 rotation chains covering every needed ring offset."""
  p = st.layout.shards
  need = [o for o in range(1, p) if len(_pairs(st, o))]
  best = (p - 1, 0) if need else (0, 0)
  for a in range(p - 1, -1, -1):
    rest = [o for o in need if o > a]
    b = p - min(rest) if rest else 0
    if a + b < sum(best):
      best = (a, b)
  return tuple((d, n) for d, n in zip((1, -1), best) if n)


def _shift(tree, distance: int, p: int):
  """Sends every leaf `distance` ranks along the ring."""
  perm = [(i, (i + distance) % p) for i in range(p)]
  return jax.tree.map(lambda x: lax.ppermute(x, SEQ_AXIS, perm), tree)


def _chain_pairs(st: ab.Tiles, direction: int, steps: int) -> np.ndarray:
  """The pairs worth tracing at any ring offset of a chain (hidden ones are skipped at run time)."""
  pairs = np.concatenate([_pairs(st, direction * j) for j in range(1, steps + 1)])
  return np.unique(pairs, axis=0)


def _src_ids(st: ab.Tiles, r, offset):
  return st.layout.local_chunk_ids((r - offset) % st.layout.shards)


def _run_chain(st: ab.Tiles, direction: int, steps: int, carry, held, attend, send_carry):
  """Runs one rotation chain: at step j = 1..steps the rank holds the shard sent `j` ranks along
  the ring and calls carry = attend(carry, held, j). The steps run in a lax.scan with the held
  shard in the loop carry, so only the held and the incoming shard are alive; the next shard's
  ppermute depends only on the held one, so it can overlap the step's compute. With send_carry,
  carry = (rest, acc) and `acc` travels too, after each step but the last."""
  p = st.layout.shards

  def step(c, j):
    carry, held = c
    incoming = _shift(held, direction, p)
    carry = attend(carry, held, j)
    if send_carry:
      carry = (carry[0], _shift(carry[1], direction, p))
    return (carry, incoming), None

  c = (carry, _shift(held, direction, p))
  (carry, held), _ = lax.scan(step, c, jnp.arange(1, steps, dtype=jnp.int32))
  return attend(carry, held, steps)


def _keys(st: ab.Tiles, k, v, seg):
  """The own shard as it travels: (stacked K, V [chunks, 2, ...], key segment ids or None)."""
  return ab.block_kv(st, k, v), ab.block_segments(st, seg, queries=False)


def _forward(st: ab.Tiles, scale, q, k, v, seg, sinks_hg):
  """Returns (out [b, L, h, d] in q's dtype, lse [chunks, nq, b, hk, rows, 1])."""
  r = lax.axis_index(SEQ_AXIS)
  q_ids = st.layout.local_chunk_ids(r)
  qb, q_seg = ab.block_scaled_queries(st, q, scale), ab.block_segments(st, seg, queries=True)
  keys = _keys(st, k, v, seg)
  state = ab.attend_forward(st, ab.init_state(st, qb, sinks_hg), qb, q_seg, q_ids, *keys, q_ids,
                            _pairs(st, 0))
  for direction, steps in ring_chains(st):
    pairs = _chain_pairs(st, direction, steps)

    def attend(state, held, j, direction=direction, pairs=pairs):
      return ab.attend_forward(st, state, qb, q_seg, q_ids, *held,
                               _src_ids(st, r, direction * j), pairs)

    state = _run_chain(st, direction, steps, state, keys, attend, False)
  out, lse = fc.finalize(state)
  return ab.unblock_queries(st, out.astype(q.dtype)), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring(st, scale, q, k, v, seg, sinks_hg):
  return _forward(st, scale, q, k, v, seg, sinks_hg)[0]


def _ring_fwd(st, scale, q, k, v, seg, sinks_hg):
  out, lse = _forward(st, scale, q, k, v, seg, sinks_hg)
  return out, (q, k, v, seg, sinks_hg, out, lse)


def _ring_bwd(st, scale, res, dout):
  """Rotates K, V again; the float32 dK, dV accumulator of the held shard travels with it and
  returns to its owner at the end of each chain, where the rank's own (offset 0) pairs are added
  last (so no separate own dK, dV is alive during the rotation). dq stays local. Only the
  [b, L, ...] inputs are saved; their blocked copies are rebuilt here."""
  q, k, v, seg, sinks_hg, out, lse = res
  r = lax.axis_index(SEQ_AXIS)
  q_ids = st.layout.local_chunk_ids(r)
  qb, dob = ab.block_scaled_queries(st, q, scale), ab.block_queries(st, dout)
  delta = ab.block_queries(st, fc.out_delta(out, dout))
  common = (qb, dob, lse, delta, ab.block_segments(st, seg, queries=True), q_ids)
  axes = ab.axes_of(qb)
  dq, dkv = ab.vary(jnp.zeros(qb.shape, jnp.float32), axes), None
  keys = _keys(st, k, v, seg)
  for direction, steps in ring_chains(st):
    pairs = _chain_pairs(st, direction, steps)

    def attend(grads, held, j, direction=direction, pairs=pairs):
      return ab.attend_backward(st, grads, *common, *held, _src_ids(st, r, direction * j), pairs)

    acc = ab.vary(jnp.zeros(keys[0].shape, jnp.float32), axes)
    dq, acc = _run_chain(st, direction, steps, (dq, acc), keys, attend, True)
    back = _shift(acc, -direction * steps, st.layout.shards)
    dkv = back if dkv is None else dkv + back
  if dkv is None:  # a single rank
    dkv = ab.vary(jnp.zeros(keys[0].shape, jnp.float32), axes)
  dq, dkv = ab.attend_backward(st, (dq, dkv), *common, *keys, q_ids, _pairs(st, 0))
  dsinks = None if sinks_hg is None else ab.sinks_grad(st, sinks_hg, lse, delta)
  dk, dv = ab.unblock_kv(st, dkv)
  return ((ab.unblock_queries(st, dq) * scale).astype(q.dtype), dk.astype(k.dtype),
          dv.astype(v.dtype), None, dsinks)


_ring.defvjp(_ring_fwd, _ring_bwd)
