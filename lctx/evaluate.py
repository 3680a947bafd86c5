"""Held-out evaluation: loss and perplexity by position bucket, and the unigram baseline."""

import math
from typing import Iterable

import numpy as np

from lctx.losses import batch_targets


def bucket_edges(seq_len: int, num_buckets: int) -> list[tuple[int, int]]:
  """[lo, hi) document-position ranges of the equal-width buckets used by make_eval_step."""
  edges = []
  for i in range(num_buckets):
    lo = -(-i * seq_len // num_buckets)  # smallest p with p * num_buckets // seq_len == i
    hi = -(-(i + 1) * seq_len // num_buckets)
    edges.append((lo, hi))
  return edges


def bucket_column(lo: int, hi: int) -> str:
  return f"ppl_pos_{lo}_{hi}"


def summarize(ce_sum: np.ndarray, count: np.ndarray, seq_len: int,
              correct: np.ndarray | None = None) -> dict[str, float]:
  """Turns bucketed sums into {"eval_loss", "eval_ppl", "eval_accuracy" (when `correct`, the
  bucketed argmax hits, is given), "ppl_pos_lo_hi"...}."""
  ce_sum, count = np.asarray(ce_sum, np.float64), np.asarray(count, np.float64)
  if count.sum() == 0:
    raise ValueError("evaluation saw no target tokens; the eval data is empty")
  loss = float(ce_sum.sum() / count.sum())
  out = {"eval_loss": loss, "eval_ppl": math.exp(loss)}
  if correct is not None:
    out["eval_accuracy"] = float(np.sum(correct) / count.sum())
  for (lo, hi), s, c in zip(bucket_edges(seq_len, len(count)), ce_sum, count):
    out[bucket_column(lo, hi)] = math.exp(s / c) if c else float("nan")
  return out


def unigram_counts(batches: Iterable[dict], vocab_size: int) -> np.ndarray:
  """Token frequencies over the non-padding tokens of `batches`."""
  counts = np.zeros(vocab_size, np.float64)
  for batch in batches:
    tokens = np.asarray(batch["tokens"])[np.asarray(batch["segment_ids"]) != 0]
    counts += np.bincount(tokens.reshape(-1), minlength=vocab_size)[:vocab_size]
  return counts


def unigram_loss(counts: np.ndarray, batches: Iterable[dict]) -> float:
  """Cross-entropy (nats/token) of the targets of `batches` under add-one-smoothed `counts`.

  Scored on exactly the tokens the model's eval loss is scored on (same targets and weights).
  """
  logp = np.log((counts + 1.0) / (counts.sum() + len(counts)))
  total, n = 0.0, 0.0
  for batch in batches:
    targets, weights = batch_targets(batch)
    targets, w = np.asarray(targets), np.asarray(weights) > 0
    total -= logp[targets[w]].sum()
    n += w.sum()
  if n == 0:
    raise ValueError("unigram baseline: the eval data has no target tokens")
  return float(total / n)
