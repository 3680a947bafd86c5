"""The delta rule op (DeltaNet, Gated DeltaNet, KDA): the oracle against the matrix form, the
chunked xla path and the Pallas kernels (interpreted, in both chunk walks) against the oracle
(outputs, final states and every gradient, float32, odd shapes), the kernels' export for cuda and
tpu, decoding steps, dispatch and errors."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.delta_rule import delta_rule, delta_rule_step

B, H, HK = 2, 4, 2


def inputs(t, dk, dv, gate_scale, seed=0, channel=False):
  """(q, k, v, beta, g, h0); g per head [B, t, H], or per key dim [B, t, H, dk] if `channel`."""
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # the mixers L2-normalize k
  q = rng.normal(size=(B, t, H, dk))
  k = unit(rng.normal(size=(B, t, HK, dk)))
  v = rng.normal(size=(B, t, HK, dv))
  beta = 1 / (1 + np.exp(-rng.normal(size=(B, t, H))))
  g = None if gate_scale is None else -gate_scale * rng.uniform(
      size=(B, t, H) + ((dk,) if channel else ()))
  h0 = rng.normal(size=(B, H, dk, dv))
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  return tuple(map(f32, (q, k, v, beta, g, h0)))


def segments(t):
  # Row 0: resets inside a chunk and exactly at a chunk start (16); row 1: ids 0, 1, 0.
  seg = np.zeros((B, t), np.int32)
  seg[0, 5:], seg[0, 16:], seg[0, t // 2 + 3:] = 1, 2, 3
  seg[1, 20:], seg[1, t - 9:] = 1, 0
  return jnp.asarray(seg)


def test_reference_is_the_matrix_recurrence():
  # S_t = (I - beta_t k_t k_t^T) diag(a_t) S_{t-1} + beta_t k_t v_t^T, o_t = scale S_t^T q_t,
  # written out with explicit matrices in float64, for a per-head and a per-key-dim (KDA) gate.
  t, dk, dv = 9, 5, 3
  for channel in (False, True):
    q, k, v, beta, g, h0 = (None if x is None else np.asarray(x, np.float64)
                            for x in inputs(t, dk, dv, 1.0, seed=3, channel=channel))
    o, final = delta_rule(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, beta, g)),
                          initial_state=jnp.asarray(h0, jnp.float32), output_final_state=True,
                          impl="reference")
    want = np.zeros((B, t, H, dv))
    for bi in range(B):
      for hi in range(H):
        s = h0[bi, hi]
        for ti in range(t):
          kt, vt = k[bi, ti, hi // 2][:, None], v[bi, ti, hi // 2][:, None]
          bt, at = beta[bi, ti, hi], np.exp(g[bi, ti, hi])
          decay = np.diag(at) if channel else at * np.eye(dk)
          s = (np.eye(dk) - bt * kt @ kt.T) @ decay @ s + bt * kt @ vt.T
          want[bi, ti, hi] = dk ** -0.5 * s.T @ q[bi, ti, hi]
        np.testing.assert_allclose(final[bi, hi], s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5)


def _vjp(impl, args, seg, ct, chunk_size=16):
  def fn(q, k, v, beta, g, h0):
    return delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True,
                      segment_ids=seg, impl=impl, chunk_size=chunk_size)

  out, vjp = jax.vjp(fn, *args)
  return out, vjp(ct)


def _errors(impl, t, dk, dv, gate_scale, chunk_size=16, channel=False):
  args = inputs(t, dk, dv, gate_scale, channel=channel)
  seg = segments(t)
  rng = np.random.default_rng(1)
  ct = (jnp.asarray(rng.normal(size=(B, t, H, dv)), jnp.float32),
        jnp.asarray(rng.normal(size=(B, H, dk, dv)), jnp.float32))
  got = jax.jit(lambda a, c: _vjp(impl, a, seg, c, chunk_size))(args, ct)
  want = jax.jit(lambda a, c: _vjp("reference", a, seg, c))(args, ct)
  rel = lambda x, y: float(np.linalg.norm(x - y) / (np.linalg.norm(y) + 1e-30))
  (o, s), grads = jax.device_get(got)
  (o_ref, s_ref), grads_ref = jax.device_get(want)
  names = ("dq", "dk", "dv", "dbeta", "dg", "dh0")
  errs = {"o": rel(o, o_ref), "state": rel(s, s_ref)}
  errs.update({n: rel(a, b) for n, a, b in zip(names, grads, grads_ref) if b is not None})
  assert len(errs) == (7 if gate_scale is None else 8), errs
  return errs


@pytest.mark.parametrize("t,dk,dv,gate_scale,channel", [
    (63, 60, 60, None, False), (100, 60, 28, 0.1, False), (63, 12, 7, 1.0, False),
    (100, 12, 7, 10.0, False), (100, 60, 28, 0.1, True), (63, 12, 7, 1.0, True),
    (100, 12, 7, 10.0, True)])
def test_chunked_matches_reference_values_states_and_gradients(t, dk, dv, gate_scale, channel):
  # channel: KDA's per-key-dim gate.
  errs = _errors("xla", t, dk, dv, gate_scale, channel=channel)
  assert max(errs.values()) <= 1e-5, errs


@pytest.mark.parametrize("t,dk,dv,gate_scale,chunk,target", [
    (63, 60, 60, None, 32, None), (100, 12, 7, 10.0, 16, None), (63, 12, 7, 1.0, 32, "gpu"),
    (40, 5, 28, 0.1, 16, "gpu")])
def test_pallas_matches_reference_values_states_and_gradients(monkeypatch, t, dk, dv, gate_scale,
                                                              chunk, target):
  # target "gpu": the Triton conventions (each program loops over its chunks; head dims and the
  # chunk padded to powers of two) run in the interpreter; None: the grid walk, as on TPU.
  from layers.kernels import chunk_walk
  monkeypatch.setattr(chunk_walk, "target_of", lambda interpret: target)
  errs = _errors("pallas", t, dk, dv, gate_scale, chunk)
  assert max(errs.values()) <= 1e-5, errs


def _export_delta(platform, gate, with_state_and_segments, t=32768, d=128):
  """Exports the delta-rule kernels' forward+backward for `platform` (bf16, T = 32K, d = 128)."""
  from jax import export
  from layers.kernels.delta_pallas import delta_pallas
  b, h = 1, 2
  x = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  per_token = jax.ShapeDtypeStruct((b, t, h), jnp.float32)
  h0 = seg = None
  if with_state_and_segments:
    h0 = jax.ShapeDtypeStruct((b, h, d, d), jnp.float32)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def loss(q, k, v, beta, g, h0, seg):
    o, final = delta_pallas(q, k, v, beta, g, scale=0.1, initial_state=h0, segment_ids=seg,
                            interpret=False)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  argnums = (0, 1, 2, 3) + ((4,) if gate else ()) + ((5,) if h0 is not None else ())
  fn = jax.jit(jax.value_and_grad(loss, argnums=argnums))
  return export.export(fn, platforms=[platform], disabled_checks=checks)(
      x, x, x, per_token, per_token if gate else None, h0, seg)


@pytest.mark.parametrize("target", ["gpu", "tpu"])
def test_delta_kernels_export_for_cuda_and_tpu_at_32k(monkeypatch, tpu_chip, target):
  # DeltaNet and Gated DeltaNet, with and without segment ids and an initial state: the three
  # kernels lower (Triton on GPU, Mosaic on TPU), which is what lets `auto` pick them on both.
  import re
  from layers.kernels import chunk_walk
  monkeypatch.setattr(chunk_walk, "target_of", lambda interpret: target)
  platform, call = {"gpu": ("cuda", "__gpu$xla.gpu.triton"),
                    "tpu": ("tpu", "tpu_custom_call")}[target]
  for gate in (False, True):
    for extras in (False, True):
      text = _export_delta(platform, gate, extras).mlir_module()
      kernels = set(re.findall(r"delta_(fwd|states|bwd)", text))
      assert kernels == {"fwd", "states", "bwd"}, (gate, extras, kernels)
      assert text.count(f"custom_call @{call}(") == 3, (gate, extras)


def test_small_gates_after_a_strongly_decaying_token_keep_their_precision():
  # Gates of -4e4 on a few tokens and in (-0.1, 0) elsewhere: the in-chunk decay ratios between
  # later tokens are exp(sum of the small gates), which differences of cumulative sums of about
  # -4e4 (float32 spacing 0.004) got wrong by ~0.1% in the outputs.
  t = 48
  q, k, v, beta, _, h0 = inputs(t, 8, 6, None, seed=5)
  g = -0.1 * np.random.default_rng(6).uniform(size=(B, t, H))
  g[:, [3, 20, 37]] = -4e4
  run = lambda impl: delta_rule(q, k, v, beta, jnp.asarray(g, jnp.float32), initial_state=h0,
                                output_final_state=True, impl=impl, chunk_size=16)
  for got, want in zip(run("xla"), run("reference")):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_chunk_size_does_not_change_the_result():
  args = inputs(100, 12, 7, 1.0, seed=2)
  run = lambda c: jax.jit(lambda a: delta_rule(*a[:5], initial_state=a[5],
                                                segment_ids=segments(100), impl="xla",
                                                chunk_size=c))(args)
  np.testing.assert_allclose(run(16), run(64), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("channel", [False, True])
def test_decoding_steps_equal_the_chunked_output(channel):
  q, k, v, beta, g, h0 = inputs(40, 12, 7, 1.0, seed=4, channel=channel)
  o, final = delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True, impl="xla",
                        chunk_size=16)
  state, steps = h0, []
  step = jax.jit(lambda *a, state: delta_rule_step(*a, state=state))
  for i in range(q.shape[1]):
    o_i, state = step(q[:, i], k[:, i], v[:, i], beta[:, i], g[:, i], state=state)
    steps.append(o_i)
  np.testing.assert_allclose(jnp.stack(steps, 1), o, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(state, final, rtol=2e-5, atol=2e-5)


def test_auto_runs_xla_on_cpu_and_the_kernels_on_accelerators(caplog):
  from layers.kernels import dispatch
  q, k, v, beta, g, _ = inputs(16, 8, 8, 1.0)
  with caplog.at_level(logging.INFO, logger="lctx.kernels"):
    delta_rule(q, k, v, beta, g)
    for backend in ("gpu", "tpu"):
      assert dispatch.resolve_impl("delta_rule", "auto", backend) == "pallas"
  assert "delta_rule: impl=auto -> xla on cpu" in caplog.text
  assert "delta_rule: impl=auto -> pallas on gpu" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="lctx.kernels"):
    delta_rule(q, k, v, beta, g, impl="pallas")
  assert "delta_rule: impl=pallas -> pallas on cpu (interpret mode)" in caplog.text
  # KDA's per-key-dim gate has no kernel: auto runs xla on accelerators and says why.
  kda = jnp.broadcast_to(g[..., None], q.shape)
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="lctx.kernels"):
    assert dispatch.resolve_impl("delta_rule", "auto", "gpu", no_kernel="a reason") == "xla"
  assert "delta_rule: impl=auto -> xla on gpu because a reason" in caplog.text
  with pytest.raises(ValueError, match="impl='pallas' cannot run on cpu: its Pallas kernels take "
                     "a per-head gate, not KDA's per-key-dim one"):
    delta_rule(q, k, v, beta, kda, impl="pallas")


def test_bad_arguments_name_what_is_wrong():
  q, k, v, beta, g, h0 = inputs(16, 8, 8, 1.0)
  with pytest.raises(ValueError, match=r"beta has shape \(2, 16\)"):
    delta_rule(q, k, v, beta[..., 0], g)
  with pytest.raises(ValueError, match=r"gate g has shape \(2, 16, 4, 1\); allowed: None"):
    delta_rule(q, k, v, beta, g[..., None])
  with pytest.raises(ValueError, match="initial_state has shape"):
    delta_rule(q, k, v, beta, g, initial_state=h0[:, :2])
  with pytest.raises(ValueError, match="chunk_size=24"):
    delta_rule(q, k, v, beta, g, chunk_size=24)
  with pytest.raises(ValueError, match="not a multiple of key/value heads"):
    delta_rule(q[:, :, :3], k, v, beta[:, :, :3], g[:, :, :3])


def test_unit_lower_inverse_matches_numpy():
  from layers.kernels.delta_chunked import unit_lower_inverse
  rng = np.random.default_rng(7)
  for c in (16, 48):
    a = np.tril(rng.normal(size=(3, c, c)), -1) * 0.3
    got = unit_lower_inverse(jnp.asarray(a, jnp.float32))
    want = np.linalg.inv(np.eye(c) + a)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_back_to_back_gated_backward_passes_finish():
  # XLA:CPU's triangular-solve custom call deadlocked here after a few jitted gated backward
  # passes dispatched back to back (the chunked path now inverts by block doubling); run in a
  # subprocess so that a deadlock fails the test instead of hanging the suite.
  import subprocess
  import sys
  from tests import cli
  script = """
import jax, jax.numpy as jnp, numpy as np
from layers.delta_rule import delta_rule
x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 64, 4, 64)), jnp.float32)
k = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
beta, g = jnp.full((8, 64, 4), 0.5), jnp.full((8, 64, 4), -0.1)
f = jax.jit(jax.grad(lambda q, k, v: delta_rule(q, k, v, beta, g).sum(), argnums=(0, 1, 2)))
for _ in range(30):
  out = f(k, k, x)
jax.block_until_ready(out)
print("done")
"""
  proc = subprocess.run([sys.executable, "-c", script], cwd=cli.ROOT, env=cli.env(),
                        capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]
