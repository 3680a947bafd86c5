"""Tests for the training / eval pipelines (lctx.data.pipeline)."""

import json
import re

import numpy as np
import pytest

from lctx.data import DataConfig, eval_batches, make_tokenizer, train_iterator

TOK = make_tokenizer("byte")
_MARK = re.compile(rb"<(\d{3})>")


def _make_docs(n, seed=0, min_len=5, max_len=150):
  """Unique documents '<007>qwxz...' whose marker identifies them in a stream."""
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
  docs = []
  for i in range(n):
    body = "".join(rng.choice(letters, size=int(rng.integers(min_len, max_len))))
    docs.append(f"<{i:03d}>{body}")
  return docs


def _jsonl_cfg(tmp_path, docs, **kwargs):
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  kwargs.setdefault("seq_len", 64)
  kwargs.setdefault("batch_size", 4)
  return DataConfig(source="jsonl", paths=(str(path),), **kwargs)


def _check_structure(batch, seq_len, rows):
  """Shapes, dtypes, and segment/position consistency of a document-masked batch."""
  assert set(batch) == {"tokens", "segment_ids", "positions"}
  for value in batch.values():
    assert value.shape == (rows, seq_len) and value.dtype == np.int32
  for tokens, seg, pos in zip(batch["tokens"], batch["segment_ids"], batch["positions"]):
    real = seg > 0
    n = int(real.sum())
    assert real[:n].all() and not real[n:].any(), "padding only at the end"
    assert (tokens[n:] == 0).all() and (pos[n:] == 0).all()
    if n:
      assert seg[0] == 1
      assert set(np.diff(seg[:n])) <= {0, 1}, "segment ids count up by one"
    for s in range(1, int(seg.max()) + 1):
      idx = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))


def _stream(batches):
  """Concatenated non-padding tokens of all rows, and where segments start."""
  chunks, starts, offset = [], set(), 0
  for batch in batches:
    for tokens, seg in zip(batch["tokens"], batch["segment_ids"]):
      n = int((seg > 0).sum())
      starts.update(offset + np.flatnonzero(np.diff(seg[:n], prepend=0) != 0))
      chunks.append(tokens[:n].astype(np.uint8).tobytes())
      offset += n
  return b"".join(chunks), starts


def _parse(stream, docs):
  """Splits a token stream into whole documents; returns their ids in order.

  Asserts the stream is exactly a concatenation of `docs` (ignoring a cut
  final document).
  """
  marks = list(_MARK.finditer(stream))
  assert marks and marks[0].start() == 0
  ids = []
  for m, nxt in zip(marks, marks[1:] + [None]):
    doc_id = int(m.group(1))
    piece = stream[m.start() : nxt.start() if nxt else len(stream)]
    expected = docs[doc_id].encode()
    if nxt is None:
      assert expected.startswith(piece)
    else:
      assert piece == expected, f"document {doc_id} is not contiguous"
    ids.append(doc_id)
  return ids, [m.start() for m in marks]


def test_training_stream_is_shuffled_epochs_of_whole_documents(tmp_path):
  docs = _make_docs(21)
  cfg = _jsonl_cfg(tmp_path, docs, eval_every_nth=5)
  it = train_iterator(cfg, TOK)
  batches = [next(it) for _ in range(40)]
  for batch in batches:
    _check_structure(batch, 64, 4)
    assert (batch["segment_ids"] > 0).all(), "training rows are never padded"
  stream, seg_starts = _stream(batches)
  ids, doc_starts = _parse(stream, docs)
  train_ids = sorted(i for i in range(21) if i % 5 != 0)
  first, second = ids[: len(train_ids)], ids[len(train_ids) : 2 * len(train_ids)]
  assert sorted(first) == train_ids and sorted(second) == train_ids
  assert first != second, "each epoch is reshuffled"
  # A segment starts at every document start and otherwise only at row starts.
  row_starts = set(range(0, len(stream), 64))
  assert set(doc_starts) <= seg_starts <= set(doc_starts) | row_starts


def _alphabet_docs(n, length, seed=0):
  """Documents whose letters identify them: document k uses only 'a'+3k..'c'+3k."""
  rng = np.random.default_rng(seed)
  return ["".join(rng.choice(list(chr(97 + 3 * k + j) for j in range(3)), size=length)) for k in range(n)]


def test_neighbouring_rows_come_from_different_documents(tmp_path):
  # 8 training documents of 32 pieces each; with piece_chars == seq_len and
  # byte tokens every row is exactly one piece.
  docs = _alphabet_docs(9, 32 * 64)
  cfg = _jsonl_cfg(tmp_path, docs, eval_every_nth=9, piece_chars=64)
  it = train_iterator(cfg, TOK)
  batches = [next(it) for _ in range(16)]
  rows = np.concatenate([b["tokens"] for b in batches])
  for batch in batches:
    np.testing.assert_array_equal(batch["segment_ids"], np.ones((4, 64)))
    np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(64), (4, 1)))
  owners = (rows[:, 0] - 97) // 3
  for row, k in zip(rows, owners):
    text = row.astype(np.uint8).tobytes().decode()
    assert 1 <= k <= 8 and docs[k].find(text) % 64 == 0, "a row is an aligned slice"
  same = int((owners[1:] == owners[:-1]).sum())
  # Under a uniform shuffle of the 256 pieces, each of the 63 neighbour pairs
  # shares a document with p = 31/255; the count has mean 7.7 and sd ~2.6.
  # 20 is ~5 sd above the mean; packing whole documents would give >= 61.
  assert same <= 20, same


def test_eval_is_deterministic_in_order_padded_and_cycled(tmp_path):
  docs = _make_docs(12, seed=1)
  docs[4] = docs[4] + "x" * 200  # A held-out document longer than a row.
  cfg = _jsonl_cfg(tmp_path, docs, eval_every_nth=2, batch_size=3, seq_len=32)
  held_out = [docs[i] for i in range(0, 12, 2)]
  total = sum(len(d.encode()) for d in held_out)
  rows_per_pass = -(-total // 32)
  batches = eval_batches(cfg, "byte", num_batches=rows_per_pass)  # > one pass
  assert len(batches) == rows_per_pass
  for batch in batches:
    _check_structure(batch, 32, 3)
  again = eval_batches(cfg, TOK, num_batches=rows_per_pass)
  for a, b in zip(batches, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  stream, seg_starts = _stream([{k: v[:rows_per_pass] for k, v in rows.items()}])
  assert stream == "".join(held_out).encode()
  ids, doc_starts = _parse(stream, docs)
  assert ids == list(range(0, 12, 2))
  assert set(doc_starts) <= seg_starts <= set(doc_starts) | set(range(0, total, 32))
  last = rows["segment_ids"][rows_per_pass - 1]
  assert (last == 0).any() == (total % 32 != 0)
  # Rows after one pass cycle back to the first row.
  for key in rows:
    np.testing.assert_array_equal(rows[key][rows_per_pass], rows[key][0])


def test_eval_and_training_documents_are_disjoint(tmp_path):
  docs = _make_docs(30, seed=2)
  cfg = _jsonl_cfg(tmp_path, docs, eval_every_nth=3)
  it = train_iterator(cfg, TOK)
  train_ids, _ = _parse(_stream([next(it) for _ in range(30)])[0], docs)
  eval_ids, _ = _parse(_stream(eval_batches(cfg, TOK, 10))[0], docs)
  assert set(eval_ids) == set(range(0, 30, 3))
  assert set(train_ids) == set(range(30)) - set(eval_ids)


def test_document_mask_false(tmp_path):
  docs = _make_docs(10)
  masked = _jsonl_cfg(tmp_path, docs, eval_every_nth=2)
  plain = _jsonl_cfg(tmp_path, docs, eval_every_nth=2, document_mask=False)
  a, b = next(train_iterator(masked, TOK)), next(train_iterator(plain, TOK))
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert a["segment_ids"].max() > 1
  np.testing.assert_array_equal(b["segment_ids"], np.ones((4, 64)))
  np.testing.assert_array_equal(b["positions"], np.tile(np.arange(64), (4, 1)))
  # Padding keeps segment id 0 (eval: the held-out set ends in a padded row).
  ev = np.concatenate([b["segment_ids"] for b in eval_batches(plain, TOK, 4)])
  ev_masked = np.concatenate([b["segment_ids"] for b in eval_batches(masked, TOK, 4)])
  np.testing.assert_array_equal(ev, ev_masked > 0)
  assert (ev == 0).any() and (ev == 1).any()
  np.testing.assert_array_equal(eval_batches(plain, TOK, 1)[0]["positions"], np.tile(np.arange(64), (4, 1)))


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def assert_resumes_exactly(cfg, skip, count):
  """Draws `skip` batches, saves the state through JSON, and checks that a fresh iterator set
  to it yields the same next `count` batches; returns (saved state, those batches)."""
  it = train_iterator(cfg, TOK)
  for _ in range(skip):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(count)]
  fresh = train_iterator(cfg, TOK)
  fresh.set_state(state)
  _assert_same([next(fresh) for _ in range(count)], expected)
  return it, state, expected


@pytest.mark.parametrize("k", [0, 1, 3, 7, 12])
def test_state_restores_exactly_after_json(tmp_path, k):
  cfg = _jsonl_cfg(tmp_path, _make_docs(15, seed=3), eval_every_nth=4, seq_len=32)
  it, state, expected = assert_resumes_exactly(cfg, k, 6)
  # Restoring an iterator that already moved on rewinds it, too.
  it.set_state(state)
  _assert_same([next(it) for _ in range(6)], expected)


def test_seed_controls_order(tmp_path):
  docs = _make_docs(20)
  first = [next(train_iterator(_jsonl_cfg(tmp_path, docs, seed=s), TOK)) for s in (0, 0, 1)]
  _assert_same([first[0]], [first[1]])
  assert not np.array_equal(first[0]["tokens"], first[2]["tokens"])


def test_shards_split_batch_and_documents(tmp_path):
  docs = _make_docs(21)
  cfg = _jsonl_cfg(tmp_path, docs, batch_size=8, eval_every_nth=7)
  seen = []
  for index in range(2):
    it = train_iterator(cfg, TOK, shard_index=index, shard_count=2)
    batches = [next(it) for _ in range(12)]
    for batch in batches:
      _check_structure(batch, 64, 4)
    seen.append(set(_parse(_stream(batches)[0], docs)[0]))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {i for i in range(21) if i % 7}
  with pytest.raises(ValueError, match=r"DataConfig\.batch_size: 8 is not divisible by shard_count=3"):
    train_iterator(cfg, TOK, shard_index=0, shard_count=3)
  with pytest.raises(ValueError, match=r"shard_index"):
    train_iterator(cfg, TOK, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match=r"shard_count=8 exceeds the 3 training documents"):
    train_iterator(_jsonl_cfg(tmp_path, docs[:4], batch_size=8), TOK, shard_count=8)


def test_errors_are_raised_when_building(tmp_path):
  missing = DataConfig(source="jsonl", paths=(str(tmp_path / "none.jsonl"),))
  with pytest.raises(ValueError, match=r"DataConfig\.paths: no such file"):
    train_iterator(missing, TOK)
  with pytest.raises(ValueError, match=r"DataConfig\.paths: no such file"):
    eval_batches(missing, TOK, 1)
  with pytest.raises(ValueError, match=r"DataConfig\.tokenizer: unknown tokenizer"):
    train_iterator(DataConfig(), "words")
  with pytest.raises(ValueError, match=r"leaves no training documents"):
    train_iterator(_jsonl_cfg(tmp_path, ["only one"]), TOK)
  with pytest.raises(ValueError, match=r"num_batches"):
    eval_batches(DataConfig(), TOK, 0)


def test_empty_documents(tmp_path):
  # Empty documents have no pieces; they never make an empty segment.
  docs = _make_docs(9)
  docs[3] = docs[5] = ""
  it = train_iterator(_jsonl_cfg(tmp_path, docs, eval_every_nth=4), TOK)
  _check_structure(next(it), 64, 4)
  # Held-out documents without tokens cannot be evaluated.
  cfg = _jsonl_cfg(tmp_path, ["", "some text", "more text"], eval_every_nth=5)
  with pytest.raises(ValueError, match=r"held-out documents .* contain no tokens"):
    eval_batches(cfg, TOK, 1)
  # Training documents without text fail when the pipeline is built, also
  # when only one shard's are empty (on every host).
  cfg = _jsonl_cfg(tmp_path, ["held out", "", ""], eval_every_nth=5)
  with pytest.raises(ValueError, match=r"training documents among the jsonl files are all empty"):
    train_iterator(cfg, TOK)
  cfg = _jsonl_cfg(tmp_path, ["held out", "a", "", "b", ""], eval_every_nth=5, batch_size=2)
  with pytest.raises(ValueError, match=r"training documents of shard 1 of 2 .* are all empty"):
    train_iterator(cfg, TOK, shard_index=0, shard_count=2)


def test_eval_rows_are_spread_over_the_held_out_stream(tmp_path):
  docs = _make_docs(40, seed=4)
  cfg = _jsonl_cfg(tmp_path, docs, eval_every_nth=2, batch_size=2, seq_len=32)
  held_out = "".join(docs[0::2]).encode()
  num_rows = -(-len(held_out) // 32)
  everything = eval_batches(cfg, TOK, num_rows)  # >= one pass: all rows in order.
  all_rows = np.concatenate([b["tokens"] for b in everything])[:num_rows]
  batches = eval_batches(cfg, TOK, 3)
  picked = np.concatenate([b["tokens"] for b in batches])
  expected = [i * num_rows // 6 for i in range(6)]
  np.testing.assert_array_equal(picked, all_rows[expected])
  # Rows from the start, middle and end: held-out documents all over the set.
  owners = {int(_MARK.findall(held_out[: 32 * r + 5])[-1]) for r in expected}
  assert len(owners) == 6 and max(owners) >= 30
