"""Needle tasks on text: passkey retrieval, RULER's needles and variable tracking.

Each generator takes a tokenizer, a target length in tokens, a needle depth in [0, 1] and a
numpy Generator, and returns an `Example` whose prompt is at most `length` tokens (the haystack
is fitted by `example.fit_haystack`). The texts follow the published tasks:

passkey      filler "The grass is green. The sky is blue. ..." repeated; the needle "The pass
             key is {k}. Remember it. {k} is the pass key." (k a 5-digit number); query "What
             is the pass key? The pass key is".
niah_single  RULER: "One of the special magic numbers for {key} is: {value}." (value a 7-digit
             number), queried by key.
niah_multikey   the same with `distractors` needles of other keys around it.
niah_multivalue `values` needles with one key and different values: every value is an answer.
niah_multiquery `queries` needles of different keys, all queried: every value is an answer.
variable_tracking  "VAR ABCDE = 12345." then a chain of `hops` assignments "VAR X = VAR Y."
             spread over the context; the answer lists every name bound to the value.
"""

from __future__ import annotations

import string

import numpy as np

from lctx.evals.example import Example, check_representable, encode, fit_haystack

PASSKEY_FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.",
                  "Here we go.", "There and back again."]


def number(rng, digits: int) -> str:
  return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def word(rng, letters: int = 6, alphabet: str = string.ascii_lowercase) -> str:
  return "".join(rng.choice(list(alphabet), letters))


def _distinct(rng, make, n: int) -> list[str]:
  out: list[str] = []
  while len(out) < n:
    x = make(rng)
    if x not in out:
      out.append(x)
  return out


def _spread(depth: float, n: int) -> list[float]:
  """Depths of n needles: the first (the one asked about) at `depth`, the others at evenly
  spaced depths over the context."""
  if n == 1:
    return [depth]
  others = np.linspace(0.0, 1.0, n + 1)[1:]
  return [depth] + [float(x) for x in others[:n - 1]]


def text_example(task, tokenizer, needles, query, answers, length, depths, depth, *,
                 filler=PASSKEY_FILLER, sep=" ") -> Example:
  """The `Example` of a text task: `needles` at `depths` in `filler` (joined by `sep`), then a
  newline and `query`; the answers are the strings `answers`, each after a space."""
  query = "\n" + query
  check_representable(tokenizer, needles + [query] + answers, f"task {task!r}")
  prompt, context_len = fit_haystack(tokenizer, filler, needles, query, length, depths,
                                     f"task {task!r}", sep)
  return Example(task, prompt, tuple(encode(tokenizer, " " + a) for a in answers),
                 tuple(answers), depth, context_len)


def passkey(tokenizer, length: int, depth: float, rng) -> Example:
  key = number(rng, 5)
  needle = f"The pass key is {key}. Remember it. {key} is the pass key."
  return text_example("passkey", tokenizer, [needle], "What is the pass key? The pass key is",
                  [key], length, [depth], depth)


def _magic(key: str, value: str) -> str:
  return f"One of the special magic numbers for {key} is: {value}."


def _magic_query(keys: list[str], answers: int) -> str:
  listed = ", ".join(keys)
  if answers == 1:
    return (f"What is the special magic number for {listed} mentioned in the provided text? "
            f"The special magic number for {listed} mentioned in the provided text is")
  return (f"What are all the special magic numbers for {listed} mentioned in the provided "
          f"text? The special magic numbers for {listed} mentioned in the provided text are")


def niah(tokenizer, length: int, depth: float, rng, *, variant: str = "single",
         distractors: int = 3, values: int = 4, queries: int = 4) -> Example:
  """RULER needle-in-a-haystack; variant is single, multikey, multivalue or multiquery."""
  task = f"niah_{variant}"
  if variant == "single":
    keys, vals = [word(rng)], [number(rng, 7)]
    needles, asked, answers = [_magic(keys[0], vals[0])], keys, vals
  elif variant == "multikey":
    keys = _distinct(rng, word, 1 + distractors)
    vals = _distinct(rng, lambda r: number(r, 7), 1 + distractors)
    needles, asked, answers = [_magic(k, v) for k, v in zip(keys, vals)], keys[:1], vals[:1]
  elif variant == "multivalue":
    keys, vals = [word(rng)], _distinct(rng, lambda r: number(r, 7), values)
    needles, asked, answers = [_magic(keys[0], v) for v in vals], keys, vals
  elif variant == "multiquery":
    keys = _distinct(rng, word, queries)
    vals = _distinct(rng, lambda r: number(r, 7), queries)
    needles, asked, answers = [_magic(k, v) for k, v in zip(keys, vals)], keys, vals
  else:
    raise ValueError(f"niah: variant={variant!r} must be one of single, multikey, multivalue, "
                     "multiquery")
  query = _magic_query(asked, len(answers))
  return text_example(task, tokenizer, needles, query, answers, length,
                  _spread(depth, len(needles)), depth)


def variable_tracking(tokenizer, length: int, depth: float, rng, *, hops: int = 4) -> Example:
  """One chain: VAR N0 = value, then VAR N1 = VAR N0, ..., spread from `depth` to the end."""
  names = _distinct(rng, lambda r: word(r, 5, string.ascii_uppercase), hops + 1)
  value = number(rng, 5)
  needles = [f"VAR {names[0]} = {value}."]
  needles += [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
  depths = [float(x) for x in np.linspace(depth, 1.0, hops + 2)[:-1]]
  query = (f"Find all variables that are assigned the value {value} in the text above. Answer: "
           f"According to the chain(s) of variable assignment in the text above, {hops + 1} "
           f"variables are assigned the value {value}, they are:")
  return text_example("variable_tracking", tokenizer, needles, query, names, length, depths, depth)
