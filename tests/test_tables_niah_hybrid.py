"""The SpikingBrain hybrid-ablation table script (experiments/tables/niah_hybrid.py): at its
tiniest size it trains, evaluates at 1x/2x/4x, prints the table, writes the CSVs and the plot
and ends with the verdict; the CPU-scale run is marked slow."""

import csv
import os

import pytest

from experiments.tables import niah_hybrid


def _read(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_tiniest_table(tmp_path, capsys):
  out = str(tmp_path / "niah")
  # One model, one task, one depth, one example per cell.
  assert niah_hybrid.main(["--models", "swa", "--tasks", "passkey", "--train_len", "128",
                           "--width", "16",
                           "--layers", "2", "--d_ff", "32", "--train_examples", "16",
                           "--test_examples", "8", "--batch_size", "16", "--epochs", "1",
                           "--examples", "1", "--depths", "0.5", "--lrs", "1e-2,3e-2",
                           "--out", out]) == 0
  table = _read(os.path.join(out, "niah_hybrid.csv"))
  assert [(r["model"], r["task"]) for r in table] == [("swa", "passkey")]
  for r in table:
    assert all(0.0 <= float(r[f"{m}x"]) <= 1.0 for m in niah_hybrid.MULTIPLES)
  cells = _read(os.path.join(out, "niah_hybrid_cells.csv"))
  # prompt lengths 1x, 2x, 4x of the 112-token training prompt (128 - 16 answer tokens)
  assert sorted({int(c["length"]) for c in cells}) == [112, 224, 448]
  assert [c["beyond_training"] for c in cells] == ["False", "True", "True"]
  assert os.path.exists(os.path.join(out, "niah_hybrid.png"))
  printed = capsys.readouterr().out
  assert "held-out answer accuracy" in printed
  last = printed.strip().splitlines()[-1]
  assert last.startswith("SpikingBrain's claim NOT checked at this scale") and "'attention'" in last


def test_verdict_reads_the_1x_column():
  def table(**at_1x):
    return [{"model": m, "task": t, "1x": s, "2x": 0.0, "4x": 0.0}
            for m, s in at_1x.items() for t in niah_hybrid.TASKS]

  good = table(attention=1.0, swa=0.5, gla=0.3, hybrid=0.9)
  assert niah_hybrid.verdict(good, 0.9).startswith("SpikingBrain's claim reproduced")
  assert "swa scores 0.90 at 1x, not clearly below" in niah_hybrid.verdict(
      table(attention=1.0, swa=0.9, gla=0.3, hybrid=0.9), 0.9)
  # The CPU scale's 2 windows of 128 reach over its 240-token prompt.
  assert "its 2 stacked windows of 128 reach 256 tokens back, the whole 240-token prompt" in (
      niah_hybrid.verdict(table(attention=1.0, swa=0.9, gla=0.3, hybrid=0.9), 0.9,
                          niah_hybrid.CPU))
  assert "the hybrid keeps 0.50" in niah_hybrid.verdict(
      table(attention=1.0, swa=0.5, gla=0.3, hybrid=0.5), 0.9)
  assert "full attention recalls only 0.40" in niah_hybrid.verdict(
      table(attention=0.4, swa=0.0, gla=0.0, hybrid=0.4), 0.9)


def test_bad_settings_are_refused_before_training(tmp_path):
  with pytest.raises(SystemExit):
    niah_hybrid.main(["--models", "mamba", "--out", str(tmp_path)])
  with pytest.raises(SystemExit):
    niah_hybrid.main(["--tasks", "passkey,vt", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match=r"layers=3 must be even"):
    niah_hybrid.model_config("hybrid", niah_hybrid.dataclasses.replace(niah_hybrid.CPU,
                                                                         layers=3), 256)
  # a training length whose prompt cannot hold the needle fails before anything compiles
  with pytest.raises(ValueError, match=r"passkey"):
    niah_hybrid.main(["--train_len", "40", "--out", str(tmp_path)])


@pytest.mark.slow
def test_cpu_scale_table(tmp_path):
  out = str(tmp_path / "niah")
  assert niah_hybrid.main(["--out", out]) == 0
  assert len(_read(os.path.join(out, "niah_hybrid.csv"))) == len(niah_hybrid.MODELS) * 2
