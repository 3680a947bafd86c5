"""Per-block math of flash attention, shared by the pure-JAX (flash_xla) and Pallas kernels.

Every function here works on one tile: queries [..., rows, d] against keys [..., cols, d], with
any leading batch dimensions (the XLA path tiles [b, kv_heads, group * block_q, d]; the Pallas
kernels tile [block_q, d]). Logits, the running max `m`, the running denominator `l` and the
output accumulator are float32 whatever the input dtype.

Sinks (gpt-oss style) are one extra logit per head with no value: they enter only the softmax
denominator. Starting the online softmax from m = sink, l = 1 (exp(sink - m)) instead of
m = -inf, l = 0 folds them in at no cost per block, and the saved logsumexp includes them, so the
backward formulas are unchanged; only the sink's own gradient is extra (`sink_grad`).
"""

import jax.numpy as jnp
from jax import lax

# A finite "minus infinity": exp(NEG_INF - m) underflows to 0 while NEG_INF - NEG_INF stays 0
# (not NaN) for rows that have seen no visible key yet.
NEG_INF = -1e30


def dot_nt(a, b):
  """a [..., m, k] @ b[..., n, k]^T -> [..., m, n] in float32 (leading dims are batch dims)."""
  batch = tuple(range(a.ndim - 2))
  return lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 1,)), (batch, batch)),
                         preferred_element_type=jnp.float32)


def dot_nn(a, b):
  """a [..., m, k] @ b [..., k, n] -> [..., m, n] in float32."""
  batch = tuple(range(a.ndim - 2))
  return lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 2,)), (batch, batch)),
                         preferred_element_type=jnp.float32)


def dot_tn(a, b):
  """a [..., k, m]^T @ b [..., k, n] -> [..., m, n] in float32."""
  batch = tuple(range(a.ndim - 2))
  return lax.dot_general(a, b, (((a.ndim - 2,), (b.ndim - 2,)), (batch, batch)),
                         preferred_element_type=jnp.float32)


def _scaled(x, scale: float):
  # Callers that fold the scale into q pass 1.0; skip the per-tile multiply then.
  return x if scale == 1.0 else x * scale


def block_mask(q_pos, k_pos, *, causal: bool, window: int | None, kv_len: int | None = None,
               q_seg=None, k_seg=None, edge: bool = True):
  """Boolean visibility of a tile, or None when every pair is visible.

  Args:
    q_pos: int positions of the tile's query rows, shaped to broadcast as a column ([rows, 1]).
    k_pos: int positions of the tile's keys, shaped as a row ([1, cols]).
    causal: keys after the query are hidden.
    window: a query sees itself plus `window` earlier keys (None: unbounded).
    kv_len: keys at positions >= kv_len are padding (None: no padding).
    q_seg, k_seg: segment ids broadcastable like q_pos / k_pos, or None.
    edge: False for tiles known to be fully visible (then only segments are masked).
  """
  mask = None
  if not edge:
    causal, window, kv_len = False, None, None

  def both(a, b):
    return b if a is None else a & b

  if causal:
    mask = both(mask, k_pos <= q_pos)
  if window is not None:
    mask = both(mask, q_pos - k_pos <= window)
  if kv_len is not None:
    mask = both(mask, k_pos < kv_len)
  if q_seg is not None:
    mask = both(mask, q_seg == k_seg)
  return mask


def init_state(rows_shape, d: int, sinks=None):
  """Online-softmax state (m, l, acc) for `rows_shape` query rows; sinks broadcast to rows."""
  if sinks is None:
    m = jnp.full(rows_shape + (1,), NEG_INF, jnp.float32)
    l = jnp.zeros(rows_shape + (1,), jnp.float32)
  else:
    m = jnp.broadcast_to(sinks.astype(jnp.float32), rows_shape + (1,))
    l = jnp.ones(rows_shape + (1,), jnp.float32)
  return m, l, jnp.zeros(rows_shape + (d,), jnp.float32)


def online_update(state, q, k, v, mask, scale: float):
  """Folds one key tile into the running (m, l, acc) of the query tile `q`."""
  m, l, acc = state
  s = _scaled(dot_nt(q, k), scale)
  if mask is not None:
    s = jnp.where(mask, s, NEG_INF)
  m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
  p = jnp.exp(s - m_new)
  if mask is not None:
    # A row with nothing visible so far has m_new == NEG_INF, where exp(s - m_new) is 1, not 0.
    p = jnp.where(mask, p, 0.0)
  alpha = jnp.exp(m - m_new)
  l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
  acc = alpha * acc + dot_nn(p.astype(v.dtype), v)
  return m_new, l, acc


def finalize(state):
  """Returns (out float32 [..., rows, d], lse [..., rows, 1]).

  A row that saw no key (and has no sink) gives out 0 and lse = -inf: the logsumexp of an empty
  set, so that merging it with other parts by logsumexp weights gives it exactly zero weight.
  """
  m, l, acc = state
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  out = acc / safe_l
  lse = jnp.where(empty, -jnp.inf, m + jnp.log(safe_l))
  return out, lse


def backward_block(q, k, v, do, lse, delta, mask, scale: float):
  """Recomputes one tile's probabilities; returns (p, ds) with ds = dL/dlogits (unscaled).

  Args:
    q, do: [..., rows, d] queries and output cotangents of the tile.
    k, v: [..., cols, d].
    lse, delta: [..., rows, 1] saved logsumexp and rowsum(do * out).
    mask: boolean tile mask or None.
  The contributions are dq += scale * ds @ k, dk += scale * ds^T @ q, dv += p^T @ do.
  """
  s = _scaled(dot_nt(q, k), scale)
  # An empty row (lse = -inf) has no probability anywhere: exp(s - inf) = 0, never inf * 0.
  p = jnp.exp(s - jnp.where(lse == -jnp.inf, jnp.inf, lse))
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = dot_nt(do, v)
  ds = p * (dp - delta)
  return p, ds


def dq_part(ds, k, scale: float):
  """scale * ds @ k for one tile, float32."""
  return _scaled(dot_nn(ds.astype(k.dtype), k), scale)


def dk_part(ds, q, scale: float):
  """scale * ds^T @ q for one tile, float32."""
  return _scaled(dot_tn(ds.astype(q.dtype), q), scale)


def dv_part(p, do):
  """p^T @ do for one tile, float32."""
  return dot_tn(p.astype(do.dtype), do)


def merge_partials(out_a, lse_a, out_b, lse_b):
  """Softmax attention over the union of two disjoint key sets, from each part's normalized
  output and row logsumexp ([..., 1] or broadcastable): (out float32, lse).

  A part with lse = -inf (it saw no key) gets exactly zero weight; if neither saw a key the
  result is out 0, lse -inf.
  """
  lse = jnp.logaddexp(lse_a, lse_b)
  ref = jnp.where(lse == -jnp.inf, 0.0, lse)
  out = (jnp.exp(lse_a - ref) * out_a.astype(jnp.float32)
         + jnp.exp(lse_b - ref) * out_b.astype(jnp.float32))
  return out, lse


def out_delta(out, dout, dlse=None):
  """The softmax-backward correction term rowsum(dout * out) - dlse in float32, as [..., 1].

  dlse is the cotangent of the row logsumexp when the op also outputs it: d lse_i / d s_ij =
  p_ij, so it folds into this term and the tile math is unchanged.
  """
  delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1, keepdims=True)
  return delta if dlse is None else delta - dlse


def with_optional_lse(out, lse, with_lse: bool):
  """The primal output of a flash custom_vjp: (out, lse) when it also returns lse, else out."""
  return (out, lse) if with_lse else out


def split_cotangent(cotangent, with_lse: bool):
  """(dout, dlse) from the cotangent of `with_optional_lse`'s output (dlse None without lse)."""
  return cotangent if with_lse else (cotangent, None)


def sink_grad(sinks_rows, lse, delta):
  """Per-row gradient of the sink logit: -p_sink * delta with p_sink = exp(sink - lse).

  The caller sums the result over the rows that share a head.
  """
  return -jnp.exp(sinks_rows.astype(jnp.float32) - lse) * delta


def _clip(x, lo, hi):
  return jnp.minimum(jnp.maximum(x, lo), hi)


def key_block_range(q_start, q_stop, block_k: int, num_k_blocks: int, *, causal: bool,
                    window: int | None, kv_len: int | None = None):
  """Key blocks for the queries at positions [q_start, q_stop) (traced ints allowed).

  Returns (lo, full_lo, full_hi, hi): blocks in [lo, hi) hold visible keys; those in
  [full_lo, full_hi) are visible to every query of the range (no causal/window/padding mask
  needed), the rest are edge blocks that need the mask.
  """
  lo, hi = 0, num_k_blocks
  full_lo, full_hi = 0, num_k_blocks
  if causal:
    hi = jnp.minimum(hi, (q_stop - 1) // block_k + 1)
    # Fully visible: the block's last key is at or before the range's first query.
    full_hi = jnp.minimum(full_hi, (q_start + 1) // block_k)
  if window is not None:
    lo = jnp.maximum(0, (q_start - window) // block_k)
    # Fully visible: the block's first key is within `window` of the range's last query.
    full_lo = jnp.maximum(full_lo, -(-(q_stop - 1 - window) // block_k))
  if kv_len is not None:
    full_hi = jnp.minimum(full_hi, kv_len // block_k)
  full_lo = _clip(full_lo, lo, hi)
  full_hi = _clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def query_block_range(k_start, k_stop, block_q: int, num_q_blocks: int, *, causal: bool,
                      window: int | None, kv_len: int | None = None):
  """Query blocks that see keys at positions [k_start, k_stop); (lo, full_lo, full_hi, hi)
  as in `key_block_range`."""
  lo, hi = 0, num_q_blocks
  full_lo, full_hi = 0, num_q_blocks
  if causal:
    lo = jnp.maximum(0, k_start // block_q)
    full_lo = jnp.maximum(full_lo, -(-(k_stop - 1) // block_q))
  if window is not None:
    hi = jnp.minimum(hi, (k_stop - 1 + window) // block_q + 1)
    full_hi = jnp.minimum(full_hi, (k_start + window + 1) // block_q)
  if kv_len is not None:
    full_hi = jnp.where(k_stop <= kv_len, full_hi, full_lo)
  full_lo = _clip(full_lo, lo, hi)
  full_hi = _clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def blocks_loop(bounds, body, state):
  """Runs body(j, state, edge) over the blocks of `bounds` = (lo, full_lo, full_hi, hi).

  `edge` is a static bool: True for the blocks that need the causal/window/padding mask. Splitting
  the range keeps the mask arithmetic off the (majority of) fully visible blocks.
  """
  lo, full_lo, full_hi, hi = bounds
  state = lax.fori_loop(lo, full_lo, lambda j, s: body(j, s, True), state)
  state = lax.fori_loop(full_lo, full_hi, lambda j, s: body(j, s, False), state)
  return lax.fori_loop(full_hi, hi, lambda j, s: body(j, s, True), state)


def pad_axis(x, axis: int, size: int, value=0):
  """Pads `x` along `axis` at the end up to `size` (no-op when already that long)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


# Default flash block size (block_q = block_k) of each tiling: the one table. "xla" is the pure-JAX
# tile loop of single-device flash (flash_xla): on CPU, 512-token tiles amortize XLA's
# per-iteration overhead. "xla_blocks" is the same tile loop as the sequence-parallel block step
# (attention_blocks) runs it on a rank's 1/P of the sequence: there the tiles' float32 logits are
# a large share of a rank's memory, and 128-token tiles measured both smaller and faster than 512
# (ring attention, P = 8 fake CPU devices, T = 4K and 16K: forward+backward 30% and 23% faster,
# per-device memory 0.15 instead of 0.21 of one device at 16K). "pallas" is one kernel program's
# tile (flash_pallas): 128 fits Triton's shared memory at head_dim 128 and is the lane width of
# TPU tiles. A block_size argument overrides the table.
DEFAULT_BLOCKS = {"xla": 512, "xla_blocks": 128, "pallas": 128}


def resolve_blocks(block_size, t: int, tiling: str, multiple: int = 8) -> tuple[int, int]:
  """(block_q, block_k) from an int, a pair or None (the tiling's DEFAULT_BLOCKS entry), shrunk
  for short sequences."""
  if block_size is None:
    block_size = DEFAULT_BLOCKS[tiling]
  bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
  cap = round_up(t, multiple)
  return min(bq, cap), min(bk, cap)

