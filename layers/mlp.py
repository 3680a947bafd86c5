"""SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers import params as P


class SwiGLU(nn.Module):
  d_model: int
  d_ff: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bte):
    e, f = self.d_model, self.d_ff
    w_gate = P.param(self, "gate", P.dense_init(e), (e, f), ("embed", "mlp"), self.param_dtype)
    w_up = P.param(self, "up", P.dense_init(e), (e, f), ("embed", "mlp"), self.param_dtype)
    w_down = P.param(self, "down", P.dense_init(f), (f, e), ("mlp", "embed"), self.param_dtype)
    x = x_bte.astype(self.dtype)
    h = jax.nn.silu(x @ w_gate.astype(self.dtype)) * (x @ w_up.astype(self.dtype))
    return h @ w_down.astype(self.dtype)
