"""Upcycling a dense model into a MoE model: the tree matches the MoE model's, values are scaled."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.moe import MoEConfig, upcycle_scale
from lctx.config import ModelConfig
from lctx.model import DecoderLM, init_params
from lctx.upcycle import upcycle_model_params


def test_upcycled_params_fit_the_moe_model_and_scale_the_dense_ffn():
  dense_cfg = ModelConfig(d_model=16, num_layers=3, d_ff=24)
  moe = MoEConfig(enabled=True, num_experts=4, top_k=1, num_shared_experts=1, dense_layers=(0,))
  tokens = jnp.zeros((1, 8), jnp.int32)
  dense = nn.unbox(init_params(DecoderLM(dense_cfg), jax.random.key(0), tokens))
  moe_model = DecoderLM(dataclasses.replace(dense_cfg, moe=moe))
  expected = jax.eval_shape(lambda: nn.unbox(moe_model.init(jax.random.key(0), tokens)["params"]))
  up = upcycle_model_params(dense, moe)
  assert jax.tree.structure(up) == jax.tree.structure(expected)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(up), jax.tree.leaves(expected)))
  alpha = upcycle_scale(moe)
  np.testing.assert_allclose(alpha, (1 + 1 / 4) ** (-1 / 3))
  for i in (1, 2):
    for name in ("gate", "up", "down"):
      w = dense[f"layer_{i}"]["mlp"][name]
      np.testing.assert_allclose(up[f"layer_{i}"]["moe"][name][3], alpha * w, rtol=1e-6)
      np.testing.assert_allclose(up[f"layer_{i}"]["moe"]["shared_" + name][0], alpha * w,
                                 rtol=1e-6)
  assert up["layer_0"] is dense["layer_0"]  # the kept dense layer is untouched
  logits = moe_model.apply({"params": up}, jnp.arange(8)[None] % 256)
  assert np.isfinite(np.asarray(logits)).all()
  with pytest.raises(ValueError, match="MoEConfig.enabled=False"):
    upcycle_model_params(dense, MoEConfig())
