"""Needle tasks in code: the haystack is lines of real Python from the embedded corpus.

The haystack is one package document of the running Python's standard library
(lctx.data.corpus: a package's .py files concatenated, each after a "# file: pkg/x.py" line, so
a seed gives the same haystack wherever the Python build is the same), chosen by the rng, read
from its first line and cycled if the length asks for more; its lines are joined by newlines
and the needles are inserted as lines of their own (`example.fit_haystack` with a newline
separator).

passkey_code  passkey's needle "The pass key is {k}. Remember it. {k} is the pass key." (k a
              5-digit number) and query "What is the pass key? The pass key is" in code.
needle_code   the planted line "{NAME} = {value}" (NAME two UPPER_CASE words of the rng joined
              by "_" that occur nowhere in the document, value a 7-digit number), queried by
              "# Question: what is the value of {NAME} assigned above?" then "# Answer: {NAME} =";
              the answer is the value.
"""

from __future__ import annotations

import functools
import string

from lctx.evals.example import Example
from lctx.evals.needles import number, word, text_example


@functools.lru_cache(maxsize=1)
def _documents():
  from lctx.data import corpus  # here, not above: lctx.data imports the task registry
  return corpus.PackageDocuments(corpus.stdlib_root())


@functools.lru_cache(maxsize=4)
def package_document(index: int) -> tuple[str, str, tuple[str, ...]]:
  """(package name, text, lines) of package document `index` of the running stdlib."""
  documents = _documents()
  text = documents[index]
  return documents.names()[index], text, tuple(text.split("\n"))


def _document(task: str, tokenizer, rng) -> tuple[str, tuple[str, ...]]:
  """The text and lines of the package document drawn by `rng`; raises unless `tokenizer`
  represents it."""
  name, text, lines = package_document(int(rng.integers(len(_documents()))))
  if tokenizer.decode(tokenizer.encode(text)) != text:
    raise ValueError(f"task {task!r}: the tokenizer {tokenizer!r} cannot represent the stdlib "
                     f"package {name!r} (decode of its encoding differs); use a tokenizer that "
                     "covers the task's text")
  return text, lines


def passkey_code(tokenizer, length: int, depth: float, rng) -> Example:
  _, lines = _document("passkey_code", tokenizer, rng)
  key = number(rng, 5)
  needle = f"The pass key is {key}. Remember it. {key} is the pass key."
  return text_example("passkey_code", tokenizer, [needle], "What is the pass key? The pass key is",
                      [key], length, [depth], depth, filler=lines, sep="\n")


def needle_code(tokenizer, length: int, depth: float, rng) -> Example:
  text, lines = _document("needle_code", tokenizer, rng)
  name = None
  while name is None or name in text:  # a name of its own: the needle is the one assignment
    name = "_".join(word(rng, 5, string.ascii_uppercase) for _ in range(2))
  value = number(rng, 7)
  query = (f"# Question: what is the value of {name} assigned above?\n"
           f"# Answer: {name} =")
  return text_example("needle_code", tokenizer, [f"{name} = {value}"], query, [value], length,
                      [depth], depth, filler=lines, sep="\n")
