"""Softmax attention mixer: GQA, RoPE, causal / sliding-window / segment masks, sinks, KV cache.

The attention itself is `layers.softmax_attention.softmax_attention` (reference, flash XLA or
Pallas, chosen by `AttentionConfig.impl`), or its sequence-parallel form (ring attention or an
all-gather of K and V) when the mixer's `sequence_parallel` config and the mesh ask for one. Decoding uses its KVCache: one slot per position for
full attention, a ring buffer of `window` slots for sliding-window layers.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from layers import params as P
from layers.heads import HeadsConfig
from layers.kernels.dispatch import IMPLS
from layers.registry import Mixer, register_mixer
from layers.rope import apply_rope
from layers.softmax_attention import KVCache, cached_attention, init_kv_cache, softmax_attention
from sharding.sequence import SequenceParallelConfig, parallel_softmax_attention


@dataclasses.dataclass(frozen=True)
class AttentionConfig(HeadsConfig):
  """Options of the softmax attention mixer.

  Attributes:
    num_heads: query heads.
    num_kv_heads: key/value heads (GQA); None means num_heads. Must divide num_heads.
    head_dim: None means d_model // num_heads.
    rope_base: RoPE base (theta); Llama 2 Long uses 5e5, ProLong 8e6.
    use_rope: apply RoPE to q and k.
    window: sliding window; a token sees itself plus `window` earlier keys. None: full causal.
    qkv_bias: biases on the q, k, v projections.
    impl: attention implementation, one of layers.kernels.dispatch.IMPLS ("auto" picks by
      backend).
    block_size: flash block size; None is the implementation's default.
    sinks: learnable per-head sink logits (gpt-oss style), initialised to 0.
  """

  rope_base: float = 10_000.0
  use_rope: bool = True
  window: int | None = None
  qkv_bias: bool = False
  impl: str = "auto"
  block_size: int | None = None
  sinks: bool = False

  def __post_init__(self):
    super().__post_init__()
    if self.use_rope and self.head_dim is not None and self.head_dim % 2:
      raise ValueError(f"AttentionConfig.head_dim={self.head_dim} must be even with RoPE")
    if self.window is not None and self.window < 0:
      raise ValueError(f"AttentionConfig.window={self.window} must be >= 0 or None")
    if self.impl not in IMPLS:
      raise ValueError(f"AttentionConfig.impl={self.impl!r} must be one of {IMPLS}")
    if self.block_size is not None and self.block_size < 1:
      raise ValueError(f"AttentionConfig.block_size={self.block_size} must be >= 1 or None")
    if self.rope_base <= 1.0:
      raise ValueError(f"AttentionConfig.rope_base={self.rope_base} must be > 1")


@register_mixer("attention")
class SoftmaxAttention(Mixer):
  """Multi-head (GQA) softmax attention with RoPE and causal/sliding-window/segment masks."""

  Config = AttentionConfig

  config: AttentionConfig

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

    sinks = None
    if cfg.sinks:
      sinks = P.param(self, "sinks", nn.initializers.zeros, (h,), ("heads",), self.param_dtype)
    if decode:
      o = self._decode(q, k, v, sinks)
    else:
      o = parallel_softmax_attention(self.sequence_parallel or SequenceParallelConfig(), q, k, v,
                                     window=cfg.window, segment_ids=segment_ids_bt, sinks=sinks,
                                     impl=cfg.impl, block_size=cfg.block_size)
    w_o = P.param(self, "o", P.dense_init(h * d), (h, d, e), ("heads", "head_dim", "embed"),
                  self.param_dtype)
    return jnp.einsum("bthd,hde->bte", o, w_o.astype(self.dtype))

  def _decode(self, q_bthd, k_btkd, v_btkd, sinks):
    """Attention of the new tokens over the "cache" collection, which it then updates.

    The cache is created (zeros) when absent, sized by the creating call's length: `generate`
    creates it with a shape-only pass over [b, max_len] tokens. A sliding-window layer gets
    only `window` slots (a ring buffer).
    """
    cfg = self.config
    b, t, kh, d = k_btkd.shape
    initialized = self.has_variable("cache", "key")
    empty = lambda: init_kv_cache(b, t, kh, d, window=cfg.window, dtype=k_btkd.dtype)
    cache_k = self.variable("cache", "key", lambda: empty().key)
    cache_v = self.variable("cache", "value", lambda: empty().value)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if not initialized:
      return softmax_attention(q_bthd, k_btkd, v_btkd, window=cfg.window, sinks=sinks,
                               impl=cfg.impl, block_size=cfg.block_size)
    cache = KVCache(cache_k.value, cache_v.value, index.value)
    o, cache = cached_attention(cache, q_bthd, k_btkd, v_btkd, window=cfg.window, sinks=sinks)
    cache_k.value, cache_v.value, index.value = cache
    return o
