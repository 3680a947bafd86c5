"""experiments.bench_convert at its tiny size: the table, the CSV and an honest verdict."""

import csv
import os

from experiments import bench_convert


def test_tiny_import_benchmark_writes_its_row(tmp_path, capsys):
  assert bench_convert.main(["--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  with open(os.path.join(tmp_path, "convert.csv")) as f:
    (row,) = list(csv.DictReader(f))
  assert int(row["params"]) == 524_928
  assert float(row["peak_rss_gib"]) >= float(row["rss_before_gib"]) > 0
  assert float(row["import_s"]) > 0
  # A 2 MiB checkpoint is not judged: the runtime's own RSS is what the ratio would measure.
  assert row["goal"] == "n/a" and "not judged below 1 GiB" in out
