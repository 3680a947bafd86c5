"""Softmax attention mixer: GQA, RoPE, causal / sliding-window / segment masks, sinks, KV cache.

The attention itself is `layers.softmax_attention.softmax_attention` (reference, flash XLA or
Pallas, chosen by `AttentionConfig.impl`), or its sequence-parallel form (ring attention or an
all-gather of K and V, layers/softmax_parallel.py) when the mixer's execution plan asks for one;
sink tokens are merged by logsumexp weights either way.
Decoding uses its KVCache: one slot per position for full attention, a ring buffer of `window`
slots for sliding-window layers. While decoding, segment id 0 marks padding (the left padding of
a ragged batch): those tokens are cached, but no token attends to them.

With the "context_cache" collection (layers/context_cache.py) the mixer records its keys and
values after RoPE, or answers queries of a recorded context from them (qTTT).

Two mixers are registered: "attention" (AttentionConfig; full causal unless `window` is set) and
"swa" (SlidingWindowConfig: the same mixer with its own config whose window is required), so that
one model can hold sliding-window and full-attention layers with different settings.

Spiking (the mixer's `spiking` SpikeConfig, layers/spiking.py): the input of the q/k/v
projections ("mixer_in"), the queries after RoPE ("attention_q", one threshold per token and
head) and the input of the output projection ("mixer_out") spike; K and V may be INT8
fake-quantized per token and the weights group-wise.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from layers import context_cache
from layers import params as P
from layers.heads import HeadsConfig
from layers.kernels.dispatch import IMPLS
from layers.registry import Mixer, register_mixer
from layers.norms import RMSNorm
from layers.rope import RopeScaling, apply_rope
from layers.sink_tokens import merge_sink_tokens
from layers.softmax_attention import KVCache, cached_attention, init_kv_cache, softmax_attention
from layers.spiking import maybe_quantize_kv, maybe_quantize_weight, spike_input
from layers.softmax_parallel import parallel_softmax_attention


@dataclasses.dataclass(frozen=True)
class AttentionConfig(HeadsConfig):
  """Options of the softmax attention mixer.

  Attributes:
    num_heads: query heads.
    num_kv_heads: key/value heads (GQA); None means num_heads. Must divide num_heads.
    head_dim: None means d_model // num_heads.
    rope_base: RoPE base (theta); Llama 2 Long uses 5e5, ProLong 8e6.
    rope_scaling: None, or a RopeScaling (linear, dynamic, llama3, yarn; layers/rope.py).
    use_rope: apply RoPE to q and k.
    window: sliding window; a token sees itself plus `window` earlier keys. None: full causal.
    qkv_bias: biases on the q, k, v projections.
    qk_norm: RMSNorm over head_dim of every query and key head before RoPE (Qwen3), with
      epsilon `qk_norm_eps`.
    impl: attention implementation, one of layers.kernels.dispatch.IMPLS ("auto" picks by
      backend).
    block_size: flash block size; None is the implementation's default.
    sinks: learnable per-head sink logits (gpt-oss style), initialised to 0.
    sink_tokens: number of learnable sink tokens (a key and a value per kv head each) that every
      query attends to whatever its window or document (SpikingBrain-76B uses 128); 0 for none.
  """

  rope_base: float = 10_000.0
  use_rope: bool = True
  window: int | None = None
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = False
  qk_norm: bool = False
  qk_norm_eps: float = 1e-6
  impl: str = "auto"
  block_size: int | None = None
  sinks: bool = False
  sink_tokens: int = 0

  def __post_init__(self):
    super().__post_init__()
    if self.sink_tokens < 0:
      raise ValueError(f"{type(self).__name__}.sink_tokens={self.sink_tokens} must be >= 0")
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
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError(f"AttentionConfig.rope_scaling must be None or a RopeScaling, got "
                       f"{type(self.rope_scaling).__name__}")
    if self.qk_norm_eps <= 0:
      raise ValueError(f"AttentionConfig.qk_norm_eps={self.qk_norm_eps} must be > 0")

  def resolved_head_dim(self, d_model: int) -> int:
    head_dim = super().resolved_head_dim(d_model)
    if self.use_rope and head_dim % 2:
      name = type(self).__name__
      raise ValueError(f"{name}: head_dim = ModelConfig.d_model={d_model} / {name}.num_heads="
                       f"{self.num_heads} = {head_dim} is odd, and RoPE rotates pairs of "
                       f"channels; set {name}.head_dim to an even width or change d_model or "
                       f"num_heads")
    return head_dim


@register_mixer("attention")
class SoftmaxAttention(Mixer):
  """Multi-head (GQA) softmax attention with RoPE and causal/sliding-window/segment masks."""

  Config = AttentionConfig

  config: AttentionConfig

  @nn.compact
  def __call__(self, x_bte, *, positions_bt, segment_ids_bt=None, decode: bool = False):
    cfg, e = self.config, self.d_model
    h, kh, d = cfg.num_heads, cfg.kv_heads, cfg.resolved_head_dim(e)
    x = spike_input(self, x_bte.astype(self.dtype), "mixer_in", self.spiking)

    def proj(name, heads, axis):
      w = P.param(self, name, P.dense_init(e), (e, heads, d), ("embed", axis, "head_dim"),
                  self.param_dtype)
      w = maybe_quantize_weight(w, self.spiking, fan_in_axes=(0,))
      y = jnp.einsum("bte,ehd->bthd", x, w.astype(self.dtype))
      if cfg.qkv_bias:
        bias = P.param(self, name + "_bias", nn.initializers.zeros, (heads, d), (axis, "head_dim"),
                       self.param_dtype)
        y = y + bias.astype(self.dtype)
      return y

    querying = context_cache.mode(self, "key") == context_cache.QUERY
    if querying:
      context_cache.check_query(self, positions_bt, decode)
    norm = lambda name: RMSNorm(cfg.qk_norm_eps, self.dtype, self.param_dtype, "head_dim",
                                name=name)
    rope = lambda x: (apply_rope(x, positions_bt, cfg.rope_base, cfg.rope_scaling)
                      if cfg.use_rope else x)
    q = proj("q", h, "heads")
    q = rope(norm("q_norm")(q) if cfg.qk_norm else q)
    q = spike_input(self, q, "attention_q", self.spiking)
    if querying:  # the recorded context's keys and values; none of them is recomputed
      k, v = context_cache.read(self, "key"), context_cache.read(self, "value")
      context_cache.sow_queries(self, q)
    else:
      k, v = proj("k", kh, "kv_heads"), proj("v", kh, "kv_heads")
      k = rope(norm("k_norm")(k) if cfg.qk_norm else k)
      k = maybe_quantize_kv(k, self.spiking, token_axes=(0, 1))
      v = maybe_quantize_kv(v, self.spiking, token_axes=(0, 1))
      context_cache.record(self, key=k, value=v)

    sinks = None
    if cfg.sinks:
      sinks = P.param(self, "sinks", nn.initializers.zeros, (h,), ("heads",), self.param_dtype)
    sink_kv = None
    if cfg.sink_tokens:
      init = nn.initializers.normal(0.02)
      sink_kv = tuple(P.param(self, name, init, (cfg.sink_tokens, kh, d),
                              (None, "kv_heads", "head_dim"), self.param_dtype).astype(self.dtype)
                      for name in ("sink_keys", "sink_values"))
    if querying:
      o = context_cache.attention_over_record(q, positions_bt, k, v, window=cfg.window,
                                              sinks=sinks, return_lse=sink_kv is not None)
      if sink_kv is not None:
        o = merge_sink_tokens(*o, q, *sink_kv, scale=q.shape[-1] ** -0.5)
    elif decode:
      o = self._decode(q, k, v, sinks, sink_kv, segment_ids_bt)
    else:
      o = parallel_softmax_attention(self.plan, q, k, v, window=cfg.window,
                                     segment_ids=segment_ids_bt, sinks=sinks,
                                     sink_tokens=sink_kv, impl=cfg.impl,
                                     block_size=cfg.block_size)
    # One threshold per token over all heads: the output projection's input is h * d channels.
    o = spike_input(self, o.reshape(*o.shape[:2], -1), "mixer_out", self.spiking).reshape(o.shape)
    w_o = P.param(self, "o", P.dense_init(h * d), (h, d, e), ("heads", "head_dim", "embed"),
                  self.param_dtype)
    w_o = maybe_quantize_weight(w_o, self.spiking, fan_in_axes=(0, 1))
    return jnp.einsum("bthd,hde->bte", o, w_o.astype(self.dtype))

  def _decode(self, q_bthd, k_btkd, v_btkd, sinks, sink_kv, segment_ids_bt):
    """Attention of the new tokens over the "cache" collection, which it then updates.

    The cache is created (zeros) when absent, sized by the creating call's length: `generate`
    creates it with a shape-only pass over [b, max_len] tokens. A sliding-window layer gets
    only `window` slots (a ring buffer). The new tokens may be one decoding step or a chunk of
    a prompt; tokens of segment 0 are padding, which later tokens never see.
    """
    cfg = self.config
    b, t, kh, d = k_btkd.shape
    initialized = self.has_variable("cache", "key")
    empty = lambda: init_kv_cache(b, t, kh, d, window=cfg.window, dtype=k_btkd.dtype)
    cache_k = self.variable("cache", "key", lambda: empty().key)
    cache_v = self.variable("cache", "value", lambda: empty().value)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    cache_pad = self.variable("cache", "pad", lambda: empty().pad)
    with_lse = sink_kv is not None
    if not initialized:
      o = softmax_attention(q_bthd, k_btkd, v_btkd, window=cfg.window, sinks=sinks,
                            impl=cfg.impl, block_size=cfg.block_size, return_lse=with_lse)
    else:
      cache = KVCache(cache_k.value, cache_v.value, index.value, cache_pad.value)
      pad = None if segment_ids_bt is None else segment_ids_bt == 0
      o, cache = cached_attention(cache, q_bthd, k_btkd, v_btkd, window=cfg.window, sinks=sinks,
                                  return_lse=with_lse, pad=pad)
      cache_k.value, cache_v.value, index.value, cache_pad.value = cache
    if with_lse:
      o = merge_sink_tokens(*o, q_bthd, *sink_kv, scale=q_bthd.shape[-1] ** -0.5)
    return o


@dataclasses.dataclass(frozen=True)
class SlidingWindowConfig(AttentionConfig):
  """AttentionConfig of the "swa" mixer; `window` is required (SpikingBrain-7B: 4096)."""

  window: int | None = 4096

  def __post_init__(self):
    super().__post_init__()
    if self.window is None:
      raise ValueError("SlidingWindowConfig.window must be set (use the 'attention' mixer for "
                       "full attention)")


@register_mixer("swa")
class SlidingWindowAttention(SoftmaxAttention):
  """Softmax attention with a sliding window, configured separately from "attention"."""

  Config = SlidingWindowConfig
  config: SlidingWindowConfig
