"""Softmax attention: the dense reference against a per-query loop, RoPE, and the mixer's masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention import AttentionConfig, SoftmaxAttention
from layers.kernels.attention_reference import dot_product_attention
from layers.masks import attention_mask
from layers.rope import apply_rope


def loop_attention(q, k, v, seg, window):
  """One query at a time, keys filtered by explicit Python conditions (float64)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, d = q.shape
  g = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for ti in range(t):
      keys = [s for s in range(ti + 1) if (window is None or ti - s <= window)
              and (seg is None or seg[bi, s] == seg[bi, ti])]
      for hi in range(h):
        logits = np.array([q[bi, ti, hi] @ k[bi, s, hi // g] for s in keys]) / np.sqrt(d)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[bi, ti, hi] = sum(pi * v[bi, s, hi // g] for pi, s in zip(p, keys))
  return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (3, 1)])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("segments", [False, True])
def test_dot_product_attention_matches_loop(heads, kv_heads, window, segments):
  rng = np.random.default_rng(1)
  b, t, d = 2, 13, 6
  q = rng.normal(size=(b, t, heads, d)).astype(np.float32)
  k = rng.normal(size=(b, t, kv_heads, d)).astype(np.float32)
  v = rng.normal(size=(b, t, kv_heads, d)).astype(np.float32)
  seg = np.sort(rng.integers(1, 4, (b, t)), axis=1) if segments else None
  idx = np.broadcast_to(np.arange(t), (b, t))
  got = dot_product_attention(q, k, v, attention_mask(idx, idx, seg, seg, window))
  np.testing.assert_allclose(got, loop_attention(q, k, v, seg, window), rtol=1e-5, atol=1e-5)


def test_rope_preserves_norm_and_is_relative():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 1, 1, 8)).astype(np.float32)
  y = rng.normal(size=(1, 1, 1, 8)).astype(np.float32)

  def dot_at(pq, pk):
    rq = apply_rope(x, jnp.array([[pq]]), 10_000.0)
    rk = apply_rope(y, jnp.array([[pk]]), 10_000.0)
    return float(jnp.sum(rq * rk))

  rotated = apply_rope(x, jnp.array([[7]]), 10_000.0)
  np.testing.assert_allclose(np.linalg.norm(rotated), np.linalg.norm(x), rtol=1e-6)
  np.testing.assert_allclose(dot_at(9, 4), dot_at(5, 0), rtol=1e-5)
  assert abs(dot_at(9, 4) - dot_at(9, 5)) > 1e-4


def test_mixer_keeps_documents_apart():
  """With segment ids, a document's outputs equal those of the document run alone."""
  cfg = AttentionConfig(num_heads=4, num_kv_heads=2, window=None)
  mixer = SoftmaxAttention(cfg, d_model=16)
  x = jax.random.normal(jax.random.key(0), (1, 12, 16))
  seg = jnp.array([[1] * 5 + [2] * 7])
  pos = jnp.array([list(range(5)) + list(range(7))])
  params = mixer.init(jax.random.key(1), x, positions_bt=pos, segment_ids_bt=seg)
  packed = mixer.apply(params, x, positions_bt=pos, segment_ids_bt=seg)
  first = mixer.apply(params, x[:, :5], positions_bt=pos[:, :5], segment_ids_bt=seg[:, :5])
  second = mixer.apply(params, x[:, 5:], positions_bt=pos[:, 5:], segment_ids_bt=seg[:, 5:])
  np.testing.assert_allclose(packed, jnp.concatenate([first, second], axis=1), atol=1e-5)


def test_config_errors_name_the_setting():
  with pytest.raises(ValueError, match="num_kv_heads=3 must be >= 1 and divide"):
    AttentionConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="AttentionConfig.window=-1"):
    AttentionConfig(window=-1)
  with pytest.raises(ValueError, match=r"AttentionConfig.num_heads='4' must be int"):
    AttentionConfig(num_heads="4")
