"""The linear-attention mixers inside the model: configs, decay schedule, decoding, training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from layers.linear_mixers import GLAConfig, LinearAttentionConfig, lightning_log_decay
from lctx.config import ModelConfig
from lctx.generate import generate, greedy_by_recompute
from lctx.model import DecoderLM, init_params
from layers.registry import get_mixer

MIXERS = ("linear", "lightning", "gla", "gated_deltanet", "kda")


def tiny_model(mixer, **options):
  opts = {mixer: get_mixer(mixer).Config(num_heads=2, chunk_size=16, **options)}
  return DecoderLM(ModelConfig(vocab_size=32, d_model=32, num_layers=2, d_ff=64,
                               mixers=(mixer, "attention"), mixer_options=opts))


def test_lightning_slopes_follow_the_schedule():
  g = lightning_log_decay(4, layer_index=1, num_layers=4)
  np.testing.assert_allclose(g, [0.0, -1.5, -3.0, -4.5], rtol=1e-6)
  np.testing.assert_allclose(lightning_log_decay(4, 4, 4), np.zeros(4), atol=0)


@pytest.mark.parametrize("field,value,message", [
    ("feature_map", "tanh", "feature_map='tanh' must be one of"),
    ("chunk_size", 24, "chunk_size=24"),
    ("impl", "cuda", "impl='cuda'"),
    ("num_kv_heads", 3, "num_kv_heads=3"),
])
def test_config_errors_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    LinearAttentionConfig(**{field: value})
  with pytest.raises(ValueError, match="GLAConfig.gate_tau"):
    GLAConfig(gate_tau=0.0)


@pytest.mark.parametrize("mixer,options", [
    ("linear", {}), ("lightning", {}), ("gla", {}),
    ("gla", {"feature_map": "relu", "output_gate": True, "num_kv_heads": 1}),
    ("linear", {"feature_map": "hedgehog"}), ("lightning", {"feature_map": "sigmoid"}),
    ("kda", {"num_key_heads": 1}), ("gated_deltanet", {"gate": False, "conv_size": 0}),
])
def test_cached_decoding_equals_recompute(mixer, options):
  model = tiny_model(mixer, **options)
  prompt = jax.random.randint(jax.random.key(0), (2, 7), 0, 32)
  params = init_params(model, jax.random.key(1), prompt)
  cached = generate(model, params, prompt, jax.random.key(2), max_new_tokens=6)
  np.testing.assert_array_equal(cached, greedy_by_recompute(model, params, prompt, 6))


@pytest.mark.parametrize("mixer", MIXERS)
def test_model_with_each_mixer_trains(mixer):
  model = tiny_model(mixer)
  rng = np.random.default_rng(0)
  pattern = rng.integers(0, 32, 8)
  tokens = jnp.asarray(np.tile(pattern, (4, 5)))  # a repeating sequence is learnable
  params = init_params(model, jax.random.key(0), tokens)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  def loss_fn(p):
    logits = model.apply({"params": p}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  losses = []
  for _ in range(30):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]


def test_gla_gate_per_kv_head_is_the_query_gate_repeated_over_each_group():
  """gate_per_kv_head (SpikingBrain-7B) equals the per-query-head gate whose up-projection and
  bias repeat each kv head's columns over its query group."""
  shared = DecoderLM(ModelConfig(vocab_size=32, d_model=32, num_layers=1, d_ff=64, mixers="gla",
                                 mixer_options={"gla": GLAConfig(num_heads=4, num_kv_heads=2,
                                                                 chunk_size=16,
                                                                 gate_per_kv_head=True)}))
  per_query = DecoderLM(ModelConfig(vocab_size=32, d_model=32, num_layers=1, d_ff=64,
                                    mixers="gla",
                                    mixer_options={"gla": GLAConfig(num_heads=4, num_kv_heads=2,
                                                                    chunk_size=16)}))
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 32)
  params = nn.unbox(init_params(shared, jax.random.key(0), tokens))
  mixer = dict(params["layer_0"]["mixer"])
  assert mixer["gate_up"].shape == (16, 2, 8) and mixer["gate_bias"].shape == (2, 8)
  mixer["gate_bias"] = jax.random.normal(jax.random.key(2), (2, 8))
  params = {**params, "layer_0": {**params["layer_0"], "mixer": mixer}}
  wide = {**params, "layer_0": {**params["layer_0"]}}
  wide["layer_0"]["mixer"] = dict(mixer, gate_up=jnp.repeat(mixer["gate_up"], 2, axis=1),
                                  gate_bias=jnp.repeat(mixer["gate_bias"], 2, axis=0))
  np.testing.assert_allclose(shared.apply({"params": params}, tokens),
                             per_query.apply({"params": wide}, tokens), rtol=1e-6, atol=1e-6)
