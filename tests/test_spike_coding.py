"""layers/spike_coding.py: hand-written trains, exact round trips, saturation, spike matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import spike_coding as sc

# Largest |count| -> the paper's T, computed by hand from the formulas in the module docstring.
TABLE = {
    # m:          0  1  2  3  4  7  8  255  256
    "binary": [1, 1, 2, 3, 4, 7, 8, 255, 256],
    "ternary": [1, 1, 2, 3, 4, 7, 8, 255, 256],
    "sign_magnitude": [1, 1, 2, 2, 3, 3, 4, 8, 9],
    "twos_complement": [2, 2, 3, 3, 4, 4, 5, 9, 10],
}
MAX_ABS = [0, 1, 2, 3, 4, 7, 8, 255, 256]


@pytest.mark.parametrize("coding", sc.CODINGS)
def test_required_time_steps_table(coding):
  assert [sc.required_time_steps(m, coding) for m in MAX_ABS] == TABLE[coding]
  traced = jax.jit(lambda m: sc.required_time_steps(m, coding))(jnp.asarray(MAX_ABS))
  np.testing.assert_array_equal(traced, TABLE[coding])


def test_time_steps_for():
  assert sc.time_steps_for(jnp.array([[-5, 2], [0, 3]]), "ternary") == 5
  assert sc.time_steps_for(np.array([-5.0, 2.0]), "sign_magnitude") == 3
  assert sc.time_steps_for(np.array([-5, 2]), "twos_complement") == 4
  assert sc.time_steps_for(np.zeros((0,)), "binary") == 1
  with pytest.raises(ValueError, match="binary"):
    sc.time_steps_for(np.array([1, -1]), "binary")
  with pytest.raises(ValueError, match="time_steps"):
    jax.jit(lambda c: sc.encode(c, "ternary"))(jnp.array([1, 2]))
  with pytest.raises(ValueError, match="coding"):
    sc.time_steps_for(np.array([1]), "unary")


@pytest.mark.parametrize("coding,count,t,train", [
    ("sign_magnitude", 5, 3, [1, 0, 1]),
    ("sign_magnitude", -5, 3, [-1, 0, -1]),
    ("sign_magnitude", 6, 4, [0, 1, 1, 0]),
    ("twos_complement", -3, 3, [1, 0, 1]),  # -4 + 1
    ("twos_complement", 3, 3, [0, 1, 1]),
    ("twos_complement", -4, 3, [1, 0, 0]),
    ("twos_complement", -1, 4, [1, 1, 1, 1]),  # -8 + 4 + 2 + 1
    ("ternary", -2, 3, [-1, -1, 0]),
    ("ternary", 3, 3, [1, 1, 1]),
    ("binary", 2, 3, [1, 1, 0]),
    ("binary", 0, 2, [0, 0]),
])
def test_hand_written_trains(coding, count, t, train):
  spikes = sc.encode(jnp.array([count]), coding, t)
  assert spikes.dtype == jnp.int8 and spikes.shape == (t, 1)
  np.testing.assert_array_equal(spikes[:, 0], train)
  assert int(sc.decode(spikes, coding)[0]) == count


def test_encode_paper_t_and_time_axis_first():
  counts = jnp.array([[5, -2], [0, 1]])
  spikes = sc.encode(counts, "sign_magnitude")  # max |count| 5 -> T = 3
  assert spikes.shape == (3, 2, 2)
  np.testing.assert_array_equal(spikes[:, 0, 0], [1, 0, 1])
  np.testing.assert_array_equal(spikes[:, 0, 1], [0, -1, 0])
  np.testing.assert_array_equal(spikes[:, 1, 1], [0, 0, 1])


def _random_counts(coding, rng):
  lo = 0 if coding == "binary" else -40
  c = rng.integers(lo, 41, size=(6, 7))
  c.flat[:3] = [0, 40, lo]
  return c


# Fixed T large enough for |count| <= 40 in each coding.
FIXED_T = {"binary": 45, "ternary": 41, "sign_magnitude": 6, "twos_complement": 7}


@pytest.mark.parametrize("coding", sc.CODINGS)
@pytest.mark.parametrize("fixed", [False, True])
def test_round_trip_random(coding, fixed):
  counts = _random_counts(coding, np.random.default_rng(1))
  t = FIXED_T[coding] if fixed else None
  spikes = sc.encode(counts, coding, t)
  want_t = FIXED_T[coding] if fixed else sc.required_time_steps(40, coding)
  assert spikes.shape == (want_t,) + counts.shape
  np.testing.assert_array_equal(sc.decode(spikes, coding), counts)
  assert bool(sc.representable(counts, coding, want_t).all())
  values = np.unique(np.asarray(spikes))
  allowed = {0, 1} if coding in ("binary", "twos_complement") else {-1, 0, 1}
  assert set(values.tolist()) <= allowed


RANGES = {  # the full representable range in T = 5 steps
    "binary": (0, 5), "ternary": (-5, 5), "sign_magnitude": (-31, 31),
    "twos_complement": (-16, 15)}


@pytest.mark.parametrize("coding", sc.CODINGS)
def test_round_trip_whole_range_and_saturation(coding):
  lo, hi = RANGES[coding]
  inside = np.arange(lo, hi + 1)
  np.testing.assert_array_equal(sc.decode(sc.encode(inside, coding, 5), coding), inside)
  assert bool(sc.representable(inside, coding, 5).all())
  outside = np.array([lo - 1, hi + 1, -1000, 1000])
  rep = np.asarray(sc.representable(outside, coding, 5))
  assert not rep.any()
  want = np.clip(outside, lo, hi)
  np.testing.assert_array_equal(sc.decode(sc.encode(outside, coding, 5), coding), want)
  np.testing.assert_array_equal(sc.saturate(outside, coding, 5), want)


def test_saturation_by_hand():
  np.testing.assert_array_equal(sc.decode(sc.encode([8, -9], "sign_magnitude", 3),
                                          "sign_magnitude"), [7, -7])
  np.testing.assert_array_equal(sc.decode(sc.encode([-17, 16], "twos_complement", 5),
                                          "twos_complement"), [-16, 15])
  np.testing.assert_array_equal(sc.encode([-1, 3], "binary", 2).T, [[0, 0], [1, 1]])
  np.testing.assert_array_equal(sc.encode([3, -3], "ternary", 2).T, [[1, 1], [-1, -1]])


def test_float_counts_are_rounded():
  np.testing.assert_array_equal(sc.decode(sc.encode(np.array([2.0, -3.0]), "ternary"),
                                          "ternary"), [2, -3])


def test_step_weights():
  np.testing.assert_array_equal(sc.step_weights("sign_magnitude", 4), [8, 4, 2, 1])
  np.testing.assert_array_equal(sc.step_weights("twos_complement", 4), [-8, 4, 2, 1])
  np.testing.assert_array_equal(sc.step_weights("ternary", 3), [1, 1, 1])
  np.testing.assert_array_equal(sc.step_weights("binary", 1), [1])
  with pytest.raises(ValueError, match="time_steps=32"):
    sc.step_weights("sign_magnitude", 32)
  with pytest.raises(ValueError, match="time_steps=33"):
    sc.step_weights("twos_complement", 33)
  with pytest.raises(ValueError, match="time_steps=0"):
    sc.step_weights("ternary", 0)


@pytest.mark.parametrize("coding", ["sign_magnitude", "twos_complement"])
def test_the_chosen_time_steps_decode_the_largest_counts(coding):
  """The T picked for |counts| >= 2^30 (32 for two's complement) decodes its own train."""
  counts = np.array([2**31 - 1, -(2**31 - 1), 2**30, -(2**30), 5, 0], np.int32)
  if coding == "twos_complement":
    counts = np.append(counts, np.int32(-(2**31)))
  t = sc.time_steps_for(counts, coding)
  assert t == (32 if coding == "twos_complement" else 31)
  np.testing.assert_array_equal(sc.decode(sc.encode(counts, coding, t), coding), counts)


@pytest.mark.parametrize("coding", sc.CODINGS)
def test_spike_matmul_equals_dense(coding):
  rng = np.random.default_rng(2)
  counts = _random_counts(coding, rng)  # [6, 7]: 6 tokens, 7 channels
  spikes = sc.encode(counts, coding)
  w_int = rng.integers(-9, 10, size=(7, 3))
  got = sc.spike_matmul(spikes, w_int.astype(np.int32), coding)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, counts @ w_int)
  # Integer-valued float weights: every partial sum is a small integer, so exact in float32.
  np.testing.assert_array_equal(sc.spike_matmul(spikes, w_int.astype(np.float32), coding),
                                (counts @ w_int).astype(np.float32))
  w = rng.normal(size=(7, 3)).astype(np.float32)
  v_th = rng.uniform(0.1, 2.0, size=(6, 1)).astype(np.float32)
  got = sc.spike_matmul(spikes, w, coding, v_th)
  want = (counts.astype(np.float64) * v_th) @ w.astype(np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _nonzeros(counts, coding, t):
  return np.asarray((sc.encode(counts, coding, t) != 0).sum(axis=0))


@pytest.mark.parametrize("coding", sc.CODINGS)
def test_spikes_per_element_matches_encode(coding):
  counts = _random_counts(coding, np.random.default_rng(3))
  np.testing.assert_array_equal(sc.spikes_per_element(counts, coding),
                                _nonzeros(counts, coding, None))
  # Small T saturates some counts; binary also meets negative counts (saturated to 0).
  with_neg = counts - 5
  traced = jax.jit(lambda c, t: sc.spikes_per_element(c, coding, t))
  for t in (1, 2, 3, 6, 33, 40):
    want = _nonzeros(with_neg, coding, t)
    np.testing.assert_array_equal(sc.spikes_per_element(with_neg, coding, t), want)
    np.testing.assert_array_equal(traced(with_neg, jnp.int32(t)), want)


def test_spikes_per_element_by_hand():
  # Two's complement, T = 4: -1 = 1111, -8 = 1000, 7 = 0111, 5 = 0101.
  np.testing.assert_array_equal(
      sc.spikes_per_element([-1, -8, 7, 5], "twos_complement", 4), [4, 1, 3, 2])
  # T = 33: the pattern of -1 has 33 ones, -2 has 32, 1 has one.
  np.testing.assert_array_equal(
      sc.spikes_per_element([-1, -2, 1], "twos_complement", 33), [33, 32, 1])
  np.testing.assert_array_equal(
      sc.spikes_per_element([-7, 6, 9], "sign_magnitude", 3), [3, 2, 3])  # 9 -> 7 = 111
  np.testing.assert_array_equal(sc.spikes_per_element([-3, 4], "ternary", 3), [3, 3])
