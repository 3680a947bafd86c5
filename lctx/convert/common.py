"""What every checkpoint layout of lctx/convert shares: the error type, config.json reading,
RoPE settings, and tensor mappings (a Hugging Face name, an lctx parameter path and the two
layout changes between them).

torch Linear weights are [out, in]; lctx kernels are [in, ...]:
  model.embed_tokens.weight [V, D]           -> embedding [V, D]
  lm_head.weight [V, D] (absent when tied)   -> head [D, V]
  model.norm.weight                          -> final_norm/scale
  model.layers.{i}.input_layernorm.weight    -> layer_i/mixer_norm/scale
  ...post_attention_layernorm.weight         -> layer_i/mlp_norm/scale
  ...self_attn.{q,k,v}_proj.weight [H d, D]  -> layer_i/mixer/{q,k,v} [D, H, d]
  ...self_attn.{q,k,v}_proj.bias [H d]       -> layer_i/mixer/{q,k,v}_bias [H, d]     (Qwen2)
  ...self_attn.o_proj.weight [D, H d]        -> layer_i/mixer/o [H, d, D]
  ...self_attn.{q,k}_norm.weight [d]         -> layer_i/mixer/{q,k}_norm/scale        (Qwen3)
  ...mlp.{gate,up}_proj.weight [F, D]        -> layer_i/mlp/{gate,up} [D, F]
  ...mlp.down_proj.weight [D, F]             -> layer_i/mlp/down [F, D]
"""

import dataclasses
import json
import os
from typing import Callable

import numpy as np

from layers.rope import ROPE_TYPES, RopeScaling
from lctx.config import ModelConfig
from lctx.convert import config_json

CONFIG = "config.json"

class ConversionError(ValueError):
  """A checkpoint or config that cannot be converted; the message names the file and key."""


def read_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ConversionError(f"{path}: no such file (a Hugging Face model directory holds "
                          f"{CONFIG} and its safetensors)") from None
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: not JSON ({e})") from None



def rope_settings(hf: dict, where: str) -> tuple[float, RopeScaling | None]:
  """(rope_theta, RopeScaling or None) of a config.json dict (legacy rope_scaling or
  transformers 5's rope_parameters)."""
  params, legacy = hf.get("rope_parameters"), hf.get("rope_scaling")
  kind_of = lambda d: d.get("rope_type", d.get("type", "default"))
  if isinstance(params, dict) and "rope_theta" in params:  # transformers 5
    if legacy and kind_of(legacy) != kind_of(params):
      raise ConversionError(f"{where}: rope_parameters (type {kind_of(params)!r}) and "
                            f"rope_scaling (type {kind_of(legacy)!r}) disagree")
    theta, scaling = params["rope_theta"], dict(params)
  else:
    theta, scaling = hf.get("rope_theta", 10_000.0), dict(legacy or {})
  kind = kind_of(scaling)
  if kind not in ROPE_TYPES:
    raise ConversionError(f"{where}: rope_scaling type {kind!r} is not supported; supported: "
                          f"{ROPE_TYPES}")
  if float(hf.get("partial_rotary_factor", scaling.get("partial_rotary_factor", 1.0))) != 1.0:
    raise ConversionError(f"{where}: partial_rotary_factor != 1 is not supported")
  if kind == "default":
    return float(theta), None
  max_pos = hf.get("max_position_embeddings")
  original = scaling.get("original_max_position_embeddings")
  factor = scaling.get("factor")
  if factor is None and kind == "yarn" and original and max_pos:
    factor = max_pos / original
  if factor is None:
    raise ConversionError(f"{where}: rope_scaling {kind!r} has no factor")
  fields = dict(rope_type=kind, factor=float(factor), max_position=max_pos,
                original_max_position=original)
  for key, name in (("low_freq_factor", "low_freq_factor"), ("high_freq_factor", "high_freq_factor"),
                    ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"),
                    ("attention_factor", "attention_factor"), ("mscale", "mscale"),
                    ("mscale_all_dim", "mscale_all_dim"), ("truncate", "truncate")):
    if scaling.get(key) is not None:
      value = scaling[key]
      fields[name] = bool(value) if name == "truncate" else float(value)
  try:
    return float(theta), RopeScaling(**fields)
  except ValueError as e:
    raise ConversionError(f"{where}: rope_scaling: {e}") from None


def required(hf: dict, key: str, where: str):
  """config.json's `key`; ConversionError naming the file if it is missing."""
  if key not in hf:
    raise ConversionError(f"{where}: {key} is missing")
  return hf[key]


def check_silu(hf: dict, where: str) -> None:
  """lctx's FFN is SwiGLU: any other hidden_act is refused naming the file."""
  if hf.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"{where}: hidden_act={hf['hidden_act']!r}; only silu (SwiGLU) is "
                          "supported")


def recorded_config(hf: dict, where: str) -> ModelConfig:
  """The ModelConfig a config.json written by lctx records in its "lctx_config"."""
  try:
    return config_json.from_json(hf["lctx_config"], f"{where}: lctx_config")
  except ValueError as e:
    raise ConversionError(str(e)) from None


def block_reasons(cfg: ModelConfig) -> list[str]:
  """What no Hugging Face-style layout of this package holds outside the mixers: MoE FFNs,
  mixer-only blocks, a scaled tied head."""
  out = []
  if cfg.moe.enabled:
    out.append("MoE FFNs")
  if cfg.d_ff == 0:
    out.append("d_ff=0")
  if cfg.tie_embeddings and cfg.scale_tied_logits:
    out.append("scale_tied_logits=True (Hugging Face ties without a scale)")
  return out


def rope_scaling_to_hf(s: RopeScaling) -> dict:
  """config.json's rope_scaling of a RopeScaling (what rope_settings reads back)."""
  scaling = {"rope_type": s.rope_type, "factor": s.factor}
  if s.original_max_position:
    scaling["original_max_position_embeddings"] = s.original_max_position
  if s.rope_type == "llama3":
    scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
  if s.rope_type == "yarn":
    scaling.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
    if s.attention_factor is not None:
      scaling["attention_factor"] = s.attention_factor
    if s.mscale:
      scaling.update(mscale=s.mscale, mscale_all_dim=s.mscale_all_dim)
  return scaling


@dataclasses.dataclass(frozen=True)
class TensorMapping:
  """One tensor: its HF name, its lctx path and the two layout changes (numpy views)."""
  hf: str
  path: tuple[str, ...]
  to_lctx: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  hf_shape: tuple[int, ...]


SAME = lambda x: x
T = lambda x: x.T


def embedding_maps(cfg: ModelConfig) -> list[TensorMapping]:
  """The embedding, the final norm and (untied) the head."""
  e, v = cfg.d_model, cfg.vocab_size
  out = [TensorMapping("model.embed_tokens.weight", ("embedding",), SAME, SAME, (v, e)),
         TensorMapping("model.norm.weight", ("final_norm", "scale"), SAME, SAME, (e,))]
  if not cfg.tie_embeddings:
    out.append(TensorMapping("lm_head.weight", ("head",), T, T, (v, e)))
  return out


def block_maps(i: int, e: int, f: int) -> list[TensorMapping]:
  """Layer i's two norms and its SwiGLU FFN."""
  p, layer = f"model.layers.{i}.", f"layer_{i}"
  out = [TensorMapping(p + "input_layernorm.weight", (layer, "mixer_norm", "scale"), SAME, SAME,
                       (e,)),
         TensorMapping(p + "post_attention_layernorm.weight", (layer, "mlp_norm", "scale"),
                       SAME, SAME, (e,))]
  for name, shape in (("gate", (f, e)), ("up", (f, e)), ("down", (e, f))):
    out.append(TensorMapping(p + f"mlp.{name}_proj.weight", (layer, "mlp", name), T, T, shape))
  return out


def attention_maps(i: int, e: int, h: int, kh: int, d: int, *, qkv_bias: bool,
                   qk_norm: bool = False) -> list[TensorMapping]:
  """Layer i's q/k/v/o projections (and q/k/v biases, q/k norms)."""
  p, layer = f"model.layers.{i}.self_attn.", f"layer_{i}"

  def proj_in(heads):  # [heads d, e] <-> [e, heads, d]
    return (lambda w: w.T.reshape(e, heads, d), lambda w: w.reshape(e, heads * d).T)

  out = []
  for name, heads in (("q", h), ("k", kh), ("v", kh)):
    out.append(TensorMapping(p + f"{name}_proj.weight", (layer, "mixer", name), *proj_in(heads),
                             (heads * d, e)))
    if qkv_bias:
      out.append(TensorMapping(p + f"{name}_proj.bias", (layer, "mixer", name + "_bias"),
                               lambda b, heads=heads: b.reshape(heads, d),
                               lambda b: b.reshape(-1), (heads * d,)))
  out.append(TensorMapping(p + "o_proj.weight", (layer, "mixer", "o"),
                           lambda w: w.T.reshape(h, d, e), lambda w: w.reshape(h * d, e).T,
                           (e, h * d)))
  if qk_norm:
    for name in ("q", "k"):
      out.append(TensorMapping(p + f"{name}_norm.weight", (layer, "mixer", f"{name}_norm",
                                                           "scale"), SAME, SAME, (d,)))
  return out


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def get_path(tree, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


