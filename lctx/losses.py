"""Next-token targets and weights for packed rows, and the summed cross-entropy."""

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
