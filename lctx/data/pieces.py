"""Training documents cut into pieces, the unit that training shuffles.

Shuffling whole documents leaves every long document in one block of the
training stream: a 200 KB stdlib package fills ~800 consecutive rows of 256
bytes, so whole batches (and hundreds of steps) see a single package. Cutting
each document into consecutive windows of `piece_chars` characters and
shuffling the (document, piece) pairs of the whole corpus makes neighbouring
rows and the rows of a batch close to independent draws, while a piece is
still contiguous text several rows long.

A document of n characters becomes ceil(n / piece_chars) pieces; empty
documents have none. Only an offset table of one integer per document is
kept; a piece's text is read on access (see `documents.read_range`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lctx.data import documents


class Pieces(Sequence[str]):
  """The pieces of `docs`, in document order, as a random-access sequence.

  Attributes:
    total_chars: Characters in all pieces (= in all documents).
  """

  def __init__(
      self,
      docs: Sequence[str],
      piece_chars: int,
      lengths: np.ndarray | None = None,
  ):
    """Builds the piece table.

    Args:
      docs: The documents.
      piece_chars: Characters per piece (the last piece of a document may be
        shorter); must be >= 1.
      lengths: `documents.char_lengths(docs)`, if already known.
    """
    if piece_chars < 1:
      raise ValueError(f"Pieces: piece_chars must be >= 1, got {piece_chars}")
    self._docs = docs
    self._piece_chars = int(piece_chars)
    if lengths is None:
      lengths = documents.char_lengths(docs)
    self._lengths = np.asarray(lengths, dtype=np.int64)
    counts = -(-self._lengths // self._piece_chars)  # ceil(n / piece_chars)
    # _first[d] is the index of the first piece of document d.
    self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self.total_chars = int(self._lengths.sum())

  def __len__(self) -> int:
    return int(self._first[-1])

  def locate(self, index: int) -> tuple[int, int, int]:
    """Returns (document index, start, stop) of piece `index`."""
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(index)
    doc = int(np.searchsorted(self._first, index, side="right")) - 1
    start = (index - int(self._first[doc])) * self._piece_chars
    stop = min(start + self._piece_chars, int(self._lengths[doc]))
    return doc, start, stop

  def __getitem__(self, index: int) -> str:
    if isinstance(index, slice):
      # Sequence mixins (iteration, `in`) only need ints; grain slices its
      # own datasets, never the source.
      raise TypeError("Pieces does not support slicing")
    doc, start, stop = self.locate(index)
    return documents.read_range(self._docs, doc, start, stop)

  @property
  def mean_chars(self) -> float:
    """Mean characters per piece (0 if there are none)."""
    return self.total_chars / len(self) if len(self) else 0.0


def mix_weights(
    token_fractions: Sequence[float], mean_piece_chars: Sequence[float]
) -> list[float]:
  """Per-draw mixing weights that give each kind its share of the tokens.

  Drawing kind k with probability w_k yields on average w_k * m_k characters
  of it per draw, where m_k is its mean piece length. For those to be in the
  ratio of `token_fractions` f_k, w_k must be proportional to f_k / m_k.

  Args:
    token_fractions: Target fraction of characters per kind (positive).
    mean_piece_chars: Mean piece length per kind (positive).

  Returns:
    Weights summing to 1.
  """
  raw = [f / m for f, m in zip(token_fractions, mean_piece_chars)]
  total = sum(raw)
  return [w / total for w in raw]
