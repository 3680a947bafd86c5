"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2 and Qwen3 causal LMs, without torch.

  cfg, params = load_pretrained(directory)          # a ModelConfig and a params pytree
  save_pretrained(out, cfg, params)                 # config.json + safetensors (+ tokenizer)

`DecoderLM(cfg).apply({"params": params}, tokens)` gives the logits transformers gives for the
same directory. The mapping (torch Linear weights are [out, in]; lctx kernels are [in, ...]):
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
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import ml_dtypes

from layers.attention import AttentionConfig
from layers.rope import ROPE_TYPES, RopeScaling
from lctx.config import ModelConfig
from lctx.convert import safetensors_io as st

CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
FAMILIES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
            "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
MAX_SHARD_BYTES = 5 * 10**9
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


class ConversionError(ValueError):
  """A checkpoint or config that cannot be converted; the message names the file and key."""


# ------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


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


def family_of(hf: dict, where: str) -> str:
  archs = hf.get("architectures") or []
  known = [FAMILIES[a] for a in archs if a in FAMILIES]
  if not known:
    raise ConversionError(f"{where}: architectures={archs!r} is not supported; supported: "
                          f"{sorted(FAMILIES)}")
  return known[0]


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


def config_from_hf(hf: dict, where: str = CONFIG, *, param_dtype: str = "float32",
                   dtype: str = "float32") -> ModelConfig:
  """The ModelConfig of a Hugging Face config.json (as a dict); `where` names it in errors."""
  family = family_of(hf, where)

  def need(key):
    if key not in hf:
      raise ConversionError(f"{where}: {key} is missing")
    return hf[key]

  if hf.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"{where}: hidden_act={hf['hidden_act']!r}; only silu (SwiGLU) is "
                          "supported")
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


def _exportable(cfg: ModelConfig) -> AttentionConfig:
  """The attention config of a model a transformers class holds; ConversionError otherwise."""
  reasons = []
  if set(cfg.layer_mixers()) != {"attention"}:
    reasons.append(f"mixers {sorted(set(cfg.layer_mixers()))} (only 'attention' layers)")
  if cfg.moe.enabled:
    reasons.append("MoE FFNs")
  if cfg.spiking.enabled:
    reasons.append("spiking")
  if cfg.d_ff == 0:
    reasons.append("d_ff=0")
  if cfg.tie_embeddings and cfg.scale_tied_logits:
    reasons.append("scale_tied_logits=True (transformers ties without a scale)")
  att = cfg.mixer_config("attention")
  if not att.use_rope:
    reasons.append("use_rope=False")
  if att.sinks or att.sink_tokens:
    reasons.append("attention sinks")
  if att.qkv_bias and att.window is not None:
    reasons.append("q/k/v biases with a window")
  if att.qk_norm and att.window is not None:
    reasons.append("q/k norms with a window")
  if reasons:
    raise ConversionError("save_pretrained: this model has no Hugging Face class: "
                          + "; ".join(reasons))
  return att


def config_to_hf(cfg: ModelConfig) -> dict:
  """config.json of a model that load_pretrained maps back to `cfg`."""
  att = _exportable(cfg)
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
    hf["rope_scaling"] = scaling
  return hf


# ------------------------------------------------------------------------------------------------
# Tensor names and layouts.


@dataclasses.dataclass(frozen=True)
class TensorMapping:
  """One tensor: its HF name, its lctx path and the two layout changes (numpy views)."""
  hf: str
  path: tuple[str, ...]
  to_lctx: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  hf_shape: tuple[int, ...]


def tensor_map(cfg: ModelConfig) -> list[TensorMapping]:
  """The mappings of every tensor of `cfg` (a model of the supported families)."""
  att = cfg.mixer_config("attention")
  e, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
  h, kh, d = att.num_heads, att.kv_heads, att.resolved_head_dim(e)
  same = lambda x: x
  t = lambda x: x.T

  def proj_in(heads):  # [heads d, e] <-> [e, heads, d]
    return (lambda w: w.T.reshape(e, heads, d), lambda w: w.reshape(e, heads * d).T)

  out = [TensorMapping("model.embed_tokens.weight", ("embedding",), same, same, (v, e)),
         TensorMapping("model.norm.weight", ("final_norm", "scale"), same, same, (e,))]
  if not cfg.tie_embeddings:
    out.append(TensorMapping("lm_head.weight", ("head",), t, t, (v, e)))
  for i in range(cfg.num_layers):
    p, layer = f"model.layers.{i}.", f"layer_{i}"
    out += [TensorMapping(p + "input_layernorm.weight", (layer, "mixer_norm", "scale"), same, same, (e,)),
            TensorMapping(p + "post_attention_layernorm.weight", (layer, "mlp_norm", "scale"), same,
                    same, (e,))]
    for name, heads in (("q", h), ("k", kh), ("v", kh)):
      out.append(TensorMapping(p + f"self_attn.{name}_proj.weight", (layer, "mixer", name),
                         *proj_in(heads), (heads * d, e)))
      if att.qkv_bias:
        out.append(TensorMapping(p + f"self_attn.{name}_proj.bias", (layer, "mixer", name + "_bias"),
                           lambda b, heads=heads: b.reshape(heads, d), lambda b: b.reshape(-1),
                           (heads * d,)))
    out.append(TensorMapping(p + "self_attn.o_proj.weight", (layer, "mixer", "o"),
                       lambda w: w.T.reshape(h, d, e), lambda w: w.reshape(h * d, e).T,
                       (e, h * d)))
    if att.qk_norm:
      for name in ("q", "k"):
        out.append(TensorMapping(p + f"self_attn.{name}_norm.weight", (layer, "mixer", f"{name}_norm",
                                                                   "scale"), same, same, (d,)))
    for name, shape in (("gate", (f, e)), ("up", (f, e)), ("down", (e, f))):
      out.append(TensorMapping(p + f"mlp.{name}_proj.weight", (layer, "mlp", name), t, t, shape))
  return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


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


def load_pretrained(directory: str, *, mesh=None, param_dtype: str | None = None,
                    dtype: str = "float32") -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) of a Hugging Face model directory.

  Args:
    directory: holds config.json and model.safetensors or sharded files with their index.json
      (F32, F16 or BF16 tensors).
    mesh: place every parameter straight into its shards on this mesh (from the logical axis
      rules); None puts them on the default device.
    param_dtype: "float32" or "bfloat16"; None keeps bfloat16 when every tensor is stored so and
      float32 otherwise.
    dtype: the compute dtype of the returned ModelConfig.
  Raises ConversionError (a ValueError) naming the file and key for a missing or truncated file,
  an unknown architecture or rope scaling, and a tensor whose shape disagrees with config.json.
  """
  where = os.path.join(directory, CONFIG)
  cfg = config_from_hf(read_config(directory), where, dtype=dtype)  # before any tensor is read
  try:
    index = st.TensorIndex(directory)
  except st.CheckpointFileError as e:
    raise ConversionError(str(e)) from None
  mappings = tensor_map(cfg)
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
          view.shape, _get(shardings, m.path),
          lambda idx, view=view: np.asarray(view[idx], dtype=np_dtype))
    _set(params, m.path, value)
  return cfg, params


# ------------------------------------------------------------------------------------------------
# Export.


def save_pretrained(out: str, cfg: ModelConfig, params: dict, *,
                    max_shard_bytes: int = MAX_SHARD_BYTES,
                    tokenizer_dir: str | None = None) -> list[str]:
  """Writes config.json and safetensors ({"format": "pt"} metadata) to `out`; returns the files.

  Files above `max_shard_bytes` are split into model-0000i-of-0000n.safetensors with
  model.safetensors.index.json. Tensors keep the parameters' dtype. `tokenizer_dir`: copy its
  tokenizer files (tokenizer.json and friends) along.
  """
  hf = config_to_hf(cfg)
  mappings = tensor_map(cfg)
  os.makedirs(out, exist_ok=True)
  sizes = []
  for m in mappings:
    leaf = _get(params, m.path)
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
    array = np.asarray(jax.device_get(_get(params, m.path)))
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
