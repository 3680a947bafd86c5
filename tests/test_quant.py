"""layers/quant.py: INT8 group-wise weight and per-token K/V fake quantization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import quant


def _group_scales(w, group):
  """Reference scales [groups, columns] for a 2-D w [fan_in, columns], by slicing."""
  return np.stack([np.abs(w[i:i + group]).max(axis=0) / 127 for i in range(0, len(w), group)])


def test_group_boundaries_and_error_bound():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(300, 5)).astype(np.float32)
  w[127, 0] = 50.0  # an outlier only affects the first group of column 0
  q, scales = quant.quantize_int8_grouped(w, group=128)
  assert q.dtype == jnp.int8 and q.shape == w.shape
  assert scales.dtype == jnp.float32 and scales.shape == (3, 5)  # 128 + 128 + 44
  np.testing.assert_allclose(scales, _group_scales(w, 128), rtol=1e-6)
  assert float(scales[0, 0]) == pytest.approx(50 / 127)
  assert float(scales[1, 0]) < 0.05
  assert int(np.abs(np.asarray(q)).max()) == 127
  fake = np.asarray(quant.fake_quant_int8_grouped(w, 128))
  per_entry = np.repeat(np.asarray(scales), 128, axis=0)[:300]
  assert (np.abs(fake - w) <= per_entry / 2 * (1 + 1e-5)).all()
  np.testing.assert_array_equal(fake, quant.dequantize_int8_grouped(q, scales, 128))
  # The largest entry of each group is kept (to rounding of the scale).
  np.testing.assert_allclose(fake[127, 0], 50.0, rtol=1e-6)


def test_values_on_the_grid_are_exact():
  rng = np.random.default_rng(1)
  ints = rng.integers(-127, 128, size=(256, 3))
  ints[0], ints[128] = 127, -127  # each group's max |q| is 127, so its scale is s exactly
  s = np.array([0.5, 0.25, 2.0], np.float32)
  w = (ints * s).astype(np.float32)
  np.testing.assert_array_equal(quant.fake_quant_int8_grouped(w, 128), w)
  q, scales = quant.quantize_int8_grouped(w, 128)
  np.testing.assert_array_equal(q, ints)
  np.testing.assert_array_equal(scales, np.broadcast_to(s, (2, 3)))


def test_fan_in_axes():
  rng = np.random.default_rng(2)
  w = rng.normal(size=(3, 100, 4)).astype(np.float32)  # [heads, head_dim, out]: fan-in 300
  got = quant.fake_quant_int8_grouped(w, 128, fan_in_axes=(0, 1))
  want = quant.fake_quant_int8_grouped(w.reshape(300, 4), 128)
  np.testing.assert_array_equal(got, np.asarray(want).reshape(3, 100, 4))
  _, scales = quant.quantize_int8_grouped(w, 128, fan_in_axes=(0, 1))
  assert scales.shape == (3, 4)
  # Fan-in on the last axis ([out, in] layout) is the transpose of the [in, out] case.
  w2 = rng.normal(size=(300, 6)).astype(np.float32)
  np.testing.assert_array_equal(quant.fake_quant_int8_grouped(w2.T, 128, fan_in_axes=(-1,)),
                                np.asarray(quant.fake_quant_int8_grouped(w2, 128)).T)


def test_per_token_scale():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 5, 3, 4)).astype(np.float32)  # [b, s, heads, head_dim]
  x[1, 2] *= 100.0  # one loud token must not coarsen the others
  got = np.asarray(quant.fake_quant_int8_per_token(x, (0, 1)))
  scale = np.abs(x).max(axis=(2, 3), keepdims=True) / 127
  assert (np.abs(got - x) <= scale / 2 * (1 + 1e-5)).all()
  # Each token's value grid is its own scale: got / scale is integer.
  ratio = got / scale
  np.testing.assert_allclose(ratio, np.round(ratio), atol=1e-3)
  assert np.abs(got[0, 0] - x[0, 0]).max() < 0.05
  # Values on a token's grid are exact.
  grid = (rng.integers(-127, 128, size=(2, 3, 4)) * 0.125).astype(np.float32)
  grid[:, 0, 0] = 127 * 0.125
  np.testing.assert_array_equal(quant.fake_quant_int8_per_token(grid, (0,)), grid)


def test_straight_through_gradients():
  rng = np.random.default_rng(4)
  w = jnp.asarray(rng.normal(size=(200, 3)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(200, 3)), jnp.float32)
  grad = jax.grad(lambda w: jnp.sum(v * quant.fake_quant_int8_grouped(w, 64)))(w)
  np.testing.assert_array_equal(grad, v)
  x = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
  u = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
  grad = jax.grad(lambda x: jnp.sum(u * quant.fake_quant_int8_per_token(x, (0, 1))))(x)
  np.testing.assert_array_equal(grad, u)


def test_all_zero_is_safe():
  w = np.zeros((300, 2), np.float32)
  w[200:, 1] = np.linspace(-1, 1, 100)  # only the last group of column 1 is nonzero
  fake = quant.fake_quant_int8_grouped(w, 128)
  assert bool(jnp.isfinite(fake).all())
  np.testing.assert_array_equal(fake[:, 0], 0.0)
  np.testing.assert_array_equal(fake[:128, 1], 0.0)
  grad = jax.grad(lambda w: jnp.sum(quant.fake_quant_int8_grouped(w, 128)))(jnp.asarray(w))
  np.testing.assert_array_equal(grad, 1.0)
  x = np.zeros((2, 3, 4), np.float32)
  x[1, 1] = [1.0, -2.0, 0.5, 0.0]
  got = quant.fake_quant_int8_per_token(x, (0, 1))
  assert bool(jnp.isfinite(got).all())
  np.testing.assert_array_equal(got[0], 0.0)
  np.testing.assert_allclose(got[1, 1], x[1, 1], atol=2 / 127 / 2)


def test_dtype_preserved_and_errors():
  w = jnp.ones((4, 2), jnp.float32)
  assert quant.fake_quant_int8_grouped(w, 3).dtype == jnp.float32
  with pytest.raises(ValueError, match="group=0"):
    quant.fake_quant_int8_grouped(w, 0)
  with pytest.raises(ValueError, match="fan_in_axes"):
    quant.fake_quant_int8_grouped(w, 2, fan_in_axes=(2,))
  with pytest.raises(ValueError, match="fan_in_axes"):
    quant.fake_quant_int8_grouped(w, 2, fan_in_axes=(0, -2))
  with pytest.raises(ValueError, match="token_axes"):
    quant.fake_quant_int8_per_token(w, ())
  q, scales = quant.quantize_int8_grouped(w, 3)
  with pytest.raises(ValueError, match="scales shape"):
    quant.dequantize_int8_grouped(q, scales, 1)
