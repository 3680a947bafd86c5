"""SwiGLU feed-forward block: down(silu(gate(x)) * up(x)).

With a SpikeConfig (layers/spiking.py) the block's input ("mlp_in") and the input of the down
projection ("mlp_hidden") spike, and the weights may be INT8 fake-quantized group-wise.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers import params as P
from layers.spiking import maybe_quantize_weight, spike_input


class SwiGLU(nn.Module):
  d_model: int
  d_ff: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  spiking: Any = None

  @nn.compact
  def __call__(self, x_bte):
    e, f = self.d_model, self.d_ff

    def weight(name, shape, axes):
      w = P.param(self, name, P.dense_init(shape[0]), shape, axes, self.param_dtype)
      return maybe_quantize_weight(w, self.spiking, fan_in_axes=(0,)).astype(self.dtype)

    w_gate = weight("gate", (e, f), ("embed", "mlp"))
    w_up = weight("up", (e, f), ("embed", "mlp"))
    w_down = weight("down", (f, e), ("mlp", "embed"))
    x = spike_input(self, x_bte.astype(self.dtype), "mlp_in", self.spiking)
    h = jax.nn.silu(x @ w_gate) * (x @ w_up)
    return spike_input(self, h, "mlp_hidden", self.spiking) @ w_down
