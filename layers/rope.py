"""Rotary position embeddings (RoPE): half-split rotation, a base and the published scalings.

The channel pairing is the "rotate half" one of Llama / Qwen checkpoints: channel j rotates with
channel j + head_dim / 2, at inverse frequency base^(-2j / head_dim). `RopeScaling` adds the
context-extension variants as Hugging Face transformers computes them (modeling_rope_utils):
  linear   position interpolation: every inverse frequency divided by `factor`;
  dynamic  NTK-aware: when the longest position p of the call passes `max_position`, the base
           becomes base * (factor * (p + 1) / max_position - (factor - 1))^(d / (d - 2));
  llama3   wavelengths above original_max / low_freq_factor divided by `factor`, those below
           original_max / high_freq_factor kept, a smooth interpolation in between;
  yarn     a linear ramp between the interpolated and extrapolated frequencies over the
           correction dimensions of beta_fast / beta_slow rotations, and cos / sin multiplied by
           the attention factor (0.1 ln(factor) + 1 unless given).
"""

import dataclasses
import math

import jax.numpy as jnp

from sharding.validation import check_fields

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """A RoPE scaling ("rope_scaling" of a Hugging Face config.json).

  Attributes:
    rope_type: one of ROPE_TYPES.
    factor: the context extension factor (linear, dynamic, llama3, yarn).
    original_max_position: the pre-training context (llama3, yarn; yarn falls back to
      max_position).
    max_position: the model's max_position_embeddings (dynamic; yarn's fallback).
    low_freq_factor, high_freq_factor: llama3's band edges.
    beta_fast, beta_slow: yarn's correction rotations.
    attention_factor: yarn's cos / sin multiplier; None derives it from factor (and mscale).
    mscale, mscale_all_dim: yarn's DeepSeek-style attention-factor terms (0: unused).
    truncate: yarn rounds its correction range to whole dimensions.
  """

  rope_type: str = "default"
  factor: float = 1.0
  original_max_position: int | None = None
  max_position: int | None = None
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None
  mscale: float = 0.0
  mscale_all_dim: float = 0.0
  truncate: bool = True

  def __post_init__(self):
    check_fields(self)
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"RopeScaling.rope_type={self.rope_type!r}: supported types are "
                       f"{ROPE_TYPES}")
    if self.factor <= 0:
      raise ValueError(f"RopeScaling.factor={self.factor} must be > 0")
    if self.rope_type == "dynamic" and not self.max_position:
      raise ValueError("RopeScaling(rope_type='dynamic') needs max_position (the model's "
                       "max_position_embeddings)")
    if self.rope_type == "llama3":
      if not self.original_max_position:
        raise ValueError("RopeScaling(rope_type='llama3') needs original_max_position")
      if self.high_freq_factor <= self.low_freq_factor:
        raise ValueError(f"RopeScaling: high_freq_factor={self.high_freq_factor} must exceed "
                         f"low_freq_factor={self.low_freq_factor}")
    if self.rope_type == "yarn" and not (self.original_max_position or self.max_position):
      raise ValueError("RopeScaling(rope_type='yarn') needs original_max_position or "
                       "max_position")

  def cos_sin_factor(self) -> float:
    """The multiplier of cos and sin (yarn's attention factor; 1 otherwise)."""
    if self.rope_type != "yarn":
      return 1.0
    if self.attention_factor is not None:
      return float(self.attention_factor)

    def get_mscale(scale, m=1.0):
      return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if self.mscale and self.mscale_all_dim:
      return get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim)
    return get_mscale(self.factor)


def rope_frequencies(head_dim: int, base: float, scaling: RopeScaling | None = None,
                     max_position=None):
  """Inverse frequencies [d/2] in float32.

  `max_position` (a traced scalar: the largest position of the call) is read by the dynamic
  scaling only.
  """
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (base ** exponents)
  kind = "default" if scaling is None else scaling.rope_type
  if kind == "default":
    return inv_freq
  factor = scaling.factor
  if kind == "linear":
    return inv_freq / factor
  if kind == "dynamic":
    original = scaling.max_position
    seq_len = jnp.maximum(jnp.asarray(max_position if max_position is not None else 0,
                                      jnp.float32) + 1.0, float(original))
    new_base = base * (factor * seq_len / original - (factor - 1)) ** (head_dim / (head_dim - 2))
    scaled = 1.0 / (new_base ** exponents)
    return jnp.where(seq_len > original, scaled, inv_freq)
  if kind == "llama3":
    original = scaling.original_max_position
    low_wavelen = original / scaling.low_freq_factor
    high_wavelen = original / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = ((original / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)
  # yarn
  original = scaling.original_max_position or scaling.max_position

  def correction_dim(rotations):
    return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001
  ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
  extrapolation = 1.0 - ramp
  return (inv_freq / factor) * (1.0 - extrapolation) + inv_freq * extrapolation


def apply_rope(x_bthd, positions_bt, base: float, scaling: RopeScaling | None = None):
  """Rotates x by its (per-document) positions; computed in float32, returned in x's dtype."""
  max_position = None
  if scaling is not None and scaling.rope_type == "dynamic":
    max_position = jnp.max(positions_bt)
  inv_freq = rope_frequencies(x_bthd.shape[-1], base, scaling, max_position)
  angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
  mult = 1.0 if scaling is None else scaling.cos_sin_factor()
  sin = (jnp.sin(angles) * mult)[:, :, None, :]
  cos = (jnp.cos(angles) * mult)[:, :, None, :]
  x1, x2 = jnp.split(x_bthd.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bthd.dtype)
