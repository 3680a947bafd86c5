"""The device check at its CPU size (kernels in interpret mode): checks, timings, files, verdict."""

import csv
import os

from experiments import device_check


def test_device_check_tiny_runs_checks_and_timings(tmp_path, capsys):
  out = str(tmp_path / "dc")
  rc = device_check.main(["--tiny", "--only", "flash_window,gla_vector_gate_segments_h0,"
                          "delta_rule_gated_segments_h0", "--repeats", "1", "--out", out])
  assert rc == 0
  with open(os.path.join(out, "check.csv")) as f:
    checks = list(csv.DictReader(f))
  assert [(r["kernel"], r["variant"], r["result"]) for r in checks] == [
      ("flash", "window", "PASS"), ("gla", "vector_gate_segments_h0", "PASS"),
      ("delta_rule", "gated_segments_h0", "PASS")]
  assert all(float(r["rel_rms"]) < device_check.TOL for r in checks)
  with open(os.path.join(out, "timing.csv")) as f:
    timing = list(csv.DictReader(f))
  assert {(r["op"], r["impl"]) for r in timing} == {
      ("flash", "pallas"), ("flash", "xla"), ("jax.nn.dot_product_attention", "xla"),
      ("gla", "pallas"), ("gla", "xla"), ("gated_delta_rule", "pallas"),
      ("gated_delta_rule", "xla")}
  assert all(float(r["fwd_ms"]) > 0 and float(r["fwd_bwd_ms"]) > 0 for r in timing)
  assert "device_check: 3/3 kernel variants match the reference on cpu" in capsys.readouterr().out


def test_device_check_reports_a_failing_variant(tmp_path, capsys, monkeypatch):
  # A tolerance nothing meets: the row says FAIL and the exit status is 1.
  monkeypatch.setattr(device_check, "TOL", 0.0)
  rc = device_check.main(["--tiny", "--only", "gla_plain", "--no_timing",
                          "--out", str(tmp_path / "dc")])
  assert rc == 1
  assert "0/1 kernel variants match the reference on cpu; FAILED: gla_plain" in (
      capsys.readouterr().out)
