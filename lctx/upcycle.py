"""Upcycling a dense model's parameters into a mixture-of-experts model's.

`upcycle_model_params(dense_params, moe_config)` takes the parameters of a DecoderLM whose FFNs
are all dense SwiGLUs and returns those of the same model with `moe_config`: every layer outside
`moe_config.dense_layers` gets its FFN replaced by experts copied from it, each matrix scaled by
alpha = (S + k/N)^(-1/3) (layers.moe.upcycle_params); everything else is kept as it is. Build the
MoE model with `dataclasses.replace(dense_config, moe=moe_config)`.
"""

import re

import jax

from layers.moe import MoEConfig, upcycle_params

_LAYER = re.compile(r"^layer_(\d+)$")


def upcycle_model_params(dense_params: dict, moe_config: MoEConfig, *, rng=None) -> dict:
  """The MoE model's params from the dense model's (plain arrays, not boxed).

  Args:
    dense_params: a dense DecoderLM's params (`variables["params"]`).
    moe_config: the MoE options of the target model (must be enabled).
    rng: optional key for small random routers (one per layer); None gives zero routers.
  """
  if not moe_config.enabled:
    raise ValueError("MoEConfig.enabled=False: nothing to upcycle into")
  out = dict(dense_params)
  for name, block in dense_params.items():
    match = _LAYER.match(name)
    if not match or int(match.group(1)) in moe_config.dense_layers:
      continue
    if "mlp" not in block:
      raise ValueError(f"upcycle_model_params: {name} has no dense FFN ('mlp') to upcycle")
    layer_rng = None if rng is None else jax.random.fold_in(rng, int(match.group(1)))
    block = dict(block)
    block["moe"] = upcycle_params(block.pop("mlp"), moe_config, rng=layer_rng)
    out[name] = block
  return out
