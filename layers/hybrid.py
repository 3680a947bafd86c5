"""Intra-layer parallel hybrid: several mixers on the same input, each normalized, then summed.

SpikingBrain-76B runs linear attention and sliding-window (or, at a few layers, full) attention
side by side in every layer: y = sum_i RMSNorm_i(mixer_i(x)). Each branch is a registered mixer
with its own config and parameters (under the branch's mixer name), and its own output RMSNorm
("<name>_norm") so that neither branch's scale dominates the sum.
"""

from typing import Any

import flax.linen as nn

from layers.norms import RMSNorm
from layers.registry import Mixer, get_mixer


class ParallelMixers(Mixer):
  """Runs the branch mixers of `config`, pairs (registered mixer name, its Config), in parallel.

  The other fields are the Mixer ones (layers/registry.py), passed on to every branch, and the
  epsilon of the branch output norms.
  """

  config: tuple[tuple[str, Any], ...]
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x_bte, *, positions_bt, segment_ids_bt=None, decode: bool = False):
    names = [name for name, _ in self.config]
    if len(set(names)) != len(names):
      raise ValueError(f"parallel hybrid layer {self.layer_index}: branch mixers {names} must be "
                       "distinct")
    total = None
    for name, config in self.config:
      mixer = get_mixer(name)(config=config, d_model=self.d_model, layer_index=self.layer_index,
                              num_layers=self.num_layers, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              plan=self.plan, spiking=self.spiking,
                              name=name)
      y = mixer(x_bte, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt, decode=decode)
      y = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, name=f"{name}_norm")(y)
      total = y if total is None else total + y
    return total
