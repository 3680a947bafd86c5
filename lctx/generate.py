"""Text generation: one prefill pass fills the per-layer caches, then cached one-token steps.

`greedy_by_recompute` re-runs the full model for every new token; it is the oracle that cached
decoding is tested against.
"""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from layers.validation import check_fields


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """Attributes:
    prompt: text the continuation starts from.
    max_new_tokens: tokens to generate.
    temperature: 0 means greedy decoding; otherwise sample from softmax(logits / temperature).
    top_k: sample only among the k most likely tokens (0: all).
    num_samples: continuations generated in one batch.
    seed: sampling seed.
  """

  prompt: str = "def "
  max_new_tokens: int = 200
  temperature: float = 0.0
  top_k: int = 0
  num_samples: int = 1
  seed: int = 0

  def __post_init__(self):
    check_fields(self)
    if not self.prompt:
      raise ValueError("GenerateConfig.prompt must not be empty")
    if self.max_new_tokens < 1 or self.num_samples < 1 or self.top_k < 0:
      raise ValueError("GenerateConfig.max_new_tokens and num_samples must be >= 1, top_k >= 0")
    if self.temperature < 0:
      raise ValueError(f"GenerateConfig.temperature must be >= 0, got {self.temperature}")


def sample_token(logits_bv, rng, temperature: float, top_k: int):
  """Greedy (temperature 0) or temperature / top-k sampling of one token per row."""
  if temperature == 0.0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits = logits_bv.astype(jnp.float32) / temperature
  if top_k:
    kth = lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def init_cache(model, params, batch_size: int, max_len: int):
  """Zero caches for `max_len` positions, created from shapes only (nothing is computed)."""
  shapes = jax.eval_shape(
      lambda: model.apply({"params": params}, jnp.zeros((batch_size, max_len), jnp.int32),
                          decode=True, mutable=["cache"])[1]["cache"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k"))
def generate(model, params, prompt_bt, rng, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0):
  """Continues each row of `prompt_bt` [b, p] by `max_new_tokens` tokens; returns [b, n]."""
  b, p = prompt_bt.shape
  cache = init_cache(model, params, b, p + max_new_tokens)
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  logits, variables = model.apply({"params": params, "cache": cache}, prompt_bt, positions,
                                  decode=True, mutable=["cache"])
  rng, sub = jax.random.split(rng)
  first = sample_token(logits[:, -1], sub, temperature, top_k)

  def step(carry, i):
    cache, token, rng = carry
    rng, sub = jax.random.split(rng)
    pos = jnp.full((b, 1), p + i, jnp.int32)
    logits, variables = model.apply({"params": params, "cache": cache}, token[:, None], pos,
                                    decode=True, mutable=["cache"])
    nxt = sample_token(logits[:, -1], sub, temperature, top_k)
    return (variables["cache"], nxt, rng), nxt

  _, rest = lax.scan(step, (variables["cache"], first, rng), jnp.arange(max_new_tokens - 1))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def greedy_by_recompute(model, params, prompt_bt, max_new_tokens: int):
  """Greedy continuation computed by a full forward pass over the whole prefix per token."""
  apply = jax.jit(lambda t: model.apply({"params": params}, t))
  tokens = prompt_bt
  for _ in range(max_new_tokens):
    nxt = jnp.argmax(apply(tokens)[:, -1], axis=-1).astype(jnp.int32)
    tokens = jnp.concatenate([tokens, nxt[:, None]], axis=1)
  return tokens[:, prompt_bt.shape[1]:]
