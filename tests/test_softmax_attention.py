"""softmax_attention: every implementation against the dense reference (outputs and gradients),
block-skipping bounds, ring-buffer decoding against the full forward, dispatch logging, errors."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from layers.attention import AttentionConfig, SoftmaxAttention
from layers.kernels import flash_common as fc
from layers.kernels import flash_pallas
from layers.kernels.attention_reference import softmax_attention_reference
from layers.softmax_attention import (cache_slots, cached_attention, init_kv_cache,
                                      softmax_attention)


def rel_rms(got, want):
  """RMS error relative to the RMS of `want` (absolute where `want` is exactly 0)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.sqrt(np.mean((got - want) ** 2)) / (np.sqrt(np.mean(want ** 2)) or 1.0)


def make_inputs(seed, b, t, h, hk, d, segments=False, sinks=False):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, hk, hk))
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1), jnp.int32) if segments else None
  s = jnp.asarray(rng.normal(size=(h,)), jnp.float32) if sinks else None
  return q, k, v, seg, s


def outputs_and_grads(fn, q, k, v, sinks, **kwargs):
  """fn's output and the gradients of a fixed random projection of it in q, k, v (and sinks)."""
  weights = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)

  def loss(q, k, v, s):
    out = fn(q, k, v, sinks=s, **kwargs)
    return jnp.sum(out * weights), out

  argnums = (0, 1, 2) if sinks is None else (0, 1, 2, 3)
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(q, k, v, sinks)
  return out, grads


def check_against_reference(impl, case, **extra):
  t, d, h, hk, causal, window, segments, sinks, block = case
  q, k, v, seg, s = make_inputs(t + d + h, 2, t, h, hk, d, segments, sinks)
  kw = dict(causal=causal, window=window, segment_ids=seg)
  want, want_grads = outputs_and_grads(softmax_attention_reference, q, k, v, s,
                                       scale=d ** -0.5, **kw)
  got, got_grads = outputs_and_grads(softmax_attention, q, k, v, s, impl=impl, block_size=block,
                                     **kw, **extra)
  assert got.shape == want.shape and got.dtype == want.dtype
  assert rel_rms(got, want) < 5e-5, rel_rms(got, want)
  for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got_grads, want_grads):
    assert rel_rms(g, w) < 5e-5, (name, rel_rms(g, w))


# (t, d, heads, kv_heads, causal, window, segments, sinks, block_size)
PALLAS_CASES = [
    (63, 60, 4, 2, True, None, False, False, 16),
    (100, 60, 4, 1, True, 7, True, True, (16, 32)),
    (100, 32, 2, 2, False, None, True, True, 32),
]
XLA_CASES = PALLAS_CASES + [
    (64, 16, 6, 2, True, 20, False, True, 16),
    (37, 8, 2, 1, False, None, False, False, 16),
    (50, 8, 2, 2, True, 0, True, False, (32, 16)),
]


@pytest.mark.parametrize("case", XLA_CASES, ids=str)
def test_xla_matches_reference(case):
  check_against_reference("xla", case)


@pytest.mark.parametrize("target", [None, "gpu"])
@pytest.mark.parametrize("case", PALLAS_CASES, ids=str)
def test_pallas_matches_reference(monkeypatch, case, target):
  # None: the grid walks the key blocks with the state in scratch (TPU's walk, interpreted);
  # "gpu": each program loops over its blocks on power-of-two tiles (Triton's walk, interpreted).
  monkeypatch.setattr(flash_pallas, "_target", lambda interpret: target)
  check_against_reference("pallas", case)


def test_pallas_with_tpu_interpret_params():
  check_against_reference("pallas", (40, 16, 4, 2, True, 9, True, True, 16),
                          interpret=pltpu.InterpretParams())


@pytest.mark.parametrize("target", ["gpu", "tpu"])
def test_pallas_kernels_lower_for_gpu_and_tpu(monkeypatch, tpu_chip, target):
  """Forward and backward lower with Triton (GPU) and Mosaic (TPU) without the hardware.

  Lowering is the Python half of compilation (shapes, block specs, ops the backend accepts); the
  backend compilers themselves still need the device. Odd sizes exercise the padding.
  """
  from jax import export
  monkeypatch.setattr(flash_pallas, "_target", lambda interpret: target)
  q, k, v, seg, s = make_inputs(8, 1, 300, 6, 2, 60, segments=True, sinks=True)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))

  def loss(q, k, v, s):
    out = flash_pallas.flash_attention_pallas(q, k, v, scale=0.1, window=200, segment_ids=seg,
                                              sinks=s, block_size=64, interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  platform = {"gpu": "cuda", "tpu": "tpu"}[target]
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  exported = export.export(grad, platforms=[platform], disabled_checks=checks)(q, k, v, s)
  text = exported.mlir_module()
  # GPU: forward and one fused backward (atomic dq); TPU: forward, dq and dk/dv.
  assert text.count("xla.gpu.triton" if target == "gpu" else "tpu_custom_call") == (
      2 if target == "gpu" else 3)


def test_reference_sinks_match_a_loop():
  """The oracle itself: a sink is an extra softmax entry with no value."""
  q, k, v, _, s = make_inputs(3, 1, 6, 2, 1, 4, sinks=True)
  got = softmax_attention_reference(q, k, v, scale=0.5, window=2, sinks=s)
  qn, kn, vn, sn = (np.asarray(x, np.float64) for x in (q, k, v, s))
  want = np.zeros_like(qn)
  for t in range(6):
    keys = [j for j in range(t + 1) if t - j <= 2]
    for h in range(2):
      logits = np.array([qn[0, t, h] @ kn[0, j, 0] * 0.5 for j in keys] + [sn[h]])
      p = np.exp(logits - logits.max())
      p /= p.sum()
      want[0, t, h] = sum(pi * vn[0, j, 0] for pi, j in zip(p[:-1], keys))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_stay_close_to_float32():
  q, k, v, seg, s = make_inputs(4, 1, 48, 4, 2, 16, segments=True, sinks=True)
  want = softmax_attention_reference(q, k, v, window=11, segment_ids=seg, sinks=s)
  bf = lambda x: x.astype(jnp.bfloat16)
  got = softmax_attention(bf(q), bf(k), bf(v), window=11, segment_ids=seg, sinks=s, impl="xla",
                          block_size=16)
  assert got.dtype == jnp.bfloat16
  assert rel_rms(got, want) < 2e-2


@pytest.mark.parametrize("rel,window", [(0, None), (20, None), (40, 30), (5, 3)])
def test_grid_walk_fetches_only_visible_blocks(rel, window):
  """The TPU walk's index_maps, with queries `rel` positions after the keys (the block step):
  the blocks fetched for a query block are exactly its visible key blocks (a skipped step
  repeats the last index, so nothing is copied), and the same holds for the dk/dv kernel's walk
  over query blocks; the ranges behind them cover every visible pair."""
  from layers.kernels import flash_pallas_kernels as fk
  bq, bk, tq, tk, kv_len = 8, 16, 32, 48, 44
  st = flash_pallas.make_static(scale=1.0, causal=True, window=window, block_q=bq, block_k=bk,
                                kv_len=kv_len, group=1, has_seg=False, has_sinks=False,
                                interpret=True)
  q_pos, k_pos = rel + np.arange(tq), np.arange(tk)
  visible = (k_pos[None] <= q_pos[:, None]) & (k_pos[None] < kv_len)
  if window is not None:
    visible &= q_pos[:, None] - k_pos[None] <= window
  tile = lambda i, j: visible[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any()
  rel_ref = jnp.array([rel], jnp.int32)
  index = flash_pallas._kv_index(st, tk // bk)
  for i in range(tq // bq):
    fetched = [int(index(0, 0, i, j, rel_ref)[2]) for j in range(tk // bk)]
    wanted = [j for j in range(tk // bk) if tile(i, j)]
    changes = [x for n, x in enumerate(fetched) if n == 0 or x != fetched[n - 1]]
    assert changes == (wanted or changes[:1]), (i, fetched, wanted)
    lo, _, _, hi = (int(x) for x in fk.key_range(st, rel + i * bq, tk // bk))
    assert wanted == [j for j in range(lo, hi) if tile(i, j)], (i, lo, hi)
  for j in range(tk // bk):
    lo, _, _, hi = (int(x) for x in fk.query_range(st, rel, j * bk, tq // bq))
    wanted = [i for i in range(tq // bq) if tile(i, j)]
    assert wanted == [i for i in range(lo, hi) if tile(i, j)] and (
        not wanted or (wanted[0], wanted[-1] + 1) == (lo, hi)), (j, lo, hi, wanted)


@pytest.mark.parametrize("causal,window,bq,bk", [(True, None, 16, 8), (True, 5, 8, 16),
                                                 (True, 20, 16, 16), (False, None, 8, 16)])
def test_block_ranges_skip_only_invisible_blocks(causal, window, bq, bk):
  """Blocks outside [lo, hi) have no visible pair; [full_lo, full_hi) need no mask."""
  t, kv_len = 48, 43
  nq, nk = t // bq, t // bk
  pos = np.arange(t)
  visible = np.ones((t, t), bool)
  if causal:
    visible &= pos[None, :] <= pos[:, None]
  if window is not None:
    visible &= pos[:, None] - pos[None, :] <= window
  visible &= pos[None, :] < kv_len
  tile = lambda i, j: visible[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
  for i in range(nq):
    lo, full_lo, full_hi, hi = (int(x) for x in fc.key_block_range(
        i * bq, (i + 1) * bq, bk, nk, causal=causal, window=window, kv_len=kv_len))
    assert lo <= full_lo <= full_hi <= hi
    for j in range(nk):
      if not lo <= j < hi:
        assert not tile(i, j).any(), (i, j)
      if full_lo <= j < full_hi:
        assert tile(i, j).all(), (i, j)
  for j in range(nk):
    lo, full_lo, full_hi, hi = (int(x) for x in fc.query_block_range(
        j * bk, (j + 1) * bk, bq, nq, causal=causal, window=window, kv_len=kv_len))
    assert lo <= full_lo <= full_hi <= hi
    for i in range(nq):
      if not lo <= i < hi:
        assert not tile(i, j).any(), (i, j)
      if full_lo <= i < full_hi:
        assert tile(i, j).all(), (i, j)
  # The causal diagonal really is skipped: some block above it is outside [lo, hi).
  if causal:
    assert int(fc.key_block_range(0, bq, bk, nk, causal=True, window=window)[3]) < nk


@pytest.mark.parametrize("window", [None, 4])
def test_cached_attention_step_by_step_equals_full_forward(window):
  """Chunks of 3, 1, 1, 7 (more than the ring), 1, ... tokens reproduce the full forward."""
  b, t, h, hk, d = 2, 19, 4, 2, 8
  q, k, v, _, s = make_inputs(5, b, t, h, hk, d, sinks=True)
  want = softmax_attention_reference(q, k, v, window=window, sinks=s)
  cache = init_kv_cache(b, t, hk, d, window=window)
  assert cache.key.shape == (b, cache_slots(t, window), hk, d)
  assert cache.key.shape[1] == (t if window is None else window)
  step = jax.jit(lambda c, q, k, v: cached_attention(c, q, k, v, window=window, sinks=s))
  outs, start = [], 0
  for n in (3, 1, 1, 7, 1, 1, 5):
    out, cache = step(cache, q[:, start:start + n], k[:, start:start + n], v[:, start:start + n])
    outs.append(out)
    start += n
  assert start == t and int(cache.index) == t
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, rtol=1e-5, atol=1e-5)


def test_mixer_decodes_with_a_ring_buffer():
  """A sliding-window mixer with sinks: cache of `window` slots, decoding == full forward."""
  # The reference impl for the full forward: the flash paths are compared to it above.
  cfg = AttentionConfig(num_heads=4, num_kv_heads=2, window=3, sinks=True, impl="reference")
  mixer = SoftmaxAttention(cfg, d_model=16)
  b, t = 2, 11
  x = jax.random.normal(jax.random.key(0), (b, t, 16))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  params = nn.unbox(jax.jit(mixer.init)(jax.random.key(1), x, positions_bt=pos)["params"])
  assert params["sinks"].shape == (4,)
  params["sinks"] = params["sinks"] + jnp.array([2.0, -1.0, 0.5, 0.0])  # sinks that matter
  full = jax.jit(mixer.apply)({"params": params}, x, positions_bt=pos)
  cache = jax.eval_shape(lambda: mixer.apply({"params": params}, x, positions_bt=pos,
                                             decode=True, mutable=["cache"])[1]["cache"])
  cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), cache)
  assert cache["key"].shape == (b, 3, 2, 4)
  step = jax.jit(lambda c, x, p: mixer.apply({"params": params, "cache": c}, x, positions_bt=p,
                                             decode=True, mutable=["cache"]))
  outs, start = [], 0
  for n in (4, 1, 1, 1, 1, 1, 1, 1):
    out, variables = step(cache, x[:, start:start + n], pos[:, start:start + n])
    cache = variables["cache"]
    outs.append(out)
    start += n
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_mixer_sink_gradient_flows():
  cfg = AttentionConfig(num_heads=2, window=2, sinks=True, impl="reference")
  mixer = SoftmaxAttention(cfg, d_model=8)
  x = jax.random.normal(jax.random.key(0), (1, 20, 8))
  pos = jnp.arange(20)[None]
  params = jax.jit(mixer.init)(jax.random.key(1), x, positions_bt=pos)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(mixer.apply(p, x, positions_bt=pos) ** 2)))(params)
  assert np.all(np.abs(np.asarray(grads["params"]["sinks"].value)) > 0)


@pytest.mark.parametrize("impl,chosen", [("auto", "xla"), ("reference", "reference"),
                                         ("xla", "xla"), ("pallas", "pallas")])
def test_log_names_the_implementation(caplog, impl, chosen):
  q, k, v, _, _ = make_inputs(6, 1, 8, 2, 2, 4)
  with caplog.at_level(logging.INFO, logger="lctx.kernels"):
    softmax_attention(q, k, v, impl=impl)
  assert f"softmax_attention: impl={impl} -> {chosen} on cpu" in caplog.text
  assert ("(interpret mode)" in caplog.text) == (chosen == "pallas")


def test_bad_arguments_raise_with_the_setting_named():
  q, k, v, _, _ = make_inputs(7, 1, 8, 4, 2, 4)
  with pytest.raises(ValueError, match=r"q heads=4 must be a multiple of k/v heads=3"):
    softmax_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2))
  with pytest.raises(ValueError, match=r"window=2 requires causal=True"):
    softmax_attention(q, k, v, causal=False, window=2)
  with pytest.raises(ValueError, match=r"window=-1 must be None or an int >= 0"):
    softmax_attention(q, k, v, window=-1)
  with pytest.raises(ValueError, match=r"impl='cuda' is not one of"):
    softmax_attention(q, k, v, impl="cuda")
  with pytest.raises(ValueError, match=r"sinks must be a float array of shape \(4,\)"):
    softmax_attention(q, k, v, sinks=jnp.zeros((2,)))
  with pytest.raises(ValueError, match=r"segment_ids must be an integer array of shape \(1, 8\)"):
    softmax_attention(q, k, v, segment_ids=jnp.zeros((1, 7), jnp.int32))
  with pytest.raises(ValueError, match=r"block_size=0 must be None, a positive int or a pair"):
    softmax_attention(q, k, v, block_size=0)
  with pytest.raises(ValueError, match=r"must agree in batch, time and head_dim"):
    softmax_attention(q, k[:, :5], v[:, :5])
  with pytest.raises(ValueError, match=r"q must be 4-D"):
    softmax_attention(q[0], k, v)
  with pytest.raises(ValueError, match=r"scale=-1.0 must be None"):
    softmax_attention(q, k, v, scale=-1.0)
  with pytest.raises(ValueError, match=r"AttentionConfig.impl='fast' must be one of"):
    AttentionConfig(impl="fast")
  with pytest.raises(ValueError, match=r"cache key shape .* does not fit new keys"):
    cached_attention(init_kv_cache(1, 8, 3, 4), q, k, v)


@pytest.mark.parametrize("target", ["gpu", "tpu"])
def test_flash_kernels_export_for_cuda_and_tpu_at_32k(monkeypatch, tpu_chip, target):
  """Every variant's forward+backward exports at T = 32K, bf16, head_dim 64 / 96 / 128.

  Export runs the lowering only: later compiler passes (TPU VMEM fitting among them) still need
  the device, so this proves the kernels are accepted, not that they fit.
  """
  from jax import export
  monkeypatch.setattr(flash_pallas, "_target", lambda interpret: target)
  t, platform = 32768, {"gpu": "cuda", "tpu": "tpu"}[target]
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  kernel = "xla.gpu.triton" if target == "gpu" else "tpu_custom_call"
  for d in (64, 96, 128):
    for variant in ("causal", "window", "segments", "sinks", "gqa"):
      h, hk = (4, 2) if variant == "gqa" else (2, 2)
      q = jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16)
      kv = jax.ShapeDtypeStruct((1, t, hk, d), jnp.bfloat16)
      seg = jax.ShapeDtypeStruct((1, t), jnp.int32) if variant == "segments" else None
      sinks = jax.ShapeDtypeStruct((h,), jnp.float32) if variant == "sinks" else None

      def loss(q, k, v, seg, sinks, window=4096 if variant == "window" else None):
        out = flash_pallas.flash_attention_pallas(q, k, v, scale=0.1, window=window,
                                                  segment_ids=seg, sinks=sinks, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

      fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      text = export.export(fn, platforms=[platform], disabled_checks=checks)(
          q, kv, kv, seg, sinks).mlir_module()
      assert text.count(kernel) == (2 if target == "gpu" else 3), (d, variant, text.count(kernel))
