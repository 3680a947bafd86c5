"""Optimizer: schedule shape and the weight-decay mask."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lctx.config import ModelConfig
from lctx.model import DecoderLM
from lctx.optim import OptimizerConfig, decay_mask, learning_rate_schedule, make_optimizer


def test_warmup_then_cosine_to_end_fraction():
  cfg = OptimizerConfig(learning_rate=1e-3, warmup_steps=10, end_lr_fraction=0.1)
  sched = learning_rate_schedule(cfg, 100)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(100)), 1e-4, rtol=1e-5)
  assert float(sched(5)) < float(sched(10)) and float(sched(50)) < float(sched(10))


def test_decay_mask_skips_norms_on_boxed_and_plain_params():
  boxed = DecoderLM(ModelConfig(d_model=16, num_layers=1, d_ff=32)).init(
      jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
  for params in (boxed, nn.unbox(boxed)):
    mask = decay_mask(params, OptimizerConfig().no_decay)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert not any(v for k, v in flat.items() if "scale" in k)
    assert all(v for k, v in flat.items() if "'q'" in k or "'gate'" in k or "embedding" in k)


def test_weight_decay_only_touches_masked_params():
  params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  tx, _ = make_optimizer(OptimizerConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5,
                                         clip_norm=0.0), total_steps=10)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert float(new["scale"][0]) == 1.0
  assert float(new["w"][0, 0]) < 1.0


def test_bad_optimizer_values():
  with pytest.raises(ValueError, match="OptimizerConfig.learning_rate must be > 0"):
    OptimizerConfig(learning_rate=0.0)
  with pytest.raises(ValueError, match=r"OptimizerConfig.learning_rate='1e-3' must be float"):
    OptimizerConfig(learning_rate="1e-3")
