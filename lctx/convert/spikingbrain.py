"""SpikingBrain-7B's checkpoint layout (its hf_7B_model/, RESEARCH.md section 9).

A GLA / sliding-window hybrid on Qwen2's keys (common.py): every layer has the Qwen2 attention
projections with q/k/v biases, norms and SwiGLU FFN; the GLA layers add
  model.layers.{i}.self_attn.gk_proj.0.weight [R, D]       -> layer_i/mixer/gate_down [D, R]
  model.layers.{i}.self_attn.gk_proj.1.weight [Hk d, R]    -> layer_i/mixer/gate_up [R, Hk, d]
  model.layers.{i}.self_attn.gk_proj.1.bias [Hk d]         -> layer_i/mixer/gate_bias [Hk, d]
  model.layers.{i}.self_attn.g_norm.weight [d]             -> layer_i/mixer/o_norm/scale
(the low-rank gate, one per kv head, logsigmoid(.) / 16; the output RMSNorm over head_dim); the
other layers are sliding-window attention.

Import recognises the layout by those tensors, whatever config.json's architectures say (a
released checkpoint's names are its own): the GLA layers are the layers that have gk_proj, the
window is config.json's sliding_window (lctx's meaning: a token sees itself and `window` earlier
keys), and the GLA settings are SpikingBrain's (GLA_TEMPLATE, the settings of
gin/models/spikingbrain_7b.gin). Spiking is an activation coding, not a weight: an imported
release runs without it unless the config.json is one lctx wrote, whose "lctx_config" holds the
whole ModelConfig (spiking included) and is read back exactly.
"""

import dataclasses

from layers.attention import SlidingWindowConfig
from layers.linear_mixers import GLAConfig
from lctx.config import ModelConfig
from lctx.convert import config_json
from lctx.convert.common import (SAME, T, ConversionError, TensorMapping, attention_maps,
                                 block_maps, block_reasons, check_silu, embedding_maps,
                                 recorded_config, required, rope_scaling_to_hf, rope_settings)

ARCH = "SpikingBrainForCausalLM"  # what lctx writes; import does not rely on it
MODEL_TYPE = "spikingbrain"
GATE = "self_attn.gk_proj.0.weight"
# SpikingBrain's GLA layer; the head layout comes from config.json.
GLA_TEMPLATE = GLAConfig(feature_map="relu", output_norm=True, output_gate=False, qkv_bias=True,
                         gate_rank=16, gate_tau=16.0, gate_per_kv_head=True)
_GLA_FIELDS = ("feature_map", "output_norm", "output_gate", "qkv_bias", "gate_tau",
               "gate_per_kv_head")


def gla_layers(names) -> list[int]:
  """Indices of the layers whose gate tensors are among `names` (checkpoint tensor names)."""
  layers = set()
  for name in names:
    if name.startswith("model.layers.") and name.endswith(GATE):
      layers.add(int(name.split(".")[2]))
  return sorted(layers)


def reasons(cfg: ModelConfig) -> list[str]:
  """Why `cfg` does not fit this layout (empty when it does)."""
  out = []
  mixers = set(cfg.layer_mixers())
  if not mixers <= {"gla", "swa"} or "gla" not in mixers:
    return [f"mixers {sorted(mixers)} (GLA and sliding-window layers only)"]
  gla = cfg.mixer_config("gla")
  for field in _GLA_FIELDS:
    if getattr(gla, field) != getattr(GLA_TEMPLATE, field):
      out.append(f"GLAConfig.{field}={getattr(gla, field)!r} (SpikingBrain: "
                 f"{getattr(GLA_TEMPLATE, field)!r})")
  out += block_reasons(cfg)
  if "swa" in mixers:
    swa = cfg.mixer_config("swa")
    heads = lambda c: (c.num_heads, c.kv_heads, c.resolved_head_dim(cfg.d_model), c.qkv_bias)
    if heads(swa) != heads(gla):
      out.append("GLA and sliding-window layers with different heads")
    if swa.sinks or swa.sink_tokens or swa.qk_norm or not swa.use_rope:
      out.append("sliding-window layers with sinks, q/k norms or without RoPE")
  return out


def config_to_hf(cfg: ModelConfig) -> dict:
  gla = cfg.mixer_config("gla")
  d = gla.resolved_head_dim(cfg.d_model)
  hf = {"architectures": [ARCH], "model_type": MODEL_TYPE, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": gla.num_heads,
        "num_key_value_heads": gla.kv_heads, "head_dim": d, "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "layer_types": list(cfg.layer_mixers()), "gate_rank": gla.gate_rank,
        "torch_dtype": cfg.param_dtype}
  if "swa" in cfg.layer_mixers():
    swa = cfg.mixer_config("swa")
    hf["sliding_window"] = swa.window
    hf["rope_theta"] = swa.rope_base
    if swa.rope_scaling is not None:
      hf["rope_scaling"] = rope_scaling_to_hf(swa.rope_scaling)
  hf["lctx_config"] = config_json.to_json(cfg)
  return hf


def config_from_hf(hf: dict, where: str, names) -> ModelConfig:
  """The ModelConfig of a SpikingBrain-layout config.json (`names`: the checkpoint's tensors)."""
  if "lctx_config" in hf:
    return recorded_config(hf, where)
  need = lambda key: required(hf, key, where)
  check_silu(hf, where)
  layers, depth = gla_layers(names), need("num_hidden_layers")
  if not layers or max(layers) >= depth:
    raise ConversionError(f"{where}: the GLA gate tensors ({GATE}) name layers {layers} of "
                          f"{depth}")
  d_model, heads = need("hidden_size"), need("num_attention_heads")
  heads_cfg = dict(num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                   head_dim=hf.get("head_dim") or d_model // heads, qkv_bias=True)
  mixers = tuple("gla" if i in layers else "swa" for i in range(depth))
  options = {"gla": dataclasses.replace(GLA_TEMPLATE, gate_rank=int(hf.get("gate_rank", 16)),
                                        **heads_cfg)}
  if "swa" in mixers:
    rope_base, scaling = rope_settings(hf, where)
    options["swa"] = SlidingWindowConfig(window=int(need("sliding_window")), rope_base=rope_base,
                                         rope_scaling=scaling, **heads_cfg)
  return ModelConfig(vocab_size=need("vocab_size"), d_model=d_model, num_layers=depth,
                     d_ff=need("intermediate_size"), mixers=mixers, mixer_options=options,
                     norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                     tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                     scale_tied_logits=False)


def tensor_map(cfg: ModelConfig) -> list[TensorMapping]:
  gla = cfg.mixer_config("gla")
  e, f = cfg.d_model, cfg.d_ff
  h, kh, d, r = gla.num_heads, gla.kv_heads, gla.resolved_head_dim(e), gla.gate_rank
  out = embedding_maps(cfg)
  for i, name in enumerate(cfg.layer_mixers()):
    out += block_maps(i, e, f)
    out += attention_maps(i, e, h, kh, d, qkv_bias=True)
    if name != "gla":
      continue
    p, layer = f"model.layers.{i}.self_attn.", f"layer_{i}"
    out += [TensorMapping(p + "gk_proj.0.weight", (layer, "mixer", "gate_down"), T, T, (r, e)),
            TensorMapping(p + "gk_proj.1.weight", (layer, "mixer", "gate_up"),
                          lambda w: w.T.reshape(r, kh, d), lambda w: w.reshape(r, kh * d).T,
                          (kh * d, r)),
            TensorMapping(p + "gk_proj.1.bias", (layer, "mixer", "gate_bias"),
                          lambda b: b.reshape(kh, d), lambda b: b.reshape(-1), (kh * d,)),
            TensorMapping(p + "g_norm.weight", (layer, "mixer", "o_norm", "scale"), SAME, SAME,
                          (d,))]
  return out
