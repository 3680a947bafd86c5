"""Training and eval rows made by an evaluation task (`DataConfig.source = 'task:<name>'`).

Every row is one example, so a model trains on a task exactly as Zoology trains on MQAR: the
loss falls on the answer positions only. A batch is the usual dict of [rows, seq_len] arrays
(tokens, segment_ids, positions) plus the targets and float32 weights of the loss
(lctx.losses.batch_targets):

* mqar: Zoology's generator (lctx.evals.synthetic.mqar) at length seq_len; the target at each
  query is the key's value, every other weight is 0.
* text and token tasks (lctx.evals.tasks.TASKS): the prompt of seq_len - TaskConfig.answer_tokens
  tokens, then the answer (the reference strings joined by ", ", with a leading space, as the
  evaluation scores them, and a closing "." that teaches the model where the answer ends, as the
  needle sentences end theirs; token tasks: the answer tokens), then padding; the weights are 1
  on the positions that predict the answer's tokens.

Row i of a split is made from the seed (DataConfig.seed, split, i) alone, so rows are the same
however the stream is sharded or resumed; train (split 0) and eval (split 1) never share a seed.
"""

from __future__ import annotations

import grain
import numpy as np

from lctx.data import packing
from lctx.data.config import MQAR, DataConfig
from lctx.evals import synthetic
from lctx.evals.example import Example, encode
from lctx.evals.tasks import make_example

TRAIN, EVAL = 0, 1
_UNLIMITED = 2**31 - 1  # rows of a fresh-example stream
_CHECKED_ROWS = 4  # rows built while the pipeline is set up, so bad settings fail first


def task_vocab(cfg: DataConfig, tokenizer) -> int:
  """The token ids a task's rows use lie below this."""
  if cfg.task_name == MQAR:
    return cfg.task.vocab or tokenizer.vocab_size
  return tokenizer.vocab_size


def answer_tokens(ex: Example, tokenizer) -> np.ndarray:
  """The tokens a model trained on the task learns to produce after the prompt.

  Text answers end with ".": without a learned end, a model trained on " 18585" continues it
  with more digits, and the passkey metric (the first number equals the key) fails on a
  correct answer.
  """
  if ex.answer_texts is None:
    return np.concatenate(ex.answers).astype(np.int32)
  return encode(tokenizer, " " + ", ".join(ex.answer_texts) + ".")


def mqar_row(inputs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
  """One row from MQAR's (inputs [t], labels [t]) (labels IGNORE except at the queries)."""
  t = len(inputs)
  return {"tokens": inputs.astype(np.int32), "segment_ids": np.ones(t, np.int32),
          "positions": np.arange(t, dtype=np.int32),
          "targets": np.where(labels == synthetic.IGNORE, 0, labels).astype(np.int32),
          "weights": (labels != synthetic.IGNORE).astype(np.float32)}


def answer_row(prompt: np.ndarray, answer: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """prompt + answer + padding to seq_len, weighted on the positions predicting the answer."""
  n, a = len(prompt), len(answer)
  tokens = np.zeros(seq_len, np.int32)
  tokens[:n], tokens[n:n + a] = prompt, answer
  segment_ids = (np.arange(seq_len) < n + a).astype(np.int32)
  weights = np.zeros(seq_len, np.float32)
  weights[n - 1:n + a - 1] = 1.0
  return {"tokens": tokens, "segment_ids": segment_ids,
          "positions": np.where(segment_ids > 0, np.arange(seq_len), 0).astype(np.int32),
          "targets": np.concatenate([tokens[1:], [0]]).astype(np.int32), "weights": weights}


class TaskRows:
  """grain source: row i of one split of the task (see the module docstring)."""

  def __init__(self, cfg: DataConfig, tokenizer, split: int, size: int):
    self._cfg, self._tokenizer, self._split, self._size = cfg, tokenizer, split, size
    name, task = cfg.task_name, cfg.task
    if name == MQAR:
      synthetic.check_mqar(cfg.seq_len, task.pairs, task_vocab(cfg, tokenizer))
    elif cfg.seq_len - task.answer_tokens < 1:
      raise ValueError(f"TaskConfig.answer_tokens={task.answer_tokens} leaves no room for the "
                       f"prompt in DataConfig.seq_len={cfg.seq_len}")

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    cfg, task = self._cfg, self._cfg.task
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, self._split, int(index)]))
    if cfg.task_name == MQAR:
      inputs, labels = synthetic.mqar(rng, 1, cfg.seq_len, task.pairs,
                                      task_vocab(cfg, self._tokenizer), power_a=task.power_a)
      return mqar_row(inputs[0], labels[0])
    depth = float(rng.uniform(task.depth_min, task.depth_max))
    length = cfg.seq_len - task.answer_tokens
    try:
      ex = make_example(cfg.task_name, self._tokenizer, length, depth,
                        int(rng.integers(2**31)))
    except ValueError as e:
      raise ValueError(f"DataConfig.source={cfg.source!r} with DataConfig.seq_len={cfg.seq_len}"
                       f" - TaskConfig.answer_tokens={task.answer_tokens} = {length} prompt "
                       f"tokens: {e}") from None
    answer = answer_tokens(ex, self._tokenizer)
    if len(ex.prompt) + len(answer) > cfg.seq_len:
      raise ValueError(f"TaskConfig.answer_tokens={task.answer_tokens}: an answer of task "
                       f"{cfg.task_name!r} takes {len(answer)} tokens; raise it to at least "
                       f"{len(answer)}")
    return answer_row(ex.prompt, answer, cfg.seq_len)


def _rows(cfg: DataConfig, tokenizer, split: int, size: int) -> TaskRows:
  rows = TaskRows(cfg, tokenizer, split, size)
  for i in range(min(_CHECKED_ROWS, size)):
    rows[i]  # bad settings (a prompt or answer that does not fit) fail here, before compiling
  return rows


def train_iterator(cfg: DataConfig, tokenizer, *, shard_index: int,
                   shard_count: int) -> grain.DatasetIterator:
  """Infinite batches of training rows; this shard takes rows shard_index, + shard_count, ..."""
  size = cfg.task.train_examples or _UNLIMITED
  dataset = grain.MapDataset.source(_rows(cfg, tokenizer, TRAIN, size))
  if cfg.task.train_examples:
    dataset = dataset.shuffle(seed=cfg.seed).repeat()
  batches = dataset[shard_index::shard_count].batch(cfg.batch_size // shard_count,
                                                    drop_remainder=True)
  return packing.JsonStateIterDataset(batches.to_iter_dataset()).__iter__()


def eval_batches(cfg: DataConfig, tokenizer, num_batches: int) -> list[dict[str, np.ndarray]]:
  """num_batches batches of held-out rows (split 1: seeds no training row has)."""
  source = _rows(cfg, tokenizer, EVAL, num_batches * cfg.batch_size)
  rows = [source[i] for i in range(len(source))]  # each row made once
  return [{k: np.stack([r[k] for r in rows[b * cfg.batch_size:(b + 1) * cfg.batch_size]])
           for k in rows[0]} for b in range(num_batches)]
