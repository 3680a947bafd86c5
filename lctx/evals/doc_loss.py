"""The long-context loss curve: loss per position counted from each document's start.

Training-time evaluation (`ppl_pos_*` in metrics.csv) scores packed rows of `DataConfig.seq_len`
tokens whose positions restart wherever a document is cut, so it measures the position within a
piece. Here every held-out document of the configured source (the embedded corpus's package
documents, or the user's own eval split) with more than `DocLossConfig.length` tokens is read
from its first token in one forward pass, and the next-token loss at position i is the loss of
predicting token i + 1 from tokens 0..i of the document. Positions are averaged over documents in
buckets whose edges double (0, first_bucket, 2 first_bucket, ...), so a curve that keeps falling
past the training length shows a model that uses context it never trained on.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lctx.data import DataConfig, sources


@dataclasses.dataclass(frozen=True)
class DocLossConfig:
  """What `RunConfig.mode = 'doc_loss'` scores (bound by gin/evals/doc_loss.gin).

  Attributes:
    length: tokens scored from the start of each document (may exceed the training length).
    max_documents: the first this many held-out documents long enough are scored.
    first_bucket: end of the first position bucket; later buckets double.
  """

  length: int = 1024
  max_documents: int = 8
  first_bucket: int = 64

  def __post_init__(self):
    for name in ("length", "max_documents", "first_bucket"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"DocLossConfig.{name}={getattr(self, name)} must be >= 1")
    if self.first_bucket > self.length:
      raise ValueError(f"DocLossConfig.first_bucket={self.first_bucket} must be at most "
                       f"DocLossConfig.length={self.length}")


def bucket_edges(cfg: DocLossConfig) -> list[int]:
  """[0, first, 2 first, 4 first, ..., length]."""
  edges, end = [0], cfg.first_bucket
  while end < cfg.length:
    edges.append(end)
    end *= 2
  return edges + [cfg.length]


def documents(cfg: DocLossConfig, data_cfg: DataConfig, tokenizer) -> np.ndarray:
  """[n, length + 1] int32: the first length + 1 tokens of each scored document.

  Raises:
    ValueError: the data source is a task (it has no documents), or no held-out document has
      more than `length` tokens (the message gives the longest).
  """
  if data_cfg.task_name is not None:
    raise ValueError(f"RunConfig.mode='doc_loss' scores documents, but DataConfig.source="
                     f"{data_cfg.source!r} is a task; use a document source")
  docs = sources.eval_documents(data_cfg)
  kept, longest = [], 0
  for doc in docs:
    tokens = np.asarray(tokenizer.encode(doc), np.int32)
    longest = max(longest, len(tokens))
    if len(tokens) > cfg.length:
      kept.append(tokens[:cfg.length + 1])
      if len(kept) == cfg.max_documents:
        break
  if not kept:
    raise ValueError(f"DocLossConfig.length={cfg.length}: none of the {len(docs)} held-out "
                     f"documents of DataConfig.source={data_cfg.source!r} has more than "
                     f"{cfg.length} tokens (the longest has {longest}); lower "
                     "DocLossConfig.length")
  return np.stack(kept)


@functools.partial(jax.jit, static_argnames="model")
def position_losses(model, params, tokens_1t):
  """[t - 1] float32: -log p(token i + 1 | tokens 0..i) of one document row [1, t]."""
  inputs, targets = tokens_1t[:, :-1], tokens_1t[:, 1:]
  positions = jnp.arange(inputs.shape[1], dtype=jnp.int32)[None]
  logits = model.apply({"params": params}, inputs, positions)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[0, :, 0]


def bucket_rows(losses_nt: np.ndarray, cfg: DocLossConfig, train_len: int | None) -> list[dict]:
  """One row per position bucket of the [documents, length] losses."""
  edges = bucket_edges(cfg)
  rows = []
  for start, end in zip(edges, edges[1:]):
    loss = float(np.mean(losses_nt[:, start:end], dtype=np.float64))
    rows.append({"start": start, "end": end, "documents": len(losses_nt), "loss": loss,
                 "ppl": float(np.exp(loss)),
                 "beyond_training": bool(train_len is not None and end > train_len)})
  return rows


def evaluate(model, params, docs_nt: np.ndarray, cfg: DocLossConfig,
             train_len: int | None = None) -> tuple[list[dict], np.ndarray]:
  """(bucket rows, per-position losses [documents, length]) of the documents from `documents`.

  Call inside the model's mesh context. Each document is one forward pass of `length` tokens;
  all share one compiled program.
  """
  losses = np.stack([np.asarray(position_losses(model, params, jnp.asarray(row[None])))
                     for row in docs_nt])
  return bucket_rows(losses, cfg, train_len), losses
