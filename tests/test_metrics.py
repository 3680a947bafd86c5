"""metrics.csv: header, rows, and truncation to the resumed checkpoint step."""

import csv

from lctx.metrics import MetricsWriter


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_rows_and_resume_truncation(tmp_path):
  w = MetricsWriter(str(tmp_path), ("ppl_pos_0_8",), tensorboard=False)
  for step in (10, 20, 30):
    w.write("train", step, {"loss": 1.0 / step, "learning_rate": 0.1, "grad_norm": 2.0,
                            "tokens_per_s": 5.0})
  w.write("eval", 20, {"eval_loss": 0.5, "eval_ppl": 1.6, "ppl_pos_0_8": 1.7})
  w.close()
  with open(tmp_path / "metrics.csv", "a") as f:
    f.write("train,40,0.0")  # a row cut off by a kill
  rows = _rows(tmp_path / "metrics.csv")
  assert [r["step"] for r in rows[:4]] == ["10", "20", "30", "20"]
  assert float(rows[0]["loss"]) == 0.1 and rows[3]["ppl_pos_0_8"] == "1.7"

  w = MetricsWriter(str(tmp_path), ("ppl_pos_0_8",), resume_step=20, tensorboard=False)
  w.write("train", 30, {"loss": 0.25})
  w.close()
  rows = _rows(tmp_path / "metrics.csv")
  assert [(r["kind"], r["step"]) for r in rows] == [("train", "10"), ("train", "20"),
                                                    ("eval", "20"), ("train", "30")]
  assert rows[-1]["loss"] == "0.25"


def test_fresh_start_discards_rows_of_a_run_without_checkpoint(tmp_path):
  w = MetricsWriter(str(tmp_path), (), tensorboard=False)
  w.write("train", 5, {"loss": 1.0})
  w.close()
  MetricsWriter(str(tmp_path), (), resume_step=0, tensorboard=False).close()
  assert _rows(tmp_path / "metrics.csv") == []


def test_resume_with_other_columns_extends_the_header_and_keeps_every_row(tmp_path):
  w = MetricsWriter(str(tmp_path), ("ppl_pos_0_8", "ppl_pos_8_16"), tensorboard=False)
  w.write("train", 10, {"loss": 1.0})
  w.write("eval", 10, {"eval_loss": 0.5, "ppl_pos_0_8": 1.7, "ppl_pos_8_16": 1.8})
  w.close()
  w = MetricsWriter(str(tmp_path), ("ppl_pos_0_16",), resume_step=10, tensorboard=False)
  w.write("eval", 20, {"eval_loss": 0.4, "ppl_pos_0_16": 1.5})
  w.close()
  with open(tmp_path / "metrics.csv", newline="") as f:
    reader = csv.DictReader(f)
    rows, header = list(reader), reader.fieldnames
  assert header[-3:] == ["ppl_pos_0_8", "ppl_pos_8_16", "ppl_pos_0_16"]
  assert [(r["kind"], r["step"]) for r in rows] == [("train", "10"), ("eval", "10"), ("eval", "20")]
  assert rows[1]["ppl_pos_8_16"] == "1.8" and rows[1]["ppl_pos_0_16"] == ""
  assert rows[2]["ppl_pos_0_16"] == "1.5" and rows[2]["ppl_pos_0_8"] == ""
