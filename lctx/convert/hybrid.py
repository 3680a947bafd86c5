"""Dense-to-hybrid conversion (SpikingBrain; the attention transfer of LoLCATs / Lizard).

A dense softmax model becomes a hybrid whose per-layer mixers come from a layout (a gin model file
such as gin/models/spikingbrain_7b.gin: its `ModelConfig.mixers` and mixer configs). The
embedding, every norm, every FFN and the head are kept; every layer that becomes linear, lightning
or GLA reuses W_Q, W_K, W_V, W_O and their biases and adds only its new parameters (the low-rank
gate, the output norm, a hedgehog feature map), initialised as SpikingBrain initialises new
layers (xavier-uniform with gain 2^-2.5, zero gate bias, so the gate logsigmoid(.) / tau starts
near -ln(2) / tau and a fresh layer forgets slowly; norms at 1, hedgehog maps at identity);
attention and sliding-window layers keep every attention weight. The head layout (heads, kv
heads, head_dim, q/k/v biases) and the RoPE settings always come from the dense model. A layout
with MoE FFNs (MoEConfig.enabled) gets them by upcycling the dense FFNs (lctx/upcycle.py).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lctx.config import ModelConfig
from lctx.model import DecoderLM
from lctx.upcycle import upcycle_model_params

SOFTMAX = ("attention", "swa")
LINEAR = ("linear", "lightning", "gla")
HEAD_FIELDS = ("num_heads", "num_kv_heads", "head_dim", "qkv_bias")
ROPE_FIELDS = ("rope_base", "rope_scaling", "use_rope", "qk_norm", "qk_norm_eps")
NEW_GAIN = 2.0 ** -2.5


class LayoutError(ValueError):
  """A layout that cannot take the dense model's weights (the message names the file)."""


def hybrid_config(dense: ModelConfig, layout: ModelConfig, where: str) -> ModelConfig:
  """The hybrid ModelConfig: the dense model's sizes with the layout's mixers."""
  if dense.layer_mixers() != ("attention",) * dense.num_layers:
    raise LayoutError(f"{where}: the source model must be dense softmax attention, got "
                      f"{sorted(set(dense.layer_mixers()))}")
  mixers = layout.layer_mixers()
  if len(mixers) != dense.num_layers:
    raise LayoutError(f"{where}: the layout has {len(mixers)} layers, the imported model "
                      f"{dense.num_layers}; give a LayerPattern or a list of that depth")
  unknown = sorted({m for m in mixers if m not in SOFTMAX + LINEAR})
  if unknown:
    raise LayoutError(f"{where}: mixers {unknown} cannot reuse softmax attention's q/k/v/o "
                      f"(convertible: {SOFTMAX + LINEAR})")
  att = dense.mixer_config("attention")
  if att.qk_norm and any(m in LINEAR for m in mixers):
    raise LayoutError(f"{where}: the dense model has q/k norms (Qwen3), which linear layers "
                      "have no place for")
  heads = {f: getattr(att, f) for f in HEAD_FIELDS}
  heads["head_dim"] = att.resolved_head_dim(dense.d_model)
  options = {}
  for name in sorted(set(mixers)):
    cfg = layout.mixer_config(name)
    fields = dict(heads)
    if name in SOFTMAX:
      fields.update({f: getattr(att, f) for f in ROPE_FIELDS})
      if name == "attention":
        fields["window"] = att.window
    options[name] = dataclasses.replace(cfg, **fields)
  if layout.moe.enabled and layout.moe.expert_width(dense.d_ff) != dense.d_ff:
    raise LayoutError(f"{where}: MoEConfig.d_expert={layout.moe.d_expert} differs from the "
                      f"dense FFN width {dense.d_ff}; upcycled experts are copies of the FFN")
  return dataclasses.replace(dense, mixers=mixers, mixer_options=options,
                             spiking=layout.spiking, moe=layout.moe)


def teacher_attention(dense: ModelConfig, hybrid: ModelConfig):
  """The dense model's AttentionConfig, the teacher of attention transfer (lctx/transfer.py):
  the hybrid's own "attention" config where it has attention layers (the same heads, RoPE and
  window by construction), so one AttentionConfig serves both in gin."""
  if "attention" in hybrid.layer_mixers():
    return hybrid.mixer_config("attention")
  return dense.mixer_config("attention")


def _new_init(path: tuple[str, ...], leaf, key):
  """SpikingBrain's init of a parameter the dense model does not have."""
  name = path[-1]
  if name in ("gate_down", "gate_up"):
    fan_in, fan_out = leaf.shape[0], int(leaf.size // leaf.shape[0])
    bound = NEW_GAIN * (6.0 / (fan_in + fan_out)) ** 0.5
    return jax.random.uniform(key, leaf.shape, jnp.float32, -bound, bound).astype(leaf.dtype)
  return None  # zeros / ones / identity from the mixer's own init


def convert_params(dense: ModelConfig, dense_params: dict, hybrid: ModelConfig,
                   seed: int = 0) -> tuple[dict, list[str]]:
  """(hybrid params, paths of the new parameters); every dense tensor is reused bit-exactly.

  With the layout's MoEConfig enabled, the FFNs outside its dense_layers are first upcycled into
  experts (lctx/upcycle.py: copies of the FFN scaled by alpha, a small random router)."""
  if hybrid.moe.enabled:
    dense_params = upcycle_model_params(dense_params, hybrid.moe,
                                        rng=jax.random.key(seed + 2))
  init = jax.jit(lambda key: DecoderLM(hybrid).init(key, jnp.zeros((1, 2), jnp.int32))["params"])
  fresh = nn.unbox(init(jax.random.key(seed)))
  flat_dense = {tuple(k.key for k in path): leaf
                for path, leaf in jax.tree_util.tree_leaves_with_path(dense_params)}
  used, new = set(), []
  new_key = jax.random.key(seed + 1)

  def pick(path, leaf):
    key = tuple(k.key for k in path)
    if key in flat_dense:
      src = flat_dense[key]
      if src.shape != leaf.shape:
        raise LayoutError(f"parameter {'/'.join(key)}: the dense model's {src.shape} does not "
                          f"fit the hybrid's {leaf.shape}")
      used.add(key)
      return src.astype(leaf.dtype)
    new.append("/".join(key))
    value = _new_init(key, leaf, jax.random.fold_in(new_key, len(new)))
    return leaf if value is None else value

  params = jax.tree_util.tree_map_with_path(pick, fresh)
  unused = sorted("/".join(k) for k in set(flat_dense) - used)
  if unused:
    raise LayoutError(f"the hybrid has no place for the dense parameters {unused[:4]} "
                      f"({len(unused)} in all)")
  return params, new
