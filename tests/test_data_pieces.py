"""Tests for cutting documents into pieces (lctx.data.pieces, documents)."""


import numpy as np
import pytest

from lctx.data import documents, pieces, pipeline, train_iterator
from tests.test_data_pipeline import (TOK, _check_structure, _jsonl_cfg, _make_docs, _stream,
                                      assert_resumes_exactly)


def test_pieces_are_consecutive_windows_of_each_document():
  docs = ["abcdefghij", "", "xyz", "0123"]
  table = pieces.Pieces(docs, 4)
  assert list(table) == ["abcd", "efgh", "ij", "xyz", "0123"]
  assert len(table) == 3 + 0 + 1 + 1  # ceil(n / 4) per document.
  assert [table.locate(i) for i in range(5)] == [(0, 0, 4), (0, 4, 8), (0, 8, 10), (2, 0, 3), (3, 0, 4)]
  assert table.locate(-1) == (3, 0, 4)
  assert table.total_chars == 17 and table.mean_chars == 17 / 5
  with pytest.raises(IndexError):
    table[5]
  with pytest.raises(ValueError, match=r"piece_chars must be >= 1"):
    pieces.Pieces(docs, 0)


class _Counting(list):
  """A document list with the fast-path methods, counting their use."""

  calls = 0

  def char_lengths(self):
    return [len(d) for d in self]

  def read_range(self, index, start, stop):
    self.calls += 1
    return self[index][start:stop]


def test_views_measure_and_read_through_their_base():
  base = _Counting(["hello world", "", "pieces", "of text"])
  view = documents.IndexedView(base, [3, 0, 2])[1:]  # Documents 0 and 2.
  np.testing.assert_array_equal(documents.char_lengths(view), [11, 6])
  assert documents.read_range(view, 1, 2, 5) == "ece" and base.calls == 1
  assert list(pieces.Pieces(view, 5)) == ["hello", " worl", "d", "piece", "s"]
  # Without the methods: plain slicing and len().
  np.testing.assert_array_equal(documents.char_lengths(["ab", "ñ"]), [2, 1])
  assert documents.read_range(["abcdef"], 0, 1, 3) == "bc"


def test_mix_weights_give_each_kind_its_share_of_characters():
  weights = pieces.mix_weights([0.6, 0.4], [1000.0, 250.0])
  assert sum(weights) == pytest.approx(1.0)
  chars = [w * m for w, m in zip(weights, [1000.0, 250.0])]
  assert chars[0] / sum(chars) == pytest.approx(0.6)


def test_training_stream_is_the_shuffled_pieces_packed_in_order(tmp_path):
  # 1000-character documents cut into pieces of 256: 3 full pieces and one of
  # 232, so pieces and rows do not line up.
  docs = _make_docs(10, seed=6, min_len=995, max_len=996)
  cfg = _jsonl_cfg(tmp_path, docs, eval_every_nth=5)
  assert cfg.piece_length == 256
  mix = pipeline.training_pieces(cfg)
  texts = [mix.dataset[i][1] for i in range(64)]
  train = [d for i, d in enumerate(docs) if i % 5]
  expected = {d[j : j + 256] for d in train for j in range(0, len(d), 256)}
  assert set(texts[:32]) == expected, "an epoch is every piece once"
  assert texts[:32] != texts[32:], "each epoch is reshuffled"
  it = train_iterator(cfg, TOK)
  batches = [next(it) for _ in range(20)]
  for batch in batches:
    _check_structure(batch, 64, 4)
  stream, seg_starts = _stream(batches)
  assert stream == "".join(texts).encode()[: len(stream)]
  # Every piece is a segment of its own; rows also start segments.
  piece_starts = set(np.cumsum([0] + [len(t) for t in texts]).tolist())
  piece_starts = {p for p in piece_starts if p < len(stream)}
  row_starts = set(range(0, len(stream), 64))
  assert piece_starts <= seg_starts <= piece_starts | row_starts


@pytest.mark.parametrize("k", [0, 5, 11])
def test_state_restores_exactly_mid_piece(tmp_path, k):
  cfg = _jsonl_cfg(tmp_path, _make_docs(12, seed=7, min_len=200, max_len=900), eval_every_nth=4, piece_chars=100)
  assert_resumes_exactly(cfg, k, 8)
