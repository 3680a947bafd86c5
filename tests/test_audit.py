"""The HLO collective parser on hand-written HLO, and the sequence-parallel audit at tiny size."""

import csv
import os
import subprocess
import sys

import numpy as np

from experiments import hlo_collectives as hc
from tests import cli
from tests.multidevice import ROOT

_HLO = """HloModule m
%body (p: (s32[], f32[4,3])) -> (s32[], f32[4,3]) {
  %permute = f32[4,3]{1,0} collective-permute(%x), channel_id=1, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
}
%cond (p: (s32[], f32[4,3])) -> pred[] {
}
ENTRY %main (a: f32[4,3]) -> f32[16,3] {
  %gather = f32[16,3]{1,0} all-gather(%a), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
  %scatter = f32[4,3]{1,0} reduce-scatter(%gather), channel_id=3, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %sum = (f32[4,3]{1,0}, s32[2]{0}) all-reduce(%a, %b), channel_id=4, replica_groups={{0,1,2,3},{4,5,6,7}}
  %loop = (s32[], f32[4,3]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %pair = f32[4,3]{1,0} collective-permute(%a), channel_id=5, source_target_pairs={{0,1}}
}
"""


def test_parser_counts_bytes_groups_and_loop_trips():
  ops, unparsed = hc.collectives(_HLO, 8)
  assert not unparsed
  assert [(o.kind, o.result_bytes, o.executions) for o in ops] == [
      ("collective-permute", 48, 5), ("all-gather", 192, 1), ("reduce-scatter", 48, 1),
      ("all-reduce", 56, 1), ("collective-permute", 48, 1)]
  assert ops[1].groups == ((0, 1, 2, 3), (4, 5, 6, 7))
  sent = hc.bytes_sent_per_device(ops, 8)
  # ranks 0-3: 5 loop sends of 48 (ranks 0..3 are sources) + all-gather 3/4*192 + reduce-scatter
  # 3*48 + all-reduce 2*3/4*56; rank 0 also sends the lone pair.
  shared = 144 + 144 + 84
  np.testing.assert_allclose(sent, [shared + 240 + 48] + [shared + 240] * 3 + [shared] * 4)
  assert hc.count(ops, "collective-permute") == 6


def test_parser_refuses_collectives_in_unknown_loops():
  text = _HLO.replace(', backend_config={"known_trip_count":{"n":"5"}}', "")
  try:
    hc.collectives(text, 8)
  except ValueError as e:
    assert "without a known trip count" in str(e)
  else:
    raise AssertionError("expected a ValueError")


def test_audit_tiny(tmp_path):
  out = str(tmp_path / "audit")
  env = cli.env(devices=8)
  proc = subprocess.run([sys.executable, "-m", "experiments.audit", "--seq_len", "256", "--heads", "2",
                         "--kv_heads", "2", "--head_dim", "16", "--shards", "4", "--chunk_size",
                         "16", "--repeats", "1", "--out", out], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "only rank the methods" in proc.stdout
  assert "ring forward bytes per rank within 5% of the formula: PASS" in proc.stdout, proc.stdout
  assert "ring per-device peak memory at most 1/6 of one device: " in proc.stdout, proc.stdout
  assert "lasp2h per-device peak memory: " in proc.stdout and "(no goal: it all-gathers" in (
      proc.stdout), proc.stdout
  with open(os.path.join(out, "audit_comm.csv")) as f:
    comm = list(csv.DictReader(f))
  assert {(r["method"], r["direction"]) for r in comm} == {
      (m, d) for m in ("ring", "lasp2h", "lasp2", "zeco", "lasp2_delta", "zeco_delta")
      for d in ("forward", "backward")}
  for r in comm:
    assert r["goal_5pct"] == "PASS", r
  state_mib = 2 * 16 * 16 * 4 / 2**20
  for r in comm:
    if r["method"].startswith("zeco"):  # one state per rank and direction; one rank sends 0
      assert np.isclose(float(r["measured_MiB_per_rank"]), state_mib), r
      assert float(r["min_rank_MiB"]) == 0.0, r
    if r["method"] == "lasp2_delta":  # P - 1 = 3 received [M | A] pairs of two states each
      assert np.isclose(float(r["measured_MiB_per_rank"]), 3 * 2 * state_mib), r
  with open(os.path.join(out, "audit_memory.csv")) as f:
    memory = list(csv.DictReader(f))
  assert [r["method"] for r in memory] == ["ring", "lasp2h", "lasp2", "zeco", "lasp2_delta",
                                           "zeco_delta"]
  for r in memory:
    assert 0 < float(r["memory_fraction"]) < 1 and float(r["step_ms"]) > 0, r
