"""Readers for user corpora: plain text files, JSONL and parquet.

Each reader is a random-access `Sequence[str]` of documents. Building one does
the cheap checks eagerly (globs match, files exist, the text field is present
in the first record of every file, the source is not empty) so that a bad
`DataConfig` fails when the pipeline is built, not in the middle of training.
Document texts are read on access; `char_lengths()` reads every document
once (per reader) to measure it.
"""

from __future__ import annotations

import abc
import bisect
from collections.abc import Sequence
import glob
import json
import logging
import os

import numpy as np

log = logging.getLogger("lctx.data")

_GLOB_CHARS = frozenset("*?[")


def expand_paths(patterns: Sequence[str]) -> list[str]:
  """Expands glob patterns into files, each pattern's matches sorted.

  Args:
    patterns: `DataConfig.paths`: file paths or glob patterns ('**' recurses).

  Returns:
    Files in pattern order, duplicates removed.

  Raises:
    ValueError: a path does not exist, is a directory, or a pattern matches
      no file.
  """
  if not patterns:
    raise ValueError("DataConfig.paths: no files given")
  files: dict[str, None] = {}  # An ordered set.
  for pattern in patterns:
    pattern = os.path.expanduser(pattern)
    if _GLOB_CHARS & set(pattern):
      matches = sorted(
          p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)
      )
      if not matches:
        raise ValueError(f"DataConfig.paths: no file matches {pattern!r}")
      files.update(dict.fromkeys(matches))
    elif os.path.isdir(pattern):
      raise ValueError(
          f"DataConfig.paths: {pattern!r} is a directory; use a glob such as"
          f" {os.path.join(pattern, '*')!r}"
      )
    elif not os.path.isfile(pattern):
      raise ValueError(f"DataConfig.paths: no such file {pattern!r}")
    else:
      files[pattern] = None
  return list(files)


class _MultiFileDocuments(Sequence[str]):
  """Maps a global document index to (file, index within the file)."""

  def __init__(self, files: Sequence[str], counts: Sequence[int]):
    self._files = list(files)
    # _starts[i] is the global index of the first document of file i.
    self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    if self._starts[-1] == 0:
      raise ValueError(
          f"DataConfig.paths: no documents in {len(self._files)} file(s):"
          f" {', '.join(repr(f) for f in self._files[:5])}"
      )
    self._lengths = None

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _locate(self, index: int) -> tuple[int, int]:
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(index)
    file_index = bisect.bisect_right(self._starts, index) - 1
    return file_index, index - int(self._starts[file_index])

  def __getitem__(self, index: int) -> str:
    return self._read(*self._locate(index))

  @abc.abstractmethod
  def _read(self, file_index: int, local_index: int) -> str:
    """Document `local_index` of file `file_index` (each reader knows its format)."""

  def char_lengths(self) -> np.ndarray:
    """Length of every document in characters; measured once per reader."""
    if self._lengths is None:
      self._lengths = np.concatenate(
          [np.zeros(0, np.int64)]
          + [self._file_lengths(i) for i in range(len(self._files))]
      )
    return self._lengths

  def _file_lengths(self, file_index: int) -> np.ndarray:
    count = int(self._starts[file_index + 1] - self._starts[file_index])
    return np.asarray(
        [len(self._read(file_index, j)) for j in range(count)], np.int64
    )


class TextDocuments(_MultiFileDocuments):
  """One document per text file (UTF-8). Empty files are skipped."""

  def __init__(self, paths: Sequence[str]):
    files = [f for f in expand_paths(paths) if os.path.getsize(f) > 0]
    if not files:
      raise ValueError(
          f"DataConfig.paths: every file matching {list(paths)} is empty"
      )
    super().__init__(files, [1] * len(files))

  def _read(self, file_index: int, local_index: int) -> str:
    with open(self._files[file_index], "rb") as f:
      return f.read().decode("utf-8", errors="replace")


def _text_of(record: object, text_field: str, where: str) -> str:
  if not isinstance(record, dict) or text_field not in record:
    raise ValueError(
        f"DataConfig.text_field: no field {text_field!r} in {where}"
    )
  text = record[text_field]
  if text is None:
    return ""
  if not isinstance(text, str):
    raise ValueError(
        f"DataConfig.text_field: field {text_field!r} in {where} is a"
        f" {type(text).__name__}, not a string"
    )
  return text


class JsonlDocuments(_MultiFileDocuments):
  """One document per non-blank JSONL line, text under `text_field`.

  Only line offsets are kept in memory. The first record of each file is
  validated eagerly; a later record without the field raises on access.
  """

  def __init__(self, paths: Sequence[str], text_field: str):
    self._text_field = text_field
    files = expand_paths(paths)
    self._offsets = [self._index(f) for f in files]
    super().__init__(files, [len(o) for o in self._offsets])

  def _index(self, path: str) -> np.ndarray:
    offsets = []
    position = 0
    with open(path, "rb") as f:
      for line in f:
        if line.strip():
          offsets.append(position)
        position += len(line)
    if offsets:
      self._parse(path, offsets[0], 0)
    return np.asarray(offsets, dtype=np.int64)

  def _parse(self, path: str, offset: int, line_index: int) -> str:
    with open(path, "rb") as f:
      f.seek(offset)
      line = f.readline()
    return self._decode(line, path, line_index)

  def _decode(self, line: bytes, path: str, line_index: int) -> str:
    where = f"record {line_index + 1} of {path!r}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"DataConfig.paths: invalid JSON in {where}: {e}") from e
    return _text_of(record, self._text_field, where)

  def _file_lengths(self, file_index: int) -> np.ndarray:
    # One sequential pass instead of a seek per record.
    path = self._files[file_index]
    lengths = []
    with open(path, "rb") as f:
      for line in f:
        if line.strip():
          lengths.append(len(self._decode(line, path, len(lengths))))
    return np.asarray(lengths, dtype=np.int64)

  def _read(self, file_index: int, local_index: int) -> str:
    offset = int(self._offsets[file_index][local_index])
    return self._parse(self._files[file_index], offset, local_index)


class ParquetDocuments(_MultiFileDocuments):
  """One document per parquet row, text in column `text_field`.

  The schema and row counts come from the file footers at build time; a
  file's text column is loaded (as an Arrow array, not Python strings) the
  first time one of its rows is requested, and kept.
  """

  def __init__(self, paths: Sequence[str], text_field: str):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    self._text_field = text_field
    files = expand_paths(paths)
    counts = []
    for path in files:
      try:
        parquet_file = pq.ParquetFile(path)
      except Exception as e:  # pyarrow raises ArrowInvalid and OSError kinds.
        raise ValueError(
            f"DataConfig.paths: cannot read {path!r} as parquet: {e}"
        ) from e
      schema = parquet_file.schema_arrow
      if text_field not in schema.names:
        raise ValueError(
            f"DataConfig.text_field: no column {text_field!r} in {path!r}"
            f" (columns: {', '.join(schema.names)})"
        )
      column_type = schema.field(text_field).type
      if str(column_type) not in ("string", "large_string", "string_view"):
        raise ValueError(
            f"DataConfig.text_field: column {text_field!r} in {path!r} has"
            f" type {column_type}, not string"
        )
      counts.append(parquet_file.metadata.num_rows)
    super().__init__(files, counts)
    self._columns = {}

  def _column(self, file_index: int):
    column = self._columns.get(file_index)
    if column is None:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

      table = pq.read_table(
          self._files[file_index], columns=[self._text_field], memory_map=True
      )
      # One contiguous array makes row lookup O(1) instead of O(#chunks).
      column = table.column(self._text_field).combine_chunks()
      self._columns[file_index] = column
    return column

  def _read(self, file_index: int, local_index: int) -> str:
    text = self._column(file_index)[local_index].as_py()
    return "" if text is None else text

  def _file_lengths(self, file_index: int) -> np.ndarray:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top

    try:
      # Counts characters (code points) in Arrow, without Python strings.
      lengths = pc.fill_null(pc.utf8_length(self._column(file_index)), 0)
    except pa.ArrowNotImplementedError as e:  # e.g. string_view columns.
      log.info("%s: Arrow cannot count the characters of column %r (%s); counting them in "
               "Python instead (same lengths, slower)", self._files[file_index],
               self._text_field, e)
      return super()._file_lengths(file_index)
    return lengths.to_numpy(zero_copy_only=False).astype(np.int64)


def read_documents(
    source: str, paths: Sequence[str], text_field: str = "text"
) -> Sequence[str]:
  """Builds the reader for a user source.

  Args:
    source: "text", "jsonl" or "parquet".
    paths: Files or glob patterns.
    text_field: JSONL key / parquet column holding the text.

  Returns:
    A random-access sequence of documents, in file order then record order.

  Raises:
    ValueError: unknown source, or a check on the files failed.
  """
  if source == "text":
    return TextDocuments(paths)
  if source == "jsonl":
    return JsonlDocuments(paths, text_field)
  if source == "parquet":
    return ParquetDocuments(paths, text_field)
  raise ValueError(
      f"DataConfig.source: {source!r} is not a file source (text, jsonl,"
      " parquet)"
  )
