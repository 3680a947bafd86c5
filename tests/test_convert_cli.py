"""experiments.convert and TrainConfig.init_from: import a Hugging Face directory into a workdir,
generate from it, train from it in two stages, and export it back.

The model is the tiny Qwen2 fixture of tests/data/hf (tied embeddings, biases, yarn RoPE,
bfloat16 tensors, a character tokenizer of 73 ids for its 96 embedding rows).
"""

import os

import jax
import numpy as np
import pytest

from experiments import convert
from experiments.run import load_configs, main as run_main
from lctx.checkpoint import Checkpointer
from lctx.convert import hf
from lctx.init_from import initial_state
from lctx.optim import make_optimizer
from lctx.state import build
from sharding.mesh import make_mesh
from tests import cli

QWEN2 = os.path.join(os.path.dirname(__file__), "data", "hf", "qwen2")
RUN = ["--gin.DataConfig.seq_len=32", "--gin.DataConfig.batch_size=2",
       "--gin.TrainConfig.progress_bar=False", "--gin.TrainConfig.unigram_batches=2",
       "--gin.TrainConfig.eval_batches=1", "--gin.TrainConfig.log_every=1",
       "--gin.OptimizerConfig.warmup_steps=1"]


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_trees_equal(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("imported"))
  code, out, err = cli.call(convert.main, [f"--from_hf={QWEN2}", f"--workdir={workdir}"])
  assert code == 0, err
  assert "imported 21,792 parameters (bfloat16)" in out
  return workdir


def _configs(gin_file, *bindings):
  return load_configs([gin_file], list(bindings))


def test_import_writes_checkpoint_model_gin_and_tokenizer(imported):
  cfg, params = hf.load_pretrained(QWEN2)
  configs = _configs(os.path.join(imported, "model.gin"))
  assert configs["model"] == cfg
  assert configs["data"].tokenizer == os.path.join(imported, "tokenizer.json")
  assert os.path.exists(os.path.join(imported, "tokenizer.json"))
  m = build(cfg, make_mesh(configs["mesh"]), make_optimizer(configs["optimizer"], 10)[0])
  ckpt = Checkpointer(os.path.join(imported, "checkpoints"))
  try:
    assert ckpt.all_steps() == [0]
    _assert_trees_equal(ckpt.restore_params(m.abstract_params, 0), params)
  finally:
    ckpt.close()


def test_generate_from_the_import_and_training_in_place_is_refused(imported):
  gin = f"--gin_file={os.path.join(imported, 'model.gin')}"
  code, out, err = cli.call(run_main, [gin, f"--workdir={imported}",
                                       "--gin.RunConfig.mode=generate",
                                       "--gin.GenerateConfig.max_new_tokens=4",
                                       "--gin.GenerateConfig.prompt='Hi'"])
  assert code == 0, err
  assert "checkpoint step 0" in out
  code, out, err = cli.call(run_main, [gin, f"--workdir={imported}", *RUN])
  assert code == 2
  assert "holds parameters only" in err and f"init_from={imported}" in err


def test_init_from_reads_hf_directories_and_carries_optimizer_state(imported, tmp_path):
  gin = os.path.join(imported, "model.gin")
  # A Hugging Face directory directly, with a raised RoPE base (no parameter changes).
  configs = _configs(gin, "AttentionConfig.rope_base = 5e6")
  tx, _ = make_optimizer(configs["optimizer"], 10)
  m = build(configs["model"], make_mesh(configs["mesh"]), tx)
  state = initial_state(m, configs["model"], QWEN2, False)
  _assert_trees_equal(state["params"], hf.load_pretrained(QWEN2)[1])
  assert int(state["step"]) == 0

  # Stage 1 trains from the converted workdir; stage 2 carries its optimizer state.
  stage1 = str(tmp_path / "stage1")
  code, out, err = cli.call(run_main, [f"--gin_file={gin}", f"--workdir={stage1}", *RUN,
                                       f"--gin.TrainConfig.init_from={imported}",
                                       "--gin.TrainConfig.steps=2"])
  assert code == 0, err
  assert f"Initialised the parameters from {imported} step 0" in out
  ckpt = Checkpointer(os.path.join(stage1, "checkpoints"))
  try:
    last, _ = ckpt.restore(m.abstract_state, 2)
  finally:
    ckpt.close()
  carried = initial_state(m, configs["model"], f"{stage1}@2", True)
  assert int(carried["step"]) == 0
  _assert_trees_equal(carried["params"], last["params"])
  counts = []

  def check(path, a, b):
    if "count" in jax.tree_util.keystr(path):
      counts.append((jax.tree_util.keystr(path), int(a), int(b)))
    else:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  jax.tree_util.tree_map_with_path(check, carried["opt_state"], last["opt_state"])
  # AdamW's bias-correction count continues; the learning-rate schedule's restarts.
  assert sorted((a, b) for _, a, b in counts) == [(0, 2), (2, 2)]

  stage2 = str(tmp_path / "stage2")
  code, out, err = cli.call(run_main, [f"--gin_file={gin}", f"--workdir={stage2}", *RUN,
                                       f"--gin.TrainConfig.init_from={stage1}",
                                       "--gin.TrainConfig.init_optimizer_state=True",
                                       "--gin.TrainConfig.steps=1"])
  assert code == 0, err
  assert f"parameters and optimizer state from {stage1} step 2" in out

  # Export the stage-2 model (its operative config.gin) and read it back.
  out_dir = str(tmp_path / "hf_out")
  code, out, err = cli.call(convert.main, [f"--to_hf={out_dir}", f"--workdir={stage2}"])
  assert code == 0, err
  assert "exported step 1" in out
  assert os.path.exists(os.path.join(out_dir, "tokenizer.json")) is False  # stage2 has none
  ckpt = Checkpointer(os.path.join(stage2, "checkpoints"))
  try:
    trained = ckpt.restore_params(m.abstract_params, 1)
  finally:
    ckpt.close()
  _assert_trees_equal(hf.load_pretrained(out_dir)[1], trained)


def test_init_from_and_convert_errors_name_the_setting(imported, tmp_path):
  gin = f"--gin_file={os.path.join(imported, 'model.gin')}"
  empty = tmp_path / "empty"
  empty.mkdir()
  code, _, err = cli.call(run_main, [gin, f"--workdir={tmp_path / 'a'}", *RUN,
                                     f"--gin.TrainConfig.init_from={empty}"])
  assert code == 2 and "TrainConfig.init_from" in err and "neither config.json" in err
  code, _, err = cli.call(run_main, [gin, f"--workdir={tmp_path / 'b'}", *RUN,
                                     f"--gin.TrainConfig.init_from={imported}@7"])
  assert code == 2 and "holds steps [0], not 7" in err
  code, _, err = cli.call(run_main, [gin, f"--workdir={tmp_path / 'c'}", *RUN,
                                     "--gin.TrainConfig.init_optimizer_state=True"])
  assert code == 2 and "init_optimizer_state=True needs TrainConfig.init_from" in err
  code, _, err = cli.call(run_main, ["--gin_file=gin/models/tiny.gin",
                                     f"--workdir={tmp_path / 'd'}", *RUN,
                                     f"--gin.TrainConfig.init_from={QWEN2}"])
  assert code == 2 and "do not fit the configured model" in err
  code, _, err = cli.call(convert.main, [f"--from_hf={tmp_path}", f"--workdir={tmp_path / 'e'}"])
  assert code == 2 and "config.json: no such file" in err
  code, _, err = cli.call(convert.main, [f"--from_hf={QWEN2}", f"--workdir={imported}"])
  assert code == 2 and "already holds checkpoints" in err
