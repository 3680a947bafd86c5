"""Spike codings: expanding integer spike counts into spike trains over T time steps and back.

Training treats a spiking activation as an integer count s per element (layers.spiking). At
inference the count is emitted as a train of T spikes s_1..s_T, one per time step, in one of
CODINGS:

  binary           s_t in {0, 1}: one spike per step until the count is used up. Only counts
                   0 <= s <= T are representable.
  ternary          s_t in {-1, 0, 1}: s_t = sign(remainder), remainder -= s_t. |s| <= T.
  sign_magnitude   s = sum_t 2^(T-t) b_t with b_t in {-1, 0, 1} carrying the sign of s (the most
                   significant bit is emitted first). |s| <= 2^T - 1.
  twos_complement  bits b_t in {0, 1} of the T-bit two's complement pattern, MSB first; the MSB
                   weighs -2^(T-1). -2^(T-1) <= s <= 2^(T-1) - 1.

Decoding is s = sum_t w_t s_t with the step weights w_t of `step_weights` (1 for binary and
ternary, powers of two for the bitwise codings), so count -> train -> count is exact whenever the
count is representable in T steps. Counts that are not representable in a user-fixed T saturate to
the nearest representable value (negative counts become 0 in binary).

The paper's choice of T (`required_time_steps`) takes the largest |count| m of the tensor:
binary/ternary T = max(1, m); sign_magnitude T = max(1, ceil(log2(m + 1)));
twos_complement T = max(2, ceil(log2(m + 1)) + 1).

Counts are handled as int32 (float counts are rounded), so they must fit in int32; step weights of
the bitwise codings must fit too, which limits sign-magnitude decoding to T <= 31 (weights up to
2^30) and two's complement to T <= 32 (its top weight is -2^31, int32's minimum), exactly the T that
`required_time_steps` picks for the largest int32 counts.
"""

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CODINGS = ("binary", "ternary", "sign_magnitude", "twos_complement")
_BITWISE = ("sign_magnitude", "twos_complement")
_INT_MAX = np.iinfo(np.int32).max
_INT_MIN = np.iinfo(np.int32).min
# Bitwise step weights must fit in int32: 2^(T-1) for sign-magnitude, -2^(T-1) for the top step
# of two's complement.
_MAX_BITWISE_STEPS = {"sign_magnitude": 31, "twos_complement": 32}


def _check_coding(coding: str) -> None:
  if coding not in CODINGS:
    raise ValueError(f"coding={coding!r} must be one of {CODINGS}")


def _check_static_steps(time_steps) -> int:
  if isinstance(time_steps, bool) or not isinstance(time_steps, numbers.Integral):
    raise ValueError(f"time_steps={time_steps!r} must be a Python int here (it sets the shape "
                     "of the spike train)")
  if time_steps < 1:
    raise ValueError(f"time_steps={time_steps} must be >= 1")
  return int(time_steps)


def as_counts(counts) -> jax.Array:
  """Counts as int32; float counts are rounded (and clipped so the cast is defined)."""
  counts = jnp.asarray(counts)
  if jnp.issubdtype(counts.dtype, jnp.integer):
    return counts.astype(jnp.int32)
  # 2147483520 is the largest float32 below 2^31.
  return jnp.clip(jnp.round(counts.astype(jnp.float32)), -2147483648.0,
                  2147483520.0).astype(jnp.int32)


def _bit_length(m):
  """ceil(log2(m + 1)) for int32 m >= 0 (traceable)."""
  return 32 - lax.clz(m.astype(jnp.int32))


def required_time_steps(max_abs_count, coding: str):
  """The paper's number of time steps for a tensor whose largest |count| is `max_abs_count`.

  Args:
    max_abs_count: a Python int (returns a Python int) or an integer array, possibly traced
      (returns an int32 array of the same shape).
    coding: one of CODINGS.
  """
  _check_coding(coding)
  if isinstance(max_abs_count, numbers.Integral) and not isinstance(max_abs_count, bool):
    m = int(max_abs_count)
    if m < 0:
      raise ValueError(f"max_abs_count={m} must be >= 0")
    if coding in ("binary", "ternary"):
      return max(1, m)
    if coding == "sign_magnitude":
      return max(1, m.bit_length())
    return max(2, m.bit_length() + 1)
  m = as_counts(max_abs_count)
  if coding in ("binary", "ternary"):
    return jnp.maximum(1, m)
  if coding == "sign_magnitude":
    return jnp.maximum(1, _bit_length(m))
  return jnp.maximum(2, _bit_length(m) + 1)


def time_steps_for(counts, coding: str) -> int:
  """The paper's T for a concrete tensor of counts (a Python int).

  Raises ValueError for traced counts (pass time_steps explicitly there) and for negative counts
  in binary coding, which no T can represent.
  """
  _check_coding(coding)
  if isinstance(counts, jax.core.Tracer):
    raise ValueError("time_steps_for needs concrete counts; under jit pass time_steps explicitly")
  c = np.asarray(as_counts(counts))
  if coding == "binary" and c.size and c.min() < 0:
    raise ValueError(f"coding='binary' cannot represent negative counts (min {int(c.min())}); "
                     "use a signed coding or a fixed time_steps, which saturates them to 0")
  c64 = c.astype(np.int64)
  m = int(np.abs(c64).max()) if c.size else 0
  if coding == "twos_complement" and c.size:
    # -2^k needs only k + 1 steps, as 2^k - 1 does (int32's minimum fits in 32).
    m = int(max(c64.max(), -c64.min() - 1, 0))
  return required_time_steps(m, coding)


def _bounds(coding: str, time_steps):
  """(lo, hi): the representable count range in T steps; T may be traced."""
  t = jnp.asarray(time_steps, jnp.int32)
  if coding == "binary":
    return jnp.zeros_like(t), t
  if coding == "ternary":
    return -t, t
  if coding == "sign_magnitude":
    # The shift is kept below 31 so it never overflows; T >= 31 covers all of int32 anyway.
    hi = jnp.where(t >= 31, _INT_MAX, (1 << jnp.minimum(t, 30)) - 1)
    return -hi, hi
  half = 1 << jnp.clip(t - 1, 0, 30)
  wide = t - 1 >= 31
  return jnp.where(wide, _INT_MIN, -half), jnp.where(wide, _INT_MAX, half - 1)


def representable(counts, coding: str, time_steps) -> jax.Array:
  """Bool array: whether each count has an exact train of `time_steps` steps (traceable)."""
  _check_coding(coding)
  c = as_counts(counts)
  lo, hi = _bounds(coding, time_steps)
  return (c >= lo) & (c <= hi)


def saturate(counts, coding: str, time_steps) -> jax.Array:
  """Counts (int32) clipped to the range representable in `time_steps` steps (traceable)."""
  _check_coding(coding)
  lo, hi = _bounds(coding, time_steps)
  return jnp.clip(as_counts(counts), lo, hi)


def encode(counts, coding: str, time_steps: int | None = None) -> jax.Array:
  """Spike trains of `counts`: int8 [T, *counts.shape], time axis first.

  Args:
    counts: integer-valued counts (int or float array).
    coding: one of CODINGS.
    time_steps: T; None picks the paper's T from the counts (concrete counts only). Counts not
      representable in a fixed T saturate to the nearest representable value.
  """
  _check_coding(coding)
  t_steps = time_steps_for(counts, coding) if time_steps is None else _check_static_steps(
      time_steps)
  return _encode(as_counts(counts), coding, t_steps)


# Jitted so eager callers compile one program instead of dispatching a dozen small ops.
@functools.partial(jax.jit, static_argnums=(1, 2))
def _encode(counts, coding: str, t_steps: int) -> jax.Array:
  s = saturate(counts, coding, t_steps)
  step = jnp.arange(t_steps, dtype=jnp.int32).reshape((t_steps,) + (1,) * s.ndim)
  if coding == "binary":
    out = step < s
  elif coding == "ternary":
    out = jnp.sign(s) * (step < jnp.abs(s))
  else:
    # Step t (0-based) carries bit T-1-t. Shifts are capped at 31: beyond that the magnitude has
    # no bits left (0) and the two's complement pattern is all sign bits, as for a shift of 31.
    shift = jnp.minimum(t_steps - 1 - step, 31)
    if coding == "sign_magnitude":
      out = jnp.sign(s) * (jnp.right_shift(jnp.abs(s), shift) & 1)
    else:
      out = jnp.right_shift(s, shift) & 1
  return out.astype(jnp.int8)


def step_weights(coding: str, time_steps: int) -> jax.Array:
  """The weight w_t of each time step (int32 [T]): a count is sum_t w_t s_t."""
  _check_coding(coding)
  t_steps = _check_static_steps(time_steps)
  if coding in ("binary", "ternary"):
    return jnp.ones((t_steps,), jnp.int32)
  if t_steps > _MAX_BITWISE_STEPS[coding]:
    raise ValueError(f"time_steps={t_steps} is too many for coding={coding!r}: its step weights "
                     f"must fit in int32 (at most {_MAX_BITWISE_STEPS[coding]} steps)")
  w = [1 << (t_steps - 1 - t) for t in range(t_steps)]
  if coding == "twos_complement":
    w[0] = -w[0]
  return jnp.asarray(w, jnp.int32)


def decode(spikes, coding: str) -> jax.Array:
  """Counts (int32 [...]) of spike trains `spikes` [T, ...]."""
  spikes = jnp.asarray(spikes)
  step_weights(coding, spikes.shape[0])  # validates coding and T before tracing
  return _decode(spikes, coding)


@functools.partial(jax.jit, static_argnums=(1,))
def _decode(spikes, coding: str) -> jax.Array:
  w = step_weights(coding, spikes.shape[0])
  return jnp.tensordot(w, spikes.astype(jnp.int32), axes=(0, 0))


def spike_matmul(spikes, w, coding: str, v_th=None) -> jax.Array:
  """sum_t w_t (s_t @ w), times v_th if given: the projection computed from spikes alone.

  Each step multiplies a {-1, 0, 1} matrix into `w`, i.e. only adds and subtracts weights; the
  step weights are applied to the per-step sums. The result equals decode(spikes) @ w (times v_th).

  Args:
    spikes: [T, ..., n] spike trains (from `encode`).
    w: [n, m] weights. Integer weights give an exact int32 result.
    coding: the coding of `spikes`.
    v_th: optional threshold [..., 1] (or anything broadcasting against [..., m]).
  """
  spikes = jnp.asarray(spikes)
  w = jnp.asarray(w)
  dtype = jnp.int32 if jnp.issubdtype(w.dtype, jnp.integer) else jnp.promote_types(w.dtype,
                                                                                    jnp.float32)
  per_step = jnp.matmul(spikes.astype(dtype), w.astype(dtype))
  steps = step_weights(coding, spikes.shape[0]).astype(dtype)
  y = jnp.tensordot(steps, per_step, axes=(0, 0))
  if v_th is not None:
    y = y * v_th
  return y


def spikes_per_element(counts, coding: str, time_steps=None) -> jax.Array:
  """Number of nonzero slots in each element's train (int32, counts' shape); traceable.

  Counts are saturated to `time_steps` first, so this matches counting the nonzeros of
  encode(counts, coding, time_steps). `time_steps` may be a traced integer; None takes the paper's
  T from max |counts| (also traceable).
  """
  _check_coding(coding)
  c = as_counts(counts)
  if time_steps is None:
    time_steps = required_time_steps(jnp.max(jnp.abs(c), initial=0), coding)
  return _spikes_per_element(c, coding, jnp.asarray(time_steps, jnp.int32))


@functools.partial(jax.jit, static_argnums=(1,))
def _spikes_per_element(c, coding: str, t) -> jax.Array:
  s = saturate(c, coding, t)
  if coding in ("binary", "ternary"):
    return jnp.abs(s)
  if coding == "sign_magnitude":
    return lax.population_count(jnp.abs(s))
  # The T-bit two's complement pattern: the low T bits, or for T > 32 the 32 bits of the int32
  # plus T - 32 extra sign bits (set only for negative counts).
  mask = jnp.where(t >= 32, -1, (1 << jnp.minimum(t, 31)) - 1)
  ones = lax.population_count(s & mask)
  return ones + jnp.where((t > 32) & (s < 0), t - 32, 0)
