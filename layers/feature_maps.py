"""Feature maps applied to q and k of linear attention: identity, relu, sigmoid, hedgehog.

Hedgehog (learnable, per head) maps x [.., d] to softmax(x W) (+) softmax(-x W) [.., 2d], the
normalized form of exp(xW) (+) exp(-xW): the per-token normalization keeps it bounded for any input
scale. W starts as the identity.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers import params as P

FEATURE_MAPS = ("identity", "relu", "sigmoid", "hedgehog")


def feature_dim(name: str, head_dim: int) -> int:
  """Width of the mapped features (the state's d_k)."""
  return 2 * head_dim if name == "hedgehog" else head_dim


class FeatureMap(nn.Module):
  """Applies the feature map `kind` (one of FEATURE_MAPS) to x [b, t, h, d]."""

  kind: str
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bthd):
    if self.kind == "identity":
      return x_bthd
    if self.kind == "relu":
      return jax.nn.relu(x_bthd)
    if self.kind == "sigmoid":
      return jax.nn.sigmoid(x_bthd)
    if self.kind != "hedgehog":
      raise ValueError(f"feature map {self.kind!r} is not one of {FEATURE_MAPS}")
    h, d = x_bthd.shape[2:]
    eye = lambda key, shape, dtype: jnp.broadcast_to(jnp.eye(shape[1], dtype=dtype), shape)
    w = P.param(self, "w", eye, (h, d, d), ("heads", "head_dim", None), self.param_dtype)
    z = jnp.einsum("bthd,hde->bthe", x_bthd.astype(jnp.float32), w.astype(jnp.float32))
    out = jnp.concatenate([jax.nn.softmax(z, axis=-1), jax.nn.softmax(-z, axis=-1)], axis=-1)
    return out.astype(x_bthd.dtype)
