"""Evaluation task generators (lctx/evals): hand-checked texts, the invariants of every task
(needles present once at the requested depth, prompts that fit, answers), Zoology's MQAR law and
labels, determinism, and the errors that name the setting."""

import numpy as np
import pytest

from lctx.data.tokenizers import ByteTokenizer
from lctx.evals import needles, synthetic
from lctx.evals.tasks import TASKS, make_example

TOK = ByteTokenizer()


def text(ids) -> str:
  return TOK.decode(ids)


def test_passkey_text_is_the_published_one():
  ex = make_example("passkey", TOK, 400, depth=0.0, seed=3)
  key = ex.answer_texts[0]
  assert len(key) == 5 and key.isdigit()
  prompt = text(ex.prompt)
  needle = f"The pass key is {key}. Remember it. {key} is the pass key."
  # Depth 0: the needle follows only the few filler bytes that make the length exact.
  assert needle + " The grass is green. The sky is blue." in prompt
  assert prompt.index(needle) < 25
  assert prompt.endswith("\nWhat is the pass key? The pass key is")
  assert text(ex.answers[0]) == " " + key
  assert ex.context_len == len(TOK.encode(prompt.split("\n")[0])) and len(ex.prompt) == 400


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [600, 1500])
def test_prompts_fit_and_are_deterministic(task, length):
  ex = make_example(task, TOK, length, depth=0.4, seed=7)
  assert ex.prompt.dtype == np.int32 and ex.task == task
  # Exactly the length: every prompt of one length has one shape (one compilation).
  assert len(ex.prompt) == length, len(ex.prompt)
  again = make_example(task, TOK, length, depth=0.4, seed=7)
  assert np.array_equal(ex.prompt, again.prompt)
  assert all(np.array_equal(a, b) for a, b in zip(ex.answers, again.answers))
  other = make_example(task, TOK, length, depth=0.4, seed=8)
  assert not np.array_equal(ex.prompt, other.prompt)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_appears_once_at_its_depth(depth):
  ex = make_example("niah_single", TOK, 2000, depth=depth, seed=1)
  context = text(ex.prompt[:ex.context_len])
  value = ex.answer_texts[0]
  needle = [s for s in context.split(". ") if value in s]
  assert len(needle) == 1 and context.count(value) == 1
  at = context.index("One of the special magic")
  # Within one filler sentence of the requested fraction of the context.
  assert abs(at / len(context) - depth) <= 25 / len(context) + 0.02, (at, len(context))
  assert value in text(ex.answers[0])
  query = text(ex.prompt[ex.context_len:])
  key = needle[0].split(" for ")[1].split(" is")[0]
  assert query == (f"\nWhat is the special magic number for {key} mentioned in the provided "
                   f"text? The special magic number for {key} mentioned in the provided text is")


def test_ruler_variants():
  multikey = make_example("niah_multikey", TOK, 1500, depth=0.5, seed=2)
  context = text(multikey.prompt[:multikey.context_len])
  assert context.count("One of the special magic numbers for") == 4  # 1 + 3 distractors
  keys = [s.split(" for ")[1].split(" is")[0] for s in context.split(". ") if "magic" in s]
  assert len(set(keys)) == 4 and len(multikey.answers) == 1
  assert f"for {keys[1]} is: {multikey.answer_texts[0]}" in context  # the asked one is 2nd

  multivalue = make_example("niah_multivalue", TOK, 1500, depth=0.5, seed=2)
  context = text(multivalue.prompt[:multivalue.context_len])
  assert len(multivalue.answers) == 4 and len(set(multivalue.answer_texts)) == 4
  key = context.split("One of the special magic numbers for ")[1].split(" is")[0]
  for value in multivalue.answer_texts:
    assert context.count(f"numbers for {key} is: {value}.") == 1
  assert text(multivalue.prompt[multivalue.context_len:]).endswith("text are")

  multiquery = make_example("niah_multiquery", TOK, 1500, depth=0.5, seed=2)
  query = text(multiquery.prompt[multiquery.context_len:])
  context = text(multiquery.prompt[:multiquery.context_len])
  found = dict(s.split(" for ")[1].rstrip(".").split(" is: ") for s in context.split(". ")
               if "magic" in s)
  asked = query.split("numbers for ")[1].split(" mentioned")[0].split(", ")
  assert found == dict(zip(asked, multiquery.answer_texts)) and len(asked) == 4


def test_variable_tracking_chain():
  ex = make_example("variable_tracking", TOK, 1200, depth=0.2, seed=5)
  context = text(ex.prompt[:ex.context_len])
  names = ex.answer_texts
  assert len(names) == 5 and len(set(names)) == 5
  value = context.split(f"VAR {names[0]} = ")[1].split(".")[0]
  assert value.isdigit()
  positions = [context.index(f"VAR {names[0]} = {value}.")]
  for a, b in zip(names[:-1], names[1:]):
    assert context.count(f"VAR {b} = VAR {a}.") == 1
    positions.append(context.index(f"VAR {b} = VAR {a}."))
  assert positions == sorted(positions)  # the chain reads in order
  assert positions[0] / len(context) == pytest.approx(0.2, abs=0.05)
  assert f"assigned the value {value}" in text(ex.prompt[ex.context_len:])


def test_selective_copy():
  ex = make_example("selective_copy", TOK, 200, seed=4)
  data = ex.answers[0]
  assert len(data) == 16 and ((data >= 1) & (data <= 14)).all()
  assert ex.prompt[-1] == 15 and len(ex.prompt) == 200
  context = ex.prompt[:-1]
  assert np.array_equal(context[context != 0], data)


def test_mqar_follows_zoology():
  rng = np.random.default_rng(0)
  length, pairs, vocab, n = 64, 4, 100, 200
  inputs, labels = synthetic.mqar(rng, n, length, pairs, vocab)
  assert inputs.shape == labels.shape == (n, length)
  ctx = 2 * pairs
  keys, values = inputs[:, 0:ctx:2], inputs[:, 1:ctx:2]
  assert ((keys >= 1) & (keys < vocab // 2)).all()
  assert ((values >= vocab // 2) & (values < vocab)).all()
  assert all(len(set(r)) == pairs for r in keys) and all(len(set(r)) == pairs for r in values)
  gaps = []
  for i in range(n):
    where = np.flatnonzero(labels[i] != synthetic.IGNORE)
    assert len(where) == pairs
    # A label sits at the position of a re-placed key and is that key's value.
    for pos in where:
      j = list(keys[i]).index(inputs[i, pos])
      assert labels[i, pos] == values[i, j]
      assert pos >= ctx and (pos - ctx) % 2 == 0
      gaps.append((pos - ctx) // 2)
    rest = np.delete(inputs[i, ctx:], where - ctx)
    assert (rest == 0).all()  # Figure 2's zeros
  # The gap law p(gap = i - 1) ~ a * i^(a - 1), a = 0.01, i = 1..space: with one pair the
  # drawn gap follows it exactly (with more, draws are without replacement).
  inputs, labels = synthetic.mqar(rng, 3000, length, 1, vocab)
  one = np.argmax(labels != synthetic.IGNORE, axis=1) - 2
  space = (length - 2) // 2
  p = np.arange(1, space + 1) ** -0.99
  p /= p.sum()
  for upto in (1, 4, 16):
    assert np.mean(one // 2 < upto) == pytest.approx(p[:upto].sum(), abs=0.03), upto
  assert len(set(gaps)) > 10
  noisy, _ = synthetic.mqar(np.random.default_rng(0), 4, length, pairs, vocab,
                            random_non_queries=True)
  assert (noisy[:, ctx:] != 0).mean() > 0.9


def test_bad_requests_name_the_setting():
  with pytest.raises(ValueError, match=r"task='needle' is not one of"):
    make_example("needle", TOK, 100)
  with pytest.raises(ValueError, match=r"depth=1.5 must lie in \[0, 1\]"):
    make_example("passkey", TOK, 500, depth=1.5)
  with pytest.raises(ValueError, match=r"length=40 is below the \d+ tokens"):
    make_example("passkey", TOK, 40)
  with pytest.raises(ValueError, match=r"length=0 must be positive"):
    make_example("passkey", TOK, 0)
  with pytest.raises(ValueError, match=r"4 \* pairs=40 must be at most length=32"):
    synthetic.mqar(np.random.default_rng(0), 1, 32, 10, 100)
  with pytest.raises(ValueError, match=r"vocab=30 must exceed length=32"):
    synthetic.mqar(np.random.default_rng(0), 1, 32, 4, 30)
  with pytest.raises(ValueError, match=r"variant='x' must be one of"):
    needles.niah(TOK, 500, 0.5, np.random.default_rng(0), variant="x")

  class Lowercase(ByteTokenizer):  # loses capitals: cannot represent the task's text
    def encode(self, s):
      return super().encode(s.lower())

  with pytest.raises(ValueError, match=r"cannot represent"):
    make_example("passkey", Lowercase(), 500)
