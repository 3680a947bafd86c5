"""Jittable train and eval steps.

The train state is a plain dict pytree {"step", "params", "opt_state"} so that orbax, shard_map
and test-time training can all see plain arrays.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from lctx.losses import batch_targets, token_cross_entropy

Batch = dict[str, jax.Array]
State = dict[str, Any]


def loss_sums(model, params, batch: Batch):
  """(objective sum, sums) of one batch; the objective is what the train step differentiates.

  sums = {"ce": sum of token cross-entropies, "tokens": number of weighted tokens,
          "aux": sum over the batch's tokens of the auxiliary losses the model sowed into its
          "losses" collection (MoE load balancing, already weighted)}.
  objective = ce + aux, so dividing by the global token count gives mean cross-entropy plus the
  token-weighted mean auxiliary loss, however the batch is split into micro-batches.
  """
  targets, weights = batch_targets(batch)
  logits, collections = model.apply({"params": params}, batch["tokens"], batch["positions"],
                                    batch["segment_ids"], mutable=["losses"])
  ce = jnp.sum(token_cross_entropy(logits, targets) * weights)
  tokens = jnp.sum(weights)
  aux_terms = jax.tree.leaves(collections.get("losses", {}))
  aux = sum(aux_terms, jnp.zeros((), jnp.float32)) * tokens
  return ce + aux, {"ce": ce, "tokens": tokens, "aux": aux}


def make_train_step(model, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int = 1,
                    loss_fn=loss_sums) -> Callable[[State, Batch], tuple[State, dict]]:
  """Builds `train_step(state, batch) -> (state, metrics)`.

  The loss is the mean over all weighted tokens of the global batch, whatever the number of
  accumulation micro-batches: summed losses and summed gradients are divided by the token count
  once, so accumulation changes memory, not the result (up to float summation order).
  Metrics: "loss" is the mean cross-entropy; models with auxiliary losses also report "aux_loss".
  `loss_fn` replaces `loss_sums` (same signature and sums; attention transfer's per-layer MSE).
  """
  grad_fn = jax.value_and_grad(lambda p, b: loss_fn(model, p, b), has_aux=True)

  def train_step(state: State, batch: Batch):
    params = state["params"]
    if grad_accum_steps == 1:
      (_, sums), grads = grad_fn(params, batch)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]),
          batch)

      def body(carry, mb):
        (_, s), g = grad_fn(params, mb)
        acc_s, acc_g = carry
        return (jax.tree.map(jnp.add, acc_s, s), jax.tree.map(jnp.add, acc_g, g)), None

      zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("ce", "tokens", "aux")}
      zeros = jax.tree.map(jnp.zeros_like, params)
      (sums, grads), _ = jax.lax.scan(body, (zero_sums, zeros), micro)
    denom = jnp.maximum(sums["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                 "opt_state": opt_state}
    metrics = {"loss": sums["ce"] / denom, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state["step"]), "tokens": sums["tokens"]}
    if model.config.moe.enabled:
      metrics["aux_loss"] = sums["aux"] / denom
    return new_state, metrics

  return train_step


def make_eval_step(model, num_buckets: int, seq_len: int):
  """Builds `eval_step(params, batch) -> {"ce", "count", "correct"}`, each [num_buckets].

  Per bucket: the summed cross-entropy, the number of weighted targets and how many of them are
  the argmax of the logits (accuracy, the metric of recall tasks such as MQAR). Tokens are
  bucketed by their position inside their document (what context they had), in equal-width
  buckets over [0, seq_len).
  """

  def eval_step(params, batch: Batch):
    targets, weights = batch_targets(batch)
    logits = model.apply({"params": params}, batch["tokens"], batch["positions"],
                         batch["segment_ids"])
    ce = token_cross_entropy(logits, targets) * weights
    hit = (jnp.argmax(logits, axis=-1) == targets) * weights
    bucket = jnp.clip(batch["positions"] * num_buckets // seq_len, 0, num_buckets - 1).reshape(-1)
    per_bucket = lambda x: jnp.zeros((num_buckets,), jnp.float32).at[bucket].add(x.reshape(-1))
    return {"ce": per_bucket(ce), "count": per_bucket(weights), "correct": per_bucket(hit)}

  return eval_step


def all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of `tree` is free of NaN and infinity (jittable)."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)
