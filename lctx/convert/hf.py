"""Hugging Face checkpoints in and out, without torch.

  cfg, params = load_pretrained(directory)          # a ModelConfig and a params pytree
  save_pretrained(out, cfg, params)                 # config.json + safetensors (+ tokenizer)

Three layouts, chosen by the model on export and by config.json (and the tensors) on import:
- transformers' Llama, Mistral, Qwen2 and Qwen3 causal LMs (this module; tensor names in
  common.py): `DecoderLM(cfg).apply({"params": params}, tokens)` gives the logits transformers
  gives for the same directory, and transformers loads what save_pretrained writes;
- SpikingBrain-7B's GLA / sliding-window hybrid (spikingbrain.py);
- lctx's own layout for every other model (lctx_layout.py: Lightning, parallel hybrids, MoE...),
  whose config.json says so and which round-trips bit-exactly.
Every tensor is read once from its memory map and placed straight into its shard when a mesh is
given (jax.make_array_from_callback reads only the shard's slice), so host memory stays near the
model plus one tensor. Settings: rope_theta and rope_scaling (default, linear, dynamic, llama3,
yarn; legacy "type" and transformers 5's "rope_parameters" both read), GQA, rms_norm_eps,
Mistral's sliding_window (a token sees sliding_window - 1 earlier keys: lctx's window),
Qwen2's q/k/v biases, Qwen3's q/k norms and explicit head_dim, tied embeddings (logits unscaled).
The embedding keeps all of config.json's vocab_size rows (Qwen's exceed its tokenizer's).
"""

import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import ml_dtypes
from flax import linen as nn

from layers.attention import AttentionConfig
from lctx.config import ModelConfig
from lctx.convert import lctx_layout
from lctx.convert import safetensors_io as st
from lctx.convert import spikingbrain
from lctx.convert.common import (CONFIG, ConversionError, TensorMapping, attention_maps,
                                 block_maps, block_reasons, check_silu, embedding_maps,
                                 get_path, read_config, required, rope_scaling_to_hf,
                                 rope_settings, set_path)

__all__ = ["ConversionError", "read_config", "rope_settings", "load_pretrained",
           "save_pretrained", "export_layout", "copy_tokenizer_files", "param_shardings"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
FAMILIES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
            "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
MAX_SHARD_BYTES = 5 * 10**9
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def family_of(hf: dict, where: str) -> str:
  archs = hf.get("architectures") or []
  known = [FAMILIES[a] for a in archs if a in FAMILIES]
  if not known:
    raise ConversionError(f"{where}: architectures={archs!r} is not supported; supported: "
                          f"{sorted(FAMILIES)}")
  return known[0]


def config_from_hf(hf: dict, where: str = CONFIG, *, param_dtype: str = "float32",
                   dtype: str = "float32") -> ModelConfig:
  """The ModelConfig of a Hugging Face config.json (as a dict); `where` names it in errors."""
  family = family_of(hf, where)
  need = lambda key: required(hf, key, where)
  check_silu(hf, where)
  if hf.get("mlp_bias"):
    raise ConversionError(f"{where}: mlp_bias=true is not supported")
  if family in ("llama", "mistral") and hf.get("attention_bias"):
    raise ConversionError(f"{where}: attention_bias=true (biases on q, k, v and o) is not "
                          "supported; lctx has q/k/v biases only (Qwen2)")
  if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
    raise ConversionError(f"{where}: use_sliding_window=true (per-layer windows from "
                          "max_window_layers) is not supported")
  d_model, heads = need("hidden_size"), need("num_attention_heads")
  head_dim = hf.get("head_dim") or d_model // heads
  rope_base, scaling = rope_settings(hf, where)
  window = None
  if family == "mistral" and hf.get("sliding_window"):
    window = int(hf["sliding_window"]) - 1
  eps = float(hf.get("rms_norm_eps", 1e-6))
  attention = AttentionConfig(
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=head_dim, rope_base=rope_base, rope_scaling=scaling, window=window,
      qkv_bias=family == "qwen2" or (family == "qwen3" and bool(hf.get("attention_bias"))),
      qk_norm=family == "qwen3", qk_norm_eps=eps)
  if family == "qwen3" and hf.get("attention_bias"):
    raise ConversionError(f"{where}: attention_bias=true on Qwen3 (an o bias) is not supported")
  return ModelConfig(vocab_size=need("vocab_size"), d_model=d_model,
                     num_layers=need("num_hidden_layers"), d_ff=need("intermediate_size"),
                     mixers=("attention",), mixer_options={"attention": attention},
                     norm_eps=eps, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                     scale_tied_logits=False, dtype=dtype, param_dtype=param_dtype)


def transformers_reasons(cfg: ModelConfig) -> list[str]:
  """Why no transformers class holds `cfg` (empty when one does)."""
  if set(cfg.layer_mixers()) != {"attention"}:
    return [f"mixers {sorted(set(cfg.layer_mixers()))} (only 'attention' layers)"]
  reasons = block_reasons(cfg)
  if cfg.spiking.enabled:
    reasons.append("spiking")
  att = cfg.mixer_config("attention")
  if not att.use_rope:
    reasons.append("use_rope=False")
  if att.sinks or att.sink_tokens:
    reasons.append("attention sinks")
  if att.qkv_bias and att.window is not None:
    reasons.append("q/k/v biases with a window")
  if att.qk_norm and att.window is not None:
    reasons.append("q/k norms with a window")
  return reasons


def config_to_hf(cfg: ModelConfig) -> dict:
  """config.json of a transformers-family model that load_pretrained maps back to `cfg`."""
  reasons = transformers_reasons(cfg)
  if reasons:
    raise ConversionError("this model has no transformers class: " + "; ".join(reasons))
  att = cfg.mixer_config("attention")
  head_dim = att.resolved_head_dim(cfg.d_model)
  if att.qk_norm:
    arch, model_type = "Qwen3ForCausalLM", "qwen3"
  elif att.qkv_bias:
    arch, model_type = "Qwen2ForCausalLM", "qwen2"
  elif att.window is not None:
    arch, model_type = "MistralForCausalLM", "mistral"
  else:
    arch, model_type = "LlamaForCausalLM", "llama"
  s = att.rope_scaling
  max_pos = (s and (s.max_position or (s.original_max_position
                                       and int(s.original_max_position * s.factor)))) or 32768
  hf = {"architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": att.num_heads,
        "num_key_value_heads": att.kv_heads, "head_dim": head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, "rope_theta": att.rope_base,
        "max_position_embeddings": max_pos, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0, "torch_dtype": cfg.param_dtype, "use_cache": True}
  if model_type in ("llama", "qwen3"):
    hf["attention_bias"] = False
    hf["mlp_bias"] = False
  if model_type == "mistral":
    hf["sliding_window"] = att.window + 1
  if model_type in ("qwen2", "qwen3"):
    hf["use_sliding_window"] = False
  if s is not None:
    hf["rope_scaling"] = rope_scaling_to_hf(s)
  return hf


# ------------------------------------------------------------------------------------------------
# Tensor names and layouts.


def tensor_map(cfg: ModelConfig) -> list[TensorMapping]:
  """The mappings of every tensor of `cfg` (a model of the supported families)."""
  att = cfg.mixer_config("attention")
  e, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
  h, kh, d = att.num_heads, att.kv_heads, att.resolved_head_dim(e)
  out = embedding_maps(cfg)
  for i in range(cfg.num_layers):
    out += block_maps(i, e, f)
    out += attention_maps(i, e, h, kh, d, qkv_bias=att.qkv_bias, qk_norm=att.qk_norm)
  return out


# ------------------------------------------------------------------------------------------------
# Import.


def param_shardings(cfg: ModelConfig, mesh) -> dict:
  """The NamedSharding of every parameter of `cfg` on `mesh` (from its logical axis names)."""
  import optax
  from lctx.state import build
  return build(cfg, mesh, optax.identity()).state_shardings["params"]


def _stored_dtype(index: st.TensorIndex, names) -> str:
  kinds = {index.dtype(n) for n in names}
  return "bfloat16" if kinds == {"BF16"} else "float32"


def _import_layout(directory: str, hf: dict, where: str):
  """(ModelConfig, tensor mappings, TensorIndex) of a directory, by its config.json and tensors;
  the config is checked before any tensor is read (only the files' headers are)."""
  if hf.get("model_type") == lctx_layout.MODEL_TYPE:
    cfg = lctx_layout.config_from_hf(hf, where)
    return cfg, lctx_layout.tensor_map(cfg), _index(directory)
  archs = hf.get("architectures") or []
  if any(a in FAMILIES for a in archs):
    cfg = config_from_hf(hf, where)
    return cfg, tensor_map(cfg), _index(directory)
  index = _index(directory)
  if not spikingbrain.gla_layers(index.names()):
    family_of(hf, where)  # no known architecture and no SpikingBrain gate tensors: raises
  cfg = spikingbrain.config_from_hf(hf, where, index.names())
  return cfg, spikingbrain.tensor_map(cfg), index


def _index(directory: str) -> st.TensorIndex:
  try:
    return st.TensorIndex(directory)
  except st.CheckpointFileError as e:
    raise ConversionError(str(e)) from None


def load_pretrained(directory: str, *, mesh=None, param_dtype: str | None = None,
                    dtype: str | None = None) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) of a Hugging Face model directory.

  Args:
    directory: holds config.json and model.safetensors or sharded files with their index.json
      (F32, F16 or BF16 tensors).
    mesh: place every parameter straight into its shards on this mesh (from the logical axis
      rules); None puts them on the default device.
    param_dtype: "float32" or "bfloat16"; None keeps bfloat16 when every tensor is stored so and
      float32 otherwise.
    dtype: the compute dtype of the returned ModelConfig; None: float32, or the one a config.json
      lctx wrote records.
  Raises ConversionError (a ValueError) naming the file and key for a missing or truncated file,
  an unknown architecture or rope scaling, and a tensor whose shape disagrees with config.json.
  """
  where = os.path.join(directory, CONFIG)
  cfg, mappings, index = _import_layout(directory, read_config(directory), where)
  if dtype is not None:
    cfg = dataclasses.replace(cfg, dtype=dtype)
  missing = [m.hf for m in mappings if m.hf not in index]
  if missing:
    raise ConversionError(f"{directory}: the checkpoint lacks {missing[:3]} ({len(missing)} "
                          f"tensors in all) that {CONFIG} implies")
  for m in mappings:
    if index.shape(m.hf) != m.hf_shape:
      raise ConversionError(f"{directory}: tensor {m.hf} has shape {index.shape(m.hf)}, but "
                            f"{CONFIG} implies {m.hf_shape}")
  param_dtype = param_dtype or _stored_dtype(index, [m.hf for m in mappings])
  cfg = dataclasses.replace(cfg, param_dtype=param_dtype)
  np_dtype = _NP_DTYPES[param_dtype]
  shardings = None if mesh is None else param_shardings(cfg, mesh)
  params: dict = {}
  for m in mappings:
    view = m.to_lctx(index.read(m.hf))
    if shardings is None:
      value = jnp.asarray(np.asarray(view, dtype=np_dtype))
    else:
      value = jax.make_array_from_callback(
          view.shape, get_path(shardings, m.path),
          lambda idx, view=view: np.asarray(view[idx], dtype=np_dtype))
    set_path(params, m.path, value)
  return cfg, params


# ------------------------------------------------------------------------------------------------
# Export.


def export_layout(cfg: ModelConfig) -> tuple[str, dict, list[TensorMapping]]:
  """(layout name, config.json, tensor mappings) that save_pretrained writes for `cfg`: the
  transformers family that holds it, else SpikingBrain's layout, else lctx's own."""
  if not transformers_reasons(cfg):
    return "transformers", config_to_hf(cfg), tensor_map(cfg)
  if not spikingbrain.reasons(cfg):
    return "spikingbrain", spikingbrain.config_to_hf(cfg), spikingbrain.tensor_map(cfg)
  return "lctx", lctx_layout.config_to_hf(cfg), lctx_layout.tensor_map(cfg)


def save_pretrained(out: str, cfg: ModelConfig, params: dict, *,
                    max_shard_bytes: int = MAX_SHARD_BYTES,
                    tokenizer_dir: str | None = None) -> list[str]:
  """Writes config.json and safetensors ({"format": "pt"} metadata) to `out`; returns the files.

  Files above `max_shard_bytes` are split into model-0000i-of-0000n.safetensors with
  model.safetensors.index.json. Tensors keep the parameters' dtype. `tokenizer_dir`: copy its
  tokenizer files (tokenizer.json and friends) along. The layout is export_layout's.
  """
  _, hf, mappings = export_layout(cfg)
  params = nn.unbox(params)
  os.makedirs(out, exist_ok=True)
  sizes = []
  for m in mappings:
    leaf = get_path(params, m.path)
    sizes.append(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize)
  groups, current, used = [], [], 0
  for m, size in zip(mappings, sizes):
    if current and used + size > max_shard_bytes:
      groups.append(current)
      current, used = [], 0
    current.append(m)
    used += size
  groups.append(current)
  names = ([st.SINGLE] if len(groups) == 1 else
           [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
  for stale in os.listdir(out):
    if stale.endswith(".safetensors") or stale == st.INDEX:
      os.remove(os.path.join(out, stale))

  def host(m):
    array = np.asarray(jax.device_get(get_path(params, m.path)))
    return np.ascontiguousarray(m.to_hf(array))

  weight_map = {}
  for name, group in zip(names, groups):
    st.write_file(os.path.join(out, name), ((m.hf, host(m)) for m in group), {"format": "pt"})
    weight_map.update({m.hf: name for m in group})
  if len(groups) > 1:
    with open(os.path.join(out, st.INDEX), "w") as f:
      json.dump({"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map}, f,
                indent=2)
  with open(os.path.join(out, CONFIG), "w") as f:
    json.dump(hf, f, indent=2)
  copied = copy_tokenizer_files(tokenizer_dir, out) if tokenizer_dir else []
  return [CONFIG] + names + ([st.INDEX] if len(groups) > 1 else []) + copied


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
  """Copies the TOKENIZER_FILES that `src` has into `dst`; returns their names."""
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), os.path.join(dst, name))
      copied.append(name)
  return copied
