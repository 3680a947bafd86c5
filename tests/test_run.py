"""The entry point: gin errors, the operative config, and the train / eval / generate modes."""

import csv
import json
import logging
import os

import pytest

from experiments.run import binding_from_flag, load_configs, raised_in_project
from lctx import workdir as workdir_lib
from tests import cli


def test_flag_values_become_gin_bindings():
  assert binding_from_flag("RunConfig.mode", "generate") == "RunConfig.mode = 'generate'"
  assert binding_from_flag("X.y", "3") == "X.y = 3"
  assert binding_from_flag("X.y", "'s'") == "X.y = 's'"
  assert binding_from_flag("X.y", "None") == "X.y = None"
  assert binding_from_flag("X.y", "[1, 2]") == "X.y = [1, 2]"
  assert binding_from_flag("X.y", "@AttentionConfig()") == "X.y = @AttentionConfig()"
  assert binding_from_flag("X.y", "%SEQ_LEN") == "X.y = %SEQ_LEN"
  assert binding_from_flag("X.y", "1e-3") == "X.y = 1e-3"
  assert binding_from_flag("X.y", "-1") == "X.y = -1"
  # Not gin syntax, so strings: absolute paths and parallel-hybrid mixer names need no quotes.
  assert binding_from_flag("DataConfig.tokenizer", "/abs/tok.json") == \
      "DataConfig.tokenizer = '/abs/tok.json'"
  assert binding_from_flag("ModelConfig.mixers", "gla+swa") == "ModelConfig.mixers = 'gla+swa'"


def test_unquoted_flag_values_build_the_configs():
  configs = load_configs(["gin/quickstart.gin"], [
      ("--gin.ModelConfig.mixers=gla+swa", binding_from_flag("ModelConfig.mixers", "gla+swa")),
      ("--gin.DataConfig.paths=/data/a.jsonl",
       binding_from_flag("DataConfig.paths", "/data/a.jsonl"))])
  assert configs["model"].mixers == ("gla+swa",)
  assert configs["data"].paths == ("/data/a.jsonl",)


def test_a_binding_for_an_unused_mixer_warns(caplog):
  with caplog.at_level(logging.WARNING, logger="lctx"):
    load_configs(["gin/quickstart.gin"], ["GLAConfig.chunk_size = 32"])
  assert ("GLAConfig.chunk_size bound but unused: no layer uses the gla mixer "
          "(ModelConfig.mixers=['attention'])") in caplog.text


def test_unusable_workdirs_are_named(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(ValueError, match="is a file, not a directory"):
    workdir_lib.prepare(str(afile))
  with pytest.raises(ValueError, match=f"{afile} is a file, so no directory can be made under it"):
    workdir_lib.prepare(str(afile / "sub"))
  with pytest.raises(ValueError, match="is not writable"):  # not even root may write in /proc
    workdir_lib.prepare("/proc/lctx_workdir")
  code, _, stderr = cli.run_in_process(afile)
  assert code == 2 and f"--workdir={afile}: {afile} is a file" in stderr


def test_library_errors_are_runtime_failures_and_project_checks_are_not():
  try:
    json.loads("{not json")
  except ValueError as e:
    assert not raised_in_project(e)
  try:
    workdir_lib.prepare("/proc/lctx_workdir")
  except ValueError as e:
    assert raised_in_project(e)


@pytest.mark.parametrize("extra,message", [
    (["--gin.TrainConfig.stepz=3"], "Configurable 'TrainConfig' doesn't have a parameter named "
                                    "'stepz'"),
    (["--gin.NoSuchConfig.x=3"], "No configurable matching 'NoSuchConfig'"),
    (["--gin.ModelConfig.d_model=-4"], "ModelConfig.d_model must be >= 1"),
    (["--gin.OptimizerConfig.learning_rate=fast"], "OptimizerConfig.learning_rate='fast' must "
                                                   "be float"),
    (["--gin.AttentionConfig.num_kv_heads=3"], "AttentionConfig.num_kv_heads=3 must be >= 1 "
                                               "and divide"),
    (["--gin.RunConfig.mode=serve"], "RunConfig.mode='serve': allowed values"),
    (["--gin.MeshConfig.data=3"], "MeshConfig(data, fsdp, seq, tensor)=(3, 1, 1, 1) does not "
                                  "divide the 1 available devices"),
    (["--gin_file=gin/nope.gin"], "--gin_file=gin/nope.gin: no such file"),
    (["--gin.DataConfig.source=jsonl", "--gin.DataConfig.paths=['/no/such.jsonl']"],
     "/no/such.jsonl"),
    (["--gin.OptimizerConfig.learning_rate=1e400"], "OptimizerConfig.learning_rate=inf must be "
                                                    "a finite number"),
    (["--gin.ModelConfig.mixers=[attention"], "--gin.ModelConfig.mixers=[attention: gin cannot "
                                              "use it as `ModelConfig.mixers = [attention`"),
    (["--gin.ModelConfig.d_model=40", "--gin.AttentionConfig.num_heads=8",
      "--gin.AttentionConfig.num_kv_heads=8"],
     "head_dim = ModelConfig.d_model=40 / AttentionConfig.num_heads=8 = 5 is odd"),
])
def test_bad_settings_exit_with_a_message_naming_them(tmp_path, extra, message):
  # In this process: every one of these stops before anything is compiled (an exception escaping
  # main, the in-process form of a traceback, fails the test).
  code, _, stderr = cli.run_in_process(tmp_path / "w", *extra)
  assert code == 2, stderr[-2000:]
  assert message in stderr, stderr[-2000:]
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_bad_setting_exits_with_status_2_from_the_command_line(tmp_path):
  proc = cli.run(tmp_path / "w", "--gin.ModelConfig.d_model=-4", timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "lctx: configuration error: ModelConfig.d_model must be >= 1" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  proc = cli.run(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc.stdout


def test_train_writes_config_metrics_and_checkpoints(trained):
  workdir, stdout = trained
  config = (workdir / "config.gin").read_text()
  assert "ModelConfig.d_model = 32" in config and "DataConfig.seq_len = %SEQ_LEN" in config
  with open(workdir / "metrics.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  train_rows = [r for r in rows if r["kind"] == "train"]
  eval_rows = [r for r in rows if r["kind"] == "eval"]
  assert [int(r["step"]) for r in train_rows] == list(range(2, 25, 2))
  assert [int(r["step"]) for r in eval_rows] == [8, 16, 24]
  assert all(float(r["tokens_per_s"]) > 0 and float(r["grad_norm"]) > 0 for r in train_rows)
  assert float(train_rows[-1]["loss"]) < float(train_rows[0]["loss"])
  buckets = [c for c in eval_rows[0] if c.startswith("ppl_pos_")]
  assert buckets == ["ppl_pos_0_8", "ppl_pos_8_16", "ppl_pos_16_24", "ppl_pos_24_32"]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["16", "20", "24"]  # keep_checkpoints=3
  assert "Unigram baseline" in stdout and "Finished step 24" in stdout


def test_eval_mode_reproduces_the_final_eval(trained):
  workdir, _ = trained
  proc = cli.run(workdir, "--gin.RunConfig.mode=eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "metrics.csv", newline="") as f:
    last_eval = [r for r in csv.DictReader(f) if r["kind"] == "eval"][-1]
  line = [l for l in proc.stdout.splitlines() if l.strip().startswith("eval_loss")][0]
  assert abs(float(line.split()[-1]) - float(last_eval["eval_loss"])) < 1e-3


def test_generate_mode_prints_continuations(trained):
  workdir, _ = trained
  proc = cli.run(workdir, "--gin.RunConfig.mode=generate", "--gin.GenerateConfig.prompt='def f('",
                 "--gin.GenerateConfig.max_new_tokens=20", "--gin.GenerateConfig.temperature=0.8",
                 "--gin.GenerateConfig.top_k=20", "--gin.GenerateConfig.num_samples=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("--- sample") == 2
  assert proc.stdout.count("def f(") >= 2


def test_generate_without_checkpoint_is_a_clear_error(tmp_path):
  code, _, stderr = cli.run_in_process(tmp_path, "--gin.RunConfig.mode=generate")
  assert code == 2
  assert "no checkpoint in" in stderr and "train first" in stderr


def test_longeval_mode_writes_table_csv_and_heatmaps(trained):
  # Lengths beyond the training length (SEQ_LEN=32); one generate compile per length.
  workdir, _ = trained
  evals = ["--gin.RunConfig.mode=longeval", "--gin.LongEvalConfig.tasks=('passkey',)",
           "--gin.LongEvalConfig.depths=(0.0, 1.0)", "--gin.LongEvalConfig.max_new_tokens=8"]
  code, stdout, stderr = cli.run_in_process(workdir, *evals,
                                            "--gin.LongEvalConfig.lengths=(110, 150)")
  assert code == 0, stderr[-3000:]
  assert "checkpoint step 24, trained at 32 tokens:" in stdout
  with open(workdir / "longeval" / "longeval.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [(r["length"], r["depth"]) for r in rows] == [
      ("110", "0.0"), ("110", "1.0"), ("150", "0.0"), ("150", "1.0")]
  for r in rows:
    assert r["task"] == "passkey" and r["beyond_training"] == "True"
    assert float(r["score"]) in (0.0, 1.0) and float(r["answer_logprob"]) < 0
  assert (workdir / "longeval" / "passkey.png").stat().st_size > 0
  # A length the task cannot fit in is refused before the checkpoint is read or anything
  # compiled.
  code, _, stderr = cli.run_in_process(workdir, *evals, "--gin.LongEvalConfig.lengths=(40,)")
  assert code == 2 and "task 'passkey': length=40 is below" in stderr, stderr


def test_longeval_with_qttt_reports_its_compute(trained):
  workdir, _ = trained
  evals = ["--gin.RunConfig.mode=longeval", "--gin_file=gin/ttt/qttt.gin",
           "--gin.LongEvalConfig.tasks=('passkey',)", "--gin.LongEvalConfig.depths=(0.5,)",
           "--gin.LongEvalConfig.max_new_tokens=6", "--gin.TTTConfig.steps=2"]
  code, stdout, stderr = cli.run_in_process(workdir, *evals, "--gin.TTTConfig.span=16",
                                            "--gin.LongEvalConfig.lengths=(110,)")
  assert code == 0, stderr[-3000:]
  with open(workdir / "longeval" / "longeval.csv", newline="") as f:
    (row,) = list(csv.DictReader(f))
  assert row["method"] == "qttt" and float(row["ttt_gflops"]) > 0
  assert float(row["prefill_gflops"]) > 0 and int(row["thinking_tokens"]) > 0
  assert f"at 110 tokens: prefill {float(row['prefill_gflops']):.3g} GFLOP" in stdout
  # A span longer than a prompt is refused before the checkpoint is read.
  code, _, stderr = cli.run_in_process(workdir, *evals, "--gin.TTTConfig.span=500",
                                       "--gin.LongEvalConfig.lengths=(110,)")
  assert code == 2 and "TTTConfig.span=500 is longer than the passkey prompt" in stderr, stderr


def test_perk_meta_trains_resumes_and_answers_from_the_query(trained, tmp_path):
  base, _ = trained
  workdir = tmp_path / "perk"
  perk = ["--gin_file=gin/ttt/perk.gin", f"--gin.TrainConfig.init_from={base}",
          "--gin.SEQ_LEN=112", "--gin.BATCH_SIZE=2", "--gin.TrainConfig.eval_batches=1",
          "--gin.TrainConfig.checkpoint_every=1", "--gin.TrainConfig.log_every=1",
          "--gin.PERKConfig.segment_len=32", "--gin.PERKConfig.inner_steps=1",
          # First-order meta-gradients compile in a fraction of the time; tests/test_perk.py
          # checks the second-order ones.
          "--gin.PERKConfig.second_order_steps=0"]
  code, stdout, stderr = cli.run_in_process(workdir, *perk, "--gin.STEPS=1")
  assert code == 0, stderr[-3000:]
  assert "Finished PERK meta-training at step 1: held-out answer NLL" in stdout
  code, stdout, stderr = cli.run_in_process(workdir, *perk, "--gin.STEPS=3")
  assert code == 0, stderr[-3000:]
  assert "Resuming PERK meta-training from the checkpoint at step 1" in stdout
  with open(workdir / "metrics.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  train_rows = [r for r in rows if r["kind"] == "train"]
  assert [int(r["step"]) for r in train_rows] == [1, 2, 3]
  assert all(float(r["rate_mean"]) > 0 and float(r["inner_loss_first"]) > 0 for r in train_rows)
  code, stdout, stderr = cli.run_in_process(
      workdir, *perk, "--gin.STEPS=3", "--gin.RunConfig.mode=longeval",
      "--gin.LongEvalConfig.tasks=('passkey',)", "--gin.LongEvalConfig.lengths=(112,)",
      "--gin.LongEvalConfig.depths=(0.5,)", "--gin.LongEvalConfig.max_new_tokens=6")
  assert code == 0, stderr[-3000:]
  assert "PERK: the adapter learns each context; the model answers from the query alone" in stdout
  assert (workdir / "longeval" / "longeval.csv").exists()
  code, _, stderr = cli.run_in_process(workdir, *perk, "--gin.RunConfig.mode=generate")
  assert code == 2 and "hold PERK's meta-parameters, not a model" in stderr, stderr
  # Settings PERK cannot meta-train with are refused before anything is read.
  code, _, stderr = cli.run_in_process(tmp_path / "x", "--gin_file=gin/ttt/perk.gin")
  assert code == 2 and "set TrainConfig.init_from" in stderr, stderr
  code, _, stderr = cli.run_in_process(tmp_path / "x", *perk, "--gin.PERKConfig.targets=('wq',)")
  assert code == 2 and "PERKConfig.targets: 'wq' names no projection" in stderr, stderr


def test_doc_loss_mode_scores_documents_from_their_start(trained):
  # Beyond the training length (SEQ_LEN=32): positions 0..95 of each held-out document.
  workdir, _ = trained
  mode = "--gin.RunConfig.mode=doc_loss"
  code, stdout, stderr = cli.run_in_process(workdir, mode, "--gin.DocLossConfig.length=96",
                                            "--gin.DocLossConfig.first_bucket=16",
                                            "--gin.DocLossConfig.max_documents=2")
  assert code == 0, stderr[-3000:]
  assert "checkpoint step 24, trained at 32 tokens; 2 documents" in stdout
  with open(workdir / "doc_loss" / "doc_loss.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [(r["start"], r["end"], r["beyond_training"]) for r in rows] == [
      ("0", "16", "False"), ("16", "32", "False"), ("32", "64", "True"), ("64", "96", "True")]
  assert all(0 < float(r["loss"]) < 10 and r["documents"] == "2" for r in rows)
  assert (workdir / "doc_loss" / "doc_loss.png").stat().st_size > 0
  # No document that long: refused before the checkpoint is read or anything compiled.
  code, _, stderr = cli.run_in_process(workdir, mode, "--gin.DocLossConfig.length=100000000")
  assert code == 2 and "DocLossConfig.length=100000000: none of the" in stderr, stderr
