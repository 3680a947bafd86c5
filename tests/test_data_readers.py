"""Tests for the text / JSONL / parquet readers (lctx.data.readers)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lctx.data import readers


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_text_files_sorted_glob_and_empty_files_skipped(tmp_path):
  (tmp_path / "b.txt").write_text("second ü")
  (tmp_path / "a.txt").write_text("first")
  (tmp_path / "c.txt").write_text("")
  (tmp_path / "skip.md").write_text("not matched")
  docs = readers.read_documents("text", [str(tmp_path / "*.txt")])
  assert list(docs) == ["first", "second ü"]
  assert docs[-1] == "second ü"
  with pytest.raises(IndexError):
    docs[2]


def test_explicit_paths_keep_order_and_dedupe(tmp_path):
  (tmp_path / "a.txt").write_text("A")
  (tmp_path / "b.txt").write_text("B")
  paths = [str(tmp_path / "b.txt"), str(tmp_path / "*.txt")]
  assert list(readers.read_documents("text", paths)) == ["B", "A"]


def test_jsonl_records_across_files(tmp_path):
  first = _write_jsonl(tmp_path / "1.jsonl", [{"body": "one"}, {"body": "two"}])
  (tmp_path / "2.jsonl").write_text(
      '\n{"body": "three", "id": 3}\n\n{"body": "f\\u00fcnf"}'  # Blank lines, no final newline.
  )
  docs = readers.read_documents(
      "jsonl", [first, str(tmp_path / "2.jsonl")], text_field="body"
  )
  assert len(docs) == 4
  assert list(docs) == ["one", "two", "three", "fünf"]


def test_parquet_rows_across_files(tmp_path):
  for i, texts in enumerate([["a", "bb"], ["ccc"]]):
    table = pa.table({"content": texts, "n": list(range(len(texts)))})
    pq.write_table(table, tmp_path / f"part-{i}.parquet", row_group_size=1)
  docs = readers.read_documents(
      "parquet", [str(tmp_path / "*.parquet")], text_field="content"
  )
  assert list(docs) == ["a", "bb", "ccc"]
  assert docs[2] == "ccc" and docs[0] == "a"


def test_parquet_lengths_of_string_view_columns_fall_back_and_say_so(tmp_path, caplog):
  # Arrow has no utf8_length for string_view: the lengths are counted in Python (code points, as
  # for plain strings) and the log says so, naming the file and the column.
  texts = ["ab", "h\u00e9llo", ""]
  pq.write_table(pa.table({"text": pa.array(texts, type=pa.string_view())}),
                 tmp_path / "sv.parquet")
  docs = readers.read_documents("parquet", [str(tmp_path / "sv.parquet")])
  with caplog.at_level("INFO", logger="lctx.data"):
    lengths = docs.char_lengths()
  assert lengths.tolist() == [2, 5, 0]
  assert "sv.parquet: Arrow cannot count the characters of column 'text'" in caplog.text


def test_missing_path(tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(ValueError, match=r"DataConfig\.paths: no such file .*nope\.jsonl"):
    readers.read_documents("jsonl", [missing])


def test_glob_without_match(tmp_path):
  with pytest.raises(ValueError, match=r"DataConfig\.paths: no file matches .*\*\.txt"):
    readers.read_documents("text", [str(tmp_path / "*.txt")])


def test_directory_is_rejected(tmp_path):
  with pytest.raises(ValueError, match=r"DataConfig\.paths: .* is a directory"):
    readers.read_documents("text", [str(tmp_path)])


def test_empty_sources(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match=r"DataConfig\.paths: every file .* is empty"):
    readers.read_documents("text", [str(tmp_path / "empty.txt")])
  (tmp_path / "blank.jsonl").write_text("\n\n")
  with pytest.raises(ValueError, match=r"DataConfig\.paths: no documents in .*blank\.jsonl"):
    readers.read_documents("jsonl", [str(tmp_path / "blank.jsonl")])
  pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
  with pytest.raises(ValueError, match=r"DataConfig\.paths: no documents in .*e\.parquet"):
    readers.read_documents("parquet", [str(tmp_path / "e.parquet")])


def test_jsonl_missing_field(tmp_path):
  path = _write_jsonl(tmp_path / "d.jsonl", [{"body": "x"}])
  with pytest.raises(ValueError, match=r"DataConfig\.text_field: no field 'text' in record 1 of .*d\.jsonl"):
    readers.read_documents("jsonl", [path])


def test_jsonl_later_bad_record_fails_on_access(tmp_path):
  path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"other": 1}, {"text": 5}])
  docs = readers.read_documents("jsonl", [path])
  assert docs[0] == "ok"
  with pytest.raises(ValueError, match=r"no field 'text' in record 2"):
    docs[1]
  with pytest.raises(ValueError, match=r"'text' in record 3 .* is a int, not a string"):
    docs[2]


def test_jsonl_invalid_json(tmp_path):
  (tmp_path / "bad.jsonl").write_text("{not json}\n")
  with pytest.raises(ValueError, match=r"DataConfig\.paths: invalid JSON in record 1"):
    readers.read_documents("jsonl", [str(tmp_path / "bad.jsonl")])


def test_parquet_missing_or_non_string_column(tmp_path):
  pq.write_table(pa.table({"body": ["x"], "n": [1]}), tmp_path / "d.parquet")
  path = str(tmp_path / "d.parquet")
  with pytest.raises(ValueError, match=r"DataConfig\.text_field: no column 'text' in .*d\.parquet"):
    readers.read_documents("parquet", [path])
  with pytest.raises(ValueError, match=r"DataConfig\.text_field: column 'n' .* not string"):
    readers.read_documents("parquet", [path], text_field="n")


def test_not_a_parquet_file(tmp_path):
  (tmp_path / "x.parquet").write_text("hello")
  with pytest.raises(ValueError, match=r"DataConfig\.paths: cannot read .* as parquet"):
    readers.read_documents("parquet", [str(tmp_path / "x.parquet")])


def test_unknown_file_source():
  with pytest.raises(ValueError, match=r"DataConfig\.source"):
    readers.read_documents("stdlib", ["x"])


def test_char_lengths_count_characters(tmp_path):
  (tmp_path / "a.txt").write_text("naïve\n")
  (tmp_path / "b.txt").write_text("xy")
  text = readers.read_documents("text", [str(tmp_path / "*.txt")])
  np.testing.assert_array_equal(text.char_lengths(), [6, 2])
  path = _write_jsonl(tmp_path / "d.jsonl", [{"t": "fünf"}, {"t": None}, {"t": "ab"}])
  other = _write_jsonl(tmp_path / "e.jsonl", [{"t": "xyz"}])
  jsonl = readers.read_documents("jsonl", [path, other], text_field="t")
  np.testing.assert_array_equal(jsonl.char_lengths(), [4, 0, 2, 3])
  pq.write_table(pa.table({"t": ["é", None, "abc"]}), tmp_path / "p.parquet")
  parquet = readers.read_documents("parquet", [str(tmp_path / "p.parquet")], text_field="t")
  np.testing.assert_array_equal(parquet.char_lengths(), [1, 0, 3])
  # A bad record fails the length scan (the pipeline build), not later.
  bad = _write_jsonl(tmp_path / "bad.jsonl", [{"t": "ok"}, {"u": 1}])
  with pytest.raises(ValueError, match=r"no field 't' in record 2"):
    readers.read_documents("jsonl", [bad], text_field="t").char_lengths()
