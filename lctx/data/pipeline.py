"""Training and eval pipelines: documents -> packed, batched token arrays.

Every batch is a dict of int32 numpy arrays of shape [rows, seq_len]:

* ``tokens``: token ids; 0 on padding.
* ``segment_ids``: 1, 2, 3, ... for the documents (or document pieces) of a
  row, 0 on padding. With ``document_mask=False``: 1 on every token.
* ``positions``: position within the segment, 0 at each segment start and on
  padding. With ``document_mask=False``: ``arange(seq_len)``.

Training streams never pad (documents are concatenated end to end); eval
batches can pad the last row of the held-out set.
"""

from __future__ import annotations

import grain
import numpy as np

from lctx.data import packing
from lctx.data import sources
from lctx.data.config import DataConfig
from lctx.data.tokenizers import Tokenizer
from lctx.data.tokenizers import make_tokenizer


def _resolve_tokenizer(tokenizer: Tokenizer | str) -> Tokenizer:
  if isinstance(tokenizer, str):
    return make_tokenizer(tokenizer)
  return tokenizer


def _seed(cfg_seed: int, stream: int) -> int:
  # Independent 32-bit shuffle seeds per document kind from one config seed.
  return int(np.random.SeedSequence([cfg_seed, stream]).generate_state(1)[0])


def train_iterator(
    cfg: DataConfig,
    tokenizer: Tokenizer | str,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.DatasetIterator:
  """Returns an infinite iterator over training batches.

  Each kind of training document is sharded (shard `i` takes documents
  i, i + shard_count, ...), shuffled with a new order every epoch and
  repeated; for the stdlib source the two kinds are interleaved so that a
  fraction `cfg.long_fraction` of the documents are packages. Documents are
  then packed into rows and batched.

  Args:
    cfg: The data config.
    tokenizer: A `Tokenizer`, or a name/path for `make_tokenizer`.
    shard_index: This host's shard, in [0, shard_count).
    shard_count: Number of hosts; each yields cfg.batch_size // shard_count
      rows per batch.

  Returns:
    A grain `DatasetIterator`. `get_state()` returns a JSON-serializable dict;
    `set_state(state)` on a fresh iterator built from the same arguments makes
    it continue exactly where the saved one was.

  Raises:
    ValueError: bad shard arguments or a source problem (see `sources`).
  """
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(
        f"train_iterator: need 0 <= shard_index < shard_count, got"
        f" shard_index={shard_index}, shard_count={shard_count}"
    )
  if cfg.batch_size % shard_count:
    raise ValueError(
        f"DataConfig.batch_size: {cfg.batch_size} is not divisible by"
        f" shard_count={shard_count}"
    )
  tokenizer = _resolve_tokenizer(tokenizer)

  parts, weights = [], []
  # Bound on consecutive empty documents before all must be empty: enough
  # draws for every kind to go through two full epochs.
  max_empty = 0
  for stream, kind in enumerate(sources.train_documents(cfg)):
    # Checked on the totals so that every host fails, not just the unlucky.
    if len(kind.docs) < shard_count:
      raise ValueError(
          f"train_iterator: shard_count={shard_count} exceeds the"
          f" {len(kind.docs)} training documents among the {kind.name}"
      )
    shard = grain.MapDataset.source(kind.docs)[shard_index::shard_count]
    parts.append(shard.shuffle(seed=_seed(cfg.seed, stream)).repeat())
    weights.append(kind.weight)
    max_empty += int(np.ceil(2 * len(shard) / kind.weight))
  docs = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)

  rows = packing.pack(
      docs, tokenizer, cfg.seq_len, max_consecutive_empty=max_empty + 100
  )
  batches = rows.batch(
      cfg.batch_size // shard_count,
      drop_remainder=True,
      batch_fn=packing.FormatBatch(cfg.seq_len, cfg.document_mask),
  )
  return packing.JsonStateIterDataset(batches).__iter__()


def eval_batches(
    cfg: DataConfig, tokenizer: Tokenizer | str, num_batches: int
) -> list[dict[str, np.ndarray]]:
  """Returns deterministic batches of the held-out documents.

  The held-out documents are packed in order (no shuffle). If they fill fewer
  than `num_batches` batches, their rows are cycled; the last row of the
  held-out set may be padded.

  Args:
    cfg: The data config (`batch_size` rows per batch, global).
    tokenizer: A `Tokenizer`, or a name/path for `make_tokenizer`.
    num_batches: Number of batches to return.

  Returns:
    A list of `num_batches` batch dicts.

  Raises:
    ValueError: num_batches < 1, or the held-out documents have no tokens.
  """
  if num_batches < 1:
    raise ValueError(f"eval_batches: num_batches must be >= 1, got {num_batches}")
  tokenizer = _resolve_tokenizer(tokenizer)
  docs = sources.eval_documents(cfg)
  rows_needed = num_batches * cfg.batch_size
  rows = []
  # Pack lazily and stop early: the stdlib held-out packages alone make
  # thousands of rows, far more than a typical eval needs.
  for row in packing.pack(grain.MapDataset.source(docs), tokenizer, cfg.seq_len):
    rows.append(row)
    if len(rows) == rows_needed:
      break
  if not rows:
    raise ValueError(
        f"DataConfig.eval_every_nth: the {len(docs)} held-out documents of"
        f" source {cfg.source!r} contain no tokens"
    )
  rows = [rows[i % len(rows)] for i in range(rows_needed)]
  return [
      packing.format_rows(
          rows[b * cfg.batch_size : (b + 1) * cfg.batch_size],
          cfg.seq_len,
          cfg.document_mask,
      )
      for b in range(num_batches)
  ]
