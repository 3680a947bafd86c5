"""The RoPE-extension table script (experiments/tables/rope_extension.py): at its tiniest size it
trains, continues at 4x, prints the table, writes the CSV and the plot and ends with the
verdict; the CPU-scale run is marked slow."""

import csv
import os

import numpy as np
import pytest

from experiments.tables import rope_extension

TINY = ["--train_len", "16", "--width", "16", "--layers", "1", "--d_ff", "32", "--heads", "2",
        "--batch_size", "4", "--steps", "4", "--continue_steps", "2", "--eval_batches", "2"]


def _read(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_tiniest_table(tmp_path, capsys):
  out = str(tmp_path / "rope")
  assert rope_extension.main([*TINY, "--variants", "abf,linear", "--out", out]) == 0
  table = _read(os.path.join(out, "rope_extension.csv"))
  assert [(r["variant"], r["rope_scaling"]) for r in table] == [
      ("none", "none"), ("abf", "none"), ("linear", "linear")]
  assert float(table[1]["rope_base"]) == 5e5 and float(table[2]["rope_base"]) == 1e4
  for r in table:
    buckets = [float(r[f"loss_{lo}_{lo + 16}"]) for lo in (0, 16, 32, 48)]
    assert all(0 < b < 10 for b in buckets)
  assert os.path.exists(os.path.join(out, "rope_extension.png"))
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith("Llama 2 Long's finding") and "paired difference" in last


def _row(variant, per_row_beyond):
  ce = np.array([[1.0, x] for x in per_row_beyond])
  n = np.ones_like(ce)
  return {"variant": variant, "beyond_train_len": float(np.mean(per_row_beyond)),
          "ce_rows": ce, "n_rows": n}


def test_verdict_needs_a_difference_beyond_the_noise():
  pi = _row("linear", [2.0, 2.1, 1.9, 2.0])
  assert rope_extension.verdict([_row("abf", [1.8, 1.9, 1.7, 1.8]), pi]).startswith(
      "Llama 2 Long's finding reproduced")
  within = rope_extension.verdict([_row("abf", [1.9, 2.3, 1.6, 2.1]), pi])
  assert within.startswith("Llama 2 Long's finding NOT reproduced") and "within two" in within
  worse = rope_extension.verdict([_row("abf", [2.2, 2.3, 2.1, 2.2]), pi])
  assert "interpolation is better here" in worse
  assert "NOT checked" in rope_extension.verdict([pi])
  with pytest.raises(ValueError, match="unknown variant 'pi'"):
    rope_extension.main(["--variants", "pi"])


@pytest.mark.slow
def test_cpu_scale_table(tmp_path):
  assert rope_extension.main(["--out", str(tmp_path)]) == 0
