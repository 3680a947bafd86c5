"""Long-context continued pretraining: the gin/cpt recipes and the tiny two-stage chain."""

import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
from flax import linen as nn
import pytest

from experiments import convert
from experiments.run import load_configs
from experiments.run import main as run_main
from lctx.convert import hf
from lctx.model import DecoderLM, init_params
from tests import cli

MODEL = "gin/models/tiny.gin"


def test_published_recipes_hold_their_settings():
  s1 = load_configs([MODEL, "gin/cpt/prolong_64k.gin"], [])
  att = s1["model"].mixer_config("attention")
  assert att.rope_base == 8e6 and att.rope_scaling is None
  assert s1["data"].seq_len * s1["data"].batch_size == 64 * 65536  # 4M tokens per step
  assert [s.name for s in s1["data"].mixture] == ["code repositories", "books", "textbooks",
                                                   "short data"]
  assert s1["data"].mixture_weights == pytest.approx((0.30, 0.30, 0.03, 0.37))
  opt, train = s1["optimizer"], s1["train"]
  assert (opt.learning_rate, opt.end_lr_fraction, opt.b1, opt.b2, opt.weight_decay,
          opt.clip_norm) == (1e-5, 0.1, 0.9, 0.95, 0.1, 1.0)
  assert train.steps == 5000 and opt.warmup_steps == 500 and train.init_from

  s2 = load_configs([MODEL, "gin/cpt/prolong_512k.gin"], [])
  assert s2["model"].mixer_config("attention").rope_base == 1.28e8
  assert s2["data"].seq_len * s2["data"].batch_size == 16 * 524288  # 8M tokens per step
  lengths = {s.name: (s.segment_len(s2["data"].seq_len), s.weight) for s in s2["data"].mixture}
  assert lengths == {"code repositories at 512K": (524288, 15), "code repositories at 64K":
                     (65536, 15), "books at 512K": (524288, 5), "books at 64K": (65536, 25),
                     "short data": (524288, 40)}
  assert s2["train"].steps == 2500 and s2["train"].init_optimizer_state
  assert s2["optimizer"].learning_rate == 5e-6 and s2["mesh"].seq == 8
  assert s2["model"].sequence_parallel.enabled

  abf = load_configs([MODEL, "gin/cpt/llama2_long_abf.gin"], [])
  assert abf["model"].mixer_config("attention").rope_base == 5e5
  assert abf["data"].seq_len == 32768

  for stage in ("tiny_prolong_64k", "tiny_prolong_512k"):  # the twins keep the mix shape
    twin = load_configs([MODEL, f"gin/cpt/{stage}.gin"], [])["data"]
    published = (s1 if stage.endswith("64k") else s2)["data"]
    assert len(twin.mixture) == len(published.mixture) - (1 if stage.endswith("64k") else 0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A small Llama written as a Hugging Face directory and imported (experiments.convert)."""
  tmp = tmp_path_factory.mktemp("cpt")
  cfg = load_configs([MODEL], ["ModelConfig.d_model = 32", "ModelConfig.num_layers = 2",
                               "ModelConfig.d_ff = 64"])["model"]
  params = nn.unbox(init_params(DecoderLM(cfg), jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
  hf.save_pretrained(str(tmp / "hf"), cfg, params)
  imported = str(tmp / "imported")
  code, _, err = cli.call(convert.main, [f"--from_hf={tmp / 'hf'}", f"--workdir={imported}"])
  assert code == 0, err
  return tmp, imported


# The twins at test size: short rows, few steps, segments cut at a quarter row.
COMMON = ["--gin.TrainConfig.progress_bar=False", "--gin.TrainConfig.unigram_batches=2",
          "--gin.TrainConfig.eval_batches=1", "--gin.TrainConfig.log_every=2"]
STAGE1 = ["--gin_file=gin/cpt/tiny_prolong_64k.gin", "--gin.DataConfig.seq_len=32",
          "--gin.DataConfig.batch_size=2", "--gin.STEPS=4", "--gin.TrainConfig.eval_every=4",
          "--gin.OptimizerConfig.warmup_steps=1"]
STAGE2 = ["--gin_file=gin/cpt/tiny_prolong_512k.gin", "--gin.DataConfig.seq_len=64",
          "--gin.DataConfig.batch_size=2", "--gin.STEPS=48",
          "--gin.TrainConfig.checkpoint_every=8", "--gin.TrainConfig.eval_every=24",
          "--gin.code_short/SourceConfig.seq_len=16", "--gin.books_short/SourceConfig.seq_len=16"]


def test_two_stage_chain_and_a_sigkill_in_stage_two_resumes_exactly(base, tmp_path):
  tmp, imported = base
  model = f"--gin_file={os.path.join(imported, 'model.gin')}"
  stage1 = str(tmp_path / "stage1")
  code, out, err = cli.call(run_main, [model, f"--workdir={stage1}", *STAGE1, *COMMON,
                                       f"--gin.BASE={imported}"])
  assert code == 0, err
  assert f"Initialised the parameters from {imported} step 0" in out

  def stage2(workdir):
    return [sys.executable, "-m", "experiments.run", model, f"--workdir={workdir}", *STAGE2,
            *COMMON, f"--gin.STAGE1={stage1}"]

  reference = str(tmp_path / "reference")
  proc = subprocess.run(stage2(reference), cwd=cli.ROOT, env=cli.env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"parameters and optimizer state from {stage1} step 4" in proc.stdout

  resumed = str(tmp_path / "resumed")
  finished = cli.kill_after_checkpoint(stage2(resumed), resumed, 16,
                                       random.Random(0).uniform(0.0, 0.3))
  assert not finished, "stage 2 ended before it could be killed; the test proves nothing"
  latest = max(int(s) for s in os.listdir(os.path.join(resumed, "checkpoints")) if s.isdigit())
  assert 16 <= latest < 48
  proc = subprocess.run(stage2(resumed), cwd=cli.ROOT, env=cli.env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Resuming from the checkpoint at step" in proc.stdout
  assert "Initialised" not in proc.stdout  # the resumed run does not re-read stage 1
  cli.assert_same_metrics(reference, resumed)
