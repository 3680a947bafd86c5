"""RMSNorm with a learnable scale, computed in float32, and L2 normalization."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers import params as P


class RMSNorm(nn.Module):
  """y = x / rms(x) * scale, normalized over the last axis (in float32, cast back to dtype)."""

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    scale = P.param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,),
                    self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def l2_normalize(x, eps: float = 1e-6):
  """x / sqrt(sum(x^2) + eps) over the last axis (in float32, cast back to x's dtype)."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
