"""Dense-to-hybrid conversion (lctx/convert/hybrid.py, experiments.convert --to_layout)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import convert
from experiments.run import load_configs
from lctx.convert import hf, hybrid
from lctx.model import DecoderLM
from tests import cli

DATA = os.path.join(os.path.dirname(__file__), "data", "hf")


def _layout(path, depth):
  return load_configs([path], [f"ModelConfig.num_layers = {depth}"])["model"]


def _flat(tree):
  return {jax.tree_util.keystr(p, simple=True, separator="/"): x
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_spikingbrain_layout_reuses_every_dense_tensor_bit_exactly():
  dense, params = hf.load_pretrained(os.path.join(DATA, "qwen2"))
  cfg = hybrid.hybrid_config(dense, _layout("gin/models/spikingbrain_7b.gin", 2), "layout")
  assert cfg.layer_mixers() == ("gla", "swa")
  gla, swa = cfg.mixer_config("gla"), cfg.mixer_config("swa")
  att = dense.mixer_config("attention")
  assert (gla.num_heads, gla.kv_heads, gla.head_dim, gla.qkv_bias) == (4, 2, 8, True)
  assert gla.gate_per_kv_head and gla.feature_map == "relu"  # from the layout
  assert swa.window == 4096 and swa.rope_scaling == att.rope_scaling
  assert (cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.tie_embeddings) == (96, 32, 64, True)
  out, new = hybrid.convert_params(dense, params, cfg)
  assert sorted(new) == ["layer_0/mixer/gate_bias", "layer_0/mixer/gate_down",
                         "layer_0/mixer/gate_up", "layer_0/mixer/o_norm/scale"]
  flat, src = _flat(out), _flat(params)
  for path, value in src.items():
    assert flat[path].dtype == value.dtype
    np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(value), err_msg=path)
  # SpikingBrain's new-layer init: xavier-uniform with gain 2^-2.5, zero gate bias, unit norm.
  up = np.asarray(flat["layer_0/mixer/gate_up"], np.float32)  # [16, kv heads, d]
  bound = 2 ** -2.5 * (6 / (16 + 2 * 8)) ** 0.5
  assert 0.5 * bound < np.abs(up).max() <= bound * 1.01
  assert not np.asarray(flat["layer_0/mixer/gate_bias"], np.float32).any()
  np.testing.assert_array_equal(np.asarray(flat["layer_0/mixer/o_norm/scale"], np.float32), 1.0)
  # The converted model runs.
  logits = DecoderLM(cfg).apply({"params": out}, jnp.zeros((1, 8), jnp.int32))
  assert np.isfinite(np.asarray(logits)).all()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("convert") / "hybrid")
  code, out, err = cli.call(convert.main, [f"--from_hf={os.path.join(DATA, 'qwen2')}",
                                           "--to_layout=gin/models/spikingbrain_7b.gin",
                                           f"--workdir={workdir}"])
  assert code == 0, err
  assert "mixers ('gla', 'swa'); new parameters: layer_0/mixer/gate_bias" in out
  return workdir


def test_convert_cli_writes_a_hybrid_workdir_that_generates(converted):
  workdir = converted
  configs = load_configs([os.path.join(workdir, "model.gin")], [])
  assert configs["model"].layer_mixers() == ("gla", "swa")
  dense, _ = hf.load_pretrained(os.path.join(DATA, "qwen2"))
  assert configs["transfer"].teacher == dense.mixer_config("attention")
  from experiments.run import main as run_main
  code, _, err = cli.call(run_main, [f"--gin_file={os.path.join(workdir, 'model.gin')}",
                                        f"--workdir={workdir}", "--gin.RunConfig.mode=generate",
                                        "--gin.GenerateConfig.max_new_tokens=3",
                                        "--gin.GenerateConfig.prompt='Hi'"])
  assert code == 0, err


def test_layouts_that_do_not_fit_are_named():
  dense, params = hf.load_pretrained(os.path.join(DATA, "llama"))
  with pytest.raises(hybrid.LayoutError, match="lay.gin: the layout has 3 layers, the imported "
                                               "model 2"):
    hybrid.hybrid_config(dense, _layout("gin/models/tiny.gin", 3), "lay.gin")
  gdn = load_configs(["gin/models/tiny.gin"], ["ModelConfig.num_layers = 2",
                                               "ModelConfig.mixers = ('gated_deltanet', "
                                               "'attention')"])["model"]
  with pytest.raises(hybrid.LayoutError, match=r"mixers \['gated_deltanet'\] cannot reuse"):
    hybrid.hybrid_config(dense, gdn, "lay.gin")
  qwen3, _ = hf.load_pretrained(os.path.join(DATA, "qwen3"))
  with pytest.raises(hybrid.LayoutError, match="q/k norms"):
    hybrid.hybrid_config(qwen3, _layout("gin/models/spikingbrain_7b.gin", 2), "lay.gin")


def test_attention_transfer_trains_only_new_parameters_and_lowers_the_layer_error(converted,
                                                                                   tmp_path):
  from experiments.run import main as run_main
  from lctx import transfer
  from lctx.checkpoint import Checkpointer
  from lctx.data import eval_batches

  gin = os.path.join(converted, "model.gin")
  run = [f"--gin_file={gin}", "--gin.DataConfig.seq_len=32", "--gin.DataConfig.batch_size=4",
         "--gin.TrainConfig.progress_bar=False", "--gin.TrainConfig.unigram_batches=1",
         "--gin.TrainConfig.eval_batches=1", "--gin.TrainConfig.log_every=1",
         "--gin.OptimizerConfig.warmup_steps=1", "--gin.OptimizerConfig.learning_rate=1e-2",
         "--gin.TrainConfig.steps=12", "--gin.RunConfig.mode=attention_transfer"]
  # Without a converted model to start from, the mode refuses before anything runs.
  code, _, err = cli.call(run_main, [f"--workdir={tmp_path / 'no_init'}", *run])
  assert code == 2 and "set TrainConfig.init_from to the converted workdir" in err

  workdir = str(tmp_path / "transfer")
  code, out, err = cli.call(run_main, [f"--workdir={workdir}", *run,
                                       f"--gin.TrainConfig.init_from={converted}"])
  assert code == 0, err
  assert "per-layer MSE to the softmax teacher" in out
  configs = load_configs([gin], ["DataConfig.seq_len = 32", "DataConfig.batch_size = 4"])
  student = configs["model"]
  teacher = transfer.teacher_config(student, configs["transfer"])
  assert teacher.layer_mixers() == ("attention", "attention")
  labeler = transfer.param_labeler(student, teacher)
  import optax
  from lctx.state import build
  from sharding.mesh import make_mesh
  abstract = build(student, make_mesh(configs["mesh"]), optax.identity()).abstract_params

  def restore(directory, step):
    ckpt = Checkpointer(os.path.join(directory, "checkpoints"))
    try:
      return ckpt.restore_params(abstract, step)
    finally:
      ckpt.close()

  before, after = restore(converted, 0), restore(workdir, 12)
  marks = _flat(labeler(before))
  flat_before, flat_after = _flat(before), _flat(after)
  trained = sorted(k for k, v in marks.items() if v == transfer.TRAINED)
  assert trained == ["layer_0/mixer/gate_bias", "layer_0/mixer/gate_down",
                     "layer_0/mixer/gate_up", "layer_0/mixer/o_norm/scale"]
  for key, mark in marks.items():
    same = np.array_equal(np.asarray(flat_before[key]), np.asarray(flat_after[key]))
    assert same == (mark == transfer.FROZEN), key
  batch = eval_batches(configs["data"], configs["data"].tokenizer, 1)[0]
  err0 = transfer.layer_errors(student, teacher, before, labeler, batch)
  err1 = transfer.layer_errors(student, teacher, after, labeler, batch)
  assert list(err0) == [0] and err1[0] < 0.9 * err0[0], (err0, err1)


def test_conversion_composes_with_upcycling_to_moe(tmp_path):
  from layers.moe import upcycle_scale
  layout = tmp_path / "moe_layout.gin"
  layout.write_text("include 'gin/models/spikingbrain_7b.gin'\n"
                    "MoEConfig.enabled = True\nMoEConfig.num_experts = 4\n"
                    "MoEConfig.dense_layers = [0]\n")
  dense, params = hf.load_pretrained(os.path.join(DATA, "qwen2"))
  cfg = hybrid.hybrid_config(dense, _layout(str(layout), 2), "layout")
  assert cfg.moe.enabled and cfg.uses_moe(1) and not cfg.uses_moe(0)
  out, new = hybrid.convert_params(dense, params, cfg)
  assert "mlp" in out["layer_0"] and "mlp" not in out["layer_1"]
  alpha = upcycle_scale(cfg.moe)
  experts = _flat(out["layer_1"]["moe"])
  dense_up = np.asarray(params["layer_1"]["mlp"]["up"])
  ups = [v for k, v in experts.items() if k.endswith("up")]
  assert ups and all(np.allclose(np.asarray(u)[..., :, :].reshape(-1, *dense_up.shape),
                                 alpha * dense_up) for u in ups)
  logits = DecoderLM(cfg).apply({"params": out}, jnp.zeros((1, 8), jnp.int32))
  assert np.isfinite(np.asarray(logits)).all()
  wide = tmp_path / "wide.gin"
  wide.write_text(layout.read_text() + "MoEConfig.d_expert = 128\n")
  with pytest.raises(hybrid.LayoutError, match="d_expert=128 differs from the dense FFN width 64"):
    hybrid.hybrid_config(dense, _layout(str(wide), 2), "layout")
