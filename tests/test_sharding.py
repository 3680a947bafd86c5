"""Meshes and the logical-axis rules on 8 fake CPU devices (run in a subprocess, because the
device count must be set before jax initializes)."""

import pytest

from sharding.mesh import MeshConfig
from tests.multidevice import run_with_devices


def test_mesh_shapes_and_errors():
  assert MeshConfig().shape(8) == (8, 1, 1, 1)
  assert MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 1, 2)
  with pytest.raises(ValueError, match="does not divide the 8 available devices"):
    MeshConfig(fsdp=3).shape(8)
  with pytest.raises(ValueError, match="uses 4 devices but 8 are available"):
    MeshConfig(data=2, fsdp=2).shape(8)
  with pytest.raises(ValueError, match="at most one -1"):
    MeshConfig(data=-1, fsdp=-1)


def test_params_born_sharded_and_sharded_step_matches_single_device():
  out = run_with_devices("""
    import jax, jax.numpy as jnp, numpy as np
    assert len(jax.devices()) == 8
    from layers.attention import AttentionConfig
    from lctx.config import ModelConfig
    from lctx.optim import OptimizerConfig, make_optimizer
    from lctx.state import build
    from lctx.steps import make_train_step
    from sharding.mesh import MeshConfig, make_mesh
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = ModelConfig(d_model=32, num_layers=2, d_ff=64,
                      mixer_options={"attention": AttentionConfig(4, 2)})
    tx, sched = make_optimizer(OptimizerConfig(warmup_steps=0), 10)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 256, (8, 16)), "segment_ids": np.ones((8, 16)),
             "positions": np.broadcast_to(np.arange(16), (8, 16))}
    batch = {k: np.asarray(v, np.int32) for k, v in batch.items()}
    results = []
    for mesh_cfg, devices in [(MeshConfig(), jax.devices()[:1]),
                              (MeshConfig(data=2, fsdp=2, tensor=2), None)]:
      m = build(cfg, make_mesh(mesh_cfg, devices), tx)
      state = m.init_state(0)
      step = m.jit(make_train_step(m.model, tx, sched),
                   in_shardings=(m.state_shardings, m.batch_sharding),
                   out_shardings=(m.state_shardings, None), donate_argnums=(0,))
      gb = {k: jax.device_put(v, m.batch_sharding) for k, v in batch.items()}
      for _ in range(2):
        state, out = step(state, gb)
      results.append((state, out))
      if devices is None:
        q = state["params"]["layer_0"]["mixer"]["q"]
        print("q", q.sharding.spec, len(q.addressable_shards), q.addressable_shards[0].data.shape)
        mu = state["opt_state"][1][0].mu["layer_0"]["mlp"]["gate"]
        print("mu", mu.sharding.spec)
    (s1, o1), (s8, o8) = results
    np.testing.assert_allclose(o1["loss"], o8["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                 atol=1e-5), s1["params"], s8["params"])
    print("match")
  """)
  assert "q P('fsdp', 'tensor', None) 8 (16, 2, 8)" in out, out
  assert "mu P('fsdp', 'tensor')" in out, out
  assert "match" in out
