"""layers/spike_stats.py: statistics of hand-built counts, merging across batches, summaries of
fake and real "intermediates" trees."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import spike_stats
from layers import spiking
from layers.spiking import SpikeConfig

# 2 tokens x 4 channels; channel 1 never fires.
COUNTS = np.array([[2, 0, -1, 0], [3, 0, 0, 1]])


def _check(stats, want):
  assert set(stats) == {"spikes", "tokens", "slots", "time_steps", "unrepresentable",
                        "abs_count"}
  for key, value in want.items():
    assert stats[key].dtype == jnp.float32, key
    np.testing.assert_array_equal(stats[key], value, err_msg=key)


def test_ternary_paper_t():
  # max |count| 3 -> T = 3; ternary spends |count| spikes: channels [5, 0, 1, 1].
  _check(spike_stats.count_statistics(COUNTS, "ternary"),
         {"spikes": [5, 0, 1, 1], "tokens": 2, "slots": 2 * 4 * 3, "time_steps": 3,
          "unrepresentable": 0, "abs_count": 7})


def test_sign_magnitude_paper_t():
  # max |count| 3 -> T = 2: 2 = 10, 3 = 11, -1 = 0(-1), 1 = 01 -> channels [1 + 2, 0, 1, 1].
  _check(spike_stats.count_statistics(COUNTS, "sign_magnitude"),
         {"spikes": [3, 0, 1, 1], "slots": 16, "time_steps": 2, "unrepresentable": 0})


def test_fixed_t_saturates():
  # T = 2 ternary: 3 saturates to 2 (one unrepresentable count).
  _check(spike_stats.count_statistics(COUNTS, "ternary", 2),
         {"spikes": [4, 0, 1, 1], "slots": 16, "time_steps": 2, "unrepresentable": 1,
          "abs_count": 7})
  # Binary cannot represent -1: it counts as unrepresentable and spends no spike.
  _check(spike_stats.count_statistics(COUNTS, "binary", 3),
         {"spikes": [5, 0, 0, 1], "unrepresentable": 1})


def test_leading_axes_and_jit():
  counts = np.stack([COUNTS, -COUNTS, COUNTS])  # [3, 2, 4]: 6 tokens
  stats = jax.jit(lambda c: spike_stats.count_statistics(c, "twos_complement"))(counts)
  # max |count| 3 -> T = 3. Patterns: 2 = 010, 3 = 011, 1 = 001, -1 = 111, -2 = 110, -3 = 101.
  # Channel 0: (1 + 2) * 2 + (2 + 2) = 10; channel 2: 3 + 1 + 3 = 7; channel 3: 1 + 3 + 1 = 5.
  _check(stats, {"spikes": [10, 0, 7, 5], "tokens": 6, "slots": 6 * 4 * 3, "time_steps": 3,
                 "abs_count": 21})
  with pytest.raises(ValueError, match="channel axis"):
    spike_stats.count_statistics(np.array(3), "ternary")


@pytest.mark.parametrize("time_steps", [None, 3])
def test_merge_equals_concatenation(time_steps):
  rng = np.random.default_rng(0)
  a, b = rng.integers(-4, 5, size=(5, 6)), rng.integers(-9, 10, size=(3, 6))
  merged = spike_stats.merge_statistics(spike_stats.count_statistics(a, "sign_magnitude",
                                                                     time_steps),
                                        spike_stats.count_statistics(b, "sign_magnitude",
                                                                     time_steps))
  whole = spike_stats.count_statistics(np.concatenate([a, b]), "sign_magnitude", time_steps)
  # With the paper's T each batch has its own window (3 and 4 steps), so the slots differ from a
  # single window over the concatenation; everything else is the same.
  keys = whole.keys() if time_steps else whole.keys() - {"slots"}
  for key in keys:
    np.testing.assert_array_equal(merged[key], whole[key], err_msg=key)
  if time_steps is None:
    assert float(merged["time_steps"]) == 4
    assert float(merged["slots"]) == 5 * 6 * 3 + 3 * 6 * 4


def _stats(counts, coding="ternary", t=None):
  return spike_stats.count_statistics(np.asarray(counts), coding, t)


def _fake_tree():
  return {
      "layer_10": {"mixer": {"spikes_mixer_in": (_stats([[1, 0], [0, 0]]),)}},
      "layer_2": {"mlp": {
          # Sown twice (two calls): merged into 4 tokens, channel spikes [3, 0, 1].
          "spikes_mlp_in": (_stats([[1, 0, 1], [1, 0, 0]]), _stats([[0, 0, 0], [-1, 0, 0]])),
          "spikes_mlp_hidden": (_stats([[2, 1]]),),
          "unrelated": (jnp.ones(3),),
      }},
      "head": {"spikes_mixer_out": (_stats([[0, 3]]),)},
  }


def test_summarize_fake_tree():
  rows = spike_stats.summarize(_fake_tree())
  assert [(r["layer"], r["site"]) for r in rows] == [
      ("layer_2", "mlp_in"), ("layer_2", "mlp_hidden"), ("layer_2", "all"),
      ("layer_10", "mixer_in"), ("layer_10", "all"),
      ("head", "mixer_out"), ("head", "all"), ("all", "all")]
  by = {(r["layer"], r["site"]): r for r in rows}
  mlp_in = by["layer_2", "mlp_in"]
  assert mlp_in["path"] == "layer_2/mlp" and mlp_in["channels"] == 3 and mlp_in["tokens"] == 4
  # 4 spikes over 4 tokens x 3 channels x T = 1 slots.
  assert mlp_in["time_steps"] == 1
  assert mlp_in["firing_rate"] == pytest.approx(4 / 12)
  assert mlp_in["sparsity"] == pytest.approx(8 / 12)
  assert mlp_in["spikes_per_channel"] == pytest.approx(4 / 12)
  assert mlp_in["never_firing"] == pytest.approx(1 / 3)
  assert mlp_in["mean_abs_count"] == pytest.approx(4 / 12)
  assert mlp_in["unrepresentable"] == 0
  # mlp_hidden: T = 2, 3 spikes in 1 x 2 x 2 slots.
  assert by["layer_2", "mlp_hidden"]["firing_rate"] == pytest.approx(3 / 4)
  layer = by["layer_2", "all"]
  assert layer["channels"] == 5 and layer["tokens"] == 1 and layer["time_steps"] == 2
  assert layer["firing_rate"] == pytest.approx(7 / 16)
  assert layer["spikes_per_channel"] == pytest.approx(7 / 14)
  assert layer["never_firing"] == pytest.approx(1 / 5)
  assert by["head", "mixer_out"]["path"] == "head"
  total = by["all", "all"]
  # Slots: 12 + 4 (layer 2), 2 x 2 x 1 (layer 10), 1 x 2 x 3 (head); spikes 7 + 1 + 3.
  assert total["firing_rate"] == pytest.approx(11 / 26)
  assert total["channels"] == 9 and total["never_firing"] == pytest.approx(3 / 9)
  assert spike_stats.summarize({"x": {"y": (jnp.ones(2),)}}) == []


def test_merge_trees_equals_concatenated_batches():
  a = {"layer_0": {"spikes_mlp_in": (_stats([[1, -2, 0]], "twos_complement", 3),),
                   "other": (1,)}}
  b = {"layer_0": {"spikes_mlp_in": (_stats([[0, 3, 0], [2, 2, 0]], "twos_complement", 3),),
                   "other": (2,)}}
  merged = spike_stats.merge_trees(a, b)
  assert merged["layer_0"]["other"] == (1, 2)
  whole = _stats([[1, -2, 0], [0, 3, 0], [2, 2, 0]], "twos_complement", 3)
  (got,) = merged["layer_0"]["spikes_mlp_in"]
  for key in whole:
    np.testing.assert_array_equal(got[key], whole[key], err_msg=key)
  row = spike_stats.summarize(merged)[0]
  # Spikes per channel: [1 + 0 + 1, 2 (110) + 2 (011) + 1, 0] = [2, 5, 0]; 3 x 3 x 3 slots.
  assert row["firing_rate"] == pytest.approx(7 / 27)
  assert row["never_firing"] == pytest.approx(1 / 3)


class Block(nn.Module):
  config: SpikeConfig

  @nn.compact
  def __call__(self, x):
    h = spiking.spike_input(self, x, "mlp_in", self.config)
    h = nn.relu(nn.Dense(8, name="up")(h))
    h = spiking.spike_input(self, h, "mlp_hidden", self.config)
    return nn.Dense(x.shape[-1], name="down")(h)


class Model(nn.Module):
  config: SpikeConfig

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = x + Block(self.config, name=f"layer_{i}")(x)
    return x


def test_summarize_real_module_over_two_batches():
  cfg = SpikeConfig(enabled=True, coding="ternary", time_steps=3)
  model = Model(cfg)
  rng = np.random.default_rng(1)
  x1 = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
  x2 = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x1)
  apply = jax.jit(lambda p, x: model.apply(p, x, mutable=["intermediates"])[1]["intermediates"])
  trees = [apply(params, x) for x in (x1, x2)]
  rows = spike_stats.summarize(spike_stats.merge_trees(*trees))
  assert [(r["layer"], r["site"]) for r in rows] == [
      ("layer_0", "mlp_in"), ("layer_0", "mlp_hidden"), ("layer_0", "all"),
      ("layer_1", "mlp_in"), ("layer_1", "mlp_hidden"), ("layer_1", "all"), ("all", "all")]
  first = rows[0]
  assert first["path"] == "layer_0" and first["tokens"] == 12 and first["channels"] == 4
  # The first site sees the model input: recompute its statistics from the concatenation.
  counts, _ = spiking.spike_counts(jnp.concatenate([x1, x2]))
  n = np.minimum(np.abs(np.asarray(counts)), 3)
  assert first["firing_rate"] == pytest.approx(n.sum() / (12 * 4 * 3))
  assert first["never_firing"] == pytest.approx(np.mean(n.sum(axis=(0, 1)) == 0))
  assert first["unrepresentable"] == pytest.approx(np.mean(np.abs(np.asarray(counts)) > 3))
  assert rows[2]["channels"] == 12 and rows[-1]["channels"] == 24
  assert rows[2]["tokens"] == 12 and rows[-1]["tokens"] == 12
