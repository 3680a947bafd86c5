"""Useful floating-point operations of a DecoderLM forward pass, counted analytically.

Two parts, 2 FLOPs per multiply-add:
  matmuls      2 x (the parameters a token multiplies) per token: every weight of two or more
               axes except the embedding (a gather), norm scales, biases, sink logits / tokens
               and decay logs; the routed experts of an MoE layer count top_k / num_experts of
               their size; a tied head counts the embedding once more (vocab x d_model).
  mixing       per query token, per layer: softmax attention 4 x keys seen x heads x head_dim
               (q.k and the weighted sum of values; a sliding window caps the keys seen; sink
               tokens add theirs); the linear family (linear, lightning, gla) 4 x heads x
               d_k x d_v (the state update and the readout), the delta rule (gated_deltanet, kda)
               6 x heads x d_k x d_v.
Masked work a kernel does anyway (the upper triangle of a causal tile, padding) is not counted.
"""

from __future__ import annotations

import numpy as np

from layers.feature_maps import feature_dim
from lctx.config import ModelConfig

SOFTMAX = ("attention", "swa")
LINEAR = ("linear", "lightning", "gla")
DELTA = ("gated_deltanet", "kda")
_NOT_MATMUL = ("embedding", "scale", "sinks", "sink_keys", "sink_values", "A_log")


def _routed(path: tuple[str, ...]) -> bool:
  return "moe" in path and path[-1] in ("gate", "up", "down")


def matmul_params(cfg: ModelConfig, abstract_params: dict, skip=None) -> float:
  """The parameters one token multiplies (see the module docstring), from the abstract params
  of `lctx.model.abstract_params(cfg)`; `skip(path)` True leaves a weight out (one the pass does
  not use)."""
  total = 0.0
  flat = _flatten(abstract_params)
  for path, leaf in flat:
    name = path[-1]
    if len(leaf.shape) < 2 or name in _NOT_MATMUL or name.endswith("bias"):
      continue
    if skip is not None and skip(path):
      continue
    size = float(np.prod(leaf.shape))
    if _routed(path):
      size *= cfg.moe.top_k / cfg.moe.num_experts
    total += size
  if cfg.tie_embeddings:
    total += cfg.vocab_size * cfg.d_model
  return total


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _visible_keys(start: int, queries: int, window: int | None) -> float:
  """Sum over the queries at positions start..start+queries-1 of the keys each one sees."""
  seen = np.arange(start, start + queries, dtype=np.float64) + 1
  if window is not None:
    seen = np.minimum(seen, window + 1)
  return float(seen.sum())


def mixing_flops(cfg: ModelConfig, queries: int, start: int = 0) -> float:
  """FLOPs the mixers spend mixing `queries` tokens at positions start.. (causal), all layers."""
  total = 0.0
  for layer in cfg.layer_mixers():
    for name in layer.split("+"):
      mixer = cfg.mixer_config(name)
      h = mixer.num_heads
      if name in SOFTMAX:
        d = mixer.resolved_head_dim(cfg.d_model)
        keys = _visible_keys(start, queries, mixer.window) + queries * mixer.sink_tokens
        total += 4.0 * keys * h * d
      elif name in LINEAR:
        d = mixer.resolved_head_dim(cfg.d_model)
        total += 4.0 * queries * h * feature_dim(mixer.feature_map, d) * d
      elif name in DELTA:
        dk = mixer.resolved_head_dim(cfg.d_model)
        dv = mixer.resolved_value_dim(cfg.d_model)
        total += 6.0 * queries * h * dk * dv
      else:
        raise ValueError(f"lctx.flops: no FLOP count for mixer {name!r}")
  return total


def state_fold_flops(cfg: ModelConfig, tokens: int) -> float:
  """FLOPs of folding `tokens` cached keys and values into the state of every linear-family
  layer (2 x heads x d_k x d_v each): what a query of a recorded context at position `tokens`
  spends before its own readout (layers/context_cache.py)."""
  total = 0.0
  for layer in cfg.layer_mixers():
    for name in layer.split("+"):
      if name in LINEAR:
        mixer = cfg.mixer_config(name)
        d = mixer.resolved_head_dim(cfg.d_model)
        total += 2.0 * tokens * mixer.num_heads * feature_dim(mixer.feature_map, d) * d
  return total


def forward_flops(cfg: ModelConfig, abstract_params: dict, queries: int, start: int = 0,
                  skip=None) -> float:
  """Useful FLOPs of a causal forward over `queries` tokens at positions start.. whose earlier
  context (positions 0..start-1) is cached: a prefill is (T, 0), a decoding step (1, T).
  `skip` as in `matmul_params`."""
  return (2.0 * matmul_params(cfg, abstract_params, skip) * queries +
          mixing_flops(cfg, queries, start))
