"""Token-space synthetic tasks: Zoology's multi-query associative recall (MQAR) and Mamba's
selective copying. Neither needs a tokenizer: tokens are ids below `vocab`.

MQAR follows zoology/data/multiquery_ar.py: keys are drawn without replacement from [1, V/2),
values from [V/2, V); the context is k1 v1 k2 v2 ...; the rest of the sequence is zeros except
each key placed again at context + 2 * gap, the gaps drawn without replacement from
range((length - context) / 2) with p(i) proportional to a * i^(a - 1) (i counted from 1,
a = 0.01); the label at a re-placed key is its value and every other label is IGNORE; inputs and
labels are shifted by one. Zoology's Figure 2 keeps the zeros (`random_non_queries=False`).

Selective copying: `copies` data tokens from [1, V - 1) at random, ordered positions among
blank (0) tokens, then the marker V - 1; the answer is the data tokens in order.
"""

from __future__ import annotations

import numpy as np

from lctx.evals.example import Example

IGNORE = -100


def check_mqar(length: int, pairs: int, vocab: int) -> None:
  if length % 2:
    raise ValueError(f"mqar: length={length} must be even")
  if vocab <= length:
    raise ValueError(f"mqar: vocab={vocab} must exceed length={length}")
  if 4 * pairs > length:
    raise ValueError(f"mqar: 4 * pairs={4 * pairs} must be at most length={length}")
  if pairs < 1:
    raise ValueError(f"mqar: pairs={pairs} must be at least 1")


def mqar(rng, num_examples: int, length: int, pairs: int, vocab: int, *, power_a: float = 0.01,
         random_non_queries: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(inputs int32 [n, length], labels int32 [n, length]) of Zoology's MQAR (labels IGNORE
  except at the queries, where the label is the queried key's value)."""
  check_mqar(length, pairs, vocab)
  context = 2 * pairs
  half = vocab // 2
  keys = np.stack([rng.choice(np.arange(1, half), pairs, replace=False)
                   for _ in range(num_examples)])
  values = np.stack([rng.choice(np.arange(half, vocab), pairs, replace=False)
                     for _ in range(num_examples)])
  kvs = np.zeros((num_examples, context), np.int64)
  kvs[:, 0::2], kvs[:, 1::2] = keys, values
  space = (length - context) // 2
  p = power_a * np.arange(1, space + 1) ** (power_a - 1)
  p = p / p.sum()
  gaps = np.stack([rng.choice(space, pairs, replace=False, p=p) for _ in range(num_examples)])
  queries = np.zeros((num_examples, length - context + 1), np.int64)
  np.put_along_axis(queries, gaps * 2, keys, axis=1)
  examples = np.concatenate([kvs, queries], axis=1)
  labels = np.full((num_examples, length + 1), IGNORE, np.int64)
  np.put_along_axis(labels, gaps * 2 + context + 1, values, axis=1)
  inputs, labels = examples[:, :-1], labels[:, 1:]
  if random_non_queries:
    noise = rng.integers(0, vocab, inputs.shape)
    inputs = np.where(inputs == 0, noise, inputs)
  return inputs.astype(np.int32), labels.astype(np.int32)


def selective_copy(length: int, rng, *, vocab: int = 16, copies: int = 16) -> Example:
  """A context of `length` tokens holding `copies` data tokens among blanks, then the marker."""
  if vocab < 3:
    raise ValueError(f"selective_copy: vocab={vocab} must be at least 3 (blank, data, marker)")
  if not 0 < copies < length:
    raise ValueError(f"selective_copy: copies={copies} must lie in [1, length={length})")
  data = rng.integers(1, vocab - 1, copies).astype(np.int32)
  where = np.sort(rng.choice(length - 1, copies, replace=False))
  context = np.zeros(length - 1, np.int32)
  context[where] = data
  prompt = np.concatenate([context, np.array([vocab - 1], np.int32)])
  return Example("selective_copy", prompt, (data,), None, None, length - 1)
