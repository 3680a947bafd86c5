"""Cached decoding against greedy decoding by full recomputation; chunked prefill, ragged batches
and sampling controls."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention import AttentionConfig, SlidingWindowConfig
from layers.gated_deltanet import GatedDeltaNetConfig
from layers.linear_mixers import GLAConfig, LightningConfig
from lctx.config import ModelConfig
from lctx.generate import (GenerateConfig, generate, greedy_by_recompute, init_cache, left_pad,
                           sample_token)
from lctx.model import DecoderLM

# Tiny models: full attention (GQA) under sliding-window attention with sinks (MQA, tied head);
# GLA under Lightning, on their default (chunked) implementation; a hybrid whose first layer runs
# GLA and sliding-window attention in parallel and whose second is full attention with sink
# tokens.
# Attention, and the hybrid's GLA, run their reference implementations, which compile faster
# (the fast paths are tested against them in the layer tests; attention decodes densely either
# way); the linear model keeps the default chunked path, so its prefill chunks run it with the
# cached state.
REF = "reference"
MODELS = {
    "attention": dict(mixers=("attention", "swa"), tie_embeddings=True,
                      mixer_options={"attention": AttentionConfig(4, 2, impl=REF),
                                     "swa": SlidingWindowConfig(4, 1, window=3, sinks=True,
                                                                impl=REF)}),
    "linear": dict(mixers=("gla", "lightning"),
                   mixer_options={"gla": GLAConfig(4, 2, chunk_size=16),
                                  "lightning": LightningConfig(4, chunk_size=16)}),
    "hybrid": dict(mixers=("gla+swa", "attention"),
                   mixer_options={"gla": GLAConfig(4, chunk_size=16, impl=REF),
                                  "swa": SlidingWindowConfig(4, 2, window=3, impl=REF),
                                  "attention": AttentionConfig(4, 2, sink_tokens=2, impl=REF)}),
    # Gated DeltaNet (its convolution caches and state) on its chunked path under attention.
    "deltanet": dict(mixers=("gated_deltanet", "attention"),
                     mixer_options={"gated_deltanet": GatedDeltaNetConfig(4, num_key_heads=2,
                                                                          chunk_size=16),
                                    "attention": AttentionConfig(4, 2, impl=REF)}),
}


@functools.lru_cache(maxsize=None)
def make_model(name):
  """The model and its parameters, sharpened so that greedy choices are not near-ties.

  Every parameter but the query and key projections is scaled by 3: sharpened q . k logits
  would make attention nearly one-hot, and a padding key that wrongly stayed visible could then
  change nothing. Initialized in one jitted call with an "rbg" key, which compiles several times
  faster than op-by-op or threefry initialization; the tests share each model (and so its
  compiled steps).
  """
  model = DecoderLM(ModelConfig(d_model=32, num_layers=2, d_ff=64, **MODELS[name]))
  sharpen = lambda path, p: p if {"q", "k"} & {getattr(k, "key", None) for k in path} else p * 3

  @jax.jit
  def init():
    params = model.init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 4), jnp.int32))["params"]
    return jax.tree_util.tree_map_with_path(sharpen, params)

  return model, init()


def random_tokens(seed, shape):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.int32)


PROMPT = random_tokens(1, (1, 12))
NEW = 6  # tokens generated; recomputation runs over 12 + NEW tokens, one compiled forward


def one_pass(name):
  model, params = make_model(name)
  return generate(model, params, PROMPT, jax.random.key(2), max_new_tokens=NEW,
                  return_logits=True)


def recomputed(name, prompt):
  model, params = make_model(name)
  return greedy_by_recompute(model, params, prompt, NEW, length=PROMPT.shape[1] + NEW,
                             return_logits=True)


def assert_same_continuation(got, want, what):
  (tokens, logits), (want_tokens, want_logits) = got, want
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want_tokens), err_msg=what)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=1e-4, atol=1e-3,
                             err_msg=what)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_greedy_equals_recompute(name):
  """One-pass prefill and cached steps == a full forward per token, tokens and logits."""
  cached = one_pass(name)
  assert cached[0].shape == (1, NEW) and cached[1].shape == (1, NEW, 256)
  assert_same_continuation(cached, recomputed(name, PROMPT), "one pass vs recompute")
  assert len(np.unique(np.asarray(cached[0]))) > 3, "degenerate test: a constant continuation"


def test_chunked_prefill_is_one_scan():
  """All chunks run as one scan (compiled once however many there are)."""
  model, params = make_model("attention")
  jaxpr = jax.make_jaxpr(lambda p, t: generate(model, p, t, jax.random.key(0), max_new_tokens=2,
                                               prefill_chunk=3))(params, PROMPT[:, :11])
  assert "length=4" in str(jaxpr)  # 11 tokens, left-padded to 12: 4 chunks of 3
  with pytest.raises(ValueError, match=r"prefill_chunk=0 must be >= 1"):
    generate(model, params, PROMPT, jax.random.key(0), max_new_tokens=2, prefill_chunk=0)
  with pytest.raises(ValueError, match=r"GenerateConfig.prefill_chunk=0 must be >= 1"):
    GenerateConfig(prefill_chunk=0)


# Chunks of 4 divide the 12-token batch; chunks of 5 do not (it is left-padded to 15). The
# unpadded row, prefilled in chunks, must also match the one-pass prefill.
@pytest.mark.parametrize("name,chunk", [("attention", 4), ("linear", 5), ("hybrid", 5),
                                        ("deltanet", 5)])
def test_ragged_batch_rows_equal_each_prompt_alone(name, chunk):
  """Prompts of 12, 7 and 3 tokens, left-padded into one batch and prefilled in chunks,
  continue as each prompt alone, tokens and logits."""
  model, params = make_model(name)
  prompts = [PROMPT[0], random_tokens(3, (7,)), random_tokens(4, (3,))]
  tokens, lengths = left_pad(prompts, pad_id=7)
  np.testing.assert_array_equal(lengths, [12, 7, 3])
  assert tokens.shape == (3, 12) and (tokens[2, :9] == 7).all()
  np.testing.assert_array_equal(tokens[1, 5:], prompts[1])
  batch = generate(model, params, tokens, jax.random.key(4), max_new_tokens=NEW,
                   prompt_lengths=lengths, prefill_chunk=chunk, return_logits=True)
  row = lambda i: (batch[0][i:i + 1], batch[1][i:i + 1])
  assert_same_continuation(row(0), one_pass(name), "the unpadded row vs its one-pass generation")
  for i, prompt in enumerate(prompts):
    assert_same_continuation(row(i), recomputed(name, prompt[None]), f"prompt {i} alone")
  assert len({tuple(r) for r in np.asarray(batch[0])}) == 3, "degenerate test: equal rows"


def test_linear_decoding_skips_padding_between_tokens():
  """Padding (segment id 0) anywhere in a decoded chunk leaves GLA and Lightning states as they
  were: the real tokens get the outputs of the chunk without the padding."""
  model, params = make_model("linear")
  keep = np.array([1, 0, 1, 1, 0, 0, 1], bool)
  tokens = np.full((1, 7), 7, np.int32)
  tokens[:, keep] = random_tokens(5, (1, 4))
  positions = np.maximum(np.cumsum(keep) - 1, 0)[None]

  @jax.jit
  def decode(tokens, positions, segments):
    cache = init_cache(model, params, 1, tokens.shape[1])
    return model.apply({"params": params, "cache": cache}, tokens, positions, segments,
                       decode=True, mutable=["cache"])[0]

  padded = decode(tokens, positions, keep.astype(np.int32)[None])
  alone = decode(tokens[:, keep], positions[:, keep], None)
  np.testing.assert_allclose(padded[:, keep], alone, rtol=1e-4, atol=1e-3)


def test_sampling_respects_top_k_and_temperature():
  logits = jnp.log(jnp.array([[0.05, 0.4, 0.3, 0.2, 0.05]] * 2000))
  greedy = sample_token(logits, jax.random.key(0), 0.0, 0)
  assert (greedy == 1).all()
  top2 = np.asarray(sample_token(logits, jax.random.key(1), 1.0, 2))
  assert set(np.unique(top2)) == {1, 2}
  np.testing.assert_allclose((top2 == 1).mean(), 0.4 / 0.7, atol=0.04)
  free = np.asarray(sample_token(logits, jax.random.key(2), 1.0, 0))
  np.testing.assert_allclose(np.bincount(free, minlength=5) / len(free),
                             [0.05, 0.4, 0.3, 0.2, 0.05], atol=0.04)
