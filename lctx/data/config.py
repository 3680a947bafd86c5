"""Configuration of the data pipeline.

`DataConfig` is a frozen dataclass so it can be hashed, compared and bound from
gin. All validation that needs no I/O happens in `__post_init__`; checks that
touch the filesystem (globs that match nothing, empty files, missing fields)
happen when a pipeline is built, see `lctx.data.sources`.
"""

from __future__ import annotations

import dataclasses

from sharding.validation import check_fields

SOURCES = ("stdlib", "text", "jsonl", "parquet", "task:<name>", "mixture")
USER_SOURCES = ("text", "jsonl", "parquet")
MIXTURE = "mixture"
# What one named source of a mixture reads: the embedded stdlib's long documents (whole
# packages) or short ones (modules, docstrings), or the user's files.
MIXTURE_SOURCES = ("stdlib_long", "stdlib_short") + USER_SOURCES
PACKINGS = ("concat", "first_fit")
TASK_PREFIX = "task:"
MQAR = "mqar"  # the token-space task that labels many positions (lctx.evals.synthetic)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Training rows made by an evaluation task (`DataConfig.source = 'task:<name>'`).

  Attributes:
    pairs: mqar: key-value pairs per sequence.
    vocab: mqar: its vocabulary (keys from [1, vocab/2), values from [vocab/2, vocab)); 0 means
      the tokenizer's vocabulary. Must not exceed ModelConfig.vocab_size.
    power_a: mqar: the exponent of the query-gap law p(gap = i) ~ a * i^(a - 1).
    answer_tokens: text tasks: tokens kept at the end of each row for the answer (the prompt
      fills the rest); an answer longer than this is refused.
    depth_min: text tasks: needle depths are drawn uniformly from [depth_min, depth_max].
    depth_max: see depth_min.
    train_examples: size of the fixed training set, repeated in a new order every epoch (Zoology
      trains on a fixed set); 0 means a fresh example for every row.
  """

  pairs: int = 8
  vocab: int = 0
  power_a: float = 0.01
  answer_tokens: int = 16
  depth_min: float = 0.0
  depth_max: float = 1.0
  train_examples: int = 0

  def __post_init__(self):
    check_fields(self)
    for name in ("pairs", "answer_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"TaskConfig.{name}: must be >= 1, got {getattr(self, name)}")
    for name in ("vocab", "train_examples"):
      if getattr(self, name) < 0:
        raise ValueError(f"TaskConfig.{name}: must be >= 0, got {getattr(self, name)}")
    if not 0.0 < self.power_a <= 1.0:
      raise ValueError(f"TaskConfig.power_a: must lie in (0, 1], got {self.power_a}")
    if not 0.0 <= self.depth_min <= self.depth_max <= 1.0:
      raise ValueError(f"TaskConfig.depth_min={self.depth_min}, depth_max={self.depth_max}: "
                       "need 0 <= depth_min <= depth_max <= 1")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """One named source of a data mixture (`DataConfig.source = "mixture"`).

  Each source makes whole rows of `DataConfig.seq_len` tokens on its own, and the mixture draws
  rows from the sources with probabilities proportional to their weights, so a weight is the
  source's share of the training rows (token slots). ProLong's stage 2 is a mixture whose code and
  books appear twice, once cut at 512K and once at 64K tokens, packed into 512K rows.

  Attributes:
    name: Unique name (logs, errors).
    weight: Positive; the weights are normalised to sum to 1.
    source: "stdlib_long" (the embedded stdlib's packages), "stdlib_short" (its modules and
      docstrings), or "text" / "jsonl" / "parquet" files as for DataConfig.source.
    paths: Files or glob patterns of a user source.
    text_field: Key of the text in jsonl records / parquet columns.
    seq_len: The longest segment: each piece's tokens are cut into consecutive segments of at
      most this many tokens, each with its own segment id and positions from 0 (with
      DataConfig.document_mask). 0 means DataConfig.seq_len; must not exceed it.
    packing: "concat": segments end to end, a segment that does not fit a row's end continues in
      the next row as a new segment (rows never padded); "first_fit": grain's first-fit packing,
      segments never split across rows, the rest of a row padded (segment 0).
    piece_chars: Documents are cut into pieces of this many characters before shuffling (see
      DataConfig.piece_chars); 0 means 4 * seq_len.
  """

  name: str = ""
  weight: float = 1.0
  source: str = "stdlib_long"
  paths: tuple[str, ...] = ()
  text_field: str = "text"
  seq_len: int = 0
  packing: str = "concat"
  piece_chars: int = 0

  def __post_init__(self):
    if isinstance(self.paths, str):
      object.__setattr__(self, "paths", (self.paths,))
    check_fields(self)
    what = f"SourceConfig {self.name!r}" if self.name else "SourceConfig"
    if not self.name:
      raise ValueError("SourceConfig.name: every source of a mixture needs a name")
    if not self.weight > 0:
      raise ValueError(f"{what}: weight must be > 0, got {self.weight}")
    if self.source not in MIXTURE_SOURCES:
      raise ValueError(f"{what}: source={self.source!r}; expected one of "
                       f"{', '.join(MIXTURE_SOURCES)}")
    if self.source in USER_SOURCES and not self.paths:
      raise ValueError(f"{what}: source {self.source!r} needs paths")
    if self.packing not in PACKINGS:
      raise ValueError(f"{what}: packing={self.packing!r}; expected one of {', '.join(PACKINGS)}")
    if self.seq_len < 0 or self.piece_chars < 0:
      raise ValueError(f"{what}: seq_len and piece_chars must be >= 0")

  def segment_len(self, row_len: int) -> int:
    """The longest segment in tokens, given the row length."""
    return self.seq_len or row_len

  def piece_length(self, row_len: int) -> int:
    """Characters per training piece."""
    return self.piece_chars or 4 * self.segment_len(row_len)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where documents come from and how they are tokenized, packed and batched.

  Attributes:
    source: "stdlib" (the running Python's standard library, needs no
      download), "text" (one document per file), "jsonl" (one document per
      line), "parquet" (one document per row), or "task:<name>": rows made by
      an evaluation task (lctx/evals: "task:mqar", "task:passkey", ...), with
      the loss on the answer positions only (see `task`).
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
    data_shards: The training data is read as this many shards, each giving batch_size /
      data_shards rows of every batch (lctx/data/shards.py); 0: one per process. A fixed
      count makes the batches the same for any number of processes, and lets a run saved by
      N processes resume with M.
    task: The task's settings when `source` is "task:<name>".
    mixture: With `source = "mixture"`: the named sources (`SourceConfig`) and their weights,
      each with its own segment length and packing; its position (every source's) is part of
      the iterator state saved with every checkpoint. Evaluation uses the held-out documents of
      every distinct source, in order.
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
  data_shards: int = 0
  task: TaskConfig = TaskConfig()
  mixture: tuple[SourceConfig, ...] = ()

  def __post_init__(self):
    # gin and YAML hand over lists; a frozen dataclass must stay hashable, so
    # coerce to a tuple (object.__setattr__ bypasses the frozen guard).
    if isinstance(self.paths, str):
      object.__setattr__(self, "paths", (self.paths,))
    if isinstance(self.mixture, list):
      object.__setattr__(self, "mixture", tuple(self.mixture))
    check_fields(self)  # types of every field, lists -> tuples
    self._validate()

  def _validate(self) -> None:
    """Raises ValueError naming the offending setting."""
    if not isinstance(self.task, TaskConfig):
      raise ValueError(f"DataConfig.task={self.task!r} must be a TaskConfig (@TaskConfig())")
    if self.source.startswith(TASK_PREFIX):
      from lctx.evals.tasks import TASKS  # the task registry imports the corpus

      names = sorted([MQAR, *TASKS])
      if self.task_name not in names:
        raise ValueError(f"DataConfig.source={self.source!r}: unknown task; expected "
                         f"task:<name> with <name> one of {', '.join(names)}")
    elif self.source not in SOURCES:
      raise ValueError(
          f"DataConfig.source: unknown source {self.source!r}; expected one"
          f" of {', '.join(SOURCES)}"
      )
    self._validate_mixture()
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
    _check_min("data_shards", self.data_shards, minimum=0)
    _check_min("piece_chars", self.piece_chars, minimum=0)
    if not 0.0 <= self.long_fraction <= 1.0:
      raise ValueError(
          "DataConfig.long_fraction: must be in [0, 1], got"
          f" {self.long_fraction!r}"
      )

  def _validate_mixture(self) -> None:
    if self.source != MIXTURE:
      if self.mixture:
        raise ValueError(f"DataConfig.mixture is set but DataConfig.source={self.source!r}; "
                         "set DataConfig.source = 'mixture' to train on it")
      return
    if not self.mixture:
      raise ValueError("DataConfig.source='mixture' needs DataConfig.mixture: a list of "
                       "@name/SourceConfig()")
    names = []
    for item in self.mixture:
      if not isinstance(item, SourceConfig):
        raise ValueError(f"DataConfig.mixture: {item!r} is not a SourceConfig")
      if item.name in names:
        raise ValueError(f"DataConfig.mixture: two sources are named {item.name!r}")
      names.append(item.name)
      if item.seq_len > self.seq_len:
        raise ValueError(f"SourceConfig {item.name!r}: seq_len={item.seq_len} exceeds "
                         f"DataConfig.seq_len={self.seq_len} (segments are packed into rows)")

  @property
  def mixture_weights(self) -> tuple[float, ...]:
    """The sources' weights normalised to sum to 1."""
    total = sum(s.weight for s in self.mixture)
    return tuple(s.weight / total for s in self.mixture)

  @property
  def task_name(self) -> str | None:
    """The task of a "task:<name>" source, else None."""
    if self.source.startswith(TASK_PREFIX):
      return self.source[len(TASK_PREFIX):]
    return None

  @property
  def piece_length(self) -> int:
    """Characters per training piece: `piece_chars`, or 4 * seq_len if 0."""
    # Four rows' worth keeps most rows one contiguous text yet gives a batch
    # of rows many independent draws.
    return self.piece_chars or 4 * self.seq_len


def _check_min(name: str, value: int, *, minimum: int) -> None:
  if value < minimum:
    raise ValueError(f"DataConfig.{name}: must be >= {minimum}, got {value}")
