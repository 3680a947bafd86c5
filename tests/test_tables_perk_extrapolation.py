"""The PERK extrapolation table (experiments/tables/perk_extrapolation.py): at its tiniest size
it trains a base, meta-trains PERK, answers at 1x and 2x (4x and 8x by default) in context,
after qTTT and with PERK, prints the table, writes the CSV and the plot and ends with the
verdict; the CPU-scale run is marked slow."""

import csv
import os

import pytest

from experiments.tables import perk_extrapolation


def _read(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_tiniest_table(tmp_path, capsys):
  out = str(tmp_path / "perk")
  assert perk_extrapolation.main([
      "--length", "100", "--width", "16", "--layers", "1", "--d_ff", "32", "--train_examples",
      "8", "--batch_size", "8", "--meta_steps", "1", "--meta_batch", "2", "--inner_steps", "1",
      "--second_order_steps", "0", "--segment_len", "32", "--depths", "0.5", "--examples", "1",
      "--ttt_steps", "1", "--ttt_span", "16", "--multiples", "1,2", "--out", out]) == 0
  table = _read(os.path.join(out, "perk_extrapolation.csv"))
  assert [(int(r["multiple"]), int(r["length"])) for r in table] == [(1, 100), (2, 200)]
  for r in table:
    assert all(0.0 <= float(r[m]) <= 1.0 for m in ("in_context", "qttt", "perk"))
  assert os.path.exists(os.path.join(out, "perk_extrapolation.png"))
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith("PERK's claim")


def test_verdict_reads_the_longest_length():
  def table(*rows):
    return [{"multiple": m, "in_context": a, "qttt": b, "perk": c} for m, a, b, c in rows]

  good = table((1, 1.0, 1.0, 0.8), (8, 0.1, 0.1, 0.6))
  assert perk_extrapolation.verdict(good, 0.2).startswith("PERK's claim reproduced")
  close = table((1, 1.0, 1.0, 0.8), (8, 0.5, 0.1, 0.6))
  assert "not 0.20 above in-context answering (0.50)" in perk_extrapolation.verdict(close, 0.2)
  fades = table((1, 1.0, 1.0, 0.8), (8, 0.0, 0.0, 0.3))
  assert "PERK keeps 0.30 at 8x of its 0.80 at 1x" in perk_extrapolation.verdict(fades, 0.2)


@pytest.mark.slow
def test_cpu_scale_table(tmp_path):
  out = str(tmp_path / "perk")
  assert perk_extrapolation.main(["--out", out]) == 0
  assert len(_read(os.path.join(out, "perk_extrapolation.csv"))) == 3
