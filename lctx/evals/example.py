"""One evaluation example, and the pieces every text task shares: argument checks, tokenizer
checks and fitting a haystack to a target length with the needles at a chosen depth.

An `Example` is what a long-context evaluation scores: the model reads `prompt` (context then
query, int32 tokens) and its continuation is compared with `answers` (one token sequence per
reference string; a task whose answer lists several strings, e.g. multi-value needles, has
several). Text tasks also keep the strings, so scoring can work on decoded text as RULER does.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
  """A (context + query, answer) pair in token space.

  Attributes:
    task: the task's name (lctx.evals.tasks.TASKS).
    prompt: int32 [n] tokens the model reads: context, then query.
    answers: int32 token sequences of the reference answers (the continuation to produce).
    answer_texts: the reference strings (text tasks), else None.
    depth: where the needles sit in the context, as a fraction in [0, 1] (None: no needle).
    context_len: tokens of the prompt before the query.
  """

  task: str
  prompt: np.ndarray
  answers: tuple[np.ndarray, ...]
  answer_texts: tuple[str, ...] | None = None
  depth: float | None = None
  context_len: int = 0


def check_depth(depth: float, what: str) -> float:
  depth = float(depth)
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"{what}: depth={depth} must lie in [0, 1] (0: needle at the start of the "
                     "context, 1: at its end)")
  return depth


def check_representable(tokenizer, texts, what: str) -> None:
  """Raises unless every string of `texts` survives encode -> decode with `tokenizer`."""
  for text in texts:
    if tokenizer.decode(tokenizer.encode(text)) != text:
      raise ValueError(f"{what}: the tokenizer {tokenizer!r} cannot represent {text!r} (decode "
                       "of its encoding differs); use a tokenizer that covers the task's text")


def encode(tokenizer, text: str) -> np.ndarray:
  return np.asarray(tokenizer.encode(text), np.int32).reshape(-1)


def fit_haystack(tokenizer, filler: list[str], needles: list[str], query: str, length: int,
                 depths: list[float], what: str, sep: str = " ") -> tuple[np.ndarray, int]:
  """A prompt of exactly `length` tokens: filler sentences with `needles` inserted, then `query`.

  The number of filler sentences is searched (bisection) so that context + query is at most
  `length` tokens; needle i goes before the filler sentence at fraction depths[i] of the filler.
  The remaining few tokens are the tail of more filler, in front, so that every prompt of one
  length has the same shape (one compilation per length). `filler` is a list of sentences
  cycled as needed and joined by `sep` (a space for prose, a newline for lines of code).
  Returns (prompt tokens, context length). Raises a ValueError naming the setting when even the
  needles and query alone do not fit.
  """

  def build(n: int) -> str:
    sentences = _cycle(filler, n)
    slots = sorted(((round(d * n), i) for i, d in enumerate(depths)), reverse=True)
    for at, i in slots:
      sentences.insert(at, needles[i])
    return sep.join(sentences)

  query_tokens = encode(tokenizer, query)
  contexts = functools.lru_cache(maxsize=None)(lambda n: encode(tokenizer, build(n)))
  size = lambda n: len(contexts(n)) + len(query_tokens)
  if size(0) > length:
    raise ValueError(f"{what}: length={length} is below the {size(0)} tokens that the needles and "
                     "the query alone take")
  context = contexts(largest_fit(size, length))
  context = pad_front(tokenizer, filler, context, length - len(context) - len(query_tokens), sep)
  return np.concatenate([context, query_tokens]), len(context)


def largest_fit(size, length: int) -> int:
  """The n >= 0 found by doubling then bisection with size(n) <= length < size(n + 1), for a
  `size` that grows with n and size(0) <= length (e.g. tokens of a prompt with n items)."""
  lo, hi = 0, 1
  while size(hi) <= length:
    lo, hi = hi, hi * 2
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if size(mid) <= length else (lo, mid)
  return lo


def pad_front(tokenizer, filler: list[str], context: np.ndarray, pad: int,
              sep: str = " ") -> np.ndarray:
  """`context` preceded by the last `pad` tokens of filler sentences (cycled, joined by `sep`):
  the few tokens a fitted prompt lacks to be exactly its length."""
  if not pad:
    return context
  n = 1
  while len(head := encode(tokenizer, sep.join(_cycle(filler, n)) + sep)) < pad:
    n *= 2
  return np.concatenate([head[-pad:], context])


def _cycle(filler: list[str], n: int) -> list[str]:
  """The first n sentences of `filler` repeated."""
  return [filler[i % len(filler)] for i in range(n)]
