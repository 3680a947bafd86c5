"""Targets and weights of a batch (next-token for packed rows, or the task's own), and the
per-token cross-entropy."""

import jax.numpy as jnp
import optax


def next_token_targets(tokens_bt, segment_ids_bt):
  """Targets [b, t] and float32 weights [b, t].

  Position t predicts token t+1 only when both belong to the same (non-padding) document, so no
  loss crosses a document boundary and the last position of a row carries no loss.
  """
  targets = jnp.concatenate([tokens_bt[:, 1:], jnp.zeros_like(tokens_bt[:, :1])], axis=1)
  next_seg = jnp.concatenate([segment_ids_bt[:, 1:], jnp.zeros_like(segment_ids_bt[:, :1])], 1)
  weights = (segment_ids_bt != 0) & (next_seg == segment_ids_bt)
  return targets, weights.astype(jnp.float32)


def token_cross_entropy(logits_btv, targets_bt):
  """Per-token cross-entropy in float32 [b, t]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32),
                                                         targets_bt)


def batch_targets(batch):
  """(targets [b, t], float32 weights [b, t]) of a batch.

  Batches of a task source (lctx/data/tasks.py) carry their own "targets" and "weights" (loss on
  the answer positions only; MQAR's target at a query is the key's value, not the next input
  token); packed text batches get `next_token_targets`.
  """
  if "targets" in batch:
    return batch["targets"], batch["weights"].astype(jnp.float32)
  return next_token_targets(batch["tokens"], batch["segment_ids"])
