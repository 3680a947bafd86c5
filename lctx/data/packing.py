"""grain stages shared by the training and eval pipelines.

Documents are tokenized, concatenated and split into rows of `seq_len` tokens
with grain's `ConcatThenSplitIterDataset`. It emits, per row,
``tokens_segment_ids`` (1, 2, ... per document piece, 0 on padding) and
``tokens_positions`` (restarting at 0 at each piece). A document that does not
fit in the rest of a row continues in the next row as a new segment whose
positions restart at 0, so no row ever attends across a row boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
import copy
from typing import Any

import grain
import numpy as np

from lctx.data.tokenizers import Tokenizer

# Keys produced by ConcatThenSplitIterDataset for the feature "tokens".
_TOKENS = "tokens"
_SEGMENT_IDS = "tokens_segment_ids"
_POSITIONS = "tokens_positions"


class Tokenize:
  """grain map: document text -> {"tokens": int32 array}."""

  def __init__(self, tokenizer: Tokenizer):
    self._tokenizer = tokenizer

  def __call__(self, text: str) -> dict[str, np.ndarray]:
    return {_TOKENS: np.asarray(self._tokenizer.encode(text), dtype=np.int32)}


class NonEmpty:
  """grain filter dropping documents with no tokens.

  An empty document would otherwise become a zero-length segment, leaving a
  gap in the segment ids of its row. If every document of a repeated source is
  empty the packer would wait forever, so a long run of empty documents
  raises instead.
  """

  def __init__(self, max_consecutive_empty: int | None = None):
    self._max = max_consecutive_empty
    self._run = 0

  def __call__(self, element: dict[str, np.ndarray]) -> bool:
    if len(element[_TOKENS]):
      self._run = 0
      return True
    self._run += 1
    if self._max is not None and self._run > self._max:
      raise ValueError(
          f"DataConfig.paths: {self._run} documents in a row have no tokens;"
          " the training documents appear to be empty"
      )
    return False


def pack(
    docs: grain.MapDataset,
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    max_consecutive_empty: int | None = None,
    segment_len: int | None = None,
    packing: str = "concat",
    max_tokens: int | None = None,
) -> grain.IterDataset:
  """Tokenizes `docs` and packs them into rows of `seq_len` tokens.

  Args:
    docs: Dataset of document texts, already in the order to pack them.
    tokenizer: Turns text into token ids.
    seq_len: Row length.
    max_consecutive_empty: See `NonEmpty`; None disables the check (fine for
      finite datasets).
    segment_len, packing, max_tokens: see `pack_tokens`.

  Returns:
    Dataset of rows with keys tokens, tokens_segment_ids, tokens_positions.
  """
  return pack_tokens(
      docs.map(Tokenize(tokenizer)),
      seq_len,
      max_consecutive_empty=max_consecutive_empty,
      segment_len=segment_len,
      packing=packing,
      max_tokens=max_tokens,
  )


class SplitSegments(grain.experimental.FlatMapTransform):
  """grain flat map: {"tokens": array} -> consecutive pieces of at most `length` tokens."""

  def __init__(self, length: int, max_fan_out: int):
    self._length = length
    self.max_fan_out = max_fan_out

  def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    tokens = element[_TOKENS]
    return [{_TOKENS: tokens[i:i + self._length]} for i in range(0, len(tokens), self._length)]


PACKING_BINS = 8  # rows first-fit packing keeps open


def pack_tokens(
    docs: grain.MapDataset,
    seq_len: int,
    *,
    max_consecutive_empty: int | None = None,
    segment_len: int | None = None,
    packing: str = "concat",
    max_tokens: int | None = None,
) -> grain.IterDataset:
  """Like `pack`, for documents already tokenized into {"tokens": array}.

  `segment_len` cuts every document into consecutive segments of at most that many tokens (each
  its own segment, positions from 0); `packing` is "concat" (concat-then-split, rows never
  padded) or "first_fit" (no segment split across rows, rows padded); `max_tokens` bounds a
  document's tokens (for the flat map's fan-out).
  """
  # Synchronous reads: a document is read and tokenized in ~1 ms and feeds
  # many rows, while grain's default 16 reader threads would buffer up to 500
  # tokenized documents (hundreds of MB of stdlib packages) and contend for
  # the GIL with the training loop.
  rows = docs.to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  )
  rows = rows.filter(NonEmpty(max_consecutive_empty))
  segment_len = min(segment_len or seq_len, seq_len)
  if packing == "first_fit" or segment_len < seq_len:
    fan_out = -(-(max_tokens or 4 * seq_len) // segment_len)
    rows = grain.experimental.FlatMapIterDataset(rows, SplitSegments(segment_len, fan_out))
  if packing == "first_fit":
    return grain.experimental.FirstFitPackIterDataset(
        rows, length_struct={_TOKENS: seq_len}, num_packing_bins=PACKING_BINS,
        shuffle_bins=False)
  if packing != "concat":
    raise ValueError(f"packing={packing!r}: expected 'concat' or 'first_fit'")
  return grain.experimental.ConcatThenSplitIterDataset(
      rows, length_struct={_TOKENS: seq_len}
  )


class FormatBatch:
  """grain batch_fn: packed rows -> the batch dict the model consumes."""

  def __init__(self, seq_len: int, document_mask: bool):
    self._seq_len = seq_len
    self._document_mask = document_mask

  def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
    return format_rows(rows, self._seq_len, self._document_mask)


def format_rows(
    rows: Sequence[dict[str, np.ndarray]], seq_len: int, document_mask: bool
) -> dict[str, np.ndarray]:
  """Stacks packed rows into a batch.

  Args:
    rows: Rows from `pack`.
    seq_len: Row length.
    document_mask: If False, each row is a single segment (1 on tokens, 0 on
      padding) and positions are arange(seq_len).

  Returns:
    Dict with int32 arrays tokens, segment_ids, positions of shape
    [len(rows), seq_len].
  """
  tokens = np.stack([r[_TOKENS] for r in rows]).astype(np.int32, copy=False)
  segment_ids = np.stack([r[_SEGMENT_IDS] for r in rows]).astype(
      np.int32, copy=False
  )
  if document_mask:
    positions = np.stack([r[_POSITIONS] for r in rows]).astype(
        np.int32, copy=False
    )
  else:
    segment_ids = (segment_ids > 0).astype(np.int32)
    positions = np.tile(np.arange(seq_len, dtype=np.int32), (len(rows), 1))
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def _to_json(state: Any) -> Any:
  """Deep copy with tuples as lists and numpy scalars as Python numbers."""
  if isinstance(state, dict):
    return {k: _to_json(v) for k, v in state.items()}
  if isinstance(state, (list, tuple)):
    return [_to_json(v) for v in state]
  if isinstance(state, np.generic):
    return state.item()
  return copy.copy(state)


def _from_json(state: Any) -> Any:
  """Undoes the tuple -> list conversion where grain compares with tuples.

  ConcatThenSplit marks "no remainder" with the tuple (-1, -1) and tests it
  with `!=`; after a JSON round trip the list [-1, -1] compares unequal, so
  restoring would silently drop a document. Its slices must be tuples again.
  """
  if isinstance(state, dict):
    out = {}
    for key, value in state.items():
      if key == "remainder_slices" and isinstance(value, dict):
        out[key] = {k: tuple(v) for k, v in value.items()}
      else:
        out[key] = _from_json(value)
    return out
  if isinstance(state, list):
    return [_from_json(v) for v in state]
  return state


class JsonStateIterDataset(grain.IterDataset):
  """Pass-through whose iterator state survives `json.dumps`/`json.loads`."""

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonStateIterator(self._parent.__iter__())


class _JsonStateIterator(grain.DatasetIterator):
  """See `JsonStateIterDataset`."""

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return _to_json(self._parent.get_state())

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(_from_json(state))
