"""Helpers for tests that run `python -m experiments.run` in a subprocess."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model and run small enough for a test: ~7 s per run on 2 CPU cores.
TINY = [
    "--gin_file=gin/quickstart.gin",
    "--gin.ModelConfig.d_model=32", "--gin.ModelConfig.num_layers=2", "--gin.ModelConfig.d_ff=64",
    "--gin.SEQ_LEN=32", "--gin.BATCH_SIZE=4", "--gin.STEPS=24",
    "--gin.TrainConfig.checkpoint_every=4", "--gin.TrainConfig.eval_every=8",
    "--gin.TrainConfig.eval_batches=2", "--gin.TrainConfig.log_every=2",
    "--gin.TrainConfig.progress_bar=False", "--gin.TrainConfig.unigram_batches=4",
]


def command(workdir, *extra):
  return [sys.executable, "-m", "experiments.run", f"--workdir={workdir}", *TINY, *extra]


def env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def run(workdir, *extra, timeout=300):
  return subprocess.run(command(workdir, *extra), cwd=ROOT, env=env(), capture_output=True,
                        text=True, timeout=timeout)


def run_in_process(workdir, *extra):
  """`experiments.run.main` in this process, for runs that stop before compiling or train a few
  tiny steps (no interpreter start, no jax import); returns (exit status, stdout, stderr).

  Log records go to pytest's capture (caplog), not to the returned stderr.
  """
  import contextlib
  import io

  from experiments.run import main

  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main([f"--workdir={workdir}", *TINY, *extra])
  return code, out.getvalue(), err.getvalue()
