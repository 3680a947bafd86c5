"""Linear-attention mixers: LinearAttention ("linear"), Lightning ("lightning") and GLA ("gla").

All three project x to q, k, v per head, apply a feature map to q and k, run `linear_attention`,
normalize each head's output (RMSNorm over the head dim), optionally gate it with silu(x W_g), and
project back. They differ only in the log-gate:
  linear     none (G_t = 1);
  lightning  a fixed per-head log-decay g_h = -(decay_scale / H) * (1 - l / L) * h for head h of H
             in layer l of L (fla's Lightning schedule; head 0 does not decay);
  gla        data-dependent per key dimension, SpikingBrain's form
             g_t = logsigmoid(W2 W1 x_t + b) / tau with W1 of rank `gate_rank`.
Without decode the attention may be sequence-parallel (LASP-2 or ZeCO, see sharding/sequence.py).
With decode=True the recurrent state [b, h, d_k, d_v] lives in the "cache" collection, so each
decoded token costs O(1); a call may also bring a chunk of a prompt, which continues from the
cached state. While decoding, segment id 0 marks padding (the left padding of a ragged batch): a
padding token is a no-op on the state (a zero key and no decay).
With the "context_cache" collection (layers/context_cache.py) a call records its keys, values
and per-token gates, or answers queries of a recorded context from them (qTTT).
Spiking (the mixer's `spiking` SpikeConfig, layers/spiking.py): the input of the q/k/v/gate
projections ("mixer_in") and of the output projection ("mixer_out") spike; weights may be INT8
fake-quantized group-wise.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers import context_cache
from layers import params as P
from layers.heads import HeadsConfig
from layers.feature_maps import FEATURE_MAPS, FeatureMap, feature_dim
from layers.kernels.dispatch import IMPLS
from layers.linear_attention import linear_attention, linear_attention_step
from layers.norms import RMSNorm
from layers.registry import Mixer, register_mixer
from layers.spiking import maybe_quantize_weight, spike_input
from layers.linear_parallel import parallel_linear_attention


@dataclasses.dataclass(frozen=True)
class LinearAttentionConfig(HeadsConfig):
  """Options shared by the linear-attention mixers.

  Attributes:
    num_heads: query heads.
    num_kv_heads: key/value heads (GQA); None means num_heads. Must divide num_heads.
    head_dim: None means d_model // num_heads.
    feature_map: one of identity, relu, sigmoid, hedgehog (applied to q and k).
    output_norm: per-head RMSNorm of the mixer output.
    output_gate: multiply the output by silu(x W_g) before the output projection.
    qkv_bias: biases on the q, k, v projections (SpikingBrain-7B's GLA layers reuse Qwen2.5's
      biased q, k, v projections).
    impl: reference, xla, pallas or auto (see layers.kernels.dispatch).
    chunk_size: chunk length of the chunked paths (a multiple of 16).
  """

  feature_map: str = "identity"
  output_norm: bool = True
  output_gate: bool = False
  qkv_bias: bool = False
  impl: str = "auto"
  chunk_size: int = 64

  def __post_init__(self):
    super().__post_init__()
    name = type(self).__name__
    if self.feature_map not in FEATURE_MAPS:
      raise ValueError(f"{name}.feature_map={self.feature_map!r} must be one of {FEATURE_MAPS}")
    if self.impl not in IMPLS:
      raise ValueError(f"{name}.impl={self.impl!r} must be one of {IMPLS}")
    if self.chunk_size < 16 or self.chunk_size % 16:
      raise ValueError(f"{name}.chunk_size={self.chunk_size} must be a positive multiple of 16")


@dataclasses.dataclass(frozen=True)
class LightningConfig(LinearAttentionConfig):
  """LinearAttentionConfig plus the fixed decay schedule's strength `decay_scale` (8 in fla)."""

  decay_scale: float = 8.0

  def __post_init__(self):
    super().__post_init__()
    if self.decay_scale < 0:
      raise ValueError(f"LightningConfig.decay_scale={self.decay_scale} must be >= 0")


@dataclasses.dataclass(frozen=True)
class GLAConfig(LinearAttentionConfig):
  """LinearAttentionConfig plus the low-rank gate: rank `gate_rank` (16) and temperature `gate_tau`.

  gate_per_kv_head: the gate's up-projection emits one gate per KEY/VALUE head, shared by that
    head's query group (SpikingBrain-7B's layout: 16 -> num_kv_heads * d_k); otherwise one per
    query head.
  """

  gate_rank: int = 16
  gate_tau: float = 16.0
  gate_per_kv_head: bool = False

  def __post_init__(self):
    super().__post_init__()
    if self.gate_rank < 1:
      raise ValueError(f"GLAConfig.gate_rank={self.gate_rank} must be >= 1")
    if self.gate_tau <= 0:
      raise ValueError(f"GLAConfig.gate_tau={self.gate_tau} must be > 0")


def lightning_log_decay(num_heads: int, layer_index: int, num_layers: int,
                        decay_scale: float = 8.0):
  """Fixed per-head log-decays [h] of layer `layer_index` of `num_layers`."""
  depth = 1.0 - layer_index / max(num_layers, 1)
  return -(decay_scale / num_heads) * depth * jnp.arange(num_heads, dtype=jnp.float32)


class _LinearMixer(Mixer):
  """The shared body; subclasses override `log_gate`."""

  Config = LinearAttentionConfig

  config: LinearAttentionConfig

  def log_gate(self, x_bte, num_heads: int, key_dim: int):
    """None, [h] or [b, t, h, d_k] log-gate (called inside the compact __call__)."""
    del x_bte, num_heads, key_dim
    return None

  @nn.compact
  def __call__(self, x_bte, *, positions_bt, segment_ids_bt=None, decode: bool = False):
    # Linear attention here is position-free (no RoPE); positions only place a query of the
    # recorded context (layers/context_cache.py).
    cfg, e = self.config, self.d_model
    h, kh, d = cfg.num_heads, cfg.kv_heads, cfg.resolved_head_dim(e)
    x = spike_input(self, x_bte.astype(self.dtype), "mixer_in", self.spiking)

    def proj(name, heads, axis, bias=False):
      w = P.param(self, name, P.dense_init(e), (e, heads, d), ("embed", axis, "head_dim"),
                  self.param_dtype)
      w = maybe_quantize_weight(w, self.spiking, fan_in_axes=(0,))
      y = jnp.einsum("bte,ehd->bthd", x, w.astype(self.dtype))
      if bias:
        b = P.param(self, name + "_bias", nn.initializers.zeros, (heads, d), (axis, "head_dim"),
                    self.param_dtype)
        y = y + b.astype(self.dtype)
      return y

    fmap = lambda name: FeatureMap(cfg.feature_map, self.dtype, self.param_dtype, name=name)
    q = fmap("q_map")(proj("q", h, "heads", cfg.qkv_bias))
    g = self.log_gate(x, h, feature_dim(cfg.feature_map, d))
    if context_cache.mode(self, "k") == context_cache.QUERY:
      context_cache.check_query(self, positions_bt, decode)
      context_cache.sow_queries(self, q)
      o = self._query_record(q, g, positions_bt)
    else:
      k = fmap("k_map")(proj("k", kh, "kv_heads", cfg.qkv_bias))
      v = proj("v", kh, "kv_heads", cfg.qkv_bias)
      o = self._mix(q, k, v, g, segment_ids_bt, decode)
    if cfg.output_norm:
      o = RMSNorm(1e-6, self.dtype, self.param_dtype, axis_name="head_dim", name="o_norm")(o)
    if cfg.output_gate:
      o = o * jax.nn.silu(proj("gate", h, "heads"))
    # One threshold per token over all heads: the output projection's input is h * d channels.
    o = spike_input(self, o.reshape(*o.shape[:2], -1), "mixer_out", self.spiking).reshape(o.shape)
    w_o = P.param(self, "o", P.dense_init(h * d), (h, d, e), ("heads", "head_dim", "embed"),
                  self.param_dtype)
    w_o = maybe_quantize_weight(w_o, self.spiking, fan_in_axes=(0, 1))
    return jnp.einsum("bthd,hde->bte", o.astype(self.dtype), w_o.astype(self.dtype))

  def _query_record(self, q, g, positions_bt):
    """The outputs of queries at `positions_bt` (contiguous in each row) over the recorded
    context: the state the record holds before the first of them, then the recorded keys,
    values and gates of their own positions."""
    cfg = self.config
    k, v = context_cache.read(self, "k"), context_cache.read(self, "v")
    g_rec = context_cache.read(self, "g")
    g_all = g if g_rec is None else g_rec  # None or [h] are the same at every position
    per_token = g_all is not None and g_all.ndim > 1
    g_span = context_cache.take_positions(g_all, positions_bt) if per_token else g_all
    g_before = context_cache.before(g_all, positions_bt) if per_token else g_all
    run = lambda *a, **kw: linear_attention(*a, impl=cfg.impl, chunk_size=cfg.chunk_size, **kw)
    # S at the first query: the recorded keys from there on masked out (with no decay).
    k_before = context_cache.before(k, positions_bt)
    zeros_q = jnp.zeros((k.shape[0], k.shape[1]) + q.shape[2:], q.dtype)
    if g_before is not None and g_before.ndim == 1:  # a fixed decay: mask it per position
      keep = context_cache.before(jnp.ones(k.shape[:2], jnp.float32), positions_bt)
      g_before = keep[:, :, None] * g_before
    _, state = run(zeros_q, k_before, v, g_before, output_final_state=True)
    return run(q, context_cache.take_positions(k, positions_bt),
               context_cache.take_positions(v, positions_bt), g_span, initial_state=state)

  def _mix(self, q, k, v, g, segment_ids_bt, decode):
    cfg = self.config
    if not decode:
      context_cache.record(self, k=k, v=v, g=g if g is not None and g.ndim > 1 else None)
      return parallel_linear_attention(self.plan, q, k, v, g, segment_ids=segment_ids_bt,
                                       impl=cfg.impl, chunk_size=cfg.chunk_size)
    b, t, h, dk = q.shape
    if segment_ids_bt is not None:
      # Padding leaves the state as it was: S_t = exp(0) S_{t-1} + 0^T v_t. Decoding carries
      # one document per row, so segment ids say nothing else here (no resets).
      keep = segment_ids_bt != 0
      k = jnp.where(keep[:, :, None, None], k, 0)
      if g is not None:
        g = jnp.broadcast_to(g, (b, t, h)) if g.ndim == 1 else g
        g = jnp.where(keep.reshape(keep.shape + (1,) * (g.ndim - 2)), g, 0)
    context_cache.record(self, k=k, v=v, g=g if g is not None and g.ndim > 1 else None)
    run = lambda **kw: linear_attention(q, k, v, g, impl=cfg.impl, chunk_size=cfg.chunk_size,
                                        **kw)
    initialized = self.has_variable("cache", "state")
    state = self.variable("cache", "state", jnp.zeros, (b, h, dk, v.shape[-1]), jnp.float32)
    if not initialized:  # shape-only pass creating the cache: nothing to carry yet
      return run()
    if t == 1:
      g_step = g if g is None or g.ndim == 1 else g[:, 0]
      o, state.value = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], g_step,
                                             state=state.value)
      return o[:, None]
    o, state.value = run(initial_state=state.value, output_final_state=True)
    return o


@register_mixer("linear")
class LinearAttention(_LinearMixer):
  """Plain (ungated) linear attention."""


@register_mixer("lightning")
class Lightning(_LinearMixer):
  """Linear attention with fixed per-head decay slopes that weaken with depth."""

  Config = LightningConfig
  config: LightningConfig

  def log_gate(self, x_bte, num_heads, key_dim):
    del x_bte, key_dim
    return lightning_log_decay(num_heads, self.layer_index, self.num_layers,
                               self.config.decay_scale)


@register_mixer("gla")
class GLA(_LinearMixer):
  """Gated linear attention with a low-rank data-dependent gate per key dimension."""

  Config = GLAConfig
  config: GLAConfig

  def log_gate(self, x_bte, num_heads, key_dim):
    cfg, e = self.config, self.d_model
    w1 = P.param(self, "gate_down", P.dense_init(e), (e, cfg.gate_rank), ("embed", None),
                 self.param_dtype)
    gate_heads, axis = ((cfg.kv_heads, "kv_heads") if cfg.gate_per_kv_head else
                        (num_heads, "heads"))
    w2 = P.param(self, "gate_up", P.dense_init(cfg.gate_rank),
                 (cfg.gate_rank, gate_heads, key_dim), (None, axis, "head_dim"), self.param_dtype)
    w1 = maybe_quantize_weight(w1, self.spiking, fan_in_axes=(0,))
    w2 = maybe_quantize_weight(w2, self.spiking, fan_in_axes=(0,))
    bias = P.param(self, "gate_bias", nn.initializers.zeros, (gate_heads, key_dim),
                   (axis, "head_dim"), self.param_dtype)
    z = jnp.einsum("bte,er,rhd->bthd", x_bte.astype(jnp.float32), w1.astype(jnp.float32),
                   w2.astype(jnp.float32)) + bias.astype(jnp.float32)
    if gate_heads != num_heads:  # query head h uses kv head h // group, as the keys do
      z = jnp.repeat(z, num_heads // gate_heads, axis=2)
    return jax.nn.log_sigmoid(z) / cfg.gate_tau
