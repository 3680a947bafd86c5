"""Training rows made by evaluation tasks (DataConfig.source = 'task:<name>', lctx/data/tasks.py):
MQAR rows and their loss weights, answer-only rows of text tasks, determinism under sharding and
resume, the fixed training set, gin bindings, and the errors that name the setting."""

import numpy as np
import pytest

from lctx import data as data_lib
from lctx.data import ByteTokenizer, DataConfig
from lctx.data.config import TaskConfig
from lctx.data.tasks import answer_tokens
from lctx.evals import synthetic
from lctx.evals.tasks import make_example
from lctx.model import init_params

TOK = ByteTokenizer()
MQAR = DataConfig(source="task:mqar", seq_len=64, batch_size=4, task=TaskConfig(pairs=4))


def test_mqar_rows_weigh_the_queries_only():
  batch = next(data_lib.train_iterator(MQAR, TOK))
  assert batch["tokens"].shape == batch["weights"].shape == (4, 64)
  for tokens, targets, weights in zip(batch["tokens"], batch["targets"], batch["weights"]):
    context = dict(zip(tokens[0:8:2], tokens[1:8:2]))  # k1 v1 ... k4 v4
    assert all(1 <= k < 128 <= v < 256 for k, v in context.items())
    queries = np.flatnonzero(weights)
    assert len(queries) == 4 and set(weights) == {0.0, 1.0}
    # Each weighted position holds a key of the context again; its target is that key's value.
    for q in queries:
      assert q >= 8 and tokens[q] in context and targets[q] == context[tokens[q]]
    assert sorted(tokens[queries]) == sorted(context)
    assert (tokens[8:][weights[8:] == 0] == 0).all()  # zeros elsewhere (random_non_queries off)
  np.testing.assert_array_equal(batch["segment_ids"], 1)
  np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(64), (4, 64)))


def test_rows_are_fixed_by_seed_shard_and_resume():
  it = data_lib.train_iterator(MQAR, TOK)
  first = [next(it) for _ in range(2)]
  # Shard 1 of 2 takes the global rows 1, 3, 5, ... of the same stream.
  shard = data_lib.train_iterator(MQAR, TOK, shard_index=1, shard_count=2)
  rows = np.concatenate([b["tokens"] for b in first])
  np.testing.assert_array_equal(next(shard)["tokens"], rows[1:4:2])
  state = it.get_state()
  third = next(it)
  again = data_lib.train_iterator(MQAR, TOK)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["tokens"], third["tokens"])
  # Held-out rows come from other seeds than training rows.
  evals = data_lib.eval_batches(MQAR, TOK, 2)
  assert len(evals) == 2 and not np.array_equal(evals[0]["tokens"], first[0]["tokens"])
  np.testing.assert_array_equal(evals[0]["tokens"], data_lib.eval_batches(MQAR, TOK, 1)[0]["tokens"])
  reseeded = data_lib.train_iterator(DataConfig(**{**MQAR.__dict__, "seed": 1}), TOK)
  assert not np.array_equal(next(reseeded)["tokens"], first[0]["tokens"])


def test_fixed_training_set_repeats_in_new_orders():
  cfg = DataConfig(source="task:mqar", seq_len=32, batch_size=4,
                   task=TaskConfig(pairs=2, train_examples=8))
  it = data_lib.train_iterator(cfg, TOK)
  epochs = [np.concatenate([next(it)["tokens"] for _ in range(2)]) for _ in range(3)]
  as_set = lambda rows: sorted(map(bytes, rows.astype(np.int32)))
  assert len(set(as_set(epochs[0]))) == 8  # eight distinct examples
  assert as_set(epochs[0]) == as_set(epochs[1]) == as_set(epochs[2])
  assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])  # reshuffled per epoch


def test_text_task_rows_train_on_the_answer_only():
  cfg = DataConfig(source="task:passkey", seq_len=160, batch_size=2,
                   task=TaskConfig(answer_tokens=8, depth_min=0.2, depth_max=0.6))
  batch = next(data_lib.train_iterator(cfg, TOK))
  for tokens, seg, pos, targets, weights in zip(*(batch[k] for k in (
      "tokens", "segment_ids", "positions", "targets", "weights"))):
    n = int(seg.sum())
    assert n == 160 - 8 + 7  # the prompt, then " " + the 5-digit key + "."; padding after
    text = TOK.decode(tokens[:n])
    assert text.count("Remember it.") == 1  # one needle
    key = text.split("The pass key is ")[1][:5]
    assert text.endswith(f"\nWhat is the pass key? The pass key is {key}.")
    assert TOK.decode(targets[weights > 0]) == f" {key}."  # exactly the answer is weighted
    assert np.flatnonzero(weights).tolist() == list(range(160 - 8 - 1, n - 1))
    assert (tokens[n:] == 0).all() and (pos[n:] == 0).all()
    np.testing.assert_array_equal(pos[:n], np.arange(n))
    # The needle sits within the configured depth range of the context.
    at = text.index("The pass key is") / text.index("\nWhat is")
    assert 0.15 <= at <= 0.65, at


def test_multi_answer_tasks_join_their_references():
  ex = make_example("niah_multivalue", TOK, 600, depth=0.5, seed=0)
  assert TOK.decode(answer_tokens(ex, TOK)) == " " + ", ".join(ex.answer_texts) + "."
  ex = make_example("selective_copy", TOK, 64, seed=0)
  np.testing.assert_array_equal(answer_tokens(ex, TOK), ex.answers[0])


def test_task_loss_is_the_weighted_cross_entropy():
  import jax
  import jax.numpy as jnp

  from lctx.config import ModelConfig
  from lctx.model import DecoderLM
  from lctx.steps import loss_sums

  model = DecoderLM(ModelConfig(d_model=16, num_layers=1, d_ff=32))
  params = init_params(model, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  batch = data_lib.eval_batches(MQAR, TOK, 1)[0]
  _, sums = loss_sums(model, params, batch)
  logp = jax.nn.log_softmax(model.apply({"params": params}, batch["tokens"]), -1)
  b, t = np.nonzero(batch["weights"])
  expected = -np.asarray(logp)[b, t, batch["targets"][b, t]].sum()
  assert float(sums["tokens"]) == 16.0
  np.testing.assert_allclose(float(sums["ce"]), expected, rtol=1e-5)


def test_gin_binds_the_task_settings():
  from experiments.run import load_configs

  configs = load_configs(["gin/quickstart.gin", "gin/data/mqar.gin"],
                         ["TaskConfig.pairs = 6", "TaskConfig.power_a = 0.1"])
  data = configs["data"]
  assert data.task_name == "mqar" and data.seq_len == 64
  assert data.task == TaskConfig(pairs=6, vocab=256, power_a=0.1, train_examples=20000)


@pytest.mark.parametrize("kwargs, match", [
    (dict(source="task:nope"), r"DataConfig\.source='task:nope': unknown task.*mqar"),
    (dict(source="task:mqar", seq_len=64, task=TaskConfig(pairs=20)),
     r"mqar: 4 \* pairs=80 must be at most length=64"),
    (dict(source="task:mqar", seq_len=256), r"mqar: vocab=256 must exceed length=256"),
    (dict(source="task:niah_multivalue", seq_len=600),
     r"TaskConfig\.answer_tokens=16: an answer of task 'niah_multivalue' takes 36 tokens"),
    (dict(source="task:passkey", seq_len=64),
     r"DataConfig\.seq_len=64 - TaskConfig\.answer_tokens=16 = 48 prompt tokens: task "
     r"'passkey': length=48 is below"),
    (dict(source="task:passkey", seq_len=16), r"TaskConfig\.answer_tokens=16 leaves no room"),
])
def test_bad_task_settings_name_the_setting(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data_lib.train_iterator(DataConfig(batch_size=2, **kwargs), TOK)


@pytest.mark.parametrize("kwargs, match", [
    (dict(pairs=0), r"TaskConfig\.pairs: must be >= 1"),
    (dict(depth_min=0.7, depth_max=0.2), r"TaskConfig\.depth_min=0\.7, depth_max=0\.2"),
    (dict(power_a=0.0), r"TaskConfig\.power_a"),
    (dict(train_examples=-1), r"TaskConfig\.train_examples: must be >= 0"),
])
def test_task_config_checks(kwargs, match):
  with pytest.raises(ValueError, match=match):
    TaskConfig(**kwargs)


def test_training_on_mqar_through_the_entry_point(tmp_path):
  """`experiments.run` trains on task:mqar and reports the queries' accuracy; a model vocabulary
  below the task's is refused before anything compiles."""
  from tests import cli

  code, out, err = cli.run_in_process(tmp_path / "small", "--gin_file=gin/data/mqar.gin",
                                      "--gin.TaskConfig.vocab=512")
  assert code == 2 and "ModelConfig.vocab_size=256 is smaller than the vocabulary of " \
      "DataConfig.source='task:mqar' (512, TaskConfig.vocab)" in err
  code, out, err = cli.run_in_process(tmp_path / "run", "--gin_file=gin/data/mqar.gin",
                                      "--gin.SEQ_LEN=32", "--gin.TaskConfig.pairs=2",
                                      "--gin.STEPS=8")
  assert code == 0, err[-2000:]
  import csv
  with open(tmp_path / "run" / "metrics.csv", newline="") as f:
    evals = [r for r in csv.DictReader(f) if r["kind"] == "eval"]
  accuracy = float(evals[-1]["eval_accuracy"])
  assert 0.0 <= accuracy <= 1.0 and evals[-1]["eval_loss"]
