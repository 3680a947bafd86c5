"""Hugging Face import and export (lctx/convert/hf.py) against transformers' own outputs.

The fixtures under tests/data/hf were written by tests/make_hf_fixtures.py with torch and
transformers (which the suite never imports): tiny Llama (GQA, llama3 RoPE), Qwen2 (biases, tied
embeddings, yarn, bfloat16), Mistral (sliding window, sharded float16) and Qwen3 (q/k norms,
explicit head_dim, dynamic NTK) models, with the logits and greedy tokens transformers computed.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.rope import RopeScaling, rope_frequencies
from lctx.convert import hf
from lctx.convert import safetensors_io as st
from lctx.generate import generate
from lctx.model import DecoderLM

DATA = os.path.join(os.path.dirname(__file__), "data", "hf")
FAMILIES = ("llama", "qwen2", "mistral", "qwen3")


def _expected(name):
  return np.load(os.path.join(DATA, name, "expected.npz"))


def _logits(cfg, params, prompts):
  return np.asarray(DecoderLM(cfg).apply({"params": params}, jnp.asarray(prompts)))


def _rel_err(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", FAMILIES)
def test_import_reproduces_transformers(name):
  cfg, params = hf.load_pretrained(os.path.join(DATA, name))
  exp = _expected(name)
  logits = _logits(cfg, params, exp["prompts"])
  assert _rel_err(logits, exp["logits"]) < 1e-4
  model = DecoderLM(cfg)
  tokens = generate(model, params, jnp.asarray(exp["prompts"]), jax.random.key(0),
                    max_new_tokens=exp["greedy"].shape[1])
  np.testing.assert_array_equal(np.asarray(tokens), exp["greedy"])


def test_import_settings_and_dtypes():
  """What each fixture exercises really reached the config (so the logit checks mean it)."""
  cfgs = {n: hf.load_pretrained(os.path.join(DATA, n))[0] for n in FAMILIES}
  att = {n: c.mixer_config("attention") for n, c in cfgs.items()}
  assert att["llama"].rope_scaling.rope_type == "llama3" and att["llama"].kv_heads == 2
  assert att["qwen2"].qkv_bias and cfgs["qwen2"].tie_embeddings
  assert att["qwen2"].rope_scaling.rope_type == "yarn"
  assert cfgs["qwen2"].param_dtype == "bfloat16"  # stored BF16, kept
  assert att["mistral"].window == 7  # sliding_window 8: itself and 7 earlier keys
  assert cfgs["mistral"].param_dtype == "float32"  # stored F16, widened
  assert os.path.exists(os.path.join(DATA, "mistral", st.INDEX))
  assert att["qwen3"].qk_norm and att["qwen3"].head_dim == 16
  assert att["qwen3"].rope_scaling.rope_type == "dynamic"
  assert not any(c.scale_tied_logits for c in cfgs.values())


def test_rope_frequencies_match_transformers():
  with open(os.path.join(DATA, "rope.json")) as f:
    cases = json.load(f)["cases"]
  for label, case in cases.items():
    s = case["scaling"]
    scaling = None if s is None else hf.rope_settings(
        {"rope_scaling": s, "rope_theta": case["base"], "max_position_embeddings":
         case["max_position"]}, label)[1]
    inv = rope_frequencies(case["head_dim"], case["base"], scaling, max_position=10)
    np.testing.assert_allclose(inv, case["inv_freq"], rtol=2e-6, err_msg=label)
    factor = 1.0 if scaling is None else scaling.cos_sin_factor()
    assert factor == pytest.approx(case["attention_factor"], rel=1e-6), label
    if "inv_freq_at_100" in case:
      np.testing.assert_allclose(rope_frequencies(case["head_dim"], case["base"], scaling,
                                                  max_position=99),
                                 case["inv_freq_at_100"], rtol=2e-6, err_msg=label)


@pytest.mark.parametrize("name,shard", [("llama", None), ("qwen2", None), ("qwen3", 30_000)])
def test_export_then_import_is_identity(tmp_path, name, shard):
  cfg, params = hf.load_pretrained(os.path.join(DATA, name))
  kwargs = {} if shard is None else {"max_shard_bytes": shard}
  files = hf.save_pretrained(str(tmp_path), cfg, params, **kwargs)
  assert (st.INDEX in files) == (shard is not None)
  for f in files:
    if f.endswith(".safetensors"):
      header, _ = st.read_header(os.path.join(tmp_path, f))
      assert header["__metadata__"] == {"format": "pt"}
  cfg2, params2 = hf.load_pretrained(str(tmp_path))
  assert cfg2 == cfg
  flat = jax.tree_util.tree_leaves_with_path(params)
  flat2 = dict(jax.tree_util.tree_leaves_with_path(params2))
  assert len(flat) == len(flat2)
  for path, leaf in flat:
    assert flat2[path].dtype == leaf.dtype
    np.testing.assert_array_equal(np.asarray(flat2[path]), np.asarray(leaf))


def test_import_onto_a_mesh_places_shards():
  from sharding.mesh import MeshConfig, make_mesh
  mesh = make_mesh(MeshConfig())
  cfg, params = hf.load_pretrained(os.path.join(DATA, "llama"), mesh=mesh)
  _, host = hf.load_pretrained(os.path.join(DATA, "llama"))
  shardings = hf.param_shardings(cfg, mesh)
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(params),
                                    jax.tree.leaves(shardings)):
    assert leaf.sharding == sharding, path
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(host)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _copy(name, tmp_path):
  dst = tmp_path / name
  shutil.copytree(os.path.join(DATA, name), dst)
  return dst


def _edit_config(directory, **changes):
  path = directory / hf.CONFIG
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config))


def test_bad_checkpoints_name_the_file_and_key(tmp_path):
  with pytest.raises(hf.ConversionError, match="config.json: no such file"):
    hf.load_pretrained(str(tmp_path))
  d = _copy("llama", tmp_path)
  weights = d / st.SINGLE
  data = weights.read_bytes()
  weights.write_bytes(data[:len(data) - 100])
  with pytest.raises(hf.ConversionError, match=r"model.safetensors: truncated"):
    hf.load_pretrained(str(d))
  weights.write_bytes(data)
  _edit_config(d, architectures=["GPT2LMHeadModel"])
  with pytest.raises(hf.ConversionError, match="GPT2LMHeadModel.*not supported"):
    hf.load_pretrained(str(d))
  _edit_config(d, architectures=["LlamaForCausalLM"], rope_parameters=None,
               rope_theta=1e4, rope_scaling={"type": "longrope", "factor": 2.0})
  with pytest.raises(hf.ConversionError, match="rope_scaling type 'longrope'"):
    hf.load_pretrained(str(d))
  _edit_config(d, rope_parameters={"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0})
  with pytest.raises(hf.ConversionError, match="rope_parameters .*'linear'.* and rope_scaling "
                                               ".*'longrope'.* disagree"):
    hf.load_pretrained(str(d))
  _edit_config(d, rope_scaling=None, intermediate_size=48)
  with pytest.raises(hf.ConversionError, match=r"mlp.gate_proj.weight has shape \(64, 32\).*"
                                                r"implies \(48, 32\)"):
    hf.load_pretrained(str(d))
  shards = _copy("mistral", tmp_path)
  os.remove(shards / "model-00002-of-00003.safetensors")
  with pytest.raises(hf.ConversionError, match="model-00002-of-00003.safetensors: no such file"):
    hf.load_pretrained(str(shards))


def test_rope_scaling_settings_are_checked():
  with pytest.raises(ValueError, match="rope_type='llama3'.*original_max_position"):
    RopeScaling("llama3", 8.0)
  with pytest.raises(ValueError, match="rope_type='dynamic'.*max_position"):
    RopeScaling("dynamic", 2.0)
