"""Dense masked softmax attention in float32: the oracle for the flash implementations.

It materializes the [b, heads, t, s] logits, so memory is O(t * s); use it for tests, short
sequences and single-step decoding over a cache.
"""

import jax
import jax.numpy as jnp

from layers.masks import attention_mask


def dot_product_attention(q_bthd, k_bskd, v_bskd, mask_b1ts, scale: float | None = None,
                          sinks_h=None, return_lse: bool = False):
  """Dense masked softmax attention with GQA and optional sinks; logits in float32.

  Args:
    q_bthd: queries [b, t, h, d]; h must be a multiple of the kv heads k.
    k_bskd, v_bskd: keys and values [b, s, k, d].
    mask_b1ts: boolean mask broadcastable to [b, 1, t, s], True where a query may attend.
    scale: logit scale, default d**-0.5.
    sinks_h: optional float [h] sink logits: an extra softmax entry per row with no value.
    return_lse: also return the logsumexp of each row's visible scaled logits and its sink.
  Returns:
    [b, t, h, d] in q's dtype. Rows with no visible key return zeros. With return_lse a pair
    (that, lse [b, t, h] float32); a row with no visible key and no sink has lse = -inf (the
    logsumexp of nothing), so it carries exactly no weight when merged by logsumexp weights.
  """
  b, t, h, d = q_bthd.shape
  kh = k_bskd.shape[2]
  scale = d ** -0.5 if scale is None else scale
  q = q_bthd.reshape(b, t, kh, h // kh, d).astype(jnp.float32)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k_bskd.astype(jnp.float32)) * scale
  mask = mask_b1ts[:, :, None]  # [b, 1, 1, t, s]
  neg = jnp.finfo(jnp.float32).min
  logits = jnp.where(mask, logits, neg)
  if sinks_h is not None:
    sink = jnp.broadcast_to(sinks_h.astype(jnp.float32).reshape(1, kh, h // kh, 1, 1),
                            logits.shape[:-1] + (1,))
    # The sink column takes part in the normalization and is then dropped: it has no value.
    logits = jnp.concatenate([logits, sink], axis=-1)
  probs = jax.nn.softmax(logits, axis=-1)[..., :k_bskd.shape[1]]
  probs = jnp.where(mask, probs, 0.0)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v_bskd.astype(jnp.float32))
  out = out.reshape(b, t, h, d).astype(q_bthd.dtype)
  if not return_lse:
    return out
  lse = jax.nn.logsumexp(logits, axis=-1)  # [b, k, g, t]
  if sinks_h is None:
    lse = jnp.where(jnp.any(mask, axis=-1), lse, -jnp.inf)
  return out, lse.transpose(0, 3, 1, 2).reshape(b, t, h)


def self_attention_mask(b: int, t: int, *, causal: bool = True, window: int | None = None,
                        segment_ids=None):
  """[b, 1, t, t] boolean mask of self-attention over a packed row."""
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if causal:
    return attention_mask(index, index, segment_ids, segment_ids, window)
  mask = jnp.ones((b, 1, t, t), bool)
  if segment_ids is not None:
    mask &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return mask


def softmax_attention_reference(q, k, v, *, scale: float | None = None, causal: bool = True,
                                window: int | None = None, segment_ids=None, sinks=None,
                                return_lse: bool = False):
  """The dense oracle with the signature of the flash implementations ([b, t, h, d] layout)."""
  b, t = q.shape[:2]
  mask = self_attention_mask(b, t, causal=causal, window=window, segment_ids=segment_ids)
  return dot_product_attention(q, k, v, mask, scale, sinks, return_lse)
