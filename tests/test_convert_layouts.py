"""Export and import of models no transformers class holds: SpikingBrain's GLA / SWA layout and
lctx's own layout (lctx/convert/spikingbrain.py, lctx_layout.py), bit-exact both ways."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.run import load_configs
from lctx.convert import hf, spikingbrain
from lctx.convert import safetensors_io as st
from lctx.model import DecoderLM, abstract_params

SMALL = ["ModelConfig.vocab_size = 64", "ModelConfig.d_model = 32", "ModelConfig.d_ff = 48"]
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 24)), jnp.int32)


def _model(gin_file, *bindings):
  """A config and random parameters of its shapes (no init compiled): values near what init
  gives but non-trivial everywhere (unit norms or zero biases would hide a mix-up)."""
  cfg = load_configs([gin_file], [*SMALL, *bindings])["model"]
  rng = np.random.default_rng(1)

  def value(path, leaf):
    base = 1.0 if str(path[-1].key) == "scale" else 0.0
    noise = rng.normal(0.0, 0.1, leaf.shape)
    return jnp.asarray(base + noise, leaf.dtype)

  return cfg, jax.tree_util.tree_map_with_path(value, abstract_params(cfg))


def _logits(cfg, params):
  return np.asarray(jax.jit(DecoderLM(cfg).apply)({"params": params}, TOKENS))


def _assert_bit_equal(a, b):
  fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    assert x.dtype == y.dtype, path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


SPIKINGBRAIN = ("gin/models/tiny_spikingbrain_7b.gin", "GLAConfig.num_heads = 2",
                "GLAConfig.num_kv_heads = 1", "GLAConfig.head_dim = 16",
                "SlidingWindowConfig.num_heads = 2", "SlidingWindowConfig.num_kv_heads = 1",
                "SlidingWindowConfig.head_dim = 16", "SlidingWindowConfig.window = 8")


def test_spikingbrain_layout_round_trips_and_names_its_tensors(tmp_path):
  cfg, params = _model(*SPIKINGBRAIN)
  assert cfg.layer_mixers() == ("gla", "swa", "gla", "swa") and cfg.spiking.enabled
  out = str(tmp_path / "sb")
  hf.save_pretrained(out, cfg, params)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["architectures"] == [spikingbrain.ARCH] and config["sliding_window"] == 8
  index = st.TensorIndex(out)
  assert index.shape("model.layers.0.self_attn.gk_proj.0.weight") == (16, 32)
  assert index.shape("model.layers.0.self_attn.gk_proj.1.weight") == (16, 16)  # [Hk d, R]
  assert index.shape("model.layers.0.self_attn.gk_proj.1.bias") == (16,)
  assert index.shape("model.layers.0.self_attn.g_norm.weight") == (16,)
  assert index.shape("model.layers.1.self_attn.q_proj.bias") == (32,)
  assert "model.layers.1.self_attn.gk_proj.0.weight" not in index
  np.testing.assert_array_equal(index.read("model.layers.2.self_attn.gk_proj.1.bias"),
                                np.asarray(params["layer_2"]["mixer"]["gate_bias"]).reshape(-1))
  back_cfg, back = hf.load_pretrained(out)
  assert back_cfg == cfg
  _assert_bit_equal(back, params)

  # A release's config.json: Qwen2's fields, its own architecture name, no lctx_config. The
  # layout is found from the gate tensors; spiking (an activation coding) is off.
  del config["lctx_config"]
  config["architectures"] = ["SomeReleaseForCausalLM"]
  json.dump(config, open(os.path.join(out, "config.json"), "w"))
  release_cfg, release = hf.load_pretrained(out)
  assert release_cfg.layer_mixers() == cfg.layer_mixers() and not release_cfg.spiking.enabled
  for name in ("gla", "swa"):
    mine, theirs = release_cfg.mixer_config(name), cfg.mixer_config(name)
    assert dataclasses.replace(mine, chunk_size=theirs.chunk_size) == theirs if name == "gla" \
        else mine == theirs
  _assert_bit_equal(release, params)
  dense_cfg = dataclasses.replace(cfg, spiking=release_cfg.spiking)
  np.testing.assert_array_equal(_logits(release_cfg, release), _logits(dense_cfg, params))


def test_the_spikingbrain_template_is_the_preset():
  preset = load_configs(["gin/models/spikingbrain_7b.gin"], [])["model"].mixer_config("gla")
  fields = ("feature_map", "output_norm", "output_gate", "qkv_bias", "gate_rank", "gate_tau",
            "gate_per_kv_head")
  assert {f: getattr(preset, f) for f in fields} == {
      f: getattr(spikingbrain.GLA_TEMPLATE, f) for f in fields}


@pytest.mark.parametrize("gin_file,bindings", [
    ("gin/models/tiny_spikingbrain_76b.gin", ["ModelConfig.num_layers = 2"]),  # MoE, sinks, spiking
    ("gin/models/tiny.gin", ["ModelConfig.num_layers = 3",  # lightning, a parallel hybrid, linear
                             "ModelConfig.mixers = ['lightning', 'gla+swa', 'linear']",
                             "SlidingWindowConfig.window = 8"]),
])
def test_lctx_layout_round_trips_bit_exactly(tmp_path, gin_file, bindings):
  cfg, params = _model(gin_file, *bindings)
  assert hf.export_layout(cfg)[0] == "lctx"
  out = str(tmp_path / "lctx")
  written = hf.save_pretrained(out, cfg, params)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["model_type"] == "lctx" and config["architectures"] == ["LctxForCausalLM"]
  assert "layer_0.mixer_norm.scale" in st.TensorIndex(out)
  back_cfg, back = hf.load_pretrained(out)
  assert back_cfg == cfg and written[0] == "config.json"
  _assert_bit_equal(back, params)
  np.testing.assert_array_equal(_logits(back_cfg, back), _logits(cfg, params))
  # A GLA model with a per-query-head gate is not SpikingBrain's: it goes to lctx's layout too.
  gla = load_configs(["gin/models/tiny.gin"], ["ModelConfig.num_layers = 2",
                                               "ModelConfig.mixers = ['gla', 'swa']",
                                               "SlidingWindowConfig.window = 8"])["model"]
  assert hf.export_layout(gla)[0] == "lctx"
  assert any("gate_per_kv_head=False" in r for r in spikingbrain.reasons(gla))
