"""The registry of evaluation tasks that produce `Example`s, and one entry that checks a
request and builds a deterministic example from a seed.

Text tasks (passkey, RULER needles, variable tracking and common words, bAbI in noise, needles
in stdlib code) need a tokenizer that represents their text (the byte tokenizer does);
token-space tasks (selective copying) use ids below the tokenizer's vocabulary. MQAR, which
labels many positions per sequence, is `lctx.evals.synthetic.mqar`.
"""

from __future__ import annotations

import functools

import numpy as np

from lctx.evals import babi, code, common_words, needles, synthetic
from lctx.evals.example import Example, check_depth


def _selective_copy(tokenizer, length, depth, rng):
  del depth  # the data tokens are spread over the whole context
  return synthetic.selective_copy(length, rng, vocab=min(16, tokenizer.vocab_size))


TASKS = {
    "passkey": needles.passkey,
    "niah_single": functools.partial(needles.niah, variant="single"),
    "niah_multikey": functools.partial(needles.niah, variant="multikey"),
    "niah_multivalue": functools.partial(needles.niah, variant="multivalue"),
    "niah_multiquery": functools.partial(needles.niah, variant="multiquery"),
    "variable_tracking": needles.variable_tracking,
    "common_words": common_words.common_words,
    "babi_qa1": functools.partial(babi.babi, qa=1),
    "babi_qa2": functools.partial(babi.babi, qa=2),
    "babi_qa3": functools.partial(babi.babi, qa=3),
    "passkey_code": code.passkey_code,
    "needle_code": code.needle_code,
    "selective_copy": _selective_copy,
}


def make_example(task: str, tokenizer, length: int, depth: float = 0.5, seed: int = 0) -> Example:
  """The example of `task` with prompt at most `length` tokens and its needle at `depth`.

  The same (task, tokenizer, length, depth, seed) always gives the same example. Raises a
  ValueError naming the setting for an unknown task, a depth outside [0, 1] or a length the
  task cannot fit in.
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r} is not one of {sorted(TASKS)}")
  if int(length) < 1:
    raise ValueError(f"task {task!r}: length={length} must be positive")
  depth = check_depth(depth, f"task {task!r}")
  return TASKS[task](tokenizer, int(length), depth, np.random.default_rng(seed))
