"""Symmetric INT8 quantization: group-wise for weights, per token for keys/values.

Weights: the fan-in axes are flattened together and split into groups of `group` consecutive
entries for every output column (the last group may be shorter); each group has its own scale
max|W_group| / 127 and W_q = round(W / scale) * scale. Keys/values: one scale max|x| / 127 per
token, over all of that token's other axes (heads and head dims).

The fake-quant functions return the dequantized values in the input dtype with a straight-through
gradient (the gradient of the identity), so training sees the INT8 rounding in the forward pass
only. `quantize_int8_grouped` / `dequantize_int8_grouped` give the stored form (int8 values and
float32 scales). Scales never drop below the smallest normal float32, so all-zero groups quantize
to 0 instead of dividing by zero.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_QMAX = 127.0
_TINY = float(np.finfo(np.float32).tiny)


def _normalize_axes(axes, ndim: int, name: str) -> tuple[int, ...]:
  axes = tuple(int(a) for a in axes)
  if not axes:
    raise ValueError(f"{name}={axes} must name at least one axis")
  if any(not -ndim <= a < ndim for a in axes):
    raise ValueError(f"{name}={axes} is out of range for an array with {ndim} dims")
  norm = tuple(a % ndim for a in axes)
  if len(set(norm)) != len(norm):
    raise ValueError(f"{name}={axes} repeats an axis")
  return norm


def _scale(amax):
  # The floor keeps all-zero (and denormal) groups finite: they round to 0.
  return jnp.maximum(amax / _QMAX, _TINY)


def _straight_through(x, x_q):
  # Forward value is exactly x_q (x - stop_gradient(x) is 0); the gradient is the identity.
  x32 = x.astype(jnp.float32)
  return (lax.stop_gradient(x_q) + (x32 - lax.stop_gradient(x32))).astype(x.dtype)


def _grouped_layout(shape, group: int, fan_in_axes):
  """Permutation, fan-in size, rest shape and group count for `shape`."""
  if group < 1:
    raise ValueError(f"group={group} must be >= 1")
  fan = _normalize_axes(fan_in_axes, len(shape), "fan_in_axes")
  rest = tuple(a for a in range(len(shape)) if a not in fan)
  fan_in = int(np.prod([shape[a] for a in fan], dtype=np.int64))
  rest_shape = tuple(shape[a] for a in rest)
  return fan + rest, fan_in, rest_shape, -(-fan_in // group)


def quantize_int8_grouped(w, group: int = 128, fan_in_axes=(0,)):
  """Group-wise symmetric INT8 quantization of weights.

  Args:
    w: weights of any shape.
    group: fan-in entries per group.
    fan_in_axes: the axes summed over by the projection; flattened together in order.

  Returns:
    (q, scales): q int8 with w's shape; scales float32 [num_groups, *other_dims] with the non
    fan-in dims in their original order, num_groups = ceil(fan_in / group).
  """
  w = jnp.asarray(w)
  _grouped_layout(w.shape, group, fan_in_axes)  # validates before tracing
  return _quantize_grouped(w, int(group), tuple(int(a) for a in fan_in_axes))


# Jitted so eager callers compile one program instead of dispatching each small op.
@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_grouped(w, group: int, fan_in_axes: tuple[int, ...]):
  perm, fan_in, rest_shape, n_groups = _grouped_layout(w.shape, group, fan_in_axes)
  flat = jnp.transpose(w.astype(jnp.float32), perm).reshape((fan_in,) + rest_shape)
  # Zero padding never raises a group's max |w|, so the short last group keeps its own scale.
  pad = n_groups * group - fan_in
  grouped = jnp.pad(flat, [(0, pad)] + [(0, 0)] * len(rest_shape))
  grouped = grouped.reshape((n_groups, group) + rest_shape)
  scales = _scale(jnp.max(jnp.abs(grouped), axis=1))
  q = jnp.clip(jnp.round(grouped / scales[:, None]), -_QMAX, _QMAX).astype(jnp.int8)
  q = q.reshape((n_groups * group,) + rest_shape)[:fan_in]
  q = q.reshape(tuple(w.shape[a] for a in perm))
  return jnp.transpose(q, np.argsort(perm)), scales


def dequantize_int8_grouped(q, scales, group: int = 128, fan_in_axes=(0,),
                            dtype=jnp.float32) -> jax.Array:
  """Inverse of `quantize_int8_grouped` (same group and fan_in_axes): q * scale, in `dtype`."""
  q = jnp.asarray(q)
  perm, fan_in, rest_shape, n_groups = _grouped_layout(q.shape, group, fan_in_axes)
  if jnp.shape(scales) != (n_groups,) + rest_shape:
    raise ValueError(f"scales shape {jnp.shape(scales)} does not match {(n_groups,) + rest_shape} "
                     f"for q {q.shape}, group={group}, fan_in_axes={fan_in_axes}")
  return _dequantize_grouped(q, scales, int(group), tuple(int(a) for a in fan_in_axes),
                             jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _dequantize_grouped(q, scales, group: int, fan_in_axes: tuple[int, ...], dtype):
  perm, fan_in, rest_shape, n_groups = _grouped_layout(q.shape, group, fan_in_axes)
  flat = jnp.transpose(q.astype(jnp.float32), perm).reshape((fan_in,) + rest_shape)
  per_entry = jnp.repeat(scales, group, axis=0, total_repeat_length=n_groups * group)[:fan_in]
  w = (flat * per_entry).reshape(tuple(q.shape[a] for a in perm))
  return jnp.transpose(w, np.argsort(perm)).astype(dtype)


def fake_quant_int8_grouped(w, group: int = 128, fan_in_axes=(0,)) -> jax.Array:
  """Group-wise INT8 round trip of w in w's dtype, with a straight-through gradient."""
  w = jnp.asarray(w)
  q, scales = quantize_int8_grouped(lax.stop_gradient(w), group, fan_in_axes)
  return _straight_through(w, dequantize_int8_grouped(q, scales, group, fan_in_axes))


def fake_quant_int8_per_token(x, token_axes) -> jax.Array:
  """Per-token INT8 round trip of x (e.g. keys [b, s, k, d] with token_axes=(0, 1)).

  Each token's scale is max|x| / 127 over all axes not in `token_axes`. Straight-through gradient.
  """
  x = jnp.asarray(x)
  tokens = _normalize_axes(token_axes, x.ndim, "token_axes")
  other = tuple(a for a in range(x.ndim) if a not in tokens)
  return _straight_through(x, _round_per_token(lax.stop_gradient(x), other))


@functools.partial(jax.jit, static_argnums=(1,))
def _round_per_token(x, other: tuple[int, ...]):
  x32 = x.astype(jnp.float32)
  scale = _scale(jnp.max(jnp.abs(x32), axis=other, keepdims=True))
  return jnp.clip(jnp.round(x32 / scale), -_QMAX, _QMAX) * scale
