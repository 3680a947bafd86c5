"""Adaptive-threshold spiking of the activations that enter linear projections.

Each token vector x [..., c] gets its own threshold V_th = mean_c |x| / k, clipped to
[v_min, v_max]. The spike count of an element is s = round(x / V_th) (not clamped), and the
projection sees x_hat = s * V_th. Training uses a straight-through estimator: the forward pass is
x_hat, the gradient is that of the identity (V_th gets none either). At inference the counts are
emitted as spike trains over T time steps (layers.spike_coding), and the projection of x_hat is
recovered from the trains by spike_coding.spike_matmul.

Mixers and blocks call `spike_input(self, x, site, config)` on the input of a projection; the
site names where it is applied (SITES), so a SpikeConfig can spike some of them only. When the
"intermediates" collection is mutable, the call also sows summable spike statistics under
`spikes_<site>` (layers.spike_stats.summarize turns them into a table).

SpikeConfig also switches INT8 fake quantization of weights (group-wise along the fan-in) and of
keys/values (per token), independently of spiking: `maybe_quantize_weight`, `maybe_quantize_kv`.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from layers import quant
from layers import spike_coding
from layers import spike_stats
from layers.spike_stats import SITES
from sharding.validation import check_fields



@dataclasses.dataclass(frozen=True)
class SpikeConfig:
  """Spiking of projection inputs and INT8 fake quantization.

  Attributes:
    enabled: spike the activations at `sites`.
    k: threshold divisor, V_th = mean |x| / k; larger k gives finer steps and larger counts.
    v_min: lower clip of V_th (keeps all-zero tokens finite).
    v_max: upper clip of V_th.
    sites: where spiking applies, a subset of SITES.
    coding: the spike coding (spike_coding.CODINGS) the statistics are computed for.
    time_steps: T of the spike trains in the statistics; None takes the paper's choice from the
      largest |count| of each spiked tensor.
    int8_weights: fake-quantize projection weights to INT8, group-wise along the fan-in.
    weight_group: fan-in entries per INT8 weight group.
    int8_kv: fake-quantize keys and values to INT8 with one scale per token.
  """

  enabled: bool = False
  k: float = 3.0
  v_min: float = 1e-5
  v_max: float = 1e4
  sites: tuple[str, ...] = SITES
  coding: str = "ternary"
  time_steps: int | None = None
  int8_weights: bool = False
  weight_group: int = 128
  int8_kv: bool = False

  def __post_init__(self):
    check_fields(self)
    if not self.k > 0:
      raise ValueError(f"SpikeConfig.k={self.k} must be > 0")
    if not 0 < self.v_min <= self.v_max:
      raise ValueError(f"SpikeConfig.v_min={self.v_min} and SpikeConfig.v_max={self.v_max} "
                       "must satisfy 0 < v_min <= v_max")
    unknown = [s for s in self.sites if s not in SITES]
    if unknown:
      raise ValueError(f"SpikeConfig.sites={self.sites} has unknown sites {unknown}; "
                       f"each must be one of {SITES}")
    if self.coding not in spike_coding.CODINGS:
      raise ValueError(f"SpikeConfig.coding={self.coding!r} must be one of "
                       f"{spike_coding.CODINGS}")
    if self.time_steps is not None and self.time_steps < 1:
      raise ValueError(f"SpikeConfig.time_steps={self.time_steps} must be None or >= 1")
    if self.weight_group < 1:
      raise ValueError(f"SpikeConfig.weight_group={self.weight_group} must be >= 1")


def spike_threshold(x, k: float = 3.0, v_min: float = 1e-5, v_max: float = 1e4) -> jax.Array:
  """Per-token threshold clip(mean_c |x| / k, v_min, v_max): float32 [..., 1]."""
  x32 = jnp.asarray(x).astype(jnp.float32)
  return jnp.clip(jnp.mean(jnp.abs(x32), axis=-1, keepdims=True) / k, v_min, v_max)


def spike_counts(x, k: float = 3.0, v_min: float = 1e-5, v_max: float = 1e4):
  """Spike counts round(x / V_th) (float32 holding integers) and the threshold V_th [..., 1]."""
  v_th = spike_threshold(x, k, v_min, v_max)
  return jnp.round(jnp.asarray(x).astype(jnp.float32) / v_th), v_th


def _spike(x, k, v_min, v_max):
  """(x_hat with the straight-through gradient, float32 counts)."""
  x = jnp.asarray(x)
  counts, v_th = spike_counts(lax.stop_gradient(x), k, v_min, v_max)
  x32 = x.astype(jnp.float32)
  # Written as x_hat + (x - x) rather than x + (x_hat - x) so the forward value is exactly
  # x_hat (no rounding from the detour through x); the gradient is the identity either way.
  return (counts * v_th + (x32 - lax.stop_gradient(x32))).astype(x.dtype), counts


def adaptive_spike(x, k: float = 3.0, v_min: float = 1e-5, v_max: float = 1e4) -> jax.Array:
  """x_hat = spike count * V_th in x's dtype, with a straight-through (identity) gradient."""
  return _spike(x, k, v_min, v_max)[0]


def _active(config, site: str) -> bool:
  if site not in SITES:
    raise ValueError(f"spiking site {site!r} must be one of {SITES}")
  return config is not None and config.enabled and site in config.sites


def spike_input(module, x, site: str, config: SpikeConfig | None) -> jax.Array:
  """Spikes x (the input of a projection at `site`) when `config` enables that site.

  Args:
    module: the calling Flax module; statistics are sown into its "intermediates" (under
      `spikes_<site>`) only when that collection is mutable.
    x: activations [..., channels].
    site: one of SITES.
    config: None or a SpikeConfig; x is returned unchanged unless it is enabled for `site`.
  """
  if not _active(config, site):
    return x
  x_hat, counts = _spike(x, config.k, config.v_min, config.v_max)
  if module.is_mutable_collection("intermediates"):
    stats = spike_stats.count_statistics(counts, config.coding, config.time_steps)
    module.sow("intermediates", f"spikes_{site}", stats)
  return x_hat


def maybe_quantize_weight(w, config: SpikeConfig | None, fan_in_axes: tuple[int, ...] = (0,)):
  """INT8 group-wise fake quantization of w when config.int8_weights, else w."""
  if config is None or not config.int8_weights:
    return w
  return quant.fake_quant_int8_grouped(w, config.weight_group, fan_in_axes)


def maybe_quantize_kv(x, config: SpikeConfig | None, token_axes: tuple[int, ...]):
  """Per-token INT8 fake quantization of keys or values when config.int8_kv, else x."""
  if config is None or not config.int8_kv:
    return x
  return quant.fake_quant_int8_per_token(x, token_axes)
