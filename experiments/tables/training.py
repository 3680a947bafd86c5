"""Training loops shared by the table scripts: one model trained at several learning rates at
once (vmapped: one compilation, one program), on a fixed set of rows from lctx's task pipeline.

Rows are dicts of [n, seq_len] arrays with the task pipeline's keys (tokens, segment_ids,
positions, targets, weights); the loss falls where `weights` is non-zero. The optimizer is AdamW
(weight decay 0.1, b2 0.99, clipping at 1.0) with a 10% warm-up and a cosine decay, as Zoology
trains; the learning rate scales AdamW's update (weight decay included, as in optax.adamw)
through a hyperparameter held in the optimizer state, so every rate shares the program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lctx.model import init_params
from lctx.optim import OptimizerConfig, make_optimizer
from lctx.steps import make_eval_step, make_train_step


def train_at_rates(model, train: dict[str, np.ndarray], *, lrs, batch_size: int, epochs: int,
                   seed: int = 0, weight_decay: float = 0.1):
  """Parameters after `epochs` passes over `train` (reshuffled each epoch), stacked over lrs.

  Every rate starts from the same initialization (seed). Rows beyond a whole number of batches
  are left out of an epoch.
  """
  n = len(train["tokens"])
  if n < batch_size:
    raise ValueError(f"tables: {n} training rows are fewer than the batch size {batch_size}")
  steps_per_epoch = n // batch_size
  steps = steps_per_epoch * epochs
  base, schedule = make_optimizer(OptimizerConfig(learning_rate=1.0, warmup_steps=steps // 10,
                                                  weight_decay=weight_decay, b2=0.99,
                                                  clip_norm=1.0), steps)
  tx = optax.chain(base, optax.inject_hyperparams(optax.scale)(step_size=1.0))
  params = init_params(model, jax.random.key(seed), jnp.asarray(train["tokens"][:1]))

  def init(lr):
    opt_state = tx.init(params)
    opt_state[1].hyperparams["step_size"] = lr
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}

  states = jax.vmap(init)(jnp.asarray(lrs, jnp.float32))
  step = jax.jit(jax.vmap(make_train_step(model, tx, schedule), in_axes=(0, None)),
                 donate_argnums=(0,))
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(n)
    for i in range(steps_per_epoch):
      rows = order[i * batch_size:(i + 1) * batch_size]
      states, _ = step(states, {k: v[rows] for k, v in train.items()})
  return states["params"]


def accuracy_at_rates(model, params, test: dict[str, np.ndarray], batch_size: int) -> list[float]:
  """Argmax accuracy over the weighted positions of `test`, for each rate of stacked params."""
  length = test["tokens"].shape[1]
  evaluate = jax.jit(jax.vmap(make_eval_step(model, 1, length), in_axes=(0, None)))
  correct = count = 0.0
  for i in range(0, len(test["tokens"]), batch_size):
    out = evaluate(params, {k: v[i:i + batch_size] for k, v in test.items()})
    correct = correct + np.asarray(out["correct"])[:, 0]
    count = count + np.asarray(out["count"])[:, 0]
  return [float(c / count[0]) for c in correct]
