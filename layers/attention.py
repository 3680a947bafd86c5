"""Softmax attention mixer: GQA, RoPE, causal / sliding-window / segment masks, KV cache.

This is the dense (materialized-logits) implementation; it is also the oracle that faster
attention kernels are tested against.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from layers import params as P
from layers.masks import attention_mask
from layers.registry import register_mixer
from layers.rope import apply_rope
from layers.validation import check_fields


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Options of the softmax attention mixer.

  Attributes:
    num_heads: query heads.
    num_kv_heads: key/value heads (GQA); None means num_heads. Must divide num_heads.
    head_dim: None means d_model // num_heads.
    rope_base: RoPE base (theta); Llama 2 Long uses 5e5, ProLong 8e6.
    use_rope: apply RoPE to q and k.
    window: sliding window; a token sees itself plus `window` earlier keys. None: full causal.
    qkv_bias: biases on the q, k, v projections.
  """

  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None
  rope_base: float = 10_000.0
  use_rope: bool = True
  window: int | None = None
  qkv_bias: bool = False

  def __post_init__(self):
    check_fields(self)
    if self.num_heads < 1:
      raise ValueError(f"AttentionConfig.num_heads must be >= 1, got {self.num_heads}")
    kv = self.kv_heads
    if kv < 1 or self.num_heads % kv:
      raise ValueError(f"AttentionConfig.num_kv_heads={self.num_kv_heads} must be >= 1 and divide "
                       f"AttentionConfig.num_heads={self.num_heads}")
    if self.head_dim is not None and (self.head_dim < 1 or (self.use_rope and self.head_dim % 2)):
      raise ValueError(f"AttentionConfig.head_dim={self.head_dim} must be a positive (even, with "
                       "RoPE) integer")
    if self.window is not None and self.window < 0:
      raise ValueError(f"AttentionConfig.window={self.window} must be >= 0 or None")
    if self.rope_base <= 1.0:
      raise ValueError(f"AttentionConfig.rope_base={self.rope_base} must be > 1")

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  def resolved_head_dim(self, d_model: int) -> int:
    if self.head_dim is not None:
      return self.head_dim
    if d_model % self.num_heads:
      raise ValueError(f"ModelConfig.d_model={d_model} is not divisible by "
                       f"AttentionConfig.num_heads={self.num_heads}; set AttentionConfig.head_dim")
    return d_model // self.num_heads


def dot_product_attention(q_bthd, k_bskd, v_bskd, mask_b1ts, scale: float | None = None):
  """Dense masked softmax attention with GQA, logits and softmax in float32.

  Args:
    q_bthd: queries [b, t, h, d]; h must be a multiple of the kv heads k.
    k_bskd, v_bskd: keys and values [b, s, k, d].
    mask_b1ts: boolean mask, True where a query may attend.
    scale: logit scale, default d**-0.5.
  Returns:
    [b, t, h, d] in q's dtype. Rows with no visible key return zeros.
  """
  b, t, h, d = q_bthd.shape
  kh = k_bskd.shape[2]
  scale = d ** -0.5 if scale is None else scale
  q = q_bthd.reshape(b, t, kh, h // kh, d).astype(jnp.float32)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k_bskd.astype(jnp.float32)) * scale
  mask = mask_b1ts[:, :, None]  # [b, 1, 1, t, s]
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(mask, probs, 0.0)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v_bskd.astype(jnp.float32))
  return out.reshape(b, t, h, d).astype(q_bthd.dtype)


@register_mixer("attention")
class SoftmaxAttention(nn.Module):
  """Multi-head (GQA) softmax attention with RoPE and causal/sliding-window/segment masks."""

  Config = AttentionConfig

  config: AttentionConfig
  d_model: int
  layer_index: int = 0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bte, *, positions_bt, segment_ids_bt=None, decode: bool = False):
    cfg, e = self.config, self.d_model
    h, kh, d = cfg.num_heads, cfg.kv_heads, cfg.resolved_head_dim(e)
    x = x_bte.astype(self.dtype)

    def proj(name, heads, axis):
      w = P.param(self, name, P.dense_init(e), (e, heads, d), ("embed", axis, "head_dim"),
                  self.param_dtype)
      y = jnp.einsum("bte,ehd->bthd", x, w.astype(self.dtype))
      if cfg.qkv_bias:
        bias = P.param(self, name + "_bias", nn.initializers.zeros, (heads, d), (axis, "head_dim"),
                       self.param_dtype)
        y = y + bias.astype(self.dtype)
      return y

    q, k, v = proj("q", h, "heads"), proj("k", kh, "kv_heads"), proj("v", kh, "kv_heads")
    if cfg.use_rope:
      q = apply_rope(q, positions_bt, cfg.rope_base)
      k = apply_rope(k, positions_bt, cfg.rope_base)

    b, t = x.shape[:2]
    if decode:
      k, v, mask = self._update_cache(k, v)
    else:
      index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      mask = attention_mask(index, index, segment_ids_bt, segment_ids_bt, cfg.window)
    o = dot_product_attention(q, k, v, mask)
    w_o = P.param(self, "o", P.dense_init(h * d), (h, d, e), ("heads", "head_dim", "embed"),
                  self.param_dtype)
    return jnp.einsum("bthd,hde->bte", o, w_o.astype(self.dtype))

  def _update_cache(self, k_btkd, v_btkd):
    """Writes the new keys/values at the cache index; returns the full cache and its mask.

    The cache is created (zeros, sized by the call that creates it) when absent; `generate`
    creates it with a shape-only pass over [b, max_len] tokens.
    """
    initialized = self.has_variable("cache", "key")
    cache_k = self.variable("cache", "key", jnp.zeros, k_btkd.shape, k_btkd.dtype)
    cache_v = self.variable("cache", "value", jnp.zeros, v_btkd.shape, v_btkd.dtype)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    b, t = k_btkd.shape[:2]
    if not initialized:
      q_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      return k_btkd, v_btkd, attention_mask(q_index, q_index, window=self.config.window)
    start = index.value
    cache_k.value = lax.dynamic_update_slice(cache_k.value, k_btkd.astype(cache_k.value.dtype),
                                             (0, start, 0, 0))
    cache_v.value = lax.dynamic_update_slice(cache_v.value, v_btkd.astype(cache_v.value.dtype),
                                             (0, start, 0, 0))
    index.value = start + t
    s = cache_k.value.shape[1]
    q_index = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    k_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    mask = attention_mask(q_index, k_index, window=self.config.window,
                          k_valid_bs=k_index < start + t)
    return cache_k.value, cache_v.value, mask
