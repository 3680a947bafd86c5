"""Evaluation task generators (lctx/evals): hand-checked texts, the invariants of every task
(needles present once at the requested depth, prompts that fit, answers), bAbI answers against
a re-simulation of the printed story, code haystacks against the stdlib files, common-word
counts, Zoology's MQAR law and labels, determinism, and the errors that name the setting."""

import collections
import os
import re

import numpy as np
import pytest

from lctx.data import corpus
from lctx.data.tokenizers import ByteTokenizer
from lctx.evals import babi, common_words, longeval, needles, synthetic
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


DROPPED = ("dropped", "put down", "discarded", "left")
FACT = re.compile(r"(Mary|John|Daniel|Sandra) ((?:moved|went back|went|journeyed|travelled) to|"
                  r"picked up|got|grabbed|took|dropped|put down|discarded|left) the (\w+)\.")


def resimulate(facts):
  """Where each actor is and the trail of places of each object after the (actor, verb, thing)
  facts, asserting that each pick-up and drop is possible where it happens."""
  where, holder, trail = {}, {}, collections.defaultdict(list)
  for actor, verb, thing in facts:
    if verb.endswith(" to"):
      where[actor] = thing
      for obj in [o for o, h in holder.items() if h == actor]:
        if trail[obj][-1:] != [thing]:
          trail[obj].append(thing)
    elif verb in ("picked up", "got", "grabbed", "took"):
      assert holder.get(thing) is None, (actor, verb, thing)  # nobody holds it
      assert not trail[thing] or trail[thing][-1] == where.get(actor), (actor, verb, thing)
      holder[thing] = actor
      if actor in where and trail[thing][-1:] != [where[actor]]:
        trail[thing].append(where[actor])
    else:
      assert verb in DROPPED and holder.get(thing) == actor, (actor, verb, thing)
      holder[thing] = None
  return where, trail


@pytest.mark.parametrize("qa", [1, 2, 3])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_babi_answers_follow_the_story(qa, depth):
  for seed in range(30):
    ex = make_example(f"babi_qa{qa}", TOK, 900, depth=depth, seed=seed)
    context, query = text(ex.prompt[:ex.context_len]), text(ex.prompt[ex.context_len:])
    facts = FACT.findall(context)
    assert len(facts) == 6 + qa  # distractors + supporting facts
    assert len({f[0] for f in facts}) >= 2 and len({f[2] for f in facts}) >= 3  # others too
    where, trail = resimulate(facts)
    if qa == 1:
      (actor,) = re.fullmatch(r"\nQuestion: Where is (\w+)\? Answer: \1 is in the", query).groups()
      want = where[actor]
      first = max(i for i, f in enumerate(facts) if f[0] == actor and f[1].endswith(" to"))
    elif qa == 2:
      (obj,) = re.fullmatch(r"\nQuestion: Where is the (\w+)\? Answer: The \1 is in the",
                            query).groups()
      want = trail[obj][-1]
    else:
      obj, second = re.fullmatch(r"\nQuestion: Where was the (\w+) before the (\w+)\? Answer: "
                                 r"Before the \2, the \1 was in the", query).groups()
      assert trail[obj].count(second) == 1 and trail[obj][0] != second
      want = trail[obj][trail[obj].index(second) - 1]
    if qa > 1:  # the supporting facts start with the (only) pick-up of the asked object
      (first,) = [i for i, f in enumerate(facts) if f[2] == obj and f[1] not in DROPPED]
    assert ex.answer_texts == (want,) and want in babi.LOCATIONS
    assert text(ex.answers[0]) == " " + want
    # The first supporting fact sits at `depth` of the noise: count filler sentences before it.
    sentences = re.findall(r"[A-Z][^.]*\.", context)
    noise = [s in needles.PASSKEY_FILLER for s in sentences]
    at = [i for i, s in enumerate(sentences) if FACT.fullmatch(s)][first]
    assert sum(noise[:at]) / sum(noise) == pytest.approx(depth, abs=3 / sum(noise) + 0.01)
    assert ex.depth == depth


def stdlib_lines(lines) -> int:
  """Asserts that the lines after the first "# file: " header are lines of the stdlib file named
  by the header above them, all in one package; returns how many were checked."""
  files, current, checked = {}, None, 0
  for line in lines:
    if line.startswith("# file: "):
      current = line[len("# file: "):]
      if current not in files:
        with open(os.path.join(corpus.stdlib_root(), current), "rb") as f:
          files[current] = set(f.read().decode("utf-8", errors="replace").split("\n"))
    elif current is not None:
      assert line in files[current], (current, line)
      checked += 1
  assert len({name.split("/")[0] for name in files}) == 1, sorted(files)
  return checked


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_code_is_one_line_at_its_depth_in_stdlib_code(depth):
  ex = make_example("needle_code", TOK, 3000, depth=depth, seed=11)
  value = ex.answer_texts[0]
  assert len(value) == 7 and value.isdigit() and text(ex.answers[0]) == " " + value
  query = text(ex.prompt[ex.context_len:])
  (name,) = re.fullmatch(r"\n# Question: what is the value of ([A-Z]{5}_[A-Z]{5}) assigned "
                         r"above\?\n# Answer: \1 =", query).groups()
  context = text(ex.prompt[:ex.context_len])
  lines = context.split("\n")
  assert context.count(name) == 1 and lines.count(f"{name} = {value}") == 1
  at = lines.index(f"{name} = {value}")
  assert at / len(lines) == pytest.approx(depth, abs=3 / len(lines) + 0.01), (at, len(lines))
  assert stdlib_lines(lines[:at] + lines[at + 1:]) > 40


def test_passkey_code_is_the_passkey_in_stdlib_code():
  ex = make_example("passkey_code", TOK, 2500, depth=0.3, seed=2)
  key = ex.answer_texts[0]
  prompt = text(ex.prompt)
  assert prompt.endswith("\nWhat is the pass key? The pass key is")
  lines = text(ex.prompt[:ex.context_len]).split("\n")
  needle = f"The pass key is {key}. Remember it. {key} is the pass key."
  assert lines.count(needle) == 1 and prompt.count(key) == 2
  at = lines.index(needle)
  assert at / len(lines) == pytest.approx(0.3, abs=3 / len(lines) + 0.01)
  assert stdlib_lines(lines[:at] + lines[at + 1:]) > 40
  # Seeds draw different package documents.
  headers = {text(make_example("passkey_code", TOK, 600, seed=s).prompt).split("# file: ")[1]
             .split("/")[0] for s in range(8)}
  assert len(headers) > 1


@pytest.mark.parametrize("length,repeats", [(512, (2, 1)), (600, (3, 1)), (1024, (6, 1)),
                                            (4000, (30, 3))])
def test_common_words_counts(length, repeats):
  assert repeats in common_words.REPEATS
  ex = make_example("common_words", TOK, length, seed=5)
  assert ex.depth is None and len(ex.answers) == 10 and len(set(ex.answer_texts)) == 10
  context, query = text(ex.prompt[:ex.context_len]), text(ex.prompt[ex.context_len:])
  assert query == ("\nQuestion: What are the 10 most common words in the above list? Answer: "
                   "The top 10 words that appear most often in the list are:")
  listing = context[context.index("1. "):]
  entries = re.findall(r"(\d+)\. ([a-z]{5})( |$)", listing)
  assert " ".join(f"{i}. {w}" for i, w, _ in entries) == listing
  assert [int(i) for i, _, _ in entries] == list(range(1, len(entries) + 1))
  counts = collections.Counter(w for _, w, _ in entries)
  common, uncommon = repeats
  assert all(counts[w] == common for w in ex.answer_texts), counts
  others = [counts[w] for w in counts if w not in ex.answer_texts]
  assert len(others) >= 10 and set(others) == {uncommon}
  # The list fills the length: one more uncommon word (its repeats) would not fit in the pad.
  assert len(context) - len(listing) < uncommon * len(" 1000. abcde")
  assert [text(a) for a in ex.answers] == [" " + w for w in ex.answer_texts]


def test_longeval_seeds_and_scores_of_the_new_tasks(monkeypatch):
  cfg = longeval.LongEvalConfig()
  before = longeval._seed(cfg, "passkey", 512, 0.5, 0)
  # A task named to sort first would have shifted every index of a sorted registry.
  monkeypatch.setitem(TASKS, "aaa", TASKS["passkey"])
  assert longeval._seed(cfg, "passkey", 512, 0.5, 0) == before
  assert longeval._seed(cfg, "passkey_code", 512, 0.5, 0) != before
  for task in ("passkey_code", "needle_code"):
    ex = make_example(task, TOK, 800)
    answer = ex.answer_texts[0]
    assert longeval.task_score(ex, None, f" {answer}, then 1.") == 1.0
    assert longeval.task_score(ex, None, f" 1 then {answer}") == 0.0  # first number only
  ex = make_example("babi_qa3", TOK, 800)
  assert longeval.task_score(ex, None, f" {ex.answer_texts[0]}.") == 1.0
  assert longeval.task_score(ex, None, " nowhere.") == 0.0
  ex = make_example("common_words", TOK, 800)
  assert longeval.task_score(ex, None, " " + ", ".join(ex.answer_texts[:4])) == 0.4


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
  for task, short in [("babi_qa2", 150), ("passkey_code", 60), ("needle_code", 90)]:
    with pytest.raises(ValueError, match=rf"task '{task}': length={short} is below the \d+ tokens "
                       "that the needles and the query alone take"):
      make_example(task, TOK, short)
  with pytest.raises(ValueError, match=r"task 'common_words': length=300 is below the \d+ tokens "
                     r"that the shortest list \(10 common words 2 times each"):
    make_example("common_words", TOK, 300)
  with pytest.raises(ValueError, match=r"babi: qa=4 must be 1, 2 or 3"):
    babi.babi(TOK, 500, 0.5, np.random.default_rng(0), qa=4)

  class Lowercase(ByteTokenizer):  # loses capitals: cannot represent the task's text
    def encode(self, s):
      return super().encode(s.lower())

  with pytest.raises(ValueError, match=r"cannot represent"):
    make_example("passkey", Lowercase(), 500)
  with pytest.raises(ValueError, match=r"task 'needle_code': the tokenizer .* cannot represent "
                     r"the stdlib package '\w+'"):
    make_example("needle_code", Lowercase(), 500)
