"""Softmax attention as one public op with three implementations, plus cached decoding.

`softmax_attention(q, k, v, ...)` validates its arguments and runs one of
  - "reference": dense masked softmax in float32 (layers/kernels/attention_reference.py),
  - "xla": blockwise flash attention in pure JAX (layers/kernels/flash_xla.py),
  - "pallas": Pallas flash kernels (layers/kernels/flash_pallas.py),
chosen by `layers.kernels.dispatch.resolve_impl` ("auto": xla on CPU, pallas elsewhere). All three
are differentiable in q, k, v and the sinks.

Layout is [batch, time, heads, head_dim] for queries and [batch, time, kv_heads, head_dim] for
keys and values (GQA: heads is a multiple of kv_heads). Masking, in token indices of the row:
query t sees key s iff (not causal or s <= t) and (no window or t - s <= window) and
segment_ids[t] == segment_ids[s]. Sinks are per-head logits that join every row's softmax
denominator without a value (gpt-oss), so a row may put weight on "nothing".

`return_lse=True` (here and in `cached_attention`) also returns each row's logsumexp, which is
differentiable: it lets another attention part be merged in exactly afterwards (e.g. the sink
tokens of layers/sink_tokens.py).

Decoding keeps a KVCache. A full-attention layer's cache has one slot per position up to the
maximum length; a sliding-window layer's cache is a ring buffer of `window` slots (token i lives
in slot i % window), so its memory is O(window) however long the generation runs. Each slot also
carries a padding flag: padding tokens (the left padding of a ragged batch) are written like any
other token, so that every row's cache index stays the same, but no token ever attends to them.
"""

import numbers
from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from layers.kernels import dispatch
from layers.kernels.attention_reference import dot_product_attention, softmax_attention_reference
from layers.kernels.flash_pallas import flash_attention_pallas
from layers.kernels.flash_xla import flash_attention_xla
from layers.masks import attention_mask

FAMILY = "softmax_attention"


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _positive_int(x) -> bool:
  return _is_int(x) and x > 0


def _check_block_size(block_size):
  ok = (block_size is None or _positive_int(block_size)
        or (isinstance(block_size, (tuple, list)) and len(block_size) == 2
            and all(_positive_int(s) for s in block_size)))
  if not ok:
    raise ValueError(f"{FAMILY}: block_size={block_size!r} must be None, a positive int or a pair "
                     "(block_q, block_k) of positive ints")


def validate_arguments(q, k, v, scale, causal, window, segment_ids, sinks, block_size):
  """The op's argument checks (ValueErrors naming the argument); shared with sharding/."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{FAMILY}: {name} must be 4-D [batch, time, heads, head_dim], got shape "
                       f"{tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{FAMILY}: {name} must be floating point, got {x.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"{FAMILY}: k shape {tuple(k.shape)} and v shape {tuple(v.shape)} differ")
  b, t, h, d = q.shape
  if t == 0:
    # The flash paths cut time into blocks; an empty sequence is a caller's mistake anyway.
    raise ValueError(f"{FAMILY}: q, k, v must hold at least one token, got time=0 (q shape "
                     f"{tuple(q.shape)})")
  if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
    raise ValueError(f"{FAMILY}: q shape {tuple(q.shape)} and k shape {tuple(k.shape)} must "
                     "agree in batch, time and head_dim (self-attention)")
  hk = k.shape[2]
  if h % hk:
    raise ValueError(f"{FAMILY}: q heads={h} must be a multiple of k/v heads={hk} (GQA)")
  if scale is not None and not (isinstance(scale, numbers.Real) and scale > 0):
    raise ValueError(f"{FAMILY}: scale={scale!r} must be None (head_dim**-0.5) or a positive "
                     "number")
  if window is not None:
    if not _is_int(window) or window < 0:
      raise ValueError(f"{FAMILY}: window={window!r} must be None or an int >= 0")
    if not causal:
      raise ValueError(f"{FAMILY}: window={window} requires causal=True")
  if segment_ids is not None:
    if tuple(segment_ids.shape) != (b, t) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"{FAMILY}: segment_ids must be an integer array of shape {(b, t)}, got "
                       f"{segment_ids.dtype}{tuple(segment_ids.shape)}")
  if sinks is not None:
    if tuple(sinks.shape) != (h,) or not jnp.issubdtype(sinks.dtype, jnp.floating):
      raise ValueError(f"{FAMILY}: sinks must be a float array of shape ({h},) (one logit per "
                       f"query head), got {sinks.dtype}{tuple(sinks.shape)}")
  _check_block_size(block_size)


def softmax_attention(q, k, v, *, scale: float | None = None, causal: bool = True,
                      window: int | None = None, segment_ids=None, sinks=None,
                      impl: str = "auto", block_size=None, interpret=None,
                      return_lse: bool = False):
  """Masked (GQA) softmax self-attention.

  Args:
    q: queries [b, t, h, d].
    k, v: keys and values [b, t, hk, d]; h must be a multiple of hk.
    scale: logit scale; None means d**-0.5.
    causal: a query sees only keys at or before it.
    window: a query sees itself plus `window` earlier keys (requires causal); None: unbounded.
    segment_ids: optional int [b, t]; queries see only keys of their own segment (document).
    sinks: optional float [h] learnable sink logits (an extra softmax entry with no value).
    impl: "auto", "reference", "xla" or "pallas" (see layers.kernels.dispatch).
    block_size: flash block size, an int or (block_q, block_k); None picks the implementation's
      default. Sequences not divisible by it are padded internally. Ignored by "reference".
    interpret: Pallas only: None (interpret where Pallas cannot compile, i.e. CPU), a bool, or
      `jax.experimental.pallas.tpu.InterpretParams()`.
    return_lse: also return the logsumexp over each row's visible scaled logits (and its sink
      logit when `sinks` is given), differentiably.
  Returns:
    [b, t, h, d] in q's dtype; with return_lse the pair (that, lse [b, t, h] float32).
  """
  validate_arguments(q, k, v, scale, causal, window, segment_ids, sinks, block_size)
  chosen = dispatch.resolve_impl(FAMILY, impl)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  window = None if window is None else int(window)
  if not (block_size is None or _is_int(block_size)):
    block_size = tuple(int(s) for s in block_size)
  elif block_size is not None:
    block_size = int(block_size)
  kwargs = dict(scale=scale, causal=causal, window=window, segment_ids=segment_ids, sinks=sinks,
                return_lse=bool(return_lse))
  if chosen == "reference":
    return softmax_attention_reference(q, k, v, **kwargs)
  if chosen == "xla":
    return flash_attention_xla(q, k, v, block_size=block_size, **kwargs)
  return flash_attention_pallas(q, k, v, block_size=block_size, interpret=interpret, **kwargs)


class KVCache(NamedTuple):
  """Decode cache of one attention layer.

  Attributes:
    key, value: [b, slots, kv_heads, d]. Full attention: slot i holds token i. Sliding window:
      a ring buffer, token i in slot i % slots.
    index: int32 scalar, the number of tokens written so far (the next token's index).
    pad: [b, slots] bool, True where the slot holds a padding token, which no query sees; None
      for a cache that tracks no padding.
  """

  key: jnp.ndarray
  value: jnp.ndarray
  index: jnp.ndarray
  pad: jnp.ndarray | None = None


def cache_slots(max_len: int, window: int | None) -> int:
  """Slots a layer needs to decode up to `max_len` tokens: max_len, or the window for a ring.

  A token sees itself (not yet in the cache) plus `window` earlier ones, so `window` slots hold
  everything a sliding-window layer can still look at.
  """
  if max_len < 1:
    raise ValueError(f"{FAMILY}: max_len={max_len} must be >= 1")
  if window is None:
    return max_len
  return max(1, min(window, max_len))


def init_kv_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int, *,
                  window: int | None = None, dtype=jnp.float32) -> KVCache:
  """Empty cache for decoding up to `max_len` tokens (O(window) slots with a window)."""
  slots = cache_slots(max_len, window)
  zeros = jnp.zeros((batch, slots, num_kv_heads, head_dim), dtype)
  return KVCache(zeros, zeros, jnp.zeros((), jnp.int32), jnp.zeros((batch, slots), bool))


def cached_attention(cache: KVCache, q, k, v, *, window: int | None = None,
                     scale: float | None = None, sinks=None, return_lse: bool = False,
                     pad=None):
  """Causal attention of new tokens over the cache and themselves; returns (out, new cache).

  The new tokens have indices cache.index, cache.index + 1, ... Any number of new tokens works
  (one per decode step, or a whole prompt), also more than the ring holds. Memory is
  O(t * slots) (dense logits): prefill a long prompt in chunks. A full-length cache must have
  room for the new tokens (writes past its end are clamped, as by lax.dynamic_update_slice).
  Padding tokens (`pad`) are cached but masked out for every query, theirs included: a query
  that sees only padding gets zeros (or, with sinks, the sinks alone).

  Args:
    cache: from `init_kv_cache` (a ring buffer iff `window` is set; use the same window).
    q: [b, t, h, d] new queries; k, v: [b, t, hk, d] their keys and values.
    window, scale, sinks, return_lse: as in `softmax_attention`.
    pad: optional bool [b, t], True for the new tokens that are padding; needs a cache with pad
      flags (`init_kv_cache` makes them).
  Returns:
    ([b, t, h, d] in q's dtype, the updated cache); with return_lse the first element is the
    pair (out, lse [b, t, h] float32).
  """
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2]:
    raise ValueError(f"{FAMILY}: cached_attention needs q [b, t, h, d] and k, v [b, t, hk, d], "
                     f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
  if cache.key.shape[0] != k.shape[0] or cache.key.shape[2:] != k.shape[2:]:
    raise ValueError(f"{FAMILY}: cache key shape {tuple(cache.key.shape)} does not fit new keys "
                     f"{tuple(k.shape)} (batch, kv_heads, head_dim must match)")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{FAMILY}: q heads={q.shape[2]} must be a multiple of k/v heads="
                     f"{k.shape[2]} (GQA)")
  if pad is not None:
    if tuple(pad.shape) != tuple(k.shape[:2]) or pad.dtype != jnp.bool_:
      raise ValueError(f"{FAMILY}: cached_attention's pad must be a bool array of shape "
                       f"{tuple(k.shape[:2])} (batch, new tokens), got {pad.dtype}"
                       f"{tuple(pad.shape)}")
    if cache.pad is None:
      raise ValueError(f"{FAMILY}: cached_attention got pad flags but the cache tracks no "
                       "padding (KVCache.pad is None); make the cache with init_kv_cache")
  elif cache.pad is not None:
    pad = jnp.zeros(k.shape[:2], bool)
  return_lse = bool(return_lse)
  if window is None:
    return _full_step(cache, q, k, v, pad, scale, sinks, return_lse)
  return _ring_step(cache, q, k, v, pad, window, scale, sinks, return_lse)


def _full_step(cache, q, k, v, pad, scale, sinks, return_lse):
  """Writes the new tokens at their indices, then attends over the whole cache."""
  b, t = k.shape[:2]
  start = cache.index
  key = _write_at(cache.key, k, start)
  value = _write_at(cache.value, v, start)
  s = key.shape[1]
  q_index = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
  k_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  k_valid = k_index < start + t
  slot_pad = None
  if pad is not None:
    slot_pad = _write_at(cache.pad, pad, start)
    k_valid &= ~slot_pad
  mask = attention_mask(q_index, k_index, k_valid_bs=k_valid)
  out = dot_product_attention(q, key, value, mask, scale, sinks, return_lse)
  return out, KVCache(key, value, start + t, slot_pad)


def _write_at(buf, x, start):
  """Writes x [b, t, ...] into buf [b, slots, ...] at slot `start` along the second axis."""
  return lax.dynamic_update_slice(buf, x.astype(buf.dtype), (0, start) + (0,) * (buf.ndim - 2))


def _ring_step(cache, q, k, v, pad, window, scale, sinks, return_lse):
  """Attends over [ring slots, new tokens] by their token indices, then updates the ring.

  Reading before writing keeps the oldest slots available to the first new tokens even when
  the new tokens will overwrite them.
  """
  b, t = k.shape[:2]
  slots = cache.key.shape[1]
  start = cache.index
  slot = jnp.arange(slots, dtype=jnp.int32)
  # Index of the latest token written to each slot; negative for slots never written.
  slot_index = start - 1 - jnp.mod(start - 1 - slot, slots)
  new_index = start + jnp.arange(t, dtype=jnp.int32)
  k_index = jnp.broadcast_to(jnp.concatenate([slot_index, new_index]), (b, slots + t))
  q_index = jnp.broadcast_to(new_index, (b, t))
  k_valid = k_index >= 0
  if pad is not None:
    k_valid &= ~jnp.concatenate([cache.pad, pad], axis=1)
  mask = attention_mask(q_index, k_index, window=window, k_valid_bs=k_valid)
  keys = jnp.concatenate([cache.key, k.astype(cache.key.dtype)], axis=1)
  values = jnp.concatenate([cache.value, v.astype(cache.value.dtype)], axis=1)
  out = dot_product_attention(q, keys, values, mask, scale, sinks, return_lse)
  # Only the last `slots` new tokens survive in the ring; their slots are distinct.
  n = min(t, slots)
  dest = jnp.mod(start + t - n + jnp.arange(n, dtype=jnp.int32), slots)
  key = cache.key.at[:, dest].set(k[:, t - n:].astype(cache.key.dtype))
  value = cache.value.at[:, dest].set(v[:, t - n:].astype(cache.value.dtype))
  slot_pad = None if pad is None else cache.pad.at[:, dest].set(pad[:, t - n:])
  return out, KVCache(key, value, start + t, slot_pad)
