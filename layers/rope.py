"""Rotary position embeddings (RoPE) with a configurable base (half-split rotation)."""

import jax.numpy as jnp


def rope_frequencies(head_dim: int, base: float):
  """Inverse frequencies [d/2] in float32."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  return base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x_bthd, positions_bt, base: float):
  """Rotates x by its (per-document) positions; computed in float32, returned in x's dtype."""
  inv_freq = rope_frequencies(x_bthd.shape[-1], base)
  angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_bthd.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bthd.dtype)
