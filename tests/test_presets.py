"""Every gin/models preset builds and runs a forward pass; the full-size ones are counted exactly.

The full-size SpikingBrain presets are only traced (jax.eval_shape: no parameter is allocated)
and their parameter counts are compared with counts written out from the published shapes.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.run import load_configs
from lctx.model import DecoderLM
from tests.cli import ROOT

G, S, A = "gla", "swa", "attention"
# preset -> the mixer of every layer it must expand to
LAYOUTS = {
    "tiny.gin": (A,) * 4,
    "tiny_gla.gin": (G, A, G, A),
    "tiny_spikingbrain_7b.gin": (G, S, G, S),
    "tiny_spikingbrain_76b.gin": ("gla+swa", "gla+attention"),
    "hybrid_jamba.gin": (G,) * 4 + (A,) + (G,) * 3,
    "hybrid_minimax.gin": ("lightning",) * 7 + (A,),
    "hybrid_qwen3_next.gin": ("gated_deltanet",) * 3 + (A,) + ("gated_deltanet",) * 3 + (A,),
    "hybrid_longgen.gin": (S, S, A, A, S, S),
    "hybrid_list.gin": ("lightning", A, "lightning", "lightning", A, "lightning"),
}


def _model_config(preset, *bindings):
  return load_configs(["gin/quickstart.gin", f"gin/models/{preset}"], list(bindings))["model"]


def _param_count(cfg) -> int:
  model = DecoderLM(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_every_preset_is_listed():
  small = {f for f in os.listdir(os.path.join(ROOT, "gin/models")) if f.endswith(".gin")}
  assert small == set(LAYOUTS) | {"spikingbrain_7b.gin", "spikingbrain_76b.gin"}


def _shortest_prefix_with_every_mixer(cfg):
  """cfg cut to its first n layers, n the fewest that hold every distinct mixer of the preset."""
  mixers = cfg.layer_mixers()
  n = max(mixers.index(name) for name in set(mixers)) + 1
  if len(cfg.mixers) == 1:
    return dataclasses.replace(cfg, num_layers=n)
  return dataclasses.replace(cfg, num_layers=n, mixers=cfg.mixers[:n])


@pytest.mark.parametrize("preset", sorted(LAYOUTS))
def test_preset_builds_and_runs_forward(preset):
  cfg = _model_config(preset)
  assert cfg.layer_mixers() == LAYOUTS[preset]
  # The whole preset is built (traced, no compile); the forward runs on the shortest prefix of
  # its layers that holds every kind of layer it has (compile time grows with depth).
  tokens = jnp.zeros((2, 64), jnp.int32)
  full = jax.eval_shape(lambda x: DecoderLM(cfg).init_with_output(jax.random.key(0), x), tokens)
  assert full[0].shape == (2, 64, cfg.vocab_size)
  layers = {name for name in full[1]["params"] if name.startswith("layer_")}
  assert layers == {f"layer_{i}" for i in range(cfg.num_layers)}, sorted(full[1]["params"])
  cfg = _shortest_prefix_with_every_mixer(cfg)
  model = DecoderLM(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 64)), jnp.int32)
  # Init and forward in one compile.
  logits, collections = jax.jit(lambda key, x: model.apply(
      {"params": model.init(key, x)["params"]}, x, mutable=["intermediates"]))(
          jax.random.key(0), tokens)
  assert logits.shape == (2, 64, cfg.vocab_size)
  assert np.isfinite(np.asarray(logits)).all()
  sown = jax.tree_util.tree_flatten_with_path(collections)[0]
  spike_sites = {k.key for path, _ in sown for k in path
                 if str(getattr(k, "key", "")).startswith("spikes_")}
  if cfg.spiking.enabled:
    assert spike_sites == {"spikes_mixer_in", "spikes_mixer_out", "spikes_mlp_in",
                           "spikes_mlp_hidden", "spikes_attention_q"}
  else:
    assert not spike_sites


def _attention_params(d, heads, kv_heads, head_dim, bias=True):
  q, kv = heads * head_dim, kv_heads * head_dim
  return d * q + 2 * d * kv + q * d + ((q + 2 * kv) if bias else 0)


def test_spikingbrain_7b_parameter_count():
  cfg = _model_config("spikingbrain_7b.gin")
  assert cfg.layer_mixers() == (G, S) * 14
  v, d, f, layers = 152064, 3584, 18944, 28
  attention = _attention_params(d, 28, 4, 128)
  qwen = 2 * v * d + d + layers * (attention + 3 * d * f + 2 * d)
  assert qwen == 7_615_616_512  # Qwen2.5-7B (untied), whose weights SpikingBrain-7B reuses
  # The low-rank gate (one gate per kv head: 16 -> 4 * 128), its bias and o_norm.
  gla_extra = d * 16 + 16 * 4 * 128 + 4 * 128 + 128
  assert _param_count(cfg) == qwen + 14 * gla_extra == 7_616_542_976


def test_spikingbrain_76b_style_parameter_count():
  cfg = _model_config("spikingbrain_76b.gin")
  assert cfg.layer_mixers()[6] == cfg.layer_mixers()[27] == "gla+attention"
  assert cfg.layer_mixers().count("gla+swa") == 24
  assert [i for i in range(28) if not cfg.uses_moe(i)] == [0, 1, 2, 4, 6, 8, 10]
  v, d, f, layers, e = 152064, 5120, 12672, 28, 16
  attention = _attention_params(d, 40, 8, 128)
  gla = attention + d * 16 + 16 * 40 * 128 + 40 * 128 + 128
  softmax = attention + 2 * 128 * 8 * 128  # 128 sink keys and values per kv head
  mixer = gla + softmax + 2 * d  # plus each branch's output norm
  dense_ffn, moe_ffn = 3 * d * f, d * e + (e + 1) * 3 * d * f
  total = 2 * v * d + d + layers * (mixer + 2 * d) + 7 * dense_ffn + 21 * moe_ffn
  assert _param_count(cfg) == total
  assert 75e9 < total < 77e9
