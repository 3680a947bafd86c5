"""Spiking, parallel-hybrid, sink-token and MoE pieces inside the model, against direct formulas."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from layers.attention import AttentionConfig, SlidingWindowConfig
from layers.hybrid import ParallelMixers
from layers.linear_mixers import GLA, GLAConfig
from layers.mlp import SwiGLU
from layers.moe import MoEConfig
from layers.norms import RMSNorm
from layers.quant import fake_quant_int8_grouped
from layers.spiking import SpikeConfig, adaptive_spike
from lctx.config import ModelConfig
from lctx.generate import generate, greedy_by_recompute
from lctx.model import DecoderLM, init_params
from lctx.patterns import LayerPattern
from lctx.steps import loss_sums, make_train_step

HIGHEST = jax.default_matmul_precision("highest")


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_swiglu_spiking_is_the_dense_block_at_the_spiked_input_with_an_identity_gradient():
  x, e, f = _x((2, 5, 12)), 12, 20
  plain = SwiGLU(e, f)
  spiking = SwiGLU(e, f, spiking=SpikeConfig(enabled=True, sites=("mlp_in",)))
  params = plain.init(jax.random.key(0), x)
  x_hat = adaptive_spike(x)
  with HIGHEST:
    np.testing.assert_allclose(spiking.apply(params, x), plain.apply(params, x_hat), atol=1e-6)
    w = _x((2, 5, 12), 1)
    g_spike = jax.grad(lambda x: jnp.sum(w * spiking.apply(params, x)))(x)
    g_plain = jax.grad(lambda x: jnp.sum(w * plain.apply(params, x)))(x_hat)
  np.testing.assert_allclose(g_spike, g_plain, atol=1e-6)
  assert not np.allclose(plain.apply(params, x), spiking.apply(params, x), atol=1e-3)


def test_swiglu_int8_weights_are_group_quantized_along_the_fan_in():
  x, e, f = _x((1, 3, 200)), 200, 136
  quantized = SwiGLU(e, f, spiking=SpikeConfig(int8_weights=True, weight_group=128))
  params = SwiGLU(e, f).init(jax.random.key(0), x)
  fq = jax.tree.map(lambda w: fake_quant_int8_grouped(w, 128, (0,)), nn.unbox(params))
  with HIGHEST:
    np.testing.assert_allclose(quantized.apply(params, x), SwiGLU(e, f).apply(fq, x), atol=1e-6)
  w = nn.unbox(params)["params"]["gate"]
  assert 0 < np.abs(fq["params"]["gate"] - w).max() <= np.abs(w[:128]).max() / 127 / 2 + 1e-7


def test_parallel_hybrid_sums_the_normalized_branch_outputs():
  x, pos = _x((2, 16, 32)), jnp.broadcast_to(jnp.arange(16), (2, 16))
  gla_cfg, swa_cfg = GLAConfig(num_heads=2, chunk_size=16), SlidingWindowConfig(2, window=4)
  layer = ParallelMixers(config=(("gla", gla_cfg), ("swa", swa_cfg)), d_model=32)
  params = layer.init(jax.random.key(0), x, positions_bt=pos)["params"]
  from layers.attention import SlidingWindowAttention
  with HIGHEST:
    out = layer.apply({"params": params}, x, positions_bt=pos)
    expected = 0.0
    for name, cls, cfg in (("gla", GLA, gla_cfg), ("swa", SlidingWindowAttention, swa_cfg)):
      y = cls(config=cfg, d_model=32).apply({"params": params[name]}, x, positions_bt=pos)
      expected = expected + RMSNorm().apply({"params": params[f"{name}_norm"]}, y)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  assert set(params) == {"gla", "gla_norm", "swa", "swa_norm"}


def _hybrid_config(**moe):
  return ModelConfig(
      d_model=32, num_layers=2, d_ff=48,
      mixers=LayerPattern(kind="list", base="gla+swa", special="gla+attention", layers=(1,)),
      mixer_options={"gla": GLAConfig(num_heads=2, num_kv_heads=1, feature_map="relu",
                                      qkv_bias=True, chunk_size=16),
                     "swa": SlidingWindowConfig(2, 1, window=3, sink_tokens=3, qkv_bias=True),
                     "attention": AttentionConfig(2, 1, sink_tokens=2)},
      moe=MoEConfig(enabled=True, num_experts=4, top_k=1, dense_layers=(0,), **moe),
      spiking=SpikeConfig(enabled=True))


def test_cached_decoding_of_the_spiking_moe_hybrid_equals_recompute():
  model = DecoderLM(_hybrid_config())
  params = init_params(model, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  params = jax.tree.map(lambda p: p * 3.0, params)  # sharpen so greedy choices are not near-ties
  prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 256)
  with HIGHEST:
    cached = generate(model, params, prompt, jax.random.key(2), max_new_tokens=6)
    recomputed = greedy_by_recompute(model, params, prompt, 6)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(recomputed))
  assert len(np.unique(np.asarray(cached))) > 2, "degenerate test: a constant continuation"


def test_moe_balance_loss_enters_the_objective_and_the_metrics():
  cfg = _hybrid_config(balance_loss_weight=0.5)
  model = DecoderLM(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 256)
  seg = jnp.ones((2, 32), jnp.int32).at[1, 20:].set(0)  # padding: no loss, no balance term
  batch = {"tokens": tokens, "positions": jnp.broadcast_to(jnp.arange(32), (2, 32)),
           "segment_ids": seg}
  params = init_params(model, jax.random.key(0), tokens)
  # One compile for both: the objective and the layers' sown balance terms.
  (objective, sums), (_, inter) = jax.jit(lambda p, b: (
      loss_sums(model, p, b), model.apply({"params": p}, tokens, b["positions"], seg,
                                          mutable=["intermediates"])))(params, batch)
  balance = [v[0] for path, v in jax.tree_util.tree_flatten_with_path(
      inter, is_leaf=lambda v: isinstance(v, tuple))[0] if "moe_balance" in str(path)]
  assert len(balance) == 1  # layer 1; layer 0 keeps its dense FFN
  np.testing.assert_allclose(sums["aux"], 0.5 * sum(balance) * sums["tokens"], rtol=1e-5)
  np.testing.assert_allclose(objective, sums["ce"] + sums["aux"], rtol=1e-6)
  tx = optax.sgd(0.1)
  step = jax.jit(make_train_step(model, tx, optax.constant_schedule(0.1)))
  _, metrics = step({"step": jnp.zeros((), jnp.int32), "params": params,
                     "opt_state": tx.init(params)}, batch)
  np.testing.assert_allclose(metrics["aux_loss"], 0.5 * sum(balance), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], sums["ce"] / sums["tokens"], rtol=1e-5)


def test_spiking_changes_the_model_but_not_its_parameters():
  cfg = _hybrid_config()
  dense = dataclasses.replace(cfg, spiking=SpikeConfig())
  tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, 256)
  params = init_params(DecoderLM(cfg), jax.random.key(0), tokens)
  assert (jax.tree.structure(params)
          == jax.tree.structure(jax.eval_shape(
              lambda: DecoderLM(dense).init(jax.random.key(0), tokens)["params"])))
  a = jax.jit(DecoderLM(cfg).apply)({"params": params}, tokens)
  b = jax.jit(DecoderLM(dense).apply)({"params": params}, tokens)
  assert np.isfinite(np.asarray(a)).all() and not np.allclose(a, b, atol=1e-3)


def test_config_errors_name_the_setting():
  with pytest.raises(ValueError, match=r"MoEConfig.dense_layers=\(5,\).*num_layers=2"):
    dataclasses.replace(_hybrid_config(), moe=MoEConfig(enabled=True, dense_layers=(5,)))
  with pytest.raises(ValueError, match="SlidingWindowConfig.window must be set"):
    SlidingWindowConfig(window=None)
  with pytest.raises(ValueError, match="sink_tokens=-1"):
    AttentionConfig(sink_tokens=-1)
