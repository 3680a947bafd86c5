"""Helpers for tests that run `python -m experiments.run` in a subprocess."""

import csv
import os
import signal
import subprocess
import sys
import time

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


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a process the tests start: the suite's (tests/conftest.py) and, when given,
  that many fake CPU devices."""
  flags = os.environ.get("LCTX_TEST_XLA_FLAGS", "")
  if devices:
    flags += f" --xla_force_host_platform_device_count={devices}"
  return flags.strip()


def env(devices: int | None = None):
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=xla_flags(devices))


def run(workdir, *extra, timeout=300):
  return subprocess.run(command(workdir, *extra), cwd=ROOT, env=env(), capture_output=True,
                        text=True, timeout=timeout)


def call(main, argv):
  """A command-line `main(argv)` in this process; returns (exit status, stdout, stderr)."""
  import contextlib
  import io

  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main(argv)
  return code, out.getvalue(), err.getvalue()


def run_in_process(workdir, *extra):
  """`experiments.run.main` in this process, for runs that stop before compiling or train a few
  tiny steps (no interpreter start, no jax import); returns (exit status, stdout, stderr).

  Log records go to pytest's capture (caplog), not to the returned stderr.
  """
  from experiments.run import main

  return call(main, [f"--workdir={workdir}", *TINY, *extra])


def kill_after_checkpoint(command, workdir, min_step, extra_delay):
  """Starts `command` and SIGKILLs it `extra_delay` seconds after checkpoint `min_step` exists in
  `workdir`; returns whether the run had already ended (then the kill proves nothing)."""
  proc = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt_dir) and any(s.isdigit() and int(s) >= min_step
                                       for s in os.listdir(ckpt_dir)):
      break
    time.sleep(0.02)
  time.sleep(extra_delay)
  finished = proc.poll() is not None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return finished


def metrics_rows(workdir, columns=None):
  """metrics.csv as tuples of `columns` (default: every column but the wall-clock tokens_per_s)."""
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  columns = columns or [c for c in rows[0] if c != "tokens_per_s"]
  return [tuple(r[c] for c in columns) for r in rows], columns


def assert_same_metrics(expected_dir, got_dir, columns=None, rtol=1e-6):
  """The two runs logged the same steps, with equal values (to `rtol`)."""
  expected, columns = metrics_rows(expected_dir, columns)
  got, _ = metrics_rows(got_dir, columns)
  assert [r[:2] for r in got] == [r[:2] for r in expected]
  for e, g in zip(expected, got):
    for name, a, b in zip(columns, e, g):
      if a != b:
        assert abs(float(a) - float(b)) <= rtol * max(1.0, abs(float(a))), (name, e, g)
