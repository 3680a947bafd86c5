"""Reliability of a run's workdir: corrupt checkpoints, finite saves, the lock, config changes
between runs, metrics history, and the errors of bad input (real files and processes)."""

import csv
import logging
import os
import shutil
import signal
import subprocess
import time

import pytest

from experiments.run import load_configs
from lctx import compat
from lctx import data as data_lib
from lctx.checkpoint import Checkpointer
from lctx.data.shards import ProcessRows
from lctx.errors import RunFailure
from lctx.optim import make_optimizer
from lctx.state import build
from lctx.restore import restore_checkpoint
from sharding.mesh import make_mesh
from tests import cli


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 24-step run (checkpoints 16, 20, 24); tests work on copies of it."""
  workdir = tmp_path_factory.mktemp("trained") / "w"
  proc = cli.run(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _copy(trained, tmp_path, name="w"):
  dest = tmp_path / name
  shutil.copytree(trained, dest)
  return dest


# --- 1. corrupt checkpoints --------------------------------------------------------------------

def _corrupt(step_dir, kind):
  state = os.path.join(step_dir, "state")
  if kind == "metadata_deleted":
    os.remove(os.path.join(state, "_METADATA"))
  elif kind == "arrays_deleted":
    shutil.rmtree(os.path.join(state, "ocdbt.process_0", "d"))
  elif kind == "manifest_emptied":
    open(os.path.join(state, "manifest.ocdbt"), "w").close()
  elif kind == "data_deleted":
    shutil.rmtree(os.path.join(step_dir, "data"))
  elif kind == "data_garbled":
    with open(os.path.join(step_dir, "data", "process_0-of-1.json"), "w") as f:
      f.write("{not json")
  elif kind == "data_wrong":
    with open(os.path.join(step_dir, "data", "process_0-of-1.json"), "w") as f:
      f.write('{"unexpected": 1}')
  else:
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def tiny_model():
  """The CLI's tiny configuration built in this process (model on a 1-device mesh, data)."""
  bindings = [a[len("--gin."):].replace("=", " = ", 1) for a in cli.TINY if a.startswith("--gin.")]
  configs = load_configs([a.split("=", 1)[1] for a in cli.TINY if a.startswith("--gin_file")],
                         bindings)
  tx, _ = make_optimizer(configs["optimizer"], configs["train"].steps)
  m = build(configs["model"], make_mesh(configs["mesh"]), tx)
  tokenizer = data_lib.make_tokenizer(configs["data"].tokenizer)
  return configs, m, tokenizer


REASONS = {"metadata_deleted": "has no train-state item", "arrays_deleted": "restoring it failed",
           "manifest_emptied": "manifest", "data_deleted": 'Item "data" was not found',
           "data_garbled": "JSONDecodeError", "data_wrong": "data-iterator state does not apply"}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_unreadable_latest_checkpoint_falls_back_and_is_moved_aside(trained, tmp_path, tiny_model,
                                                                    kind, caplog):
  configs, m, tokenizer = tiny_model
  workdir = _copy(trained, tmp_path)
  _corrupt(workdir / "checkpoints" / "24", kind)
  data_cfg = configs["data"]
  data_iter = ProcessRows(data_cfg, tokenizer, (0, data_cfg.batch_size), 1)
  ckpt = Checkpointer(str(workdir / "checkpoints"))
  with caplog.at_level(logging.WARNING, logger="lctx"):
    step, state = restore_checkpoint(ckpt, m, configs["model"], str(workdir), None,
                                     full_state=True, data_iter=data_iter, move_aside=True)
  ckpt.close()
  assert step == 20 and int(state["step"]) == 20
  assert sorted(os.listdir(workdir / "checkpoints")) == ["16", "20"]
  moved = workdir / "checkpoints_unreadable"
  assert sorted(os.listdir(moved)) == ["24", "24.reason.txt"]  # kept, never deleted
  assert REASONS[kind] in (moved / "24.reason.txt").read_text()
  warning = "\n".join(r.getMessage() for r in caplog.records)
  assert "step 24" in warning and "is unreadable" in warning and REASONS[kind] in warning
  assert "restored the newest readable checkpoint, step 20" in warning


def test_eval_skips_an_unreadable_checkpoint_without_moving_it(trained, tmp_path, tiny_model):
  configs, m, _ = tiny_model
  workdir = _copy(trained, tmp_path)
  _corrupt(workdir / "checkpoints" / "24", "arrays_deleted")
  ckpt = Checkpointer(str(workdir / "checkpoints"))
  step, params = restore_checkpoint(ckpt, m, configs["model"], str(workdir), None,
                                    full_state=False, move_aside=False)
  ckpt.close()
  assert step == 20 and "embedding" in params
  assert sorted(os.listdir(workdir / "checkpoints")) == ["16", "20", "24"]


def test_no_readable_checkpoint_is_a_runtime_failure_naming_every_step(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  for step in (16, 20, 24):
    _corrupt(workdir / "checkpoints" / str(step), "metadata_deleted")
  code, _, stderr = cli.run_in_process(workdir, "--gin.RunConfig.mode=eval")
  assert code == 4, stderr[-3000:]
  assert f"lctx: runtime failure: no readable checkpoint in {workdir / 'checkpoints'}" in stderr
  assert all(f"step {s} ({workdir / 'checkpoints' / str(s)}) is unreadable" in stderr
             for s in (16, 20, 24))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["16", "20", "24"]  # eval moves nothing


def test_resume_past_a_corrupt_checkpoint_ends_like_an_uninterrupted_run(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  _corrupt(workdir / "checkpoints" / "24", "manifest_emptied")
  proc = cli.run(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint step 24" in proc.stderr and "is unreadable" in proc.stderr
  assert "Resuming from the checkpoint at step 20" in proc.stdout
  assert "Traceback" not in proc.stderr
  compared = ("kind", "step", "loss", "eval_loss")
  assert ([tuple(r[c] for c in compared) for r in _rows(workdir)]
          == [tuple(r[c] for c in compared) for r in _rows(trained)])
  assert sorted(os.listdir(workdir / "checkpoints")) == ["16", "20", "24"]


def test_a_failed_save_is_a_runtime_failure_naming_the_directory(tmp_path, tiny_model):
  _, m, _ = tiny_model
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  os.rmdir(tmp_path / "checkpoints")
  (tmp_path / "checkpoints").write_text("not a directory")  # every write under it fails
  with pytest.raises(RunFailure, match=f"saving the checkpoint of step 3 to "
                                       f"{tmp_path / 'checkpoints'} failed"):
    ckpt.save(3, m.init_state(0), {"position": 0})


# --- 2. only finite states are saved -------------------------------------------------------------

def test_divergence_keeps_a_checkpoint_that_evaluates_finite(tmp_path):
  proc = cli.run(tmp_path, "--gin.OptimizerConfig.learning_rate=1e4",
                 "--gin.OptimizerConfig.warmup_steps=0", "--gin.OptimizerConfig.clip_norm=0.0",
                 "--gin.TrainConfig.checkpoint_every=1", "--gin.TrainConfig.log_every=1")
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "lctx: training diverged:" in proc.stderr
  kept = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  named = int(proc.stderr.split("last good checkpoint (step ")[1].split(")")[0])
  bad = int(proc.stderr.split(" step ")[1].split(":")[0].split()[0])
  assert kept and named == max(kept) and named < bad
  code, stdout, stderr = cli.run_in_process(tmp_path, "--gin.RunConfig.mode=eval")
  assert code == 0, stderr[-3000:]
  assert f"checkpoint step {named}:" in stdout
  loss = float([l for l in stdout.splitlines() if "eval_loss" in l][0].split()[-1])
  assert loss == loss and loss < float("inf")


# --- 3. one run per workdir ----------------------------------------------------------------------

def test_second_run_in_a_workdir_is_refused_and_a_killed_run_leaves_no_stale_lock(tmp_path):
  workdir = tmp_path / "w"
  first = subprocess.Popen(cli.command(workdir, "--gin.STEPS=100000"), cwd=cli.ROOT,
                           env=cli.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    lock = workdir / ".lock"
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None:
      if lock.exists() and lock.read_text():
        break
      time.sleep(0.05)
    assert first.poll() is None, first.stderr.read().decode()[-3000:]
    config_before = (workdir / "config.gin").read_text() if (workdir / "config.gin").exists() \
        else None
    second = cli.run(workdir, "--gin.STEPS=3")
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by another run (pid {first.pid} on host" in second.stderr
    assert "--gin.STEPS=100000" in second.stderr  # the running one's command
    assert first.poll() is None  # the first run was not disturbed
    if config_before is not None:
      assert (workdir / "config.gin").read_text() == config_before
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  code, _, stderr = cli.run_in_process(workdir, "--gin.STEPS=1")  # no stale lock
  assert code == 0, stderr[-3000:]


# --- 4. the configuration changed between runs ---------------------------------------------------

@pytest.mark.parametrize("mode,extra,parameter,setting", [
    ("train", "--gin.ModelConfig.d_model=64", "params/embedding has shape (256, 32) in the "
     "checkpoint and (256, 64)", "ModelConfig.d_model: 32 -> 64"),
    ("eval", "--gin.ModelConfig.d_ff=96", "params/layer_0/mlp/down has shape (64, 32) in the "
     "checkpoint and (96, 32)", "ModelConfig.d_ff: 64 -> 96"),
    ("generate", "--gin.ModelConfig.num_layers=3", "params/layer_2/mixer/k is in the configured "
     "model but not in the checkpoint", "ModelConfig.num_layers: 2 -> 3"),
])
def test_changed_model_is_refused_before_anything_is_written(trained, tmp_path, mode, extra,
                                                             parameter, setting):
  workdir = _copy(trained, tmp_path)
  before = {name: (workdir / name).read_bytes() for name in ("config.gin", "metrics.csv")}
  code, _, stderr = cli.run_in_process(workdir, f"--gin.RunConfig.mode={mode}", extra)
  assert code == 2, stderr[-3000:]
  assert "does not match the configured model" in stderr
  assert parameter in stderr and setting in stderr and len(stderr.strip().splitlines()) == 1
  assert {name: (workdir / name).read_bytes() for name in before} == before
  assert sorted(os.listdir(workdir / "checkpoints")) == ["16", "20", "24"]


def test_without_config_gin_the_hint_comes_from_the_model_dimensions(tmp_path, tiny_model):
  configs, m, _ = tiny_model
  wanted = compat.tree_signature({"params": m.abstract_params})
  fewer = {k: v for k, v in wanted.items() if "/layer_1/" not in k}
  with pytest.raises(ValueError, match="params/layer_1/.* is in the configured model but not in "
                                       "the checkpoint; likely ModelConfig.num_layers"):
    compat.check_matches(fewer, wanted, step=4, step_dir="d", workdir=str(tmp_path),
                         gin_text=None, model_cfg=configs["model"])
  wider = dict(wanted, **{"params/embedding": (256, 16)})
  with pytest.raises(ValueError, match=r"likely ModelConfig.d_model=32"):
    compat.check_matches(wider, wanted, step=4, step_dir="d", workdir=str(tmp_path),
                         gin_text=None, model_cfg=configs["model"])


# --- 4b. metrics history -------------------------------------------------------------------------

def test_resume_with_other_buckets_keeps_every_earlier_row(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  earlier = _rows(workdir)
  code, _, stderr = cli.run_in_process(workdir, "--gin.TrainConfig.position_buckets=2",
                                       "--gin.STEPS=28")
  assert code == 0, stderr[-3000:]
  rows = _rows(workdir)
  assert len(rows) == len(earlier) + 3  # train rows 26, 28 and the eval at 28
  for old, new in zip(earlier, rows):
    assert {k: new[k] for k in old} == old
  assert list(rows[0])[:len(earlier[0])] == list(earlier[0])  # earlier columns first
  assert rows[-1]["kind"] == "eval" and rows[-1]["ppl_pos_0_16"] and rows[-1]["ppl_pos_16_32"]
  assert rows[-1]["ppl_pos_0_8"] == ""


def test_rerun_with_fewer_steps_reports_the_evaluated_checkpoint(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  code, stdout, stderr = cli.run_in_process(workdir, "--gin.STEPS=8")
  assert code == 0, stderr[-3000:]
  assert "nothing to train; evaluating the checkpoint of step 24" in stdout
  assert "Finished step 24" in stdout and "Finished step 8" not in stdout
  assert len(_rows(workdir)) == len(_rows(trained))


# --- 5. bad input ----------------------------------------------------------------------------

def test_generate_requests_the_model_cannot_serve_are_refused(trained):
  code, _, stderr = cli.run_in_process(trained, "--gin.RunConfig.mode=generate",
                                       "--gin.GenerateConfig.top_k=1000",
                                       "--gin.GenerateConfig.temperature=1.0")
  assert code == 2, stderr[-3000:]
  assert "GenerateConfig.top_k=1000 is larger than the vocabulary (ModelConfig.vocab_size=256)" \
      in stderr
  start = time.time()
  code, _, stderr = cli.run_in_process(trained, "--gin.RunConfig.mode=generate",
                                       "--gin.GenerateConfig.max_new_tokens=100000")
  assert code == 2, stderr[-3000:]
  assert "GenerateConfig.max_new_tokens=100000: the prompt (4 tokens) plus the new tokens make " \
      "100004, more than GenerateConfig.max_length=None, i.e. 8 x DataConfig.seq_len=32" in stderr
  assert time.time() - start < 30  # refused, not attempted


def test_parameters_that_do_not_divide_over_the_mesh_fail_before_tracing(tmp_path):
  env = cli.env(devices=2)
  proc = subprocess.run(cli.command(tmp_path, "--gin.MeshConfig.data=1",
                                    "--gin.MeshConfig.tensor=2", "--gin.ModelConfig.d_ff=63"),
                        cwd=cli.ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert ("parameter layer_0/mlp/down: dimension 0 has size 63 (ModelConfig.d_ff (or "
          "MoEConfig.d_expert)), which does not divide by MeshConfig.tensor=2") in proc.stderr
  assert not (tmp_path / "checkpoints").exists()
