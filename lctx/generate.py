"""Text generation: one prefill pass fills the per-layer caches, then cached one-token steps.

`greedy_by_recompute` re-runs the full model for every new token; it is the oracle that cached
decoding is tested against.
"""

import dataclasses
import os
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from sharding.validation import check_fields


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """Attributes:
    prompt: text the continuation starts from.
    max_new_tokens: tokens to generate.
    temperature: 0 means greedy decoding; otherwise sample from softmax(logits / temperature).
    top_k: sample only among the k most likely tokens (0: all).
    num_samples: continuations generated in one batch.
    seed: sampling seed.
    max_length: the longest sequence (prompt + new tokens) generation may reach; None means
      8 x DataConfig.seq_len (the trained length; RoPE and linear layers extrapolate, but each
      new token attends to the whole cache, so the cost grows with the square of the length).
  """

  prompt: str = "def "
  max_new_tokens: int = 200
  temperature: float = 0.0
  top_k: int = 0
  num_samples: int = 1
  seed: int = 0
  max_length: int | None = None

  def __post_init__(self):
    check_fields(self)
    if self.max_length is not None and self.max_length < 2:
      raise ValueError(f"GenerateConfig.max_length={self.max_length} must be >= 2 or None")
    if not self.prompt:
      raise ValueError("GenerateConfig.prompt must not be empty")
    if self.max_new_tokens < 1 or self.num_samples < 1 or self.top_k < 0:
      raise ValueError("GenerateConfig.max_new_tokens and num_samples must be >= 1, top_k >= 0")
    if self.temperature < 0:
      raise ValueError(f"GenerateConfig.temperature must be >= 0, got {self.temperature}")


EXTRAPOLATION = 8  # default GenerateConfig.max_length in units of the trained length


def _available_memory_bytes() -> int | None:
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError):
    return None


def check_request(model, abstract_params, gen: GenerateConfig, prompt_len: int,
                  seq_len: int) -> None:
  """Refuses, before anything is compiled, a generation the model or its cache cannot serve."""
  vocab = model.config.vocab_size
  if gen.top_k > vocab:
    raise ValueError(f"GenerateConfig.top_k={gen.top_k} is larger than the vocabulary "
                     f"(ModelConfig.vocab_size={vocab}); use at most {vocab}, or 0 for all")
  total = prompt_len + gen.max_new_tokens
  limit = gen.max_length or EXTRAPOLATION * seq_len
  if total > limit:
    which = (f"GenerateConfig.max_length={gen.max_length}" if gen.max_length else
             f"GenerateConfig.max_length=None, i.e. {EXTRAPOLATION} x DataConfig.seq_len="
             f"{seq_len}")
    raise ValueError(f"GenerateConfig.max_new_tokens={gen.max_new_tokens}: the prompt "
                     f"({prompt_len} tokens) plus the new tokens make {total}, more than "
                     f"{which}; lower max_new_tokens or raise GenerateConfig.max_length")
  cache = jax.eval_shape(lambda p: init_cache(model, p, gen.num_samples, total), abstract_params)
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
  available = _available_memory_bytes()
  if available is not None and cache_bytes > available:
    raise ValueError(f"GenerateConfig.max_new_tokens={gen.max_new_tokens} with num_samples="
                     f"{gen.num_samples}: the decoding cache for {total} positions needs "
                     f"{cache_bytes / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB "
                     f"available")


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
