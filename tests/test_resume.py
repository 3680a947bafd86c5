"""A run killed with SIGKILL and restarted ends with exactly the metrics of an uninterrupted run."""

import os
import random

from tests import cli

# Columns that must match exactly (tokens_per_s is wall-clock and may differ).
COMPARED = ("kind", "step", "loss", "learning_rate", "grad_norm", "eval_loss", "eval_ppl",
            "ppl_pos_0_8", "ppl_pos_8_16", "ppl_pos_16_24", "ppl_pos_24_32")


# Long enough that a kill lands mid-run, with checkpoints often enough to be caught mid-save.
LONGER = ("--gin.STEPS=48", "--gin.TrainConfig.checkpoint_every=8")


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
  reference = tmp_path / "reference"
  proc = cli.run(reference, *LONGER)
  assert proc.returncode == 0, proc.stderr[-3000:]

  resumed = tmp_path / "resumed"
  rng = random.Random(0)
  # Two kills at different moments (a fresh start, then a resumed process).
  for min_step in (8, 24):
    finished = cli.kill_after_checkpoint(cli.command(resumed, *LONGER), resumed, min_step,
                                         rng.uniform(0.0, 0.5))
    assert not finished, "the run ended before it could be killed; the test proves nothing"
  latest = max(int(s) for s in os.listdir(resumed / "checkpoints") if s.isdigit())
  assert 24 <= latest < 48
  proc = cli.run(resumed, *LONGER)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Resuming from the checkpoint at step" in proc.stdout

  cli.assert_same_metrics(reference, resumed, COMPARED)
