"""A run killed with SIGKILL and restarted ends with exactly the metrics of an uninterrupted run."""

import csv
import os
import random
import signal
import subprocess
import time

from tests import cli

# Columns that must match exactly (tokens_per_s is wall-clock and may differ).
COMPARED = ("kind", "step", "loss", "learning_rate", "grad_norm", "eval_loss", "eval_ppl",
            "ppl_pos_0_8", "ppl_pos_8_16", "ppl_pos_16_24", "ppl_pos_24_32")


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    return [tuple(r[c] for c in COMPARED) for r in csv.DictReader(f)]


# Long enough that a kill lands mid-run, with checkpoints often enough to be caught mid-save.
LONGER = ("--gin.STEPS=160", "--gin.TrainConfig.checkpoint_every=8")


def _kill_after_checkpoint(workdir, min_step, extra_delay):
  """Starts a run and SIGKILLs it `extra_delay` seconds after checkpoint `min_step` exists."""
  proc = subprocess.Popen(cli.command(workdir, *LONGER), cwd=cli.ROOT, env=cli.env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
  reference = tmp_path / "reference"
  proc = cli.run(reference, *LONGER)
  assert proc.returncode == 0, proc.stderr[-3000:]

  resumed = tmp_path / "resumed"
  rng = random.Random(0)
  # Two kills at different moments (a fresh start, then a resumed process).
  for min_step in (8, 64):
    finished = _kill_after_checkpoint(resumed, min_step, rng.uniform(0.0, 0.5))
    assert not finished, "the run ended before it could be killed; the test proves nothing"
  latest = max(int(s) for s in os.listdir(resumed / "checkpoints") if s.isdigit())
  assert 64 <= latest < 160
  proc = cli.run(resumed, *LONGER)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Resuming from the checkpoint at step" in proc.stdout

  expected, got = _metrics(reference), _metrics(resumed)
  assert [r[:2] for r in got] == [r[:2] for r in expected]
  for e, g in zip(expected, got):
    for name, a, b in zip(COMPARED, e, g):
      if a != b:
        assert abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(a))), (name, e, g)
