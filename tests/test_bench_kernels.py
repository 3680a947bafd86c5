"""The kernel benchmark script at a tiny size: it runs, prints the goals and writes its files."""

import csv
import os
import re

from experiments import bench_kernels


def test_bench_kernels_writes_tables(tmp_path, capsys):
  out = str(tmp_path / "bench")
  bench_kernels.main(["--lengths", "64", "--heads", "2", "--head_dim", "16", "--chunk_size", "16",
                      "--repeats", "1", "--decode_contexts", "16,40", "--out", out])
  with open(os.path.join(out, "kernels.csv")) as f:
    rows = list(csv.DictReader(f))
  assert {r["method"] for r in rows} == {"dense_reference", "jax_nn_causal", "flash", "linear",
                                         "lightning", "gla", "delta_rule"}
  for r in rows:
    assert float(r["fwd_ms"]) > 0 and float(r["fwd_bwd_ms"]) > 0
    assert 0 < float(r["fwd_peak_frac"]) and r["impl"] in ("reference", "xla", "pallas")
  with open(os.path.join(out, "decode.csv")) as f:
    decode = list(csv.DictReader(f))
  assert {(r["model"], r["context"]) for r in decode} == {
      (m, c) for m in ("gla", "gla+swa512", "full_attention") for c in ("16", "40")}
  printed = capsys.readouterr().out
  assert "matmul peak" in printed
  # Every goal line says PASS, FAIL or n/a; the 16K goals are n/a at this size.
  assert re.search(r"^(PASS|FAIL)  decode gla: step at 40 / step at 16 = [\d.]+x", printed, re.M)
  assert re.search(r"^n/a   decode full_attention: step at 40", printed, re.M)
  assert "n/a   gla fwd+bwd at 16K vs jax_nn_causal" in printed
  assert "n/a   plain linear forward at 16K" in printed
  assert "n/a   delta_rule fwd+bwd at 16K vs gla" in printed
  assert os.path.exists(os.path.join(out, "kernels.png"))
