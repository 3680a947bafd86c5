"""Jittable train and eval steps.

The train state is a plain dict pytree {"step", "params", "opt_state"} so that orbax, shard_map
and test-time training can all see plain arrays.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from lctx.losses import next_token_targets, token_cross_entropy

Batch = dict[str, jax.Array]
State = dict[str, Any]


def _loss_sums(model, params, batch: Batch):
  """(sum of token cross-entropies, number of weighted tokens) of one batch."""
  targets, weights = next_token_targets(batch["tokens"], batch["segment_ids"])
  logits = model.apply({"params": params}, batch["tokens"], batch["positions"],
                       batch["segment_ids"])
  ce = token_cross_entropy(logits, targets)
  return jnp.sum(ce * weights), jnp.sum(weights)


def make_train_step(model, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int = 1) -> Callable[[State, Batch], tuple[State, dict]]:
  """Builds `train_step(state, batch) -> (state, metrics)`.

  The loss is the mean over all weighted tokens of the global batch, whatever the number of
  accumulation micro-batches: summed losses and summed gradients are divided by the token count
  once, so accumulation changes memory, not the result (up to float summation order).
  """
  grad_fn = jax.value_and_grad(lambda p, b: _loss_sums(model, p, b), has_aux=True)

  def train_step(state: State, batch: Batch):
    params = state["params"]
    if grad_accum_steps == 1:
      (loss_sum, count), grads = grad_fn(params, batch)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]),
          batch)

      def body(carry, mb):
        (l, c), g = grad_fn(params, mb)
        acc_l, acc_c, acc_g = carry
        return (acc_l + l, acc_c + c, jax.tree.map(jnp.add, acc_g, g)), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (loss_sum, count, grads), _ = jax.lax.scan(body, (0.0, 0.0, zeros), micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                 "opt_state": opt_state}
    metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state["step"]), "tokens": count}
    return new_state, metrics

  return train_step


def make_eval_step(model, num_buckets: int, seq_len: int):
  """Builds `eval_step(params, batch) -> (ce_sum[num_buckets], count[num_buckets])`.

  Tokens are bucketed by their position inside their document (what context they had), in
  equal-width buckets over [0, seq_len).
  """

  def eval_step(params, batch: Batch):
    targets, weights = next_token_targets(batch["tokens"], batch["segment_ids"])
    logits = model.apply({"params": params}, batch["tokens"], batch["positions"],
                         batch["segment_ids"])
    ce = token_cross_entropy(logits, targets) * weights
    bucket = jnp.clip(batch["positions"] * num_buckets // seq_len, 0, num_buckets - 1)
    ce_sum = jnp.zeros((num_buckets,), jnp.float32).at[bucket.reshape(-1)].add(ce.reshape(-1))
    count = jnp.zeros((num_buckets,), jnp.float32).at[bucket.reshape(-1)].add(
        weights.reshape(-1))
    return ce_sum, count

  return eval_step
