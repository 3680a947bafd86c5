"""The qTTT length table (experiments/tables/qttt_length.py): at its tiniest size it trains,
answers in context / after qTTT / after the thinking tokens, measures the needle mass, times one
adaptation, prints the table, writes the CSVs and the plot and ends with the verdict; the
CPU-scale run is marked slow."""

import csv
import os

import pytest

from experiments.tables import qttt_length


def _read(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_tiniest_table(tmp_path, capsys):
  out = str(tmp_path / "qttt")
  assert qttt_length.main(["--lengths", "100,130", "--width", "16", "--layers", "1", "--d_ff",
                           "32", "--train_examples", "8", "--batch_size", "8", "--epochs", "1",
                           "--examples", "1", "--depths", "0.5", "--steps", "2", "--span", "16",
                           "--cost_len", "110", "--out", out]) == 0
  table = _read(os.path.join(out, "qttt_length.csv"))
  assert [int(r["length"]) for r in table] == [100, 130]
  for r in table:
    for key in ("in_context", "qttt", "thinking", "mass_before", "mass_after"):
      assert 0.0 <= float(r[key]) <= 1.0, key
    assert float(r["qttt_gain"]) == float(r["qttt"]) - float(r["in_context"])
    assert int(r["thinking_tokens"]) > 0 and float(r["ttt_over_prefill"]) > 0
  (cost,) = _read(os.path.join(out, "qttt_cost.csv"))
  assert int(cost["prompt_len"]) == 110 and float(cost["adapt_s"]) > 0
  assert os.path.exists(os.path.join(out, "qttt_length.png"))
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith("qTTT's claim")


def test_verdict_reads_the_gain_by_length():
  def table(*rows):
    return [{"length": n, "in_context": a, "qttt": b, "qttt_gain": b - a, "mass_before": m0,
             "mass_after": m1} for n, a, b, m0, m1 in rows]

  grows = table((128, 0.9, 0.9, 0.3, 0.32), (1024, 0.4, 0.8, 0.05, 0.09))
  assert qttt_length.verdict(grows, 0.1).startswith("qTTT's claim reproduced")
  flat = table((128, 0.6, 0.8, 0.3, 0.32), (1024, 0.4, 0.6, 0.05, 0.09))
  assert "does not exceed its gain at 128 (+0.20) by 0.10" in qttt_length.verdict(flat, 0.1)
  solved = table((128, 1.0, 1.0, 0.3, 0.3), (1024, 1.0, 1.0, 0.2, 0.2))
  assert "already recalls at every length" in qttt_length.verdict(solved, 0.1)
  no_mass = table((128, 0.9, 0.9, 0.3, 0.32), (1024, 0.4, 0.8, 0.05, 0.04))
  assert "needle mass at 1024 tokens does not rise" in qttt_length.verdict(no_mass, 0.1)


@pytest.mark.slow
def test_cpu_scale_table(tmp_path, capsys):
  out = str(tmp_path / "qttt")
  assert qttt_length.main(["--out", out]) == 0
  assert [int(r["length"]) for r in _read(os.path.join(out, "qttt_length.csv"))] == list(
      qttt_length.CPU.lengths)
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith("qTTT's claim")
