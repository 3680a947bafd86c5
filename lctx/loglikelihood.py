"""Log-likelihoods of continuations under a model, computed in a few fixed batch shapes.

A request is (context tokens, continuation tokens). The model reads context + continuation
without its last token, cut from the left to the last `max_length` tokens (the context loses its
oldest tokens, as lm-evaluation-harness expects), and the continuation is scored: the sum of its
tokens' log-probabilities, and whether every one of them is the argmax (greedy) prediction.

Rows are right-padded to a power of two (at least MIN_BUCKET, at most `max_length`) and run
`batch_size` at a time, short batches filled with padding rows, so a whole evaluation compiles
once per length bucket. Padding is segment 0 and lies to the right of every real token, so
causal layers never let it change a real token's logits.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp
import numpy as np

MIN_BUCKET = 16  # shorter rows share one shape


def bucket_length(n: int, max_length: int) -> int:
  """The padded length of a row of `n` tokens: the next power of two, within
  [MIN_BUCKET, max_length]."""
  return min(max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()), max_length)


def model_window(context: Sequence[int], continuation: Sequence[int],
                 max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) of one request: the model reads `inputs` (at most `max_length` tokens)
  and the continuation is scored at the last len(continuation) positions, against `targets`.

  Raises:
    ValueError: an empty context or continuation, or a continuation longer than `max_length`.
  """
  if not len(context) or not len(continuation):
    raise ValueError(f"loglikelihood: a request needs at least one context token and one "
                     f"continuation token, got {len(context)} and {len(continuation)}")
  if len(continuation) > max_length:
    raise ValueError(f"loglikelihood: the continuation has {len(continuation)} tokens, more "
                     f"than max_length={max_length}; raise max_length")
  tokens = np.concatenate([np.asarray(context, np.int32),
                           np.asarray(continuation, np.int32)])[-(max_length + 1):]
  return tokens[:-1], tokens[-len(continuation):]


@functools.partial(jax.jit, static_argnames="model")
def target_logprobs(model, params, inputs_bt, targets_bt, segment_ids_bt):
  """log p(targets_bt[b, t] | inputs_bt[b, :t + 1]) and whether it is the argmax: [b, t] each."""
  logits = model.apply({"params": params}, inputs_bt, segment_ids_bt=segment_ids_bt)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0]
  return picked, jnp.argmax(logits, axis=-1) == targets_bt


def score(model, params, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
          max_length: int, batch_size: int, progress=None) -> list[tuple[float, bool]]:
  """(sum of the continuation's log-probabilities, whether greedy decoding yields it) for each
  (context tokens, continuation tokens) request, in the order given.

  Args:
    model, params: the model and its parameters (call inside the model's mesh context).
    requests: token-id sequences; see `model_window` for how they are cut.
    max_length: the most tokens the model reads in one pass.
    batch_size: rows per forward pass.
    progress: called with the number of requests done after every batch (a progress bar).
  """
  if max_length < 1 or batch_size < 1:
    raise ValueError(f"loglikelihood: max_length={max_length} and batch_size={batch_size} must "
                     "be >= 1")
  windows = [model_window(c, t, max_length) for c, t in requests]
  by_bucket: dict[int, list[int]] = {}
  # Longest first within a bucket, as the harness orders them (the slowest batches come first).
  for i in sorted(range(len(windows)), key=lambda i: -len(windows[i][0])):
    by_bucket.setdefault(bucket_length(len(windows[i][0]), max_length), []).append(i)
  results: list[tuple[float, bool] | None] = [None] * len(windows)
  for length, indices in sorted(by_bucket.items(), reverse=True):
    for start in range(0, len(indices), batch_size):
      rows = indices[start:start + batch_size]
      inputs = np.zeros((batch_size, length), np.int32)
      targets = np.zeros((batch_size, length), np.int32)
      segments = np.zeros((batch_size, length), np.int32)
      for r, i in enumerate(rows):
        x, y = windows[i]
        inputs[r, :len(x)] = x
        targets[r, len(x) - len(y):len(x)] = y
        segments[r, :len(x)] = 1
      logp, greedy = jax.device_get(target_logprobs(model, params, inputs, targets, segments))
      for r, i in enumerate(rows):
        n, m = len(windows[i][0]), len(windows[i][1])
        results[i] = (float(np.sum(logp[r, n - m:n], dtype=np.float64)),
                      bool(np.all(greedy[r, n - m:n])))
      if progress is not None:
        progress(len(rows))
  return results
