"""Learnable sink tokens: a few keys and values per layer that every query attends to.

A layer's n_s sink tokens are keys sink_k [n_s, kv_heads, d] and values sink_v [n_s, kv_heads, d]
that join every query row's softmax regardless of the causal mask, the sliding window and the
segment ids. Unlike the per-head `sinks` logits of layers/softmax_attention.py they carry values.

Rather than teaching every kernel about them, the sequence part runs through
`softmax_attention(..., return_lse=True)` and the sink part, dense because n_s is small, is merged
in exactly by logsumexp weights:

  lse_s = logsumexp_j(scale * q . sink_k_j),  o_s = softmax_j(scale * q . sink_k_j) @ sink_v,
  lse = logaddexp(lse_seq, lse_s),  o = exp(lse_seq - lse) * o_seq + exp(lse_s - lse) * o_s.

Gradients come from autodiff through o_seq and lse_seq (the flash kernels accept lse's
cotangent). GQA follows lctx's convention (`jnp.repeat` over kv heads): query head i uses kv
head i // (heads // kv_heads).
"""

import numbers

import jax
import jax.numpy as jnp

from layers.kernels import flash_common as fc
from layers.kernels.attention_reference import dot_product_attention, self_attention_mask
from layers.softmax_attention import (FAMILY, KVCache, cached_attention, softmax_attention,
                                      validate_arguments)


def _check_scale(scale):
  if scale is not None and not (isinstance(scale, numbers.Real) and scale > 0):
    raise ValueError(f"{FAMILY}: scale={scale!r} must be None (head_dim**-0.5) or a positive "
                     "number")


def check_sink_tokens(sink_k, sink_v, heads: int, head_dim: int, kv_heads: int | None = None):
  """Shape and dtype checks of sink tokens (ValueErrors naming sink_k / sink_v).

  Args:
    sink_k, sink_v: the sink keys and values, expected [n_s, kv_heads, head_dim] with n_s >= 1.
    heads: query heads; the sink kv heads must divide it (GQA).
    head_dim: the queries' head_dim.
    kv_heads: the sequence keys' heads when known; the sink tokens must have as many.
  """
  for name, x in (("sink_k", sink_k), ("sink_v", sink_v)):
    if x.ndim != 3:
      raise ValueError(f"{FAMILY}: {name} must be 3-D [num_sink_tokens, kv_heads, head_dim], got "
                       f"shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{FAMILY}: {name} must be floating point, got {x.dtype}")
  if sink_v.shape != sink_k.shape:
    raise ValueError(f"{FAMILY}: sink_v shape {tuple(sink_v.shape)} must equal sink_k shape "
                     f"{tuple(sink_k.shape)}")
  n, hk, d = sink_k.shape
  if n == 0:
    raise ValueError(f"{FAMILY}: sink_k must hold at least one sink token, got shape "
                     f"{tuple(sink_k.shape)} (without sink tokens call softmax_attention)")
  if d != head_dim:
    raise ValueError(f"{FAMILY}: sink_k head_dim={d} must equal the queries' head_dim={head_dim}")
  if kv_heads is not None and hk != kv_heads:
    raise ValueError(f"{FAMILY}: sink_k has {hk} kv heads but k has {kv_heads}")
  if hk == 0 or heads % hk:
    raise ValueError(f"{FAMILY}: q heads={heads} must be a multiple of sink_k kv heads={hk} (GQA)")


def merge_sink_tokens(out, lse, q, sink_k, sink_v, *, scale: float | None):
  """Merges the sink tokens' attention into a sequence attention result, exactly.

  Args:
    out: [b, t, h, d] attention output over the sequence (softmax_attention's first output).
    lse: [b, t, h] its per-row logsumexp (softmax_attention(..., return_lse=True)'s second).
    q: the queries [b, t, h, d] that produced them.
    sink_k, sink_v: [n_s, kv_heads, d] sink keys and values; h must be a multiple of kv_heads.
    scale: the logit scale used for `out` (None: d**-0.5, as softmax_attention's default).
  Returns:
    [b, t, h, d] in out's dtype: attention over the sink tokens and the sequence together.
  """
  if q.ndim != 4:
    raise ValueError(f"{FAMILY}: q must be 4-D [batch, time, heads, head_dim], got shape "
                     f"{tuple(q.shape)}")
  b, t, h, d = q.shape
  if tuple(out.shape) != (b, t, h, d):
    raise ValueError(f"{FAMILY}: out shape {tuple(out.shape)} must equal q shape {(b, t, h, d)}")
  if tuple(lse.shape) != (b, t, h):
    raise ValueError(f"{FAMILY}: lse must have shape {(b, t, h)} (one logsumexp per query row "
                     f"and head), got {tuple(lse.shape)}")
  check_sink_tokens(sink_k, sink_v, h, d)
  _check_scale(scale)
  scale = d ** -0.5 if scale is None else float(scale)
  hk = sink_k.shape[1]
  f32 = jnp.float32
  qg = q.astype(f32).reshape(b, t, hk, h // hk, d)
  logits = jnp.einsum("btkgd,nkd->btkgn", qg, sink_k.astype(f32)) * scale
  lse_s = jax.nn.logsumexp(logits, axis=-1)
  probs = jnp.exp(logits - lse_s[..., None])
  out_s = jnp.einsum("btkgn,nkd->btkgd", probs, sink_v.astype(f32)).reshape(b, t, h, d)
  lse_s = lse_s.reshape(b, t, h)
  merged, _ = fc.merge_partials(out, lse.astype(f32)[..., None], out_s, lse_s[..., None])
  return merged.astype(out.dtype)


def sink_token_attention(q, k, v, sink_k, sink_v, *, scale: float | None = None,
                         causal: bool = True, window: int | None = None, segment_ids=None,
                         sinks=None, impl: str = "auto", block_size=None, interpret=None):
  """Softmax self-attention in which every query also attends to learnable sink tokens.

  Args:
    q, k, v, scale, causal, window, segment_ids, sinks, impl, block_size, interpret: as in
      `layers.softmax_attention.softmax_attention` (masks apply to the sequence keys only).
    sink_k, sink_v: [n_s, kv_heads, d] sink keys and values (kv_heads as k's, n_s >= 1).
  Returns:
    [b, t, h, d] in q's dtype.
  """
  validate_arguments(q, k, v, scale, causal, window, segment_ids, sinks, block_size)
  check_sink_tokens(sink_k, sink_v, q.shape[2], q.shape[3], k.shape[2])
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  out, lse = softmax_attention(q, k, v, scale=scale, causal=causal, window=window,
                               segment_ids=segment_ids, sinks=sinks, impl=impl,
                               block_size=block_size, interpret=interpret, return_lse=True)
  return merge_sink_tokens(out, lse, q, sink_k, sink_v, scale=scale)


def cached_sink_token_attention(cache: KVCache, q, k, v, sink_k, sink_v, *,
                                window: int | None = None, scale: float | None = None,
                                sinks=None):
  """`layers.softmax_attention.cached_attention` with sink tokens; returns (out, new cache).

  The sink tokens are parameters, not cached: they are merged into every decode step.
  """
  check_sink_tokens(sink_k, sink_v, q.shape[2], q.shape[3], k.shape[2])
  (out, lse), cache = cached_attention(cache, q, k, v, window=window, scale=scale, sinks=sinks,
                                       return_lse=True)
  return merge_sink_tokens(out, lse, q, sink_k, sink_v, scale=scale), cache


def sink_token_attention_reference(q, k, v, sink_k, sink_v, *, scale: float | None = None,
                                   causal: bool = True, window: int | None = None,
                                   segment_ids=None, sinks=None):
  """Dense oracle: the sink tokens as extra keys in front of the sequence, always visible.

  Materializes [b, h, t, n_s + t] logits; for tests and short sequences.
  """
  b, t = q.shape[:2]
  n = sink_k.shape[0]
  expand = lambda x, like: jnp.broadcast_to(x.astype(like.dtype)[None], (b,) + x.shape)
  keys = jnp.concatenate([expand(sink_k, k), k], axis=1)
  values = jnp.concatenate([expand(sink_v, v), v], axis=1)
  seq_mask = self_attention_mask(b, t, causal=causal, window=window, segment_ids=segment_ids)
  mask = jnp.concatenate([jnp.ones((b, 1, t, n), bool), seq_mask], axis=-1)
  return dot_product_attention(q, keys, values, mask, scale, sinks)
