"""Statistics of spiking activations: firing rate, sparsity, spikes per channel, silent channels.

`count_statistics` reduces one tensor of spike counts [..., channels] to a small dict of float32
sums (traceable, so it can be sown from inside a model). The sums add up across batches
(`merge_statistics`, `merge_trees`), and `summarize` turns a model's sown "intermediates" into
rows per site, per layer and overall:

  firing_rate         nonzero spike slots / (tokens x channels x T)
  sparsity            1 - firing_rate: the fraction of silent slots over the time window
  spikes_per_channel  mean over tokens x channels of the number of spikes in a train
  never_firing        fraction of channels that never spiked over all tokens seen
  unrepresentable     fraction of counts that did not fit in T steps (saturated)
  mean_abs_count      mean |count|

For reference, SpikingBrain reports 69.15% sparsity over a 3-step window, 1.13 spikes per channel
on average, and 18.4% of channels never firing.

Statistics are float32 sums, so counts beyond ~2^24 spikes per channel lose exactness; they are
summaries, not checksums.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from layers import spike_coding

# mixer_in: input of a mixer's q/k/v/gate projections; mixer_out: input of its output projection;
# mlp_in: input of the FFN's gate/up (and MoE experts); mlp_hidden: input of the FFN down
# projection; attention_q: the query vectors of softmax attention, after the projection.
SITES = ("mixer_in", "mixer_out", "mlp_in", "mlp_hidden", "attention_q")

_PREFIX = "spikes_"
_LAYER = re.compile(r"layer_(\d+)")
# Summed when merging; "time_steps" (the window length) is combined by max instead.
_SUMMED = ("spikes", "tokens", "slots", "unrepresentable", "abs_count")
_KEYS = _SUMMED + ("time_steps",)


def count_statistics(counts, coding: str, time_steps=None) -> dict:
  """Summable statistics of spike counts [..., channels], reduced over the leading axes.

  Args:
    counts: integer-valued spike counts; the last axis is the channel axis.
    coding: the coding the counts would be emitted with (spike_coding.CODINGS).
    time_steps: T, an int or traced int; None takes the paper's T from max |counts| of this
      tensor (traceable).

  Returns:
    float32 arrays: spikes [channels] (spikes summed over tokens), tokens, slots
    (tokens x channels x T), time_steps (T), unrepresentable (counts not fitting in T) and
    abs_count (sum of |count|).
  """
  c = spike_coding.as_counts(counts)
  if c.ndim < 1:
    raise ValueError(f"counts must have a channel axis, got shape {c.shape}")
  if coding not in spike_coding.CODINGS:
    raise ValueError(f"coding={coding!r} must be one of {spike_coding.CODINGS}")
  return _count_statistics(c, coding, time_steps)


# Jitted so eager callers (summaries outside a model) run one program, not a dozen small ops.
@functools.partial(jax.jit, static_argnums=(1,))
def _count_statistics(c, coding: str, time_steps) -> dict:
  if time_steps is None:
    time_steps = spike_coding.required_time_steps(jnp.max(jnp.abs(c), initial=0), coding)
  t = jnp.asarray(time_steps, jnp.int32)
  leading = tuple(range(c.ndim - 1))
  n = spike_coding.spikes_per_element(c, coding, t)
  tokens = float(np.prod(c.shape[:-1], dtype=np.int64))
  f32 = jnp.float32
  return {
      "spikes": jnp.sum(n.astype(f32), axis=leading),
      "tokens": jnp.asarray(tokens, f32),
      "slots": jnp.asarray(tokens * c.shape[-1], f32) * t.astype(f32),
      "time_steps": t.astype(f32),
      "unrepresentable": jnp.sum((~spike_coding.representable(c, coding, t)).astype(f32)),
      "abs_count": jnp.sum(jnp.abs(c).astype(f32)),
  }


def merge_statistics(a: dict, b: dict) -> dict:
  """Statistics of the union of two batches: sums, with time_steps combined by max."""
  if set(a) != set(b):
    raise ValueError(f"cannot merge statistics with keys {sorted(a)} and {sorted(b)}")
  if np.shape(a["spikes"]) != np.shape(b["spikes"]):
    raise ValueError(f"cannot merge statistics of {np.shape(a['spikes'])} and "
                     f"{np.shape(b['spikes'])} channels")
  out = {key: a[key] + b[key] for key in a if key != "time_steps"}
  out["time_steps"] = jnp.maximum(a["time_steps"], b["time_steps"])
  return out


def _merge_sown(value) -> dict:
  """One statistics dict from a sown value (a tuple of dicts, one per call, or a dict)."""
  if hasattr(value, "keys"):
    return dict(value)
  value = list(value)
  if not value:
    raise ValueError("empty sown spike statistics")
  out = dict(value[0])
  for extra in value[1:]:
    out = merge_statistics(out, dict(extra))
  return out


def merge_trees(a, b):
  """Merges two "intermediates" trees of two batches; spike statistics are summed.

  Each spike entry becomes a 1-tuple holding the merged dict. Other sown entries are concatenated
  (as if sown in both batches); keys present in only one tree are kept.
  """
  out = {}
  for key in list(a) + [k for k in b if k not in a]:
    if key not in b:
      out[key] = a[key]
    elif key not in a:
      out[key] = b[key]
    elif isinstance(key, str) and key.startswith(_PREFIX):
      out[key] = (merge_statistics(_merge_sown(a[key]), _merge_sown(b[key])),)
    elif hasattr(a[key], "keys") and hasattr(b[key], "keys"):
      out[key] = merge_trees(a[key], b[key])
    else:
      out[key] = tuple(a[key]) + tuple(b[key])
  return out


def _find(tree, path, found) -> None:
  for key, value in tree.items():
    if isinstance(key, str) and key.startswith(_PREFIX):
      found.append((path, key[len(_PREFIX):], _merge_sown(value)))
    elif hasattr(value, "keys"):
      _find(value, path + (str(key),), found)


def _layer_of(path) -> str:
  for part in path:
    if _LAYER.fullmatch(part):
      return part
  return "/".join(path)


def _row(layer, site, path, stats_list) -> dict:
  """A summary row aggregating one or more statistics dicts (each its own set of channels)."""
  spikes = [np.asarray(s["spikes"], np.float64) for s in stats_list]
  # Every site sees every token, some as several vectors (one per head), so the smallest count
  # is the number of tokens behind an aggregated row.
  tokens = min(float(s["tokens"]) for s in stats_list)
  elements = sum(float(s["tokens"]) * sp.size for s, sp in zip(stats_list, spikes))
  slots = sum(float(s["slots"]) for s in stats_list)
  total = sum(float(sp.sum()) for sp in spikes)
  channels = sum(sp.size for sp in spikes)
  silent = sum(int((sp == 0).sum()) for sp in spikes)
  firing = total / slots if slots else 0.0
  per_elem = lambda key: (sum(float(s[key]) for s in stats_list) / elements if elements else 0.0)
  return {
      "layer": layer,
      "site": site,
      "path": path,
      "firing_rate": firing,
      "sparsity": 1.0 - firing,
      "spikes_per_channel": total / elements if elements else 0.0,
      "never_firing": silent / channels if channels else 0.0,
      "channels": channels,
      "tokens": int(round(tokens)),
      "time_steps": max(int(float(s["time_steps"])) for s in stats_list),
      "unrepresentable": per_elem("unrepresentable"),
      "mean_abs_count": per_elem("abs_count"),
  }


def _layer_key(layer: str):
  # Numbered layers first in numeric order, then any other module paths alphabetically.
  m = _LAYER.fullmatch(layer)
  return (0, int(m.group(1)), "") if m else (1, 0, layer)


def _site_key(site: str):
  return (SITES.index(site), site) if site in SITES else (len(SITES), site)


def summarize(intermediates) -> list[dict]:
  """Summary rows of every spike statistic sown in an "intermediates" tree.

  Args:
    intermediates: model.apply(..., mutable=["intermediates"])[1]["intermediates"], possibly
      accumulated over batches with `merge_trees`.

  Returns:
    Rows (dicts with layer, site, path, firing_rate, sparsity, spikes_per_channel, never_firing,
    channels, tokens, time_steps, unrepresentable, mean_abs_count): one per sown site, then one
    per layer with site "all", ordered by layer number, then one overall row (layer and site
    "all"). Aggregated rows pool the channels of their sites (never_firing is over all of them);
    their `tokens` is the smallest token count among their sites, i.e. the number of tokens seen
    (sites that spike per head, like attention_q, count one vector per head and token).
  """
  found = []
  _find(intermediates, (), found)
  by_layer = {}
  for path, site, stats in found:
    by_layer.setdefault(_layer_of(path), []).append(("/".join(path), site, stats))
  rows = []
  for layer in sorted(by_layer, key=_layer_key):
    entries = sorted(by_layer[layer], key=lambda e: (_site_key(e[1]), e[0]))
    rows += [_row(layer, site, path, [stats]) for path, site, stats in entries]
    rows.append(_row(layer, "all", layer, [stats for _, _, stats in entries]))
  if found:
    rows.append(_row("all", "all", "", [stats for _, _, stats in found]))
  return rows
