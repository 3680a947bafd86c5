"""lctx's own checkpoint layout, for models no transformers class holds and SpikingBrain's layout
does not fit (Lightning, linear or delta-rule layers, parallel hybrids, MoE, sinks...).

config.json:
  {"architectures": ["LctxForCausalLM"], "model_type": "lctx", "lctx_layout_version": 1,
   "lctx_config": <the ModelConfig as JSON, lctx/convert/config_json.py>,
   "vocab_size", "hidden_size", "num_hidden_layers" (for tools that read only those)}
safetensors: one tensor per lctx parameter, named by its path joined with "." ("embedding",
"layer_0.mixer.q", "layer_3.moe.experts.w_up", ...), in lctx's own shape and dtype. No
transformers class loads it; `load_pretrained` reads it back bit-exactly.
"""

import jax

from lctx.config import ModelConfig
from lctx.convert import config_json
from lctx.convert.common import SAME, ConversionError, TensorMapping, recorded_config
from lctx.model import abstract_params

ARCH = "LctxForCausalLM"
MODEL_TYPE = "lctx"
VERSION = 1


def config_to_hf(cfg: ModelConfig) -> dict:
  return {"architectures": [ARCH], "model_type": MODEL_TYPE, "lctx_layout_version": VERSION,
          "lctx_config": config_json.to_json(cfg), "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
          "torch_dtype": cfg.param_dtype}


def config_from_hf(hf: dict, where: str) -> ModelConfig:
  if hf.get("lctx_layout_version") != VERSION or "lctx_config" not in hf:
    raise ConversionError(f"{where}: model_type 'lctx' needs lctx_layout_version {VERSION} and "
                          "lctx_config")
  return recorded_config(hf, where)


def tensor_map(cfg: ModelConfig) -> list[TensorMapping]:
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params(cfg)):
    keys = tuple(str(k.key) for k in path)
    out.append(TensorMapping(".".join(keys), keys, SAME, SAME, tuple(leaf.shape)))
  return out
