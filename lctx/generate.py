"""Text generation: a prefill fills the per-layer caches, then cached one-token steps.

The prefill runs the prompt in one pass or, with `prefill_chunk`, in chunks that each append to
the caches, so that its memory is bounded by chunk x cache rather than prompt^2. Prompts of
different lengths go in one batch left-padded (`left_pad`), with `prompt_lengths`: each row's
positions count from its own first token, and its padding is invisible to every layer (decoding
mixers read segment id 0 as padding), so each row continues as its prompt would alone.

`greedy_by_recompute` re-runs the full model for every new token; it is the oracle that cached
decoding is tested against.
"""

import dataclasses
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
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
    prefill_chunk: prefill the prompt this many tokens at a time (a prompt it does not divide
      is left-padded to whole chunks); None prefills it in one pass, whose attention memory
      grows with the square of its length.
  """

  prompt: str = "def "
  max_new_tokens: int = 200
  temperature: float = 0.0
  top_k: int = 0
  num_samples: int = 1
  seed: int = 0
  max_length: int | None = None
  prefill_chunk: int | None = None

  def __post_init__(self):
    check_fields(self)
    if self.prefill_chunk is not None and self.prefill_chunk < 1:
      raise ValueError(f"GenerateConfig.prefill_chunk={self.prefill_chunk} must be >= 1 or None")
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
  chunk = min(gen.prefill_chunk or prompt_len, prompt_len)
  slots = total + -prompt_len % chunk  # generate left-pads the prompt to whole chunks
  cache = jax.eval_shape(lambda p: init_cache(model, p, gen.num_samples, slots), abstract_params)
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
  available = _available_memory_bytes()
  if available is not None and cache_bytes > available:
    raise ValueError(f"GenerateConfig.max_new_tokens={gen.max_new_tokens} with num_samples="
                     f"{gen.num_samples}: the decoding cache for {slots} positions needs "
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


def left_pad(prompts, pad_id: int = 0):
  """Stacks prompts of different lengths into one left-padded batch.

  Args:
    prompts: a sequence of 1-D integer token arrays, each at least one token long.
    pad_id: the token written into the padding (any id: padding is masked, never read).
  Returns:
    (tokens_bt int32 [b, longest], lengths int32 [b]) for `generate(..., prompt_lengths=...)`.
  """
  prompts = [np.asarray(x) for x in prompts]
  if not prompts:
    raise ValueError("left_pad: prompts must hold at least one prompt")
  bad = [i for i, x in enumerate(prompts) if x.ndim != 1 or not len(x)]
  if bad:
    raise ValueError(f"left_pad: prompts {bad} are not non-empty 1-D token arrays")
  lengths = np.array([len(x) for x in prompts], np.int32)
  tokens = np.full((len(prompts), lengths.max()), pad_id, np.int32)
  for row, x in zip(tokens, prompts):
    row[len(row) - len(x):] = x
  return tokens, lengths


def _ragged_layout(prompt_lengths, b: int, p: int):
  """Positions [b, p] counted from each row's first token, and segment ids (0 = padding)."""
  index = jnp.arange(p, dtype=jnp.int32)[None]
  if prompt_lengths is None:
    return jnp.broadcast_to(index, (b, p)), None
  lengths = jnp.asarray(prompt_lengths, jnp.int32)
  if lengths.shape != (b,):
    raise ValueError(f"generate: prompt_lengths must have shape ({b},) (one length per prompt "
                     f"row), got {lengths.shape}")
  positions = index - (p - lengths)[:, None]
  return jnp.maximum(positions, 0), (positions >= 0).astype(jnp.int32)


def prefill(model, params, cache, tokens_bt, positions_bt, segment_ids_bt=None, *,
            chunk: int | None = None):
  """Runs a prompt through the cached model; returns (logits [b, v] of its last token, cache).

  Each chunk of `chunk` tokens is one decode=True apply that appends to the caches; the chunks
  run in one lax.scan, so compile time does not grow with their number.

  Args:
    model, params: the DecoderLM and its parameters.
    cache: the "cache" collection, e.g. from `init_cache`, with room for the prompt.
    tokens_bt, positions_bt: the prompt [b, p] and its absolute positions.
    segment_ids_bt: optional [b, p]; 0 marks padding.
    chunk: tokens per apply, a divisor of p (`generate` left-pads the prompt to make it one);
      None: the whole prompt at once.
  """
  b, p = tokens_bt.shape
  chunk = p if chunk is None else chunk
  if chunk < 1 or p % chunk:
    raise ValueError(f"prefill: chunk={chunk} must be >= 1 and divide the prompt length {p}")

  def body(cache, xs):
    tokens, positions, segments = xs
    logits, variables = model.apply({"params": params, "cache": cache}, tokens, positions,
                                    segments, decode=True, mutable=["cache"])
    return variables["cache"], logits[:, -1]

  chunks = lambda x: None if x is None else x.reshape(b, p // chunk, chunk).swapaxes(0, 1)
  cache, last = lax.scan(body, cache, (chunks(tokens_bt), chunks(positions_bt),
                                       chunks(segment_ids_bt)))
  return last[-1], cache


@partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k",
                                   "prefill_chunk", "return_logits"))
def generate(model, params, prompt_bt, rng, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, prompt_lengths=None, prefill_chunk: int | None = None,
             return_logits: bool = False):
  """Continues each row of `prompt_bt` [b, p] by `max_new_tokens` tokens; returns [b, n].

  Args:
    model, params: the DecoderLM and its parameters.
    prompt_bt: int [b, p] prompts; left-padded (`left_pad`) when `prompt_lengths` is given.
    rng: sampling key.
    max_new_tokens, temperature, top_k: as in GenerateConfig.
    prompt_lengths: optional int [b], each row's prompt length (1 <= length <= p); row i's
      prompt is its last prompt_lengths[i] tokens, the rest is padding that no layer sees.
    prefill_chunk: prefill this many tokens per apply (see `prefill`); None: one pass. A
      prompt it does not divide is left-padded to a multiple of it (padding is invisible), so
      that all chunks share one shape and one compiled step.
    return_logits: also return the float32 logits [b, n, v] each new token was drawn from.
  Returns:
    tokens [b, n] int32, or (tokens, logits) with return_logits.
  """
  b, p = prompt_bt.shape
  if prefill_chunk is not None and prefill_chunk < 1:
    raise ValueError(f"generate: prefill_chunk={prefill_chunk} must be >= 1 or None")
  chunk = p if prefill_chunk is None else min(prefill_chunk, p)
  extra = -p % chunk
  if extra:
    prompt_bt = jnp.pad(jnp.asarray(prompt_bt), ((0, 0), (extra, 0)))
    prompt_lengths = jnp.full((b,), p, jnp.int32) if prompt_lengths is None else prompt_lengths
    p += extra
  positions, segments = _ragged_layout(prompt_lengths, b, p)
  cache = init_cache(model, params, b, p + max_new_tokens)
  logits, cache = prefill(model, params, cache, prompt_bt, positions, segments, chunk=chunk)
  rng, sub = jax.random.split(rng)
  first = sample_token(logits, sub, temperature, top_k)
  next_position = positions[:, -1:] + 1  # [b, 1]: a padded row's last token is its prompt's

  def step(carry, i):
    cache, token, rng = carry
    rng, sub = jax.random.split(rng)
    logits, variables = model.apply({"params": params, "cache": cache}, token[:, None],
                                    next_position + i, decode=True, mutable=["cache"])
    nxt = sample_token(logits[:, -1], sub, temperature, top_k)
    return (variables["cache"], nxt, rng), (nxt, logits[:, -1] if return_logits else None)

  _, (rest, rest_logits) = lax.scan(step, (cache, first, rng), jnp.arange(max_new_tokens - 1))
  tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
  if not return_logits:
    return tokens
  return tokens, jnp.concatenate([logits[:, None], rest_logits.swapaxes(0, 1)], axis=1)


@partial(jax.jit, static_argnames="model")
def _logits(model, params, tokens_bt):
  return model.apply({"params": params}, tokens_bt)


def greedy_by_recompute(model, params, prompt_bt, max_new_tokens: int, *,
                        length: int | None = None, return_logits: bool = False):
  """Greedy continuation computed by a full forward pass over the whole prefix per token.

  The forward runs over a fixed [b, length] buffer (default p + n) whose not yet generated tail
  holds zeros: the model is causal, so the logits at the prefix's last position depend on the
  prefix alone, and one compiled forward serves every step (and every prompt of at most
  length - n tokens). Returns tokens [b, n], or (tokens, logits [b, n, v]) with return_logits.
  """
  b, p = prompt_bt.shape
  length = p + max_new_tokens if length is None else length
  if length < p + max_new_tokens:
    raise ValueError(f"greedy_by_recompute: length={length} is shorter than the prompt ({p}) "
                     f"plus max_new_tokens={max_new_tokens}")
  tokens = jnp.zeros((b, length), jnp.int32).at[:, :p].set(prompt_bt)
  all_logits = []
  for i in range(max_new_tokens):
    logits = _logits(model, params, tokens)[:, p + i - 1]
    all_logits.append(logits)
    tokens = tokens.at[:, p + i].set(jnp.argmax(logits, axis=-1).astype(jnp.int32))
  new = tokens[:, p:p + max_new_tokens]
  return (new, jnp.stack(all_logits, axis=1)) if return_logits else new
