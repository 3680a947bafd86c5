"""Long-context evaluation of a model over tasks x context lengths x needle depths.

For every cell (task, length, depth) `LongEvalConfig.examples` deterministic examples are made
(lctx.evals.tasks); the model continues each prompt greedily (lctx.generate, with its decoding
cache) and one forward pass over prompt + answer gives the answer's log-likelihood. A cell
reports the means of
  exact_match     the continuation starts with the (first) answer's tokens;
  score           the task's own metric (`task_score`): passkey and the needles in code, the
                  first number of the continuation equals the key; the other text tasks (RULER
                  needles, variable tracking, common words, bAbI), the fraction of reference
                  strings contained in the decoded continuation; token tasks (selective
                  copying), exact match;
  answer_logprob  log p(first answer | prompt), nats.
Lengths beyond the training length are allowed (RoPE as configured; linear layers need
nothing); each row says whether its length is beyond it.

With `LongEvalConfig.ttt` (a TTTConfig, gin/ttt/qttt.gin) every example is answered after
test-time training (lctx/ttt/qttt.py): qTTT adapts W_Q on spans of the prompt, then continues it
and scores the answer with the adapted model and the prefill's cache; method "thinking" spends
the same FLOPs on extra greedy tokens first, and its continuation (thinking tokens, then
`max_new_tokens`) is scored whole. Rows then also report the compute (prefill and test-time
GFLOPs, thinking tokens of equal cost).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from lctx.evals import scoring
from lctx.evals.example import Example, check_depth
from lctx.evals.tasks import TASKS, make_example
from lctx.generate import generate
from lctx.ttt import qttt


@dataclasses.dataclass(frozen=True)
class LongEvalConfig:
  """What `RunConfig.mode = 'longeval'` evaluates (bound by gin/evals/*.gin).

  Attributes:
    tasks: task names of lctx.evals.tasks.TASKS.
    lengths: prompt lengths in tokens (may exceed the training length).
    depths: needle depths in [0, 1].
    examples: examples per (task, length, depth) cell.
    max_new_tokens: tokens generated per example; 0 means the answers' tokens plus 4.
    seed: seed of the examples.
    ttt: None, or the test-time training every example gets first (lctx.ttt.qttt.TTTConfig).
  """

  tasks: tuple[str, ...] = ("passkey", "niah_single")
  lengths: tuple[int, ...] = (256, 512, 1024)
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  examples: int = 1
  max_new_tokens: int = 0
  seed: int = 0
  ttt: qttt.TTTConfig | None = None

  def __post_init__(self):
    for task in self.tasks:
      if task not in TASKS:
        raise ValueError(f"LongEvalConfig.tasks: {task!r} is not one of {sorted(TASKS)}")
    if not self.tasks or not self.lengths or not self.depths:
      raise ValueError("LongEvalConfig.tasks, lengths and depths must not be empty")
    for length in self.lengths:
      if int(length) < 1:
        raise ValueError(f"LongEvalConfig.lengths: {length} must be positive")
    for depth in self.depths:
      check_depth(depth, "LongEvalConfig.depths")
    if self.examples < 1 or self.max_new_tokens < 0:
      raise ValueError("LongEvalConfig.examples must be >= 1 and max_new_tokens >= 0")
    if self.ttt is not None and not isinstance(self.ttt, qttt.TTTConfig):
      raise ValueError(f"LongEvalConfig.ttt={self.ttt!r} must be None or a TTTConfig "
                       "(@TTTConfig())")


# Tasks scored by the first number of the continuation (a key or value of digits); the other
# text tasks by the fraction of reference strings it contains, token tasks by exact match.
FIRST_NUMBER_TASKS = frozenset({"passkey", "passkey_code", "needle_code"})


def task_score(ex: Example, generated, text: str) -> float:
  """The task's own metric of one continuation: the first number of `text` equals the answer
  (FIRST_NUMBER_TASKS), else the fraction of answer strings `text` contains (RULER's metric;
  bAbI's location word, common words), else exact match of the `generated` tokens."""
  if ex.task in FIRST_NUMBER_TASKS:
    return float(scoring.first_number_matches(text, ex.answer_texts[0]))
  if ex.answer_texts is None:
    return float(scoring.exact_match(generated, ex.answers[0]))
  return scoring.contains_fraction(text, ex.answer_texts)


def _seed(cfg: LongEvalConfig, task: str, length: int, depth: float, n: int) -> int:
  # The task enters by a hash of its name, so adding tasks to the registry changes no seed.
  words = [cfg.seed, zlib.crc32(task.encode()), int(length), round(depth * 1000), n]
  return int(np.random.SeedSequence(words).generate_state(1)[0])


def examples(cfg: LongEvalConfig, tokenizer) -> list[tuple[tuple[str, int, float], Example]]:
  """Every ((task, length, depth), example) of the evaluation, built before any compile so that
  a length a task cannot fit in (or a test-time span longer than a prompt) is reported first."""
  items = [((task, int(length), float(depth)),
            make_example(task, tokenizer, length, depth, _seed(cfg, task, length, depth, n)))
           for task in cfg.tasks for length in cfg.lengths for depth in cfg.depths
           for n in range(cfg.examples)]
  if cfg.ttt is not None:
    for (task, length, _), ex in items:
      qttt.check_context(cfg.ttt, len(ex.prompt), f"the {task} prompt at length {length}")
  return items


@functools.partial(jax.jit, static_argnames="model")
def _logits(model, params, tokens):
  return model.apply({"params": params}, tokens)


def plain_answerer(model, params):
  """Greedy continuation of the prompt and log p(answer | prompt) from one forward pass."""
  def answer(ex, index: int, max_new_tokens: int):
    del index
    out = np.asarray(generate(model, params, jnp.asarray(ex.prompt[None]), jax.random.key(0),
                              max_new_tokens=max_new_tokens))[0]
    first = ex.answers[0]
    logits = _logits(model, params, jnp.asarray(np.concatenate([ex.prompt, first])[None]))[0]
    return out, scoring.answer_logprob(np.asarray(logits, np.float32), first,
                                       len(ex.prompt)), {}
  return answer


def qttt_answerer(model, params, ttt: qttt.TTTConfig):
  """The answer after qTTT on the prompt (or the thinking tokens of equal FLOPs first), with
  the compute of each example."""
  qttt.trained_paths(model.config, ttt)  # a model qTTT cannot adapt fails first

  def answer(ex, index: int, max_new_tokens: int):
    result = qttt.run(model, params, ex.prompt[None], ttt, max_new_tokens=max_new_tokens,
                      answer_bn=ex.answers[0][None], seed=ttt.seed + index)
    # Row j of the answer's logits predicts answer token j: a one-token "prompt".
    logprob = scoring.answer_logprob(np.asarray(result.answer_logits, np.float32)[0],
                                     ex.answers[0], 1)
    c = result.compute
    return np.asarray(result.tokens)[0], logprob, {
        "method": ttt.method, "prefill_gflops": c.prefill_flops / 1e9,
        "ttt_gflops": c.ttt_flops / 1e9, "thinking_tokens": c.thinking_tokens}
  return answer


def evaluate(model, params, tokenizer, cfg: LongEvalConfig, train_len: int | None = None,
             items=None, answer=None) -> list[dict]:
  """One row per (task, length, depth): the mean exact_match, score and answer_logprob.

  `items` is `examples(cfg, tokenizer)` when the caller already built them (None: built here).
  `answer(example, index, max_new_tokens) -> (continuation, answer log-prob, extra columns)`
  answers each example: None is plain in-context answering, or qTTT with `cfg.ttt`; the extra
  columns of a cell are the means over its examples (an integer column's rounded; a string
  column is taken as it is).
  """
  if answer is None:
    answer = (plain_answerer(model, params) if cfg.ttt is None else
              qttt_answerer(model, params, cfg.ttt))
  cells: dict[tuple, list[tuple[float, float, float, dict]]] = {}
  for n, (key, ex) in enumerate(examples(cfg, tokenizer) if items is None else items):
    new = cfg.max_new_tokens or sum(len(a) for a in ex.answers) + 4
    out, logprob, extra = answer(ex, n, new)
    cells.setdefault(key, []).append((float(scoring.exact_match(out, ex.answers[0])),
                                      task_score(ex, out, tokenizer.decode(out)), logprob, extra))
  rows = []
  for (task, length, depth), scores in cells.items():
    em, score, logprob = np.mean(np.asarray([s[:3] for s in scores]), axis=0)
    row = {"task": task, "length": length, "depth": depth, "examples": len(scores),
           "exact_match": float(em), "score": float(score), "answer_logprob": float(logprob),
           "beyond_training": bool(train_len is not None and length > train_len)}
    for column, value in scores[0][3].items():
      mean = None if isinstance(value, str) else float(np.mean([s[3][column] for s in scores]))
      row[column] = value if mean is None else round(mean) if isinstance(value, int) else mean
    rows.append(row)
  return rows


TTT_COLUMNS = ["method", "prefill_gflops", "ttt_gflops", "thinking_tokens"]
