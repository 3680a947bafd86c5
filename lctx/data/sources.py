"""Resolves a `DataConfig` into the document collections a pipeline reads.

This is the one place that knows which documents a source trains and
evaluates on, so that `train_iterator` and `eval_batches` agree on the split.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

from lctx.data import corpus
from lctx.data import documents
from lctx.data import readers
from lctx.data.config import DataConfig
from lctx.data.config import MIXTURE
from lctx.data.config import SourceConfig


@dataclasses.dataclass(frozen=True)
class WeightedDocuments:
  """Training documents of one kind and the fraction of tokens they supply.

  `weight` is the expected fraction of training characters (approximately
  tokens) from this kind; the pipeline turns it into per-piece mixing weights.
  """

  name: str
  docs: Sequence[str]
  weight: float


def _user_split(files: DataConfig | SourceConfig, eval_every_nth: int) -> documents.Split:
  """The train / held-out split of the user's files of a DataConfig or a mixture's source."""
  docs = readers.read_documents(files.source, files.paths, files.text_field)
  return documents.split_every_nth(docs, eval_every_nth)


def _named_split(cfg: DataConfig, src: SourceConfig) -> documents.Split:
  """The train / held-out split of one source of a mixture."""
  if src.source == "stdlib_long":
    return corpus.long_documents(cfg.eval_every_nth)
  if src.source == "stdlib_short":
    return corpus.short_documents(cfg.eval_every_nth)
  return _user_split(src, cfg.eval_every_nth)


def _same_documents(src: SourceConfig):
  return (src.source, src.paths, src.text_field)


def mixture_documents(cfg: DataConfig) -> list[tuple[SourceConfig, Sequence[str]]]:
  """The training documents of every source of a mixture, in order (read once per distinct
  source: ProLong's code at 512K and at 64K read the same files)."""
  splits: dict = {}
  out = []
  for src in cfg.mixture:
    key = _same_documents(src)
    if key not in splits:
      splits[key] = _named_split(cfg, src)
    docs = splits[key].train
    if not docs:
      raise ValueError(f"DataConfig.eval_every_nth: holding out every {cfg.eval_every_nth}-th "
                       f"document leaves no training documents in source {src.name!r}")
    out.append((src, docs))
  return out


def train_documents(cfg: DataConfig) -> list[WeightedDocuments]:
  """Returns the training documents, grouped by kind, with mixing weights.

  Args:
    cfg: The data config.

  Returns:
    One entry per kind with a positive weight (token fractions, summing to
    1).

  Raises:
    ValueError: the source has no training documents.
  """
  if cfg.source == "stdlib":
    kinds = []
    # A weight of 0 would make grain's mix reject the dataset, and a kind that
    # is never sampled should not be listed (docstrings cost a parse).
    if cfg.long_fraction > 0:
      kinds.append(
          WeightedDocuments(
              "stdlib packages",
              corpus.long_documents(cfg.eval_every_nth).train,
              cfg.long_fraction,
          )
      )
    if cfg.long_fraction < 1:
      kinds.append(
          WeightedDocuments(
              "stdlib modules and docstrings",
              corpus.short_documents(cfg.eval_every_nth).train,
              1.0 - cfg.long_fraction,
          )
      )
  else:
    kinds = [
        WeightedDocuments(
            f"{cfg.source} files", _user_split(cfg, cfg.eval_every_nth).train, 1.0
        )
    ]
  for kind in kinds:
    if not kind.docs:
      raise ValueError(
          f"DataConfig.eval_every_nth: holding out every"
          f" {cfg.eval_every_nth}-th document leaves no training documents"
          f" among the {kind.name}"
      )
  return kinds


def eval_documents(cfg: DataConfig) -> Sequence[str]:
  """Returns the held-out documents, in order.

  For the stdlib source these are the held-out packages (long documents), so
  that per-position evaluation measures long-context behaviour.

  Args:
    cfg: The data config.

  Returns:
    The held-out documents.

  Raises:
    ValueError: nothing is held out.
  """
  if cfg.source == "stdlib":
    docs = corpus.long_documents(cfg.eval_every_nth).eval
  elif cfg.source == MIXTURE:
    seen, docs = set(), []
    for src in cfg.mixture:
      if _same_documents(src) not in seen:
        seen.add(_same_documents(src))
        docs.extend(_named_split(cfg, src).eval)
  else:
    docs = _user_split(cfg, cfg.eval_every_nth).eval
  if not docs:
    raise ValueError(
        f"DataConfig.eval_every_nth: no held-out documents for source"
        f" {cfg.source!r}"
    )
  return docs
