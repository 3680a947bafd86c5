"""The default corpus: the running Python's standard library source tree.

It needs no download and is identical on every machine with the same Python
build, which makes it a good smoke-test corpus for long-context models:

* Long documents: one per package directory directly under the stdlib root
  (json/, email/, asyncio/, ...), the concatenation of all its ``.py`` files in
  sorted order, each preceded by a header line ``# file: email/utils.py``.
* Short documents: top-level single-file modules (``stdlib/*.py``), followed
  by the module/class/function docstrings of at least `MIN_DOCSTRING_CHARS`
  characters found in those modules.

Only paths are listed up front; file contents are read when a document is
requested. Document lengths (for cutting training pieces) take one read of
every file (~10 ms), cached per process. Docstrings need a parse of every
top-level module, which is done once per process (about 0.5 s) and only when
short documents are used.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
import functools
import gc
import os
import sysconfig
import warnings

import numpy as np

from lctx.data import documents

MIN_DOCSTRING_CHARS = 64

# Test suites and the IDE are large, repetitive and partly generated; they
# would dominate the corpus. site-packages is third-party code.
_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "__pycache__"}
)
# __phello__ is a two-line fixture for testing frozen packages.
_EXCLUDED_PACKAGES = frozenset({"__phello__"})
# Generated per build (it records the build's configure flags), not source.
_EXCLUDED_MODULE_PREFIXES = ("_sysconfigdata",)


def stdlib_root() -> str:
  """Returns the directory holding the running Python's standard library."""
  return sysconfig.get_paths()["stdlib"]


def _read(path: str) -> str:
  # The stdlib is UTF-8; `replace` keeps a stray byte from failing a run.
  with open(path, "rb") as f:
    return f.read().decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=None)
def list_packages(root: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """Lists the packages under `root` and their .py files.

  Args:
    root: The stdlib directory.

  Returns:
    Sorted ``(package_name, sorted_relative_file_paths)`` pairs; relative paths
    use '/' and start with the package name, e.g. 'email/mime/text.py'.
  """
  packages = []
  for name in sorted(os.listdir(root)):
    package_dir = os.path.join(root, name)
    if (
        name in _EXCLUDED_DIRS
        or name in _EXCLUDED_PACKAGES
        or not os.path.isfile(os.path.join(package_dir, "__init__.py"))
    ):
      continue
    files = []
    for dirpath, dirnames, filenames in os.walk(package_dir):
      # Pruning in place stops os.walk from descending into test dirs.
      dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
      rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
      files.extend(f"{rel_dir}/{f}" for f in filenames if f.endswith(".py"))
    if files:
      packages.append((name, tuple(sorted(files))))
  return tuple(packages)


@functools.lru_cache(maxsize=None)
def list_modules(root: str) -> tuple[str, ...]:
  """Returns the sorted file names of the top-level single-file modules."""
  return tuple(
      name
      for name in sorted(os.listdir(root))
      if name.endswith(".py")
      and not name.startswith(_EXCLUDED_MODULE_PREFIXES)
      and os.path.isfile(os.path.join(root, name))
  )


def _file_part(root: str, rel_path: str) -> str:
  """A package file as it appears in its package document."""
  text = _read(os.path.join(root, rel_path))
  return f"# file: {rel_path}\n" + (
      text if text.endswith("\n") or not text else text + "\n"
  )


@functools.lru_cache(maxsize=None)
def _package_file_ends(root: str) -> tuple[np.ndarray, ...]:
  """Per package, the end offset (in characters) of each file's part.

  Cached per process: it reads every package file once (~7 MB, well under a
  second), which lets a piece of a package be read from the one or two files
  it overlaps instead of the whole package.
  """
  return tuple(
      np.cumsum([len(_file_part(root, f)) for f in files], dtype=np.int64)
      for _, files in list_packages(root)
  )


class PackageDocuments(Sequence[str]):
  """Long documents: one concatenated text per stdlib package."""

  def __init__(self, root: str):
    self._root = root
    self._packages = list_packages(root)

  def __len__(self) -> int:
    return len(self._packages)

  def __getitem__(self, index: int) -> str:
    _, files = self._packages[index]
    return "".join(_file_part(self._root, f) for f in files)

  def char_lengths(self) -> np.ndarray:
    """Length of every package document, in characters."""
    ends = _package_file_ends(self._root)
    return np.asarray([e[-1] for e in ends], dtype=np.int64)

  def read_range(self, index: int, start: int, stop: int) -> str:
    """``self[index][start:stop]``, reading only the files it overlaps."""
    _, files = self._packages[index]
    ends = _package_file_ends(self._root)[index]
    start, stop = max(start, 0), min(stop, int(ends[-1]))
    if start >= stop:
      return ""
    # File k holds the characters [ends[k - 1], ends[k]).
    first = int(np.searchsorted(ends, start, side="right"))
    last = int(np.searchsorted(ends, stop - 1, side="right"))
    offset = int(ends[first - 1]) if first else 0
    text = "".join(_file_part(self._root, f) for f in files[first : last + 1])
    return text[start - offset : stop - offset]

  def names(self) -> tuple[str, ...]:
    """Package names, in document order."""
    return tuple(name for name, _ in self._packages)


@functools.lru_cache(maxsize=None)
def _module_lengths(root: str) -> np.ndarray:
  """Character lengths of the top-level modules; cached per process."""
  return np.asarray(
      [len(_read(os.path.join(root, m))) for m in list_modules(root)],
      dtype=np.int64,
  )


_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Statements that contain other statements (a def can hide in any of them).
_COMPOUND_NODES = tuple(
    getattr(ast, name)
    for name in (
        "ClassDef", "FunctionDef", "AsyncFunctionDef", "If", "For",
        "AsyncFor", "While", "With", "AsyncWith", "Try", "TryStar", "Match",
        "ExceptHandler", "match_case",
    )
    if hasattr(ast, name)  # TryStar is 3.11+.
)
_BLOCK_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def _collect_docstrings(node: ast.AST, out: list[str]) -> None:
  """Appends docstrings of `node` and nested defs, in source order.

  Only statement blocks are visited: docstrings cannot live inside
  expressions, and skipping them makes this far cheaper than ast.walk.
  """
  if isinstance(node, _DOC_NODES):
    doc = ast.get_docstring(node, clean=True)
    if doc is not None and len(doc) >= MIN_DOCSTRING_CHARS:
      out.append(doc)
  for field in _BLOCK_FIELDS:
    block = getattr(node, field, None)
    if isinstance(block, list):
      for child in block:
        if isinstance(child, _COMPOUND_NODES):
          _collect_docstrings(child, out)


@functools.lru_cache(maxsize=None)
def list_docstrings(root: str) -> tuple[str, ...]:
  """Extracts the long-enough docstrings of all top-level modules.

  Cached per process: it parses ~5 MB of Python.

  Args:
    root: The stdlib directory.

  Returns:
    Docstrings in module order, then source order within a module.
  """
  out: list[str] = []
  # Building ASTs allocates millions of objects, which triggers repeated full
  # garbage collections; pausing the collector makes parsing ~4x faster. The
  # trees hold no reference cycles that outlive this function.
  gc_was_enabled = gc.isenabled()
  gc.disable()
  try:
    for name in list_modules(root):
      with open(os.path.join(root, name), "rb") as f:
        source = f.read()
      try:
        with warnings.catch_warnings():
          # e.g. invalid escape sequences in old modules; not our concern.
          warnings.simplefilter("ignore")
          tree = ast.parse(source, filename=name)
      except SyntaxError:
        continue
      _collect_docstrings(tree, out)
  finally:
    if gc_was_enabled:
      gc.enable()
  return tuple(out)


class ShortDocuments(Sequence[str]):
  """Short documents: top-level modules, then docstrings."""

  def __init__(self, root: str):
    self._root = root
    self._modules = list_modules(root)
    self._docstrings = list_docstrings(root)

  def __len__(self) -> int:
    return len(self._modules) + len(self._docstrings)

  def __getitem__(self, index: int) -> str:
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(index)
    if index < len(self._modules):
      return _read(os.path.join(self._root, self._modules[index]))
    return self._docstrings[index - len(self._modules)]

  def char_lengths(self) -> np.ndarray:
    """Length of every module and docstring document, in characters."""
    docstrings = np.asarray([len(d) for d in self._docstrings], np.int64)
    return np.concatenate([_module_lengths(self._root), docstrings])


def long_documents(eval_every_nth: int, root: str | None = None):
  """Train/eval split (a `documents.Split`) of the long (package) documents.

  Args:
    eval_every_nth: `DataConfig.eval_every_nth`.
    root: The stdlib directory; defaults to the running Python's.
  """
  return documents.split_every_nth(PackageDocuments(root or stdlib_root()), eval_every_nth)


def short_documents(eval_every_nth: int, root: str | None = None):
  """Train/eval split (a `documents.Split`) of the short (module and docstring) documents;
  arguments as for `long_documents`."""
  return documents.split_every_nth(ShortDocuments(root or stdlib_root()), eval_every_nth)
