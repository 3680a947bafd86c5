"""The Gated DeltaNet mixer ("gated_deltanet"), in Qwen3-Next's / fla's layout, and KDA ("kda").

  q, k = x W_q, x W_k   [b, t, key heads, d_k];   v = x W_v   [b, t, heads, d_v]
  q, k, v <- SiLU(causal depthwise conv of width `conv_size` over time), each channel its own taps
  q, k <- L2-normalized per head; repeated from the key heads to the heads (each value head reads
          key head i // (heads / key heads), as Qwen3-Next's 16 key heads serve 32 value heads)
  beta = sigmoid(x W_b) [b, t, heads];  g = -exp(A_log) softplus(x W_a + dt_bias)  (a_t = exp(g))
  o = delta_rule(q, k, v, beta, g)  (layers/delta_rule.py; `gate=False` drops g: DeltaNet)
  o <- RMSNorm_head(o) * SiLU(x W_g);  y = o W_o.
Initialization follows fla: A = uniform(0, 16) (A_log = log A), dt = exp(uniform(log 1e-3,
log 0.1)) and dt_bias its inverse softplus.

KDA (Kimi Linear; `per_key_gate=True`, the "kda" mixer): the decay is per key dimension,
g = -exp(A_log)[head] softplus(x W_down W_up + dt_bias) [b, t, heads, d_k] with a low-rank
projection (rank d_v) and dt_bias per (head, key dim), and the delta rule decays the state's rows
apart (layers/delta_rule.py). Everything else is this mixer's, the SiLU output gate included
(Kimi Linear's low-rank sigmoid output gate is not reproduced).

Packed documents: the convolution does not look across a segment boundary (taps reading an
earlier document's tokens are masked), and the delta rule resets its state there. Decoding: the
"cache" collection holds the recurrent state [b, heads, d_k, d_v] and each convolution's last
conv_size - 1 inputs, so a decoded token costs O(1); a call may bring a chunk of a prompt, which
continues from the cache. While decoding, segment id 0 marks padding (the left padding of a
ragged batch): a padding token enters the convolution as zeros and leaves the state unchanged
(beta = 0, g = 0).

Sequence parallelism: with a plan that splits the sequence, the tokens arrive in the plan's layout
order; each layout chunk's convolution continues from the end of the chunk before it in natural
order (`layout_causal_conv`), and the delta rule runs by the plan's linear-layer method
(layers/delta_parallel.py: LASP-2 or ZeCO).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layers import params as P
from layers.delta_parallel import parallel_delta_rule
from layers.delta_rule import delta_rule, delta_rule_step
from layers.heads import HeadsConfig
from layers.kernels.dispatch import IMPLS
from layers.linear_attention import repeat_kv
from layers.norms import RMSNorm, l2_normalize
from layers.registry import Mixer, register_mixer
from layers.spiking import maybe_quantize_weight, spike_input
from sharding.layout import previous_tail


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig(HeadsConfig):
  """Options of the gated_deltanet mixer.

  Attributes:
    num_heads: value heads (the delta rule's heads and states).
    num_kv_heads: must stay None; the grouped heads of this mixer are the query/key heads,
      `num_key_heads`.
    head_dim: key (and query) head dim d_k; None means d_model // num_heads.
    num_key_heads: query/key heads; None means num_heads. Must divide num_heads.
    value_head_dim: d_v; None means head_dim.
    conv_size: width of the causal depthwise convolutions on q, k and v (0: none).
    gate: the data-dependent decay g (Gated DeltaNet); False is DeltaNet (a_t = 1).
    per_key_gate: the decay per key dimension (KDA) instead of per head; needs gate.
    impl: reference, xla, pallas or auto (layers/delta_rule.py).
    chunk_size: chunk length of the chunked path (a multiple of 16).
  """

  num_key_heads: int | None = None
  value_head_dim: int | None = None
  conv_size: int = 4
  gate: bool = True
  per_key_gate: bool = False
  impl: str = "auto"
  chunk_size: int = 64

  def __post_init__(self):
    super().__post_init__()
    name = type(self).__name__
    if self.num_kv_heads is not None:
      raise ValueError(f"{name}.num_kv_heads={self.num_kv_heads}: this mixer groups its "
                       f"query/key heads; set {name}.num_key_heads instead")
    if self.key_heads < 1 or self.num_heads % self.key_heads:
      raise ValueError(f"{name}.num_key_heads={self.num_key_heads} must be >= 1 and divide "
                       f"{name}.num_heads={self.num_heads}")
    if self.value_head_dim is not None and self.value_head_dim < 1:
      raise ValueError(f"{name}.value_head_dim={self.value_head_dim} must be >= 1")
    if self.per_key_gate and not self.gate:
      raise ValueError(f"{name}.per_key_gate=True needs {name}.gate=True (it is the gate's form)")
    if self.conv_size < 0:
      raise ValueError(f"{name}.conv_size={self.conv_size} must be >= 0")
    if self.impl not in IMPLS:
      raise ValueError(f"{name}.impl={self.impl!r} must be one of {IMPLS}")
    if self.chunk_size < 16 or self.chunk_size % 16:
      raise ValueError(f"{name}.chunk_size={self.chunk_size} must be a positive multiple of 16")

  @property
  def key_heads(self) -> int:
    return self.num_heads if self.num_key_heads is None else self.num_key_heads

  def resolved_value_dim(self, d_model: int) -> int:
    return self.value_head_dim or self.resolved_head_dim(d_model)


def _a_log_init(key, shape, dtype=jnp.float32):
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, 0.0, 16.0)).astype(dtype)


def _dt_bias_init(key, shape, dtype=jnp.float32):
  dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, np.log(1e-3), np.log(1e-1)))
  dt = jnp.maximum(dt, 1e-4)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # softplus(dt_bias) = dt


def causal_conv(x, w, seg=None, cache=None, cache_seg=None):
  """Depthwise causal convolution over time, then SiLU.

  Args:
    x: [b, t, c...] inputs; w: [width, c...] taps (w[0] reads the current token, w[j] the token
      j steps back).
    seg: [b, t] segment ids or None; a tap reading a token of another segment reads zero.
    cache: [b, width - 1, c...] the inputs before x (decoding, or the previous chunk of a split
      sequence), or None (zeros).
    cache_seg: [b, width - 1] the cache's segment ids; None: the cache belongs to the first
      token's document (decoding).
  Returns:
    (SiLU(conv) [b, t, c...] in x's dtype, the last width - 1 inputs [b, width - 1, c...]).
  """
  width, t = w.shape[0], x.shape[1]
  if cache is None:
    cache = jnp.zeros((x.shape[0], width - 1) + x.shape[2:], x.dtype)
  ext = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
  seg_ext = None
  if seg is not None:
    if cache_seg is None:
      cache_seg = jnp.repeat(seg[:, :1], width - 1, axis=1)
    seg_ext = jnp.concatenate([cache_seg.astype(seg.dtype), seg], axis=1)
  out = jnp.zeros(x.shape, jnp.float32)
  for j in range(width):
    tap = jax.lax.slice_in_dim(ext, width - 1 - j, width - 1 - j + t, axis=1).astype(jnp.float32)
    if seg_ext is not None:
      same = jax.lax.slice_in_dim(seg_ext, width - 1 - j, width - 1 - j + t, axis=1) == seg
      tap = jnp.where(same.reshape(same.shape + (1,) * (x.ndim - 2)), tap, 0.0)
    out = out + tap * w[j].astype(jnp.float32)
  return jax.nn.silu(out).astype(x.dtype), ext[:, ext.shape[1] - (width - 1):]


def layout_causal_conv(x, w, seg, layout):
  """`causal_conv` of a GLOBAL sequence in `layout` order (sharding/layout.py): each chunk
  continues from the last width - 1 inputs of the chunk before it in natural order."""
  b, t = x.shape[:2]
  n, size = layout.num_chunks, w.shape[0] - 1
  chunks = lambda y: y.reshape((b * n, t // n) + y.shape[2:])
  tails = lambda y: previous_tail(y, layout, size).reshape((b * n, size) + y.shape[2:])
  out, _ = causal_conv(chunks(x), w, None if seg is None else chunks(seg), tails(x),
                       None if seg is None else tails(seg))
  return out.reshape(x.shape)


@register_mixer("gated_deltanet")
class GatedDeltaNet(Mixer):
  """Gated DeltaNet (see the module docstring)."""

  Config = GatedDeltaNetConfig
  config: GatedDeltaNetConfig

  @nn.compact
  def __call__(self, x_bte, *, positions_bt, segment_ids_bt=None, decode: bool = False):
    del positions_bt  # position-free, like the other linear mixers
    cfg, e = self.config, self.d_model
    layout = None if decode or self.plan is None else self.plan.layout
    h, kh = cfg.num_heads, cfg.key_heads
    dk, dv = cfg.resolved_head_dim(e), cfg.resolved_value_dim(e)
    x = spike_input(self, x_bte.astype(self.dtype), "mixer_in", self.spiking)

    def weight(name, shape, axes, init=None):
      w = P.param(self, name, init or P.dense_init(e), shape, axes, self.param_dtype)
      return maybe_quantize_weight(w, self.spiking, fan_in_axes=(0,)).astype(self.dtype)

    proj = lambda name, heads, d, axis: jnp.einsum(
        "bte,ehd->bthd", x, weight(name, (e, heads, d), ("embed", axis, "head_dim")))
    q, k = proj("q", kh, dk, "kv_heads"), proj("k", kh, dk, "kv_heads")
    v = proj("v", h, dv, "heads")
    pad = None
    if decode and segment_ids_bt is not None:
      pad = segment_ids_bt == 0  # left padding of a ragged batch
      q, k, v = (jnp.where(pad[:, :, None, None], 0, y) for y in (q, k, v))
    conv_seg = None if decode else segment_ids_bt
    # Decoding's first call only creates the cache (shapes); later calls read and update it.
    carry = decode and self.has_variable("cache", "state")
    if cfg.conv_size:
      convs = []
      for name, y, axis in (("q", q, "kv_heads"), ("k", k, "kv_heads"), ("v", v, "heads")):
        taps = P.param(self, f"conv_{name}", P.dense_init(cfg.conv_size),
                       (cfg.conv_size,) + y.shape[2:], (None, axis, "head_dim"),
                       self.param_dtype)
        if decode:
          var = self.variable("cache", f"conv_{name}", jnp.zeros,
                              (y.shape[0], cfg.conv_size - 1) + y.shape[2:], self.dtype)
        if layout is not None:  # a sequence in layout order, split over the seq axis
          out = layout_causal_conv(y, taps, conv_seg, layout)
        else:
          out, tail = causal_conv(y, taps, conv_seg, var.value if carry else None)
          if carry:
            var.value = tail
        convs.append(out)
      q, k, v = convs
    else:
      q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)
    q, k = repeat_kv(l2_normalize(q), h), repeat_kv(l2_normalize(k), h)

    x32 = x.astype(jnp.float32)
    w_b = P.param(self, "beta", P.dense_init(e), (e, h), ("embed", "heads"), self.param_dtype)
    beta = jax.nn.sigmoid(jnp.einsum("bte,eh->bth", x32, w_b.astype(jnp.float32)))
    g = None
    if cfg.gate:
      f32 = lambda w: w.astype(jnp.float32)
      a_log = P.param(self, "A_log", _a_log_init, (h,), ("heads",), self.param_dtype)
      if cfg.per_key_gate:  # KDA: a low-rank projection to one log-gate per key dim
        w_down = P.param(self, "a_down", P.dense_init(e), (e, dv), ("embed", None),
                         self.param_dtype)
        w_up = P.param(self, "a_up", P.dense_init(dv), (dv, h, dk), (None, "heads", "head_dim"),
                       self.param_dtype)
        dt_bias = P.param(self, "dt_bias", _dt_bias_init, (h, dk), ("heads", "head_dim"),
                          self.param_dtype)
        pre = jnp.einsum("btr,rhk->bthk", jnp.einsum("bte,er->btr", x32, f32(w_down)), f32(w_up))
        g = -jnp.exp(f32(a_log))[:, None] * jax.nn.softplus(pre + f32(dt_bias))
      else:
        w_a = P.param(self, "a", P.dense_init(e), (e, h), ("embed", "heads"), self.param_dtype)
        dt_bias = P.param(self, "dt_bias", _dt_bias_init, (h,), ("heads",), self.param_dtype)
        g = -jnp.exp(f32(a_log)) * jax.nn.softplus(
            jnp.einsum("bte,eh->bth", x32, f32(w_a)) + f32(dt_bias))
    if pad is not None:  # a padding token leaves the state as it was
      beta = jnp.where(pad[..., None], 0.0, beta)
      if g is not None:
        g = jnp.where(pad.reshape(pad.shape + (1,) * (g.ndim - 2)), 0.0, g)

    o = self._mix(q, k, v, beta, g, segment_ids_bt, decode)
    o = RMSNorm(1e-6, self.dtype, self.param_dtype, axis_name="head_dim", name="o_norm")(o)
    o = o * jax.nn.silu(proj("gate", h, dv, "heads"))
    o = spike_input(self, o.reshape(*o.shape[:2], -1), "mixer_out", self.spiking).reshape(o.shape)
    w_o = P.param(self, "o", P.dense_init(h * dv), (h, dv, e), ("heads", "head_dim", "embed"),
                  self.param_dtype)
    w_o = maybe_quantize_weight(w_o, self.spiking, fan_in_axes=(0, 1))
    return jnp.einsum("bthd,hde->bte", o.astype(self.dtype), w_o.astype(self.dtype))

  def _mix(self, q, k, v, beta, g, segment_ids_bt, decode):
    cfg = self.config
    if not decode:
      return parallel_delta_rule(self.plan, q, k, v, beta, g, segment_ids=segment_ids_bt,
                                 impl=cfg.impl, chunk_size=cfg.chunk_size)
    run = lambda **kw: delta_rule(q, k, v, beta, g, impl=cfg.impl, chunk_size=cfg.chunk_size,
                                  **kw)
    b, t, h, dk = q.shape
    initialized = self.has_variable("cache", "state")
    state = self.variable("cache", "state", jnp.zeros, (b, h, dk, v.shape[-1]), jnp.float32)
    if not initialized:  # shape-only pass creating the cache: nothing to carry yet
      return run()
    if t == 1:
      o, state.value = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0],
                                       None if g is None else g[:, 0], state=state.value)
      return o[:, None]
    o, state.value = run(initial_state=state.value, output_final_state=True)
    return o


@dataclasses.dataclass(frozen=True)
class KDAConfig(GatedDeltaNetConfig):
  """Options of the kda mixer: gated_deltanet's, with the per-key-dim decay (KDA) on."""

  per_key_gate: bool = True


@register_mixer("kda")
class KDA(GatedDeltaNet):
  """KDA (Kimi Linear): the Gated DeltaNet mixer with a per-key-dim decay (module docstring)."""

  Config = KDAConfig
  config: KDAConfig
