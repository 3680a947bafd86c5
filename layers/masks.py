"""Attention masks: causal, sliding window and segment (document) masks, as boolean arrays.

Causality and the window are decided by token indices in the (packed) row; documents are kept
apart by segment ids. A query sees key s iff
  s <= t  and  t - s <= window (when a window is set)  and  segment[t] == segment[s].
"""

import jax.numpy as jnp


def attention_mask(q_index_bt, k_index_bs, q_segment_bt=None, k_segment_bs=None,
                   window: int | None = None, k_valid_bs=None):
  """Boolean mask [b, 1, t, s] (True = attend), broadcastable over heads.

  Args:
    q_index_bt, k_index_bs: integer indices of queries and keys in the row (or in the cache).
    q_segment_bt, k_segment_bs: optional segment ids; tokens attend only within their segment.
    window: a token sees itself plus `window` earlier keys; None means unbounded causal.
    k_valid_bs: optional boolean marking keys that exist (e.g. filled cache slots).
  """
  q = q_index_bt[:, :, None]
  k = k_index_bs[:, None, :]
  mask = k <= q
  if window is not None:
    mask &= (q - k) <= window
  if q_segment_bt is not None:
    mask &= q_segment_bt[:, :, None] == k_segment_bs[:, None, :]
  if k_valid_bs is not None:
    mask &= k_valid_bs[:, None, :]
  return mask[:, None, :, :]
