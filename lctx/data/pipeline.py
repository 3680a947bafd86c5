"""Training and eval pipelines: documents -> packed, batched token arrays.

Every batch is a dict of int32 numpy arrays of shape [rows, seq_len]:

* ``tokens``: token ids; 0 on padding.
* ``segment_ids``: 1, 2, 3, ... for the documents (or document pieces) of a
  row, 0 on padding. With ``document_mask=False``: 1 on every token.
* ``positions``: position within the segment, 0 at each segment start and on
  padding. With ``document_mask=False``: ``arange(seq_len)``.

A "task:<name>" source makes one example per row instead and adds the
``targets`` and float32 ``weights`` of its loss (`lctx.data.tasks`).

Training cuts every document into pieces (see `lctx.data.pieces`), shuffles
the pieces of the whole corpus and packs them end to end, so training rows
are never padded. Eval packs the held-out documents in order and takes rows
spread evenly over that stream; its last row may be padded.
"""

from __future__ import annotations

from typing import NamedTuple

import grain
import numpy as np

from lctx.data import documents
from lctx.data import packing
from lctx.data import pieces
from lctx.data import sources
from lctx.data import tasks
from lctx.data.config import DataConfig
from lctx.data.config import MIXTURE
from lctx.data.tokenizers import Tokenizer
from lctx.data.tokenizers import make_tokenizer


def _resolve_tokenizer(tokenizer: Tokenizer | str) -> Tokenizer:
  if isinstance(tokenizer, str):
    return make_tokenizer(tokenizer)
  return tokenizer


def _seed(cfg_seed: int, stream: int) -> int:
  # Independent 32-bit shuffle seeds per document kind from one config seed.
  return int(np.random.SeedSequence([cfg_seed, stream]).generate_state(1)[0])


def _check_shard(shard_index: int, shard_count: int) -> None:
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(
        f"train_iterator: need 0 <= shard_index < shard_count, got"
        f" shard_index={shard_index}, shard_count={shard_count}"
    )


class TrainingPieces(NamedTuple):
  """The shuffled, mixed training pieces of one shard, before packing.

  Attributes:
    dataset: Infinite grain `MapDataset` of ``(kind index, piece text)``.
    kind_names: Name of each kind of document, by kind index.
    max_consecutive_empty: Draws after which a run of pieces without tokens
      means every piece is empty (see `packing.NonEmpty`).
  """

  dataset: grain.MapDataset
  kind_names: tuple[str, ...]
  max_consecutive_empty: int


class _Tag:
  """grain map: piece text -> (kind index, text)."""

  def __init__(self, kind: int):
    self._kind = kind

  def __call__(self, text: str) -> tuple[int, str]:
    return self._kind, text


def _text(piece: tuple[int, str]) -> str:
  return piece[1]


def _shard_pieces(docs, name: str, piece_length: int, seed: int, stream: int, shard_index: int,
                  shard_count: int) -> tuple[pieces.Pieces, grain.MapDataset]:
  """This shard's pieces of one kind of document, and them shuffled (a new order every epoch)."""
  # Checked on the totals so that every host fails, not just the unlucky.
  if len(docs) < shard_count:
    raise ValueError(
        f"train_iterator: shard_count={shard_count} exceeds the"
        f" {len(docs)} training documents among the {name}"
    )
  lengths = documents.char_lengths(docs)
  for shard in range(shard_count):
    if not lengths[shard::shard_count].any():
      where = f" of shard {shard} of {shard_count}" if shard_count > 1 else ""
      raise ValueError(
          f"DataConfig.paths: the training documents{where} among the"
          f" {name} are all empty"
      )
  shard_docs = documents.IndexedView(docs, range(shard_index, len(docs), shard_count))
  table = pieces.Pieces(shard_docs, piece_length, lengths[shard_index::shard_count])
  return table, grain.MapDataset.source(table).shuffle(seed=_seed(seed, stream))


def training_pieces(
    cfg: DataConfig, *, shard_index: int = 0, shard_count: int = 1
) -> TrainingPieces:
  """Cuts, shards, shuffles and mixes the training documents.

  Each kind of training document is sharded (shard `i` takes documents
  i, i + shard_count, ...) and cut into pieces of `cfg.piece_length`
  characters; the pieces of a shard are shuffled with a new order every epoch
  and repeated. Kinds are interleaved with weights that give each its
  fraction of the characters (`cfg.long_fraction` for stdlib packages).

  Args:
    cfg: The data config.
    shard_index: This host's shard, in [0, shard_count).
    shard_count: Number of hosts.

  Returns:
    A `TrainingPieces`.

  Raises:
    ValueError: bad shard arguments, a shard without text, or a source
      problem (see `sources`).
  """
  _check_shard(shard_index, shard_count)
  parts, fractions, means, counts, names = [], [], [], [], []
  for stream, kind in enumerate(sources.train_documents(cfg)):
    table, shuffled = _shard_pieces(kind.docs, kind.name, cfg.piece_length, cfg.seed, stream,
                                    shard_index, shard_count)
    parts.append(shuffled.repeat().map(_Tag(stream)))
    fractions.append(kind.weight)
    means.append(table.mean_chars)
    counts.append(len(table))
    names.append(kind.name)
  weights = pieces.mix_weights(fractions, means)
  mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  # Enough draws for every kind to go through two full epochs.
  max_empty = sum(int(np.ceil(2 * n / w)) for n, w in zip(counts, weights))
  return TrainingPieces(mixed, tuple(names), max_empty + 100)


def train_iterator(
    cfg: DataConfig,
    tokenizer: Tokenizer | str,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.DatasetIterator:
  """Returns an infinite iterator over training batches.

  The pieces of `training_pieces` are tokenized, packed into rows (each piece
  its own segment, positions restarting at 0) and batched.

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
  _check_shard(shard_index, shard_count)
  if cfg.batch_size % shard_count:
    raise ValueError(
        f"DataConfig.batch_size: {cfg.batch_size} is not divisible by"
        f" shard_count={shard_count}"
    )
  tokenizer = _resolve_tokenizer(tokenizer)
  if cfg.task_name is not None:
    return tasks.train_iterator(cfg, tokenizer, shard_index=shard_index,
                                shard_count=shard_count)
  if cfg.source == MIXTURE:
    rows = mixture_rows(cfg, tokenizer, shard_index=shard_index, shard_count=shard_count)
  else:
    rows = _packed_rows(cfg, tokenizer, shard_index, shard_count)
  batches = rows.batch(
      cfg.batch_size // shard_count,
      drop_remainder=True,
      batch_fn=packing.FormatBatch(cfg.seq_len, cfg.document_mask),
  )
  return packing.JsonStateIterDataset(batches).__iter__()


def _packed_rows(cfg: DataConfig, tokenizer: Tokenizer, shard_index: int,
                 shard_count: int) -> grain.IterDataset:
  """Rows of the pieces of every kind, mixed before packing."""
  mix = training_pieces(cfg, shard_index=shard_index, shard_count=shard_count)
  return packing.pack(
      mix.dataset.map(_text),
      tokenizer,
      cfg.seq_len,
      max_consecutive_empty=mix.max_consecutive_empty,
  )


def mixture_rows(cfg: DataConfig, tokenizer: Tokenizer, *, shard_index: int = 0,
                 shard_count: int = 1) -> grain.IterDataset:
  """Rows of a mixture (`DataConfig.source = "mixture"`): each source is cut into pieces,
  shuffled, tokenized, cut into segments of its `seq_len` and packed into rows by its `packing`
  on its own; rows are then drawn from the sources with the normalised weights. The iterator
  state holds every source's position and the mixture's."""
  parts = []
  for stream, (src, docs) in enumerate(sources.mixture_documents(cfg)):
    name = f"documents of source {src.name!r}"
    piece_length = src.piece_length(cfg.seq_len)
    table, shuffled = _shard_pieces(docs, name, piece_length, cfg.seed, stream, shard_index,
                                    shard_count)
    # A piece of c characters has at most 4c byte tokens (and fewer for any other tokenizer).
    parts.append(packing.pack(
        shuffled.repeat(), tokenizer, cfg.seq_len, max_consecutive_empty=2 * len(table) + 100,
        segment_len=src.segment_len(cfg.seq_len), packing=src.packing,
        max_tokens=4 * piece_length))
  return grain.IterDataset.mix(parts, list(cfg.mixture_weights))


def _spread(num_rows: int, rows_needed: int) -> list[int]:
  """Indices of `rows_needed` rows spread evenly over `num_rows` rows."""
  if rows_needed >= num_rows:
    # Every row, cycled in order.
    return [i % num_rows for i in range(rows_needed)]
  return [i * num_rows // rows_needed for i in range(rows_needed)]


def eval_batches(
    cfg: DataConfig, tokenizer: Tokenizer | str, num_batches: int
) -> list[dict[str, np.ndarray]]:
  """Returns deterministic batches of the held-out documents.

  The held-out documents are tokenized and packed in order (no shuffle, no
  pieces) into one stream of R rows, whose last row may be padded. The N =
  num_batches * batch_size eval rows are rows i * R // N (i < N), spread
  evenly over the whole stream so that all held-out documents contribute,
  not just the first; if N >= R, all rows are taken, cycled in order.
  The whole held-out set is tokenized once and kept as token ids.

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
  if cfg.task_name is not None:
    return tasks.eval_batches(cfg, tokenizer, num_batches)
  docs = sources.eval_documents(cfg)
  tokenize = packing.Tokenize(tokenizer)
  tokenized = [t for t in map(tokenize, docs) if len(t["tokens"])]
  total = sum(len(t["tokens"]) for t in tokenized)
  # Concat-then-split never reorders, so the stream has exactly this many rows.
  num_rows = -(-total // cfg.seq_len)
  if not num_rows:
    raise ValueError(
        f"DataConfig.eval_every_nth: the {len(docs)} held-out documents of"
        f" source {cfg.source!r} contain no tokens"
    )
  picks = _spread(num_rows, num_batches * cfg.batch_size)
  wanted, last = set(picks), max(picks)
  kept = {}
  stream = packing.pack_tokens(grain.MapDataset.source(tokenized), cfg.seq_len)
  for index, row in enumerate(stream):
    if index in wanted:
      kept[index] = row
    if index == last:
      break
  rows = [kept[i] for i in picks]
  return [
      packing.format_rows(
          rows[b * cfg.batch_size : (b + 1) * cfg.batch_size],
          cfg.seq_len,
          cfg.document_mask,
      )
      for b in range(num_batches)
  ]
