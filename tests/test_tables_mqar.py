"""The Zoology MQAR table script (experiments/tables/mqar.py): at its tiniest size it trains,
prints the table, writes the CSV and the plot and ends with the verdict; the full CPU-scale sweep
is marked slow."""

import csv
import os

import pytest

from experiments.tables import mqar


def _read(out):
  with open(os.path.join(out, "mqar.csv")) as f:
    return list(csv.DictReader(f))


def test_tiniest_table(tmp_path, capsys):
  out = str(tmp_path / "mqar")
  assert mqar.main(["--models", "attention,linear", "--widths", "16", "--settings", "32:2",
                    "--epochs", "1", "--train_examples", "128", "--test_examples", "64",
                    "--lrs", "3e-3,1e-2", "--out", out]) == 0
  rows = _read(out)
  assert [(r["model"], r["width"], r["length"], r["pairs"]) for r in rows] == [
      ("attention", "16", "32", "2"), ("linear", "16", "32", "2")]
  for r in rows:
    per_lr = [float(a) for a in r["accuracy_per_lr"].split()]
    assert len(per_lr) == 2 and float(r["accuracy"]) == pytest.approx(max(per_lr), abs=1e-3)
    assert 0.0 <= float(r["accuracy"]) <= 1.0
  assert os.path.exists(os.path.join(out, "mqar.png"))
  last = capsys.readouterr().out.strip().splitlines()[-1]
  # One length cannot show growth with length: the verdict must say it did not reproduce.
  assert last.startswith("Zoology's claim NOT reproduced at this scale:") and "one length" in last


def test_verdict_reads_the_cells():
  scale = mqar.dataclasses.replace(mqar.CPU, widths=(32, 64), settings=((64, 4), (256, 16)))
  rows = [{"model": m, "width": w, "length": n, "accuracy": a} for m, w, n, a in [
      ("attention", 32, 64, 1.0), ("attention", 64, 64, 1.0), ("attention", 32, 256, 0.99),
      ("attention", 64, 256, 1.0), ("gla", 32, 64, 0.95), ("gla", 64, 64, 1.0),
      ("gla", 32, 256, 0.2), ("gla", 64, 256, 0.93)]]
  assert mqar.verdict(rows, scale, 0.9).startswith("Zoology's claim reproduced")
  rows[6]["accuracy"] = 0.95  # gla solves the long setting at the small width: no growth
  assert "gla's smallest solving width does not grow" in mqar.verdict(rows, scale, 0.9)
  rows[2]["accuracy"] = 0.5
  assert "attention stays below 0.90 at (width, length) (32, 256)" in mqar.verdict(rows, scale, 0.9)


def test_bad_setting_is_refused_before_training(tmp_path):
  with pytest.raises(ValueError, match=r"mqar: 4 \* pairs=80 must be at most length=64"):
    mqar.main(["--settings", "64:20", "--out", str(tmp_path)])


@pytest.mark.slow
def test_cpu_scale_table(tmp_path):
  out = str(tmp_path / "mqar")
  assert mqar.main(["--out", out]) == 0
  assert len(_read(out)) == len(mqar.MODELS) * len(mqar.CPU.widths) * len(mqar.CPU.settings)
