"""Configuration of the data pipeline.

`DataConfig` is a frozen dataclass so it can be hashed, compared and bound from
gin. All validation that needs no I/O happens in `__post_init__`; checks that
touch the filesystem (globs that match nothing, empty files, missing fields)
happen when a pipeline is built, see `lctx.data.sources`.
"""

from __future__ import annotations

import dataclasses

from sharding.validation import check_fields

SOURCES = ("stdlib", "text", "jsonl", "parquet")
USER_SOURCES = ("text", "jsonl", "parquet")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where documents come from and how they are tokenized, packed and batched.

  Attributes:
    source: "stdlib" (the running Python's standard library, needs no
      download), "text" (one document per file), "jsonl" (one document per
      line) or "parquet" (one document per row).
    paths: Files or glob patterns for the user sources. Ignored for "stdlib".
    text_field: Key of the document text in jsonl records / parquet column.
    tokenizer: "byte", a sentencepiece ``.model`` file or an HF
      ``tokenizer.json`` file.
    seq_len: Tokens per packed row.
    batch_size: Global batch size in rows (summed over all shards).
    long_fraction: stdlib only: expected fraction of the training tokens
      (measured in characters, which the byte tokenizer makes nearly exact)
      that come from long documents (whole packages) rather than short ones
      (modules, docstrings); the token share that long-context data recipes
      such as ProLong specify.
    piece_chars: Training documents are cut into pieces of this many
      characters (consecutive windows; the last one may be shorter) and the
      pieces of the whole corpus are shuffled, so that neighbouring rows and
      the rows of a batch come from different documents while each piece
      still holds contiguous long text. 0 means ``4 * seq_len``. Must be
      >= 0.
    eval_every_nth: Every n-th document in sorted order (indices 0, n, 2n, ...)
      is held out for evaluation; the rest is used for training.
    document_mask: If True, packed documents get distinct segment ids and
      positions restarting at every document. If False, every row is one
      segment and positions are ``arange(seq_len)``.
    seed: Seed of the training shuffle.
  """

  source: str = "stdlib"
  paths: tuple[str, ...] = ()
  text_field: str = "text"
  tokenizer: str = "byte"
  seq_len: int = 256
  batch_size: int = 8
  long_fraction: float = 0.5
  piece_chars: int = 0
  eval_every_nth: int = 20
  document_mask: bool = True
  seed: int = 0

  def __post_init__(self):
    # gin and YAML hand over lists; a frozen dataclass must stay hashable, so
    # coerce to a tuple (object.__setattr__ bypasses the frozen guard).
    if isinstance(self.paths, str):
      object.__setattr__(self, "paths", (self.paths,))
    check_fields(self)  # types of every field, lists -> tuples
    self._validate()

  def _validate(self) -> None:
    """Raises ValueError naming the offending setting."""
    if self.source not in SOURCES:
      raise ValueError(
          f"DataConfig.source: unknown source {self.source!r}; expected one"
          f" of {', '.join(SOURCES)}"
      )
    if self.source in USER_SOURCES and not self.paths:
      raise ValueError(
          f"DataConfig.paths: source {self.source!r} needs at least one file"
          " or glob pattern"
      )
    if self.source in ("jsonl", "parquet") and not self.text_field:
      raise ValueError("DataConfig.text_field: must be a non-empty string")
    if not isinstance(self.tokenizer, str) or not self.tokenizer:
      raise ValueError(
          "DataConfig.tokenizer: expected 'byte' or a path to a tokenizer file"
      )
    _check_min("seq_len", self.seq_len, minimum=2)
    _check_min("batch_size", self.batch_size, minimum=1)
    # 1 would hold out every document and leave nothing to train on.
    _check_min("eval_every_nth", self.eval_every_nth, minimum=2)
    _check_min("seed", self.seed, minimum=0)
    _check_min("piece_chars", self.piece_chars, minimum=0)
    if not 0.0 <= self.long_fraction <= 1.0:
      raise ValueError(
          "DataConfig.long_fraction: must be in [0, 1], got"
          f" {self.long_fraction!r}"
      )

  @property
  def piece_length(self) -> int:
    """Characters per training piece: `piece_chars`, or 4 * seq_len if 0."""
    # Four rows' worth keeps most rows one contiguous text yet gives a batch
    # of rows many independent draws.
    return self.piece_chars or 4 * self.seq_len


def _check_min(name: str, value: int, *, minimum: int) -> None:
  if value < minimum:
    raise ValueError(f"DataConfig.{name}: must be >= {minimum}, got {value}")
