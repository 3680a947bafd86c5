"""Random-access document collections and the train/eval split.

Every source (the stdlib corpus, text/jsonl/parquet readers) exposes its
documents as a `Sequence[str]` whose items are loaded lazily, so building a
pipeline only costs a listing. grain's `MapDataset.source` accepts any such
sequence.

Two optional methods let a collection answer faster than by loading whole
documents: ``char_lengths()`` (the length of every document, in characters)
and ``read_range(index, start, stop)`` (``docs[index][start:stop]``). The
module functions `char_lengths` and `read_range` use them when present.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import overload

import numpy as np


def char_lengths(docs: Sequence[str]) -> np.ndarray:
  """Returns the length in characters of every document of `docs`.

  Args:
    docs: A document collection.

  Returns:
    int64 array of shape [len(docs)].
  """
  method = getattr(docs, "char_lengths", None)
  if method is not None:
    return np.asarray(method(), dtype=np.int64)
  return np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))


def read_range(docs: Sequence[str], index: int, start: int, stop: int) -> str:
  """Returns ``docs[index][start:stop]``, without loading more if possible."""
  method = getattr(docs, "read_range", None)
  if method is not None:
    return method(index, start, stop)
  return docs[index][start:stop]


class IndexedView(Sequence[str]):
  """A read-only view of `base` restricted to `indices`, in that order."""

  def __init__(self, base: Sequence[str], indices: Sequence[int]):
    self._base = base
    self._indices = tuple(indices)

  def __len__(self) -> int:
    return len(self._indices)

  @overload
  def __getitem__(self, index: int) -> str:
    ...

  @overload
  def __getitem__(self, index: slice) -> IndexedView:
    ...

  def __getitem__(self, index):
    if isinstance(index, slice):
      return IndexedView(self._base, self._indices[index])
    return self._base[self._indices[index]]

  def char_lengths(self) -> np.ndarray:
    """Lengths of the viewed documents, from the base collection's lengths."""
    return char_lengths(self._base)[np.asarray(self._indices, dtype=np.int64)]

  def read_range(self, index: int, start: int, stop: int) -> str:
    """``self[index][start:stop]``, read through the base collection."""
    return read_range(self._base, self._indices[index], start, stop)

  def __repr__(self) -> str:
    return f"IndexedView({len(self)} of {len(self._base)} documents)"


@dataclasses.dataclass(frozen=True)
class Split:
  """Train and held-out documents of one kind."""

  train: Sequence[str]
  eval: Sequence[str]


def split_every_nth(docs: Sequence[str], n: int) -> Split:
  """Holds out documents 0, n, 2n, ... for evaluation.

  Index 0 is held out (rather than n-1) so that even a source with fewer than
  n documents has an eval document, as long as it has two documents or more.

  Args:
    docs: All documents in their deterministic (sorted) order.
    n: `DataConfig.eval_every_nth`.

  Returns:
    The split; both parts are lazy views of `docs`.
  """
  held_out = range(0, len(docs), n)
  train = [i for i in range(len(docs)) if i % n != 0]
  return Split(train=IndexedView(docs, train), eval=IndexedView(docs, held_out))
