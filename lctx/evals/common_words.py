"""RULER's common-words extraction (CWE), an aggregation task: no needle, the answer is a
statistic of the whole context.

The context is a numbered list "1. {w} 2. {w} 3. {w} ..." in which `common` words (10) each
appear `common_repeats` times and the other, uncommon words `uncommon_repeats` times, in a
random order; the query is "Question: What are the 10 most common words in the above list?
Answer: The top 10 words that appear most often in the list are:" and every common word is an
answer. Words are 5 random lowercase letters. RULER repeats common words 30 times and uncommon
ones 3 times at 4K tokens and more (6 and 1 below); here the repeats are the first pair of
`REPEATS` whose list still holds as many uncommon words as common ones in the length (the
last pair, 2 and 1, lets a byte-level prompt of 512 tokens hold the task), and the number of
uncommon words then grows to fill the length. RULER's instruction line before the list is left
out (the query states the task) for the same reason. The prompt is padded in front with
passkey filler to exactly `length` tokens, as the needle tasks are.
"""

from __future__ import annotations

import string

import numpy as np

from lctx.evals.example import Example, check_representable, encode, largest_fit, pad_front
from lctx.evals.needles import PASSKEY_FILLER

# (common word repeats, uncommon word repeats), from the longest prompts to the shortest.
REPEATS = ((30, 3), (6, 1), (3, 1), (2, 1))


class _Words:
  """A stream of distinct words of 5 random lowercase letters, drawn in blocks of a fixed size
  so that its first n words are the same however many are asked for."""

  def __init__(self, seed: int, block: int = 256):
    self._rng, self._block = np.random.default_rng(seed), block
    self._letters = np.asarray(list(string.ascii_lowercase))
    self._words: list[str] = []
    self._seen: set[str] = set()

  def first(self, n: int) -> list[str]:
    while len(self._words) < n:
      for letters in self._letters[self._rng.integers(0, 26, (self._block, 5))]:
        word = "".join(letters)
        if word not in self._seen:
          self._seen.add(word)
          self._words.append(word)
    return self._words[:n]


def common_words(tokenizer, length: int, depth: float, rng, *, common: int = 10) -> Example:
  """The numbered list of words with `common` frequent words (see the module docstring)."""
  del depth  # the answer counts the whole list
  task = "common_words"
  words = _Words(int(rng.integers(0, 2 ** 63)))
  order_seed = int(rng.integers(0, 2 ** 63))
  answers = words.first(common)
  query = (f"\nQuestion: What are the {common} most common words in the above list? Answer: The "
           f"top {common} words that appear most often in the list are:")
  check_representable(tokenizer, [query, " ".join(f"{i + 1}. {w}" for i, w in enumerate(answers))],
                      f"task {task!r}")
  query_tokens = encode(tokenizer, query)

  def listing(uncommon: int) -> str:
    # The order is fixed by the seed and the counts, so the search can rebuild any candidate.
    drawn = words.first(common + uncommon)
    entries = drawn[:common] * repeats[0] + drawn[common:] * repeats[1]
    np.random.default_rng(order_seed).shuffle(entries)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries))

  def size(extra: int) -> int:  # tokens of the prompt with common + extra uncommon words
    return len(encode(tokenizer, listing(common + extra))) + len(query_tokens)

  for repeats in REPEATS:
    if size(0) <= length:
      break
  else:
    raise ValueError(f"task {task!r}: length={length} is below the {size(0)} tokens that the "
                     f"shortest list ({common} common words {repeats[0]} times each, {common} "
                     f"others {repeats[1]} time each) and the query take")
  context = encode(tokenizer, listing(common + largest_fit(size, length)))
  context = pad_front(tokenizer, PASSKEY_FILLER, context, length - len(context) - len(query_tokens))
  return Example(task, np.concatenate([context, query_tokens]),
                 tuple(encode(tokenizer, " " + w) for w in answers), tuple(answers), None,
                 len(context))
