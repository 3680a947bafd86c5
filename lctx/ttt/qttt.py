"""qTTT: query-only test-time training against a frozen context (RESEARCH.md section 5).

  1. One prefill over the prompt (context + question) fills the decoding cache of every layer
     and records, in the same pass, each layer's keys and values (layers/context_cache.py).
  2. `TTTConfig.steps` gradient steps, each on a random contiguous span of `TTTConfig.span`
     tokens of the prompt: the next-token loss of the span, whose queries (at their absolute
     positions) read the recorded keys and values. Only the W_Q kernels of the softmax layers
     train (with `update_linear_q`, also the q projections of the linear layers); nothing of the
     context is recomputed, so every step costs a forward and backward of `span` queries.
  3. The answer: the last prompt token's logits with the adapted W_Q (one query of the record),
     then ordinary cached decoding from the prefill's cache with the adapted parameters.

A linear layer (linear, lightning, gla) has no KV cache, only a state; its record is its keys,
values and gates, from which a span query starts at the state the context had just before the
span. Its queries come from its input, which changes as the softmax layers below it adapt; with
`update_linear_q` its own q projection (the map from its input to the query that reads the state)
trains too.

Compute (lctx/flops.py, useful FLOPs): the prefill, each step (a forward of the span over the
record, plus a backward about as costly as that forward), and the thinking tokens of equal cost:
decoding tokens at the prompt's length whose FLOPs add up to the steps' (about 2 x steps x span).
`TTTConfig.method = 'thinking'` spends exactly that many extra greedy tokens instead.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax import lax

from layers import context_cache
from lctx import flops
from lctx.config import ModelConfig
from lctx.generate import generate, init_cache
from sharding.validation import check_fields

METHODS = ("qttt", "thinking")
OPTIMIZERS = ("sgd", "adam")
SUPPORTED = flops.SOFTMAX + flops.LINEAR


@dataclasses.dataclass(frozen=True)
class TTTConfig:
  """Test-time training of `RunConfig.mode = 'longeval'` (gin/ttt/qttt.gin binds it as
  `LongEvalConfig.ttt`).

  Attributes:
    method: "qttt" (adapt W_Q, then answer), or "thinking": no adaptation, the compute qTTT would
      spend goes to extra greedy tokens before the answer (the comparison at equal FLOPs).
    steps: gradient steps N.
    span: tokens k of each step's span (its k queries predict the k tokens after them).
    optimizer: "sgd" or "adam" (optax).
    learning_rate: the optimizer's step size.
    update_linear_q: also train the q projections of linear, lightning and gla layers.
    seed: seed of the spans' starts.
  """

  method: str = "qttt"
  steps: int = 32
  span: int = 128
  optimizer: str = "sgd"
  learning_rate: float = 1e-2
  update_linear_q: bool = False
  seed: int = 0

  def __post_init__(self):
    check_fields(self)
    if self.method not in METHODS:
      raise ValueError(f"TTTConfig.method={self.method!r} must be one of {METHODS}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"TTTConfig.optimizer={self.optimizer!r} must be one of {OPTIMIZERS}")
    if self.steps < 1:
      raise ValueError(f"TTTConfig.steps={self.steps} must be >= 1")
    if self.span < 1:
      raise ValueError(f"TTTConfig.span={self.span} must be >= 1")
    if not self.learning_rate > 0:
      raise ValueError(f"TTTConfig.learning_rate={self.learning_rate} must be > 0")


def trained_paths(cfg: ModelConfig, ttt: TTTConfig) -> list[tuple[str, ...]]:
  """The parameter paths qTTT updates: the W_Q kernel of every softmax layer (and of every
  linear layer with `update_linear_q`). Raises ValueError, naming the setting, for a model it
  cannot adapt."""
  if cfg.sequence_parallel.enabled:
    raise ValueError("TTTConfig: qTTT runs without sequence parallelism; set "
                     "SequenceParallelConfig.method='none' for the evaluation")
  kinds = SUPPORTED if ttt.update_linear_q else flops.SOFTMAX
  paths = []
  for i, layer in enumerate(cfg.layer_mixers()):
    names = layer.split("+")
    for name in names:
      if name not in SUPPORTED:
        raise ValueError(f"TTTConfig: layer {i}'s mixer {name!r} keeps no record of the context "
                         f"for qTTT's queries; qTTT supports {list(SUPPORTED)} layers")
      if name in kinds:
        paths.append((f"layer_{i}", "mixer") + ((name,) if len(names) > 1 else ()) + ("q",))
  if not paths:
    raise ValueError(f"TTTConfig.update_linear_q=False: ModelConfig.mixers="
                     f"{list(cfg.layer_mixers())} has no softmax attention layer whose W_Q qTTT "
                     "could update; set TTTConfig.update_linear_q=True to adapt the linear "
                     "layers' q projections")
  return paths


def split_params(params, paths):
  """(trained {path: array}, the other parameters {path: array})."""
  flat = traverse_util.flatten_dict(params)
  missing = [p for p in paths if p not in flat]
  if missing:
    raise ValueError(f"TTTConfig: the parameters have no {['/'.join(p) for p in missing]}")
  trained = {p: flat[p] for p in paths}
  return trained, {p: x for p, x in flat.items() if p not in trained}


def merge_params(trained, frozen):
  return traverse_util.unflatten_dict({**frozen, **trained})


def check_context(ttt: TTTConfig, prompt_len: int, what: str = "the prompt") -> None:
  """A span of k queries needs k + 1 tokens of the context (its targets included)."""
  if ttt.span + 1 > prompt_len:
    raise ValueError(f"TTTConfig.span={ttt.span} is longer than {what} ({prompt_len} tokens): a "
                     f"span's queries predict the token after each, so the context needs at least "
                     f"span + 1 tokens; lower TTTConfig.span or lengthen the context")


@dataclasses.dataclass(frozen=True)
class Compute:
  """Useful FLOPs of one qTTT run on a prompt of `prompt_len` tokens (lctx/flops.py)."""

  prompt_len: int
  prefill_flops: float
  step_flops: float
  ttt_flops: float
  decode_token_flops: float
  thinking_tokens: int

  def row(self) -> dict:
    return {"prompt_len": self.prompt_len, "prefill_gflops": self.prefill_flops / 1e9,
            "ttt_gflops": self.ttt_flops / 1e9, "ttt_over_prefill": self.ttt_flops /
            self.prefill_flops, "thinking_tokens": self.thinking_tokens}

  def describe(self, ttt: TTTConfig) -> str:
    return (f"qTTT compute at {self.prompt_len} tokens: prefill {self.prefill_flops / 1e9:.3g} "
            f"GFLOP, {ttt.steps} steps x {ttt.span} tokens {self.ttt_flops / 1e9:.3g} GFLOP "
            f"({self.ttt_flops / self.prefill_flops:.2f} x the prefill) = "
            f"{self.thinking_tokens} thinking tokens (2 N k = {2 * ttt.steps * ttt.span})")


# Weights a query of the record does not use: the keys', values' and gates' projections.
_RECORDED = ("k", "v", "gate_down", "gate_up")


def _not_queried(path) -> bool:
  return path[-1] in _RECORDED or (len(path) > 1 and path[-2] == "k_map")


def compute(cfg: ModelConfig, abstract_params, ttt: TTTConfig, prompt_len: int) -> Compute:
  """The FLOPs of the prefill, of the steps and the thinking tokens that cost as much.

  A step is the span's forward over the record (without the key, value and gate projections
  the record replaces; its queries at a start halfway through the range spans are drawn from; a
  linear layer also folds the record before the span into its state), a backward of the same
  cost, and the weight gradient of the trained q kernels."""
  check_context(ttt, prompt_len)
  k = ttt.span
  start = (prompt_len - 1 - k) // 2
  forward = (flops.forward_flops(cfg, abstract_params, k, start, skip=_not_queried) +
             flops.state_fold_flops(cfg, start))
  flat = traverse_util.flatten_dict(abstract_params)
  q_size = sum(float(flat[p].size) for p in trained_paths(cfg, ttt))
  step = 2.0 * forward + 2.0 * k * q_size
  decode = flops.forward_flops(cfg, abstract_params, 1, prompt_len)
  total = ttt.steps * step
  return Compute(prompt_len, flops.forward_flops(cfg, abstract_params, prompt_len), step, total,
                 decode, int(round(total / decode)))


PREFILLS = [0]  # prefills run by `prefill`, counted for the tests


def prefill(model, params, prompt_bt, room: int):
  """(last-token logits [b, v], decoding cache with `room` free positions, context record)."""
  PREFILLS[0] += 1
  return _prefill(model, params, jnp.asarray(prompt_bt, jnp.int32), room)


@partial(jax.jit, static_argnames=("model", "room"))
def _prefill(model, params, prompt_bt, room):
  b, t = prompt_bt.shape
  cache = init_cache(model, params, b, t + room)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  logits, variables = model.apply({"params": params, "cache": cache}, prompt_bt, positions,
                                  decode=True, mutable=["cache", context_cache.COLLECTION])
  return logits[:, -1], variables["cache"], variables[context_cache.COLLECTION]


def span_loss(model, params, record, tokens_bt, starts_b, span: int):
  """Mean next-token loss of the spans tokens[s:s+span] -> tokens[s+1:s+span+1] of each row
  (s = starts_b), their queries reading the record."""
  positions = starts_b[:, None].astype(jnp.int32) + jnp.arange(span, dtype=jnp.int32)[None]
  inputs = jnp.take_along_axis(tokens_bt, positions, axis=1)
  targets = jnp.take_along_axis(tokens_bt, positions + 1, axis=1)
  logits = model.apply({"params": params, context_cache.COLLECTION: record}, inputs, positions)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def make_optimizer(ttt: TTTConfig) -> optax.GradientTransformation:
  if ttt.optimizer == "adam":
    return optax.adam(ttt.learning_rate)
  return optax.sgd(ttt.learning_rate)


@partial(jax.jit, static_argnames=("model", "ttt", "paths"))
def adapt(model, params, record, tokens_bt, rng, *, ttt: TTTConfig, paths):
  """The parameters after `ttt.steps` span steps (only `paths` change) and each step's loss
  [steps] (before its update)."""
  b, t = tokens_bt.shape
  trained, frozen = split_params(params, paths)
  tx = make_optimizer(ttt)

  def loss_fn(trained, starts):
    return span_loss(model, merge_params(trained, frozen), record, tokens_bt, starts, ttt.span)

  def step(carry, key):
    trained, opt_state = carry
    starts = jax.random.randint(key, (b,), 0, t - ttt.span)  # s + span <= t - 1
    loss, grads = jax.value_and_grad(loss_fn)(trained, starts)
    updates, opt_state = tx.update(grads, opt_state, trained)
    return (optax.apply_updates(trained, updates), opt_state), loss

  (trained, _), losses = lax.scan(step, (trained, tx.init(trained)),
                                  jax.random.split(rng, ttt.steps))
  return merge_params(trained, frozen), losses


@partial(jax.jit, static_argnames=("model",))
def last_logits(model, params, record, prompt_bt):
  """Logits [b, v] after the prompt's last token, its query reading the record."""
  b, t = prompt_bt.shape
  positions = jnp.full((b, 1), t - 1, jnp.int32)
  logits = model.apply({"params": params, context_cache.COLLECTION: record},
                       prompt_bt[:, -1:], positions)
  return logits[:, -1]


@partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def continue_greedy(model, params, cache, first_logits, prompt_len: int, *, max_new_tokens):
  """Greedy tokens [b, n] from the prompt's last logits and the prefill's cache."""
  b = first_logits.shape[0]
  first = jnp.argmax(first_logits, axis=-1).astype(jnp.int32)

  def step(carry, i):
    cache, token = carry
    positions = jnp.full((b, 1), prompt_len, jnp.int32) + i
    logits, variables = model.apply({"params": params, "cache": cache}, token[:, None],
                                    positions, decode=True, mutable=["cache"])
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    return (variables["cache"], nxt), nxt

  _, rest = lax.scan(step, (cache, first), jnp.arange(max_new_tokens - 1))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


@partial(jax.jit, static_argnames=("model",))
def answer_logits(model, params, cache, first_logits, answer_bn, prompt_len: int):
  """Logits [b, n, v] of each answer token given the prompt and the answer before it: the
  first from `first_logits`, the rest from one cached chunk of the answer."""
  b, n = answer_bn.shape
  if n == 1:
    return first_logits[:, None]
  positions = prompt_len + jnp.broadcast_to(jnp.arange(n - 1, dtype=jnp.int32), (b, n - 1))
  logits, _ = model.apply({"params": params, "cache": cache}, answer_bn[:, :-1], positions,
                          decode=True, mutable=["cache"])
  return jnp.concatenate([first_logits[:, None], logits], axis=1)


@partial(jax.jit, static_argnames=("model",))
def needle_mass(model, params, record, prompt_bt, needle_bt):
  """The softmax mass the last prompt token's queries put on the positions `needle_bt` (bool
  [b, T]), averaged over heads and softmax layers: score dilution, measured before and after
  adaptation on the same record. Layers with sinks or sink tokens are refused."""
  cfg = model.config
  b, t = prompt_bt.shape
  positions = jnp.full((b, 1), t - 1, jnp.int32)
  _, variables = model.apply({"params": params, context_cache.COLLECTION: record},
                             prompt_bt[:, -1:], positions, mutable=[context_cache.QUERIES])
  queries = traverse_util.flatten_dict(variables[context_cache.QUERIES])
  keys = traverse_util.flatten_dict(record)
  masses = []
  for i, layer in enumerate(cfg.layer_mixers()):
    names = layer.split("+")
    for name in names:
      if name not in flops.SOFTMAX:
        continue
      mixer = cfg.mixer_config(name)
      if mixer.sinks or mixer.sink_tokens:
        raise ValueError(f"needle_mass: layer {i} has sinks; the mass is measured over the "
                         "context's keys alone")
      where = (f"layer_{i}", "mixer") + ((name,) if len(names) > 1 else ())
      q = queries[where + ("q",)]
      key = keys[where + ("key",)]
      weights = context_cache.attention_weights(q, positions, key, window=mixer.window)
      masses.append(jnp.sum(jnp.where(needle_bt[:, None, None, :], weights, 0.0), axis=-1)
                    .mean(axis=(1, 2)))
  return jnp.mean(jnp.stack(masses), axis=0)


@dataclasses.dataclass
class Result:
  """One adapted answer: the generated tokens [b, n], the reference answer's logits [b, m, v]
  (when one was given), the span losses [steps] (qTTT) and the compute."""

  tokens: jax.Array
  answer_logits: jax.Array | None
  losses: jax.Array | None
  compute: Compute
  params: dict | None = None  # the adapted parameters (qTTT)
  record: dict | None = None  # the prefill's record of the context (qTTT)


def run(model, params, prompt_bt, ttt: TTTConfig, *, max_new_tokens: int, answer_bn=None,
        abstract_params=None, seed: int | None = None) -> Result:
  """qTTT (or the thinking baseline) on one batch of prompts [b, T] of one context each.

  Returns the greedy continuation of `max_new_tokens` tokens (with method "thinking", that many
  after the thinking tokens, all returned) and, with `answer_bn` [b, m], the logits of that
  reference answer after the prompt."""
  cfg = model.config
  prompt_bt = jnp.asarray(prompt_bt, jnp.int32)
  b, t = prompt_bt.shape
  paths = tuple(trained_paths(cfg, ttt))
  check_context(ttt, t)
  abstract = (abstract_params if abstract_params is not None else
              jax.eval_shape(lambda: nn.unbox(params)))
  cost = compute(cfg, abstract, ttt, t)
  room = max(max_new_tokens, 0 if answer_bn is None else answer_bn.shape[1])
  if ttt.method == "thinking":
    tokens = generate(model, params, prompt_bt, jax.random.key(0),
                      max_new_tokens=cost.thinking_tokens + max_new_tokens)
    logits = None
    if answer_bn is not None:
      first, cache, _ = prefill(model, params, prompt_bt, room)
      logits = answer_logits(model, params, cache, first, jnp.asarray(answer_bn), t)
    return Result(tokens, logits, None, cost)
  _, cache, record = prefill(model, params, prompt_bt, room)
  rng = jax.random.key(ttt.seed if seed is None else seed)
  adapted, losses = adapt(model, params, record, prompt_bt, rng, ttt=ttt, paths=paths)
  first = last_logits(model, adapted, record, prompt_bt)
  tokens = continue_greedy(model, adapted, cache, first, t, max_new_tokens=max_new_tokens)
  logits = None
  if answer_bn is not None:
    logits = answer_logits(model, adapted, cache, first, jnp.asarray(answer_bn), t)
  return Result(tokens, logits, losses, cost, adapted, record)
