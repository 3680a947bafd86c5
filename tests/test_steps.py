"""Loss targets of packed rows, and the train step (accumulation, learning progress)."""

import jax
import jax.numpy as jnp
import numpy as np

from layers.attention import AttentionConfig
from lctx.config import ModelConfig
from lctx.losses import next_token_targets
from lctx.optim import OptimizerConfig, make_optimizer
from lctx.state import build
from lctx.steps import make_eval_step, make_train_step
from sharding.mesh import MeshConfig, make_mesh


def test_targets_never_cross_documents_or_padding():
  tokens = jnp.array([[10, 11, 12, 20, 21, 0, 0]])
  seg = jnp.array([[1, 1, 1, 2, 2, 0, 0]])
  targets, weights = next_token_targets(tokens, seg)
  assert targets[0, :4].tolist() == [11, 12, 20, 21]
  assert weights[0].tolist() == [1, 1, 0, 1, 0, 0, 0]


def _setup(accum):
  cfg = ModelConfig(d_model=32, num_layers=2, d_ff=64,
                    mixer_options={"attention": AttentionConfig(4, 2)})
  tx, sched = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0), 20)
  m = build(cfg, make_mesh(MeshConfig()), tx)
  step = m.jit(make_train_step(m.model, tx, sched, accum),
               in_shardings=(m.state_shardings, m.batch_sharding),
               out_shardings=(m.state_shardings, None))
  return m, step


def _batch(seed=0, b=4, t=24):
  rng = np.random.default_rng(seed)
  seg = np.sort(rng.integers(1, 4, (b, t)), axis=1)
  seg[:, -3:] = 0  # padding
  pos = np.zeros_like(seg)
  for i in range(b):
    for j in range(1, t):
      pos[i, j] = pos[i, j - 1] + 1 if seg[i, j] == seg[i, j - 1] else 0
  tokens = rng.integers(0, 256, (b, t)) * (seg != 0)
  return {k: jnp.asarray(v, jnp.int32) for k, v in
          dict(tokens=tokens, segment_ids=seg, positions=pos * (seg != 0)).items()}


def test_gradient_accumulation_equals_one_big_batch():
  m1, step1 = _setup(1)
  m4, step4 = _setup(4)
  batch = _batch()
  s1, out1 = step1(m1.init_state(0), batch)
  s4, out4 = step4(m4.init_state(0), batch)
  for key in ("loss", "grad_norm", "tokens"):
    np.testing.assert_allclose(out1[key], out4[key], rtol=1e-5)
  # Adam's first update is ~lr * sign(g): near-zero gradient entries may flip by float noise,
  # so parameters are compared to 1% of the learning rate.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
               s1["params"], s4["params"])
  assert int(s4["step"]) == 1


def test_training_on_one_batch_reduces_its_loss():
  m, step = _setup(1)
  state, batch = m.init_state(0), _batch(1)
  losses = []
  for _ in range(15):
    state, out = step(state, batch)
    losses.append(float(out["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses


def test_eval_step_buckets_by_document_position():
  m, _ = _setup(1)
  params = m.init_state(0)["params"]
  batch = _batch(2)
  out = make_eval_step(m.model, num_buckets=3, seq_len=24)(params, batch)
  count = out["count"]
  targets, weights = next_token_targets(batch["tokens"], batch["segment_ids"])
  assert float(count.sum()) == float(weights.sum())
  logits = m.model.apply({"params": params}, batch["tokens"], batch["positions"],
                         batch["segment_ids"])
  hits = (np.argmax(np.asarray(logits), -1) == np.asarray(targets)) * np.asarray(weights)
  assert float(out["correct"].sum()) == float(hits.sum())
  pos = np.asarray(batch["positions"])[np.asarray(weights) > 0]
  np.testing.assert_array_equal(count, np.bincount(pos * 3 // 24, minlength=3))


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = ModelConfig(d_model=32, num_layers=2, d_ff=64, dtype="bfloat16",
                    mixer_options={"attention": AttentionConfig(4, 2)})
  tx, sched = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0), 20)
  m = build(cfg, make_mesh(MeshConfig()), tx)
  step = m.jit(make_train_step(m.model, tx, sched),
               in_shardings=(m.state_shardings, m.batch_sharding),
               out_shardings=(m.state_shardings, None))
  state, batch = m.init_state(0), _batch(3)
  logits = m.model.apply({"params": state["params"]}, batch["tokens"])
  assert logits.dtype == jnp.float32
  m32, step32 = _setup(1)
  _, out32 = step32(m32.init_state(0), batch)
  state, out = step(state, batch)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state["params"]))
  np.testing.assert_allclose(out["loss"], out32["loss"], rtol=2e-2)
