"""Tests for the embedded stdlib corpus (lctx.data.corpus)."""

import ast
import os

import numpy as np
import pytest

from lctx.data import corpus
from lctx.data import documents


@pytest.fixture(name="fake_stdlib")
def fixture_fake_stdlib(tmp_path):
  """A tiny stdlib-shaped tree with every kind of excluded directory."""
  files = {
      "alpha.py": '"""Module alpha docstring that is long enough to be kept by the extractor."""\nx = 1\n',
      "beta.py": "def f():\n  '''short'''\n",
      "_sysconfigdata__linux.py": "build_time_vars = {}\n",
      "pkg/__init__.py": "A = 1\n",
      "pkg/b.py": "B = 2",  # No trailing newline: the next header must still start a line.
      "pkg/sub/c.py": "C = 3\n",
      "pkg/tests/test_x.py": "raise AssertionError\n",
      "pkg/test/test_y.py": "raise AssertionError\n",
      "pkg/__pycache__/b.py": "stale\n",
      "pkg/data.txt": "not python\n",
      "test/__init__.py": "",
      "idlelib/__init__.py": "",
      "__phello__/__init__.py": "",
      "notapackage/mod.py": "X = 1\n",
  }
  for rel, text in files.items():
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return str(tmp_path)


def test_fake_tree_packages_and_exclusions(fake_stdlib):
  packages = corpus.list_packages(fake_stdlib)
  assert packages == (
      ("pkg", ("pkg/__init__.py", "pkg/b.py", "pkg/sub/c.py")),
  )
  doc = corpus.PackageDocuments(fake_stdlib)[0]
  assert doc == (
      "# file: pkg/__init__.py\nA = 1\n"
      "# file: pkg/b.py\nB = 2\n"
      "# file: pkg/sub/c.py\nC = 3\n"
  )


def test_fake_tree_short_documents(fake_stdlib):
  assert corpus.list_modules(fake_stdlib) == ("alpha.py", "beta.py")
  short = corpus.ShortDocuments(fake_stdlib)
  # Two modules, then the one docstring of >= 64 characters.
  assert len(short) == 3
  assert short[0].startswith('"""Module alpha')
  assert short[2].startswith("Module alpha docstring")
  with pytest.raises(IndexError):
    short[3]


def test_docstrings_found_in_nested_blocks():
  long = "x" * 70
  source = f'''
"""{long} module"""
if True:
  class A:
    """{long} class"""
    def f(self):
      """{long} method"""
      def g():
        """{long} nested"""
try:
  pass
except ImportError:
  def h():
    """{long} in handler"""
lambda: "{long} not a docstring"
'''
  out = []
  corpus._collect_docstrings(ast.parse(source), out)
  assert [d.split()[-1] for d in out] == [
      "module", "class", "method", "nested", "handler"
  ]


def test_real_stdlib_long_documents():
  docs = corpus.PackageDocuments(corpus.stdlib_root())
  names = docs.names()
  assert len(docs) >= 20
  assert list(names) == sorted(names)
  assert {"json", "email", "asyncio"} <= set(names)
  assert not {"test", "tests", "idlelib", "site-packages"} & set(names)
  for _, files in corpus.list_packages(corpus.stdlib_root()):
    for rel in files:
      parts = rel.split("/")
      assert not {"test", "tests", "__pycache__"} & set(parts), rel
  json_doc = docs[names.index("json")]
  assert json_doc.startswith("# file: json/__init__.py\n")
  assert "# file: json/decoder.py\n" in json_doc
  assert "class JSONDecoder" in json_doc


def test_real_stdlib_is_deterministic_and_split():
  first = corpus.long_documents(20)
  second = corpus.long_documents(20)
  assert len(first.train) + len(first.eval) == len(
      corpus.PackageDocuments(corpus.stdlib_root())
  )
  assert first.eval[0] == second.eval[0]
  assert first.train[-1] == second.train[-1]
  assert not set(map(hash, first.train)) & set(map(hash, first.eval))


def test_real_stdlib_short_documents():
  short = corpus.short_documents(20)
  root = corpus.stdlib_root()
  modules = corpus.list_modules(root)
  docstrings = corpus.list_docstrings(root)
  assert "os.py" in modules and "json.py" not in modules
  assert len(short.train) + len(short.eval) == len(modules) + len(docstrings)
  assert len(docstrings) > 500
  assert all(len(d) >= corpus.MIN_DOCSTRING_CHARS for d in docstrings)
  with open(os.path.join(root, modules[0]), encoding="utf-8") as f:
    assert short.eval[0] == f.read()  # Index 0 is held out.


def _check_ranges(docs, rng):
  """char_lengths and read_range agree with the full documents."""
  lengths = docs.char_lengths()
  for index in range(len(docs)):
    text = docs[index]
    assert lengths[index] == len(text)
    for start, stop in [(0, len(text)), (len(text) - 3, len(text) + 10), (5, 5)] + [
        tuple(sorted(rng.integers(0, len(text) + 1, size=2))) for _ in range(5)
    ]:
      assert docs.read_range(index, start, stop) == text[start:stop], (index, start, stop)


def test_package_lengths_and_ranges(fake_stdlib):
  rng = np.random.default_rng(0)
  _check_ranges(corpus.PackageDocuments(fake_stdlib), rng)
  real = corpus.PackageDocuments(corpus.stdlib_root())
  np.testing.assert_array_equal(real.char_lengths(), [len(d) for d in real])
  names = real.names()
  for name in ("json", "email"):
    doc = real[names.index(name)]
    for start in rng.integers(0, len(doc), size=20):
      stop = int(start) + int(rng.integers(1, 3000))
      assert real.read_range(names.index(name), int(start), stop) == doc[start:stop]


def test_short_document_lengths(fake_stdlib):
  short = corpus.ShortDocuments(fake_stdlib)
  np.testing.assert_array_equal(short.char_lengths(), [len(d) for d in short])
  split = corpus.short_documents(20)
  np.testing.assert_array_equal(
      documents.char_lengths(split.train), [len(d) for d in split.train]
  )
