"""Scores of one example from what the model produced: exact match of the greedy continuation,
RULER's string-containment metric, the passkey metric, and the answer's log-likelihood.

All take plain numpy / strings, so they are tested on hand-made outputs and shared by every
evaluation loop.
"""

from __future__ import annotations

import re

import numpy as np


def exact_match(generated, answer) -> bool:
  """Whether the generated tokens start with the answer's tokens."""
  generated, answer = np.asarray(generated).reshape(-1), np.asarray(answer).reshape(-1)
  return len(generated) >= len(answer) and bool(np.array_equal(generated[:len(answer)], answer))


def contains_fraction(output: str, references) -> float:
  """RULER's metric: the fraction of reference strings that occur in the output text."""
  references = list(references)
  if not references:
    raise ValueError("contains_fraction: no reference strings")
  return sum(ref in output for ref in references) / len(references)


def first_number_matches(output: str, key: str) -> bool:
  """The passkey metric: the first run of digits in the output equals the key."""
  match = re.search(r"\d+", output)
  return match is not None and match.group(0) == key


def answer_logprob(logits, answer, prompt_len: int) -> float:
  """log p(answer | prompt) from a forward pass over prompt + answer.

  Args:
    logits: float [prompt_len + len(answer), vocab] (at least prompt_len + len(answer) - 1
      rows): row i predicts token i + 1.
    answer: int [m] answer tokens, placed right after the prompt.
    prompt_len: tokens of the prompt (>= 1).
  """
  answer = np.asarray(answer).reshape(-1)
  logits = np.asarray(logits, np.float64)
  if prompt_len < 1 or logits.shape[0] < prompt_len + len(answer) - 1:
    raise ValueError(f"answer_logprob: {logits.shape[0]} logit rows cannot score {len(answer)} "
                     f"answer tokens after a prompt of {prompt_len}")
  rows = logits[prompt_len - 1:prompt_len - 1 + len(answer)]
  top = rows.max(axis=-1, keepdims=True)
  logz = (top + np.log(np.exp(rows - top).sum(axis=-1, keepdims=True)))[:, 0]
  return float(np.sum(rows[np.arange(len(answer)), answer] - logz))
