"""layers/spiking.py: thresholds and counts by hand, clipping, the straight-through gradient,
SpikeConfig validation and spike_input inside a Flax module."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import quant
from layers import spike_coding
from layers import spike_stats
from layers import spiking
from layers.spiking import SpikeConfig


def test_hand_computed_spikes():
  # mean |x| = 1.5, V_th = 1.5 / 3 = 0.5, counts = x / 0.5.
  x = jnp.array([[3.0, -1.0, 0.0, 2.0]])
  np.testing.assert_array_equal(spiking.spike_threshold(x), [[0.5]])
  counts, v_th = spiking.spike_counts(x)
  np.testing.assert_array_equal(counts, [[6, -2, 0, 4]])
  assert counts.dtype == jnp.float32 and v_th.shape == (1, 1)
  np.testing.assert_array_equal(spiking.adaptive_spike(x), x)


def test_rounding_and_per_token_thresholds():
  # Token 0: mean |x| = 0.75; k = 2 -> V_th = 0.375, x / V_th = [4, -2/3, 2, 4/3] -> [4, -1, 2, 1].
  # Token 1: mean |x| = 3; V_th = 1.5, x / V_th = [0, 4, -2.5, 1.5] -> [0, 4, -2, 2] (ties to
  # even).
  x = jnp.array([[1.5, -0.25, 0.75, 0.5], [0.0, 6.0, -3.75, 2.25]])
  counts, v_th = spiking.spike_counts(x, k=2.0)
  np.testing.assert_allclose(v_th, [[0.375], [1.5]])
  np.testing.assert_array_equal(counts, [[4, -1, 2, 1], [0, 4, -2, 2]])
  np.testing.assert_allclose(spiking.adaptive_spike(x, k=2.0),
                             [[1.5, -0.375, 0.75, 0.375], [0.0, 6.0, -3.0, 3.0]])


def test_threshold_clipping():
  x = jnp.array([[0.0, 0.0, 0.0, 0.0],  # mean 0 -> v_min
                 [1e-6, -1e-6, 1e-6, 0.0],  # mean/3 = 2.5e-7 -> v_min
                 [3e5, -3e5, 6e5, 0.0]])  # mean/3 = 1e5 -> v_max
  counts, v_th = spiking.spike_counts(x)
  np.testing.assert_allclose(v_th[:, 0], [1e-5, 1e-5, 1e4])
  np.testing.assert_array_equal(counts, [[0, 0, 0, 0], [0, 0, 0, 0], [30, -30, 60, 0]])
  out = spiking.adaptive_spike(x)
  assert bool(jnp.isfinite(out).all())
  np.testing.assert_array_equal(out[:2], 0.0)
  np.testing.assert_allclose(out[2], x[2])
  # Custom clip bounds.
  _, v_th = spiking.spike_counts(x[2:], v_max=2e4)
  np.testing.assert_allclose(v_th, [[2e4]])


def test_straight_through_gradient_is_identity():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32).at[0, 0].set(0.0)
  w = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32)
  grad = jax.grad(lambda x: jnp.sum(w * spiking.adaptive_spike(x, k=3.0)))(x)
  np.testing.assert_array_equal(grad, w)
  # The forward value is not the identity: rounding moved some entries.
  assert float(jnp.abs(spiking.adaptive_spike(x) - x).max()) > 1e-3


def test_spiked_projection_equals_spike_matmul():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
  counts, v_th = spiking.spike_counts(x)
  dense = spiking.adaptive_spike(x) @ w
  for coding in ("ternary", "sign_magnitude", "twos_complement"):
    spikes = spike_coding.encode(counts, coding)
    np.testing.assert_allclose(spike_coding.spike_matmul(spikes, w, coding, v_th), dense,
                               rtol=1e-5, atol=1e-5)


def test_config_defaults_and_normalization():
  cfg = SpikeConfig(enabled=True, k=2, sites=["mlp_in", "attention_q"], time_steps=4)
  assert cfg.k == 2.0 and isinstance(cfg.k, float)
  assert cfg.sites == ("mlp_in", "attention_q")
  default = SpikeConfig()
  assert not default.enabled and default.sites == spiking.SITES
  assert default.coding == "ternary" and default.time_steps is None
  assert default.weight_group == 128 and not default.int8_weights and not default.int8_kv


@pytest.mark.parametrize("kwargs,field", [
    ({"k": 0.0}, "SpikeConfig.k"),
    ({"k": "3"}, "SpikeConfig.k"),
    ({"v_min": 0.0}, "SpikeConfig.v_min"),
    ({"v_min": 2.0, "v_max": 1.0}, "SpikeConfig.v_max"),
    ({"sites": ("mlp_in", "bogus")}, "SpikeConfig.sites"),
    ({"sites": "mlp_in"}, "SpikeConfig.sites"),
    ({"coding": "unary"}, "SpikeConfig.coding"),
    ({"time_steps": 0}, "SpikeConfig.time_steps"),
    ({"time_steps": 2.5}, "SpikeConfig.time_steps"),
    ({"weight_group": 0}, "SpikeConfig.weight_group"),
    ({"enabled": 1}, "SpikeConfig.enabled"),
])
def test_config_validation_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    SpikeConfig(**kwargs)


class Tiny(nn.Module):
  """x -> spike_input(x, "mlp_in") @ w."""

  config: SpikeConfig | None
  site: str = "mlp_in"

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1], 3))
    return spiking.spike_input(self, x, self.site, self.config) @ w


def _inputs():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 6)), jnp.float32)
  params = Tiny(None).init(jax.random.PRNGKey(0), x)
  return x, params


def test_spike_input_passthrough():
  x, _ = _inputs()
  mod = Tiny(None)
  for cfg in (None, SpikeConfig(enabled=False), SpikeConfig(enabled=True, sites=("mlp_hidden",))):
    assert spiking.spike_input(mod, x, "mlp_in", cfg) is x
  with pytest.raises(ValueError, match="bogus"):
    spiking.spike_input(mod, x, "bogus", SpikeConfig(enabled=True))


def test_spike_input_in_module_sows_only_when_mutable(monkeypatch):
  x, params = _inputs()
  cfg = SpikeConfig(enabled=True, coding="sign_magnitude", time_steps=3)
  calls = []
  original = spike_stats.count_statistics
  monkeypatch.setattr(spike_stats, "count_statistics",
                      lambda *a, **kw: calls.append(1) or original(*a, **kw))
  want = spiking.adaptive_spike(x) @ params["params"]["w"]
  out = Tiny(cfg).apply(params, x)
  np.testing.assert_allclose(out, want, rtol=1e-6)
  assert not calls, "statistics must not be computed when intermediates is immutable"

  out, state = Tiny(cfg).apply(params, x, mutable=["intermediates"])
  np.testing.assert_allclose(out, want, rtol=1e-6)
  assert len(calls) == 1
  sown = state["intermediates"]["spikes_mlp_in"]
  assert isinstance(sown, tuple) and len(sown) == 1
  counts, _ = spiking.spike_counts(x)
  expected = original(counts, "sign_magnitude", 3)
  for key, value in expected.items():
    np.testing.assert_array_equal(sown[0][key], value, err_msg=key)
  assert float(sown[0]["tokens"]) == 6 and float(sown[0]["slots"]) == 6 * 6 * 3

  # A site left out of config.sites neither spikes nor sows.
  out, state = Tiny(SpikeConfig(enabled=True, sites=("mixer_in",))).apply(
      params, x, mutable=["intermediates"])
  np.testing.assert_allclose(out, x @ params["params"]["w"], rtol=1e-6)
  assert "spikes_mlp_in" not in state.get("intermediates", {})


def test_maybe_quantize():
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.normal(size=(300, 4)), jnp.float32)
  kv = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32)
  assert spiking.maybe_quantize_weight(w, None, (0,)) is w
  assert spiking.maybe_quantize_weight(w, SpikeConfig(enabled=True), (0,)) is w
  assert spiking.maybe_quantize_kv(kv, SpikeConfig(int8_weights=True), (0, 1)) is kv
  # Applies whether or not spiking is enabled.
  cfg = SpikeConfig(int8_weights=True, weight_group=64, int8_kv=True)
  got = spiking.maybe_quantize_weight(w, cfg, (0,))
  np.testing.assert_array_equal(got, quant.fake_quant_int8_grouped(w, 64, (0,)))
  assert not np.array_equal(got, w)
  got = spiking.maybe_quantize_kv(kv, cfg, (0, 1))
  np.testing.assert_array_equal(got, quant.fake_quant_int8_per_token(kv, (0, 1)))
  assert not np.array_equal(got, kv)
