"""RunConfig.mode=spike_stats: the statistics table of a real (tiny) trained spiking checkpoint."""

import csv
import os

from tests import cli


def test_spike_stats_of_a_trained_checkpoint(readme_runs):
  # The README's two tiny_spikingbrain_7b commands (train, then spike_stats), run by the
  # readme_runs fixture: 4 layers alternating GLA (even) and sliding-window attention (odd).
  proc = readme_runs.group_of("tiny_spiking").proc
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Spiking statistics of checkpoint step 1" in proc.stdout, proc.stdout
  workdir = readme_runs.workdir("tiny_spiking")
  with open(os.path.join(workdir, "spike_stats.csv")) as f:
    rows = list(csv.DictReader(f))
  codings = {r["coding"] for r in rows}
  assert codings == {"binary", "ternary", "sign_magnitude", "twos_complement"}
  ternary = [r for r in rows if r["coding"] == "ternary"]
  layers = {r["layer"] for r in ternary}
  assert layers == {"layer_0", "layer_1", "layer_2", "layer_3", "all"}
  sites = {(r["layer"], r["site"]) for r in ternary}
  assert ("layer_1", "attention_q") in sites and ("layer_3", "attention_q") in sites
  assert ("layer_0", "attention_q") not in sites and ("layer_2", "attention_q") not in sites
  assert {("layer_0", s) for s in ("mixer_in", "mixer_out", "mlp_in", "mlp_hidden")} <= sites
  for r in rows:
    rate, sparsity = float(r["firing_rate"]), float(r["sparsity"])
    assert 0.0 < rate < 1.0 and abs(rate + sparsity - 1.0) < 1e-6, r
    assert 0.0 <= float(r["never_firing"]) <= 1.0
  overall = {r["coding"]: r for r in rows if r["layer"] == "all" and r["site"] == "all"}
  # The counts are the same for every coding; ternary spends one spike per unit of |count|, so
  # its spikes per channel equal the mean |count|, and the signed bitwise trains need fewer.
  t = overall["ternary"]
  assert abs(float(t["spikes_per_channel"]) - float(t["mean_abs_count"])) < 1e-3
  assert (float(overall["sign_magnitude"]["spikes_per_channel"])
          < float(t["spikes_per_channel"]))
  assert float(overall["binary"]["unrepresentable"]) > 0  # binary cannot code negative counts
  assert float(t["unrepresentable"]) == 0.0  # the paper's window represents every count


def test_spike_stats_needs_spiking_enabled(tmp_path):
  # Refused from the configuration alone, before any checkpoint is looked for.
  code, _, stderr = cli.run_in_process(tmp_path / "w", "--gin.RunConfig.mode=spike_stats")
  assert code == 2
  assert "SpikeConfig.enabled=False" in stderr, stderr[-2000:]
