"""Tokenizers: UTF-8 bytes (default), sentencepiece and HF `tokenizers`.

The optional backends are imported only when such a tokenizer is built, so
the byte tokenizer works with nothing beyond numpy installed.
"""

from __future__ import annotations

from collections.abc import Sequence
import importlib
import os
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline and samplers need from a tokenizer."""

  vocab_size: int

  def encode(self, text: str) -> np.ndarray:
    """Returns the token ids of `text` as a 1-D int32 array."""
    ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Returns the text of `ids`."""
    ...


class ByteTokenizer:
  """Token i is byte i of the UTF-8 encoding; vocabulary of 256."""

  vocab_size: int = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    # A model with a padded vocabulary can sample ids >= 256. 0xFF never occurs
    # in UTF-8, so mapping them to it decodes each to U+FFFD.
    ids = np.where((ids >= 0) & (ids < 256), ids, 0xFF).astype(np.uint8)
    return ids.tobytes().decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


def _import_backend(module: str, package: str, path: str):
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ValueError(
        f"DataConfig.tokenizer: {path!r} needs the {package!r} package"
        f" (pip install {package})"
    ) from e


def _check_file(path: str) -> None:
  if not os.path.isfile(path):
    raise ValueError(f"DataConfig.tokenizer: no such file {path!r}")


class SentencePieceTokenizer:
  """A sentencepiece model (``.model`` file)."""

  def __init__(self, path: str):
    _check_file(path)
    spm = _import_backend("sentencepiece", "sentencepiece", path)
    self._path = path
    try:
      self._processor = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
      raise ValueError(
          f"DataConfig.tokenizer: cannot load sentencepiece model {path!r}: {e}"
      ) from e
    self.vocab_size = int(self._processor.get_piece_size())

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._processor.encode(text), dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._processor.decode(np.asarray(ids).reshape(-1).tolist())

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self._path!r})"


class HFTokenizer:
  """A HuggingFace `tokenizers` tokenizer (``tokenizer.json`` file).

  Special tokens (BOS/EOS) are not added: documents are delimited by segment
  ids in the packed batches.
  """

  def __init__(self, path: str):
    _check_file(path)
    hf = _import_backend("tokenizers", "tokenizers", path)
    self._path = path
    try:
      self._tokenizer = hf.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception subclass.
      raise ValueError(
          f"DataConfig.tokenizer: cannot load {path!r} as a tokenizer.json: {e}"
      ) from e
    self.vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str) -> np.ndarray:
    encoding = self._tokenizer.encode(text, add_special_tokens=False)
    return np.asarray(encoding.ids, dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tokenizer.decode(
        np.asarray(ids).reshape(-1).tolist(), skip_special_tokens=False
    )

  def __repr__(self) -> str:
    return f"HFTokenizer({self._path!r})"


def make_tokenizer(name_or_path: str) -> Tokenizer:
  """Builds a tokenizer from `DataConfig.tokenizer`.

  Args:
    name_or_path: "byte", a path ending in ".model" (sentencepiece) or a path
      ending in ".json" (HF tokenizers).

  Returns:
    The tokenizer.

  Raises:
    ValueError: unknown name, missing file or missing backend package.
  """
  if name_or_path == "byte":
    return ByteTokenizer()
  path = os.path.expanduser(name_or_path)
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  if path.endswith(".json"):
    return HFTokenizer(path)
  raise ValueError(
      f"DataConfig.tokenizer: unknown tokenizer {name_or_path!r}; expected"
      " 'byte', a sentencepiece '.model' file or a 'tokenizer.json' file"
  )
