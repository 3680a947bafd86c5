"""Chunked (gated) linear attention, pure-JAX and Pallas executors, against the token-by-token
reference: outputs, final states and the gradients of q, k, v, gk and the initial state.

The xla executor gets the full sweep (gate kinds, gate strengths, initial state, segment ids,
chunk sizes); Pallas runs interpreted on CPU and is slow, so it gets a representative subset, plus
one run under the TPU interpreter (`pltpu.InterpretParams`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from layers.kernels.gla_pallas import gla_pallas
from layers.kernels.linear_chunked import chunked_linear_attention
from layers.kernels.linear_reference import linear_attention_reference

# Float32 with highest-precision matmuls (conftest) lands around 1e-6; the margin absorbs the
# accumulation-order differences of strong gates without hiding a wrong term.
TOL = 1e-4
SCALE = 0.25
STRENGTHS = (0.1, 1.0, 10.0)  # gate multipliers: weak, typical, and strong enough to overflow e^-b


def _rel_rms(x, ref, head_axis=None):
  """Relative RMS error; with head_axis, the worst head (heads may have different gates)."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if head_axis is None:
    x, ref, axes = x[None], ref[None], None
  else:
    axes = tuple(a for a in range(x.ndim) if a != head_axis)
  err = np.sqrt(np.mean((x - ref) ** 2, axis=axes))
  return float(np.max(err / (np.sqrt(np.mean(ref ** 2, axis=axes)) + 1e-30)))


def _inputs(seed, *, b=2, t=100, h=2, dk=60, dv=60, gate=None, strength=1.0, h0=True):
  """(q, k, v, gk, initial_state) with gk = logsigmoid(randn) * strength.

  strength may be a tuple with one entry per head, to sweep gate strengths in one call.
  """
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (b, t, h, dk))
  k = jax.random.normal(ks[1], (b, t, h, dk)) / np.sqrt(dk)
  v = jax.random.normal(ks[2], (b, t, h, dv))
  gk = None
  if gate is not None:
    width = 1 if gate == "scalar" else dk
    strength = jnp.broadcast_to(jnp.asarray(strength, jnp.float32), (h,))[:, None]
    gk = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, width))) * strength
  state = jax.random.normal(ks[4], (b, h, dk, dv)) if h0 else None
  return q, k, v, gk, state


def _segments(t):
  """Two rows of document ids: boundaries off chunk edges, on a chunk start (32, 64) and three
  documents inside one chunk; row 1 also reuses an earlier id (any change of id resets)."""
  row0 = np.zeros(t, np.int32)
  for start in (10, 32, 45, 50, 77):
    row0[start:] += 1
  row1 = np.full(t, 7, np.int32)
  row1[20:64] = 3
  row1[64:] = 7
  return jnp.asarray(np.stack([row0, row1]))


def _check(fn, inputs, segment_ids, tol=TOL):
  """Compares fn with the reference: forward values and a VJP with random cotangents."""
  q, k, v, gk, h0 = inputs
  ks = jax.random.split(jax.random.PRNGKey(123), 2)
  cts = (jax.random.normal(ks[0], q.shape[:3] + v.shape[-1:]),
         jax.random.normal(ks[1], (q.shape[0], q.shape[2], q.shape[3], v.shape[-1])))

  @jax.jit  # one compile per implementation beats dispatching the chunk ops one by one
  def forward_and_vjp(inputs, segment_ids, cts):
    results = []
    for impl in (fn, linear_attention_reference):
      f = lambda q, k, v, gk, h0: impl(q, k, v, gk, scale=SCALE, initial_state=h0,
                                       segment_ids=segment_ids)
      out, vjp = jax.vjp(f, *inputs)
      results.append((out, vjp(cts)))
    return results

  ((o, s), grads), ((o_ref, s_ref), grads_ref) = forward_and_vjp(inputs, segment_ids, cts)
  assert o.dtype == q.dtype and s.dtype == jnp.float32
  names = ("o", "final_state", "dq", "dk", "dv", "dgk", "dh0")
  head_axes = (2, 1, 2, 2, 2, 2, 1)
  for name, axis, x, x_ref in zip(names, head_axes, (o, s) + tuple(grads),
                                  (o_ref, s_ref) + tuple(grads_ref)):
    assert (x is None) == (x_ref is None), name
    if x is not None:
      assert x.shape == x_ref.shape, name
      err = _rel_rms(x, x_ref, axis)
      assert err < tol, f"{name}: relative RMS error {err} (worst head)"


def _xla(chunk):
  return functools.partial(chunked_linear_attention, chunk_size=chunk)


def _pallas(chunk, interpret=None):
  return functools.partial(gla_pallas, chunk_size=chunk, interpret=interpret)


# ------------------------------------------------------------------------------------------------
# xla executor: the full sweep.


@pytest.mark.parametrize("gate", [None, "scalar", "vector"])
def test_xla_gates_with_state_and_segments(gate):
  # One head per gate strength; errors are checked per head.
  inputs = _inputs(0, h=len(STRENGTHS), gate=gate, strength=STRENGTHS)
  _check(_xla(32), inputs, _segments(100))


@pytest.mark.parametrize("gate,h0,segments,t,dk,dv,chunk", [
    (None, False, False, 63, 60, 40, 16),
    ("vector", False, False, 63, 40, 24, 16),
    ("vector", True, False, 100, 60, 60, 48),  # 3 sub-chunks forward, 6 backward
    ("vector", False, True, 100, 24, 40, 24),  # chunk 24: sub-chunks of 8
    ("scalar", True, True, 1, 8, 4, 16),  # a single token
])
def test_xla_shapes_and_options(gate, h0, segments, t, dk, dv, chunk):
  inputs = _inputs(1, t=t, dk=dk, dv=dv, gate=gate, h0=h0)
  _check(_xla(chunk), inputs, _segments(t) if segments else None)


@pytest.fixture(scope="module")
def documents():
  """Inputs with segment ids, and the reference run on each document separately.

  Each document is moved to the front of a zero row of full length (zero keys and log-gates leave
  its final state alone), so one jitted reference serves all documents.
  """
  t = 100
  q, k, v, gk, h0 = _inputs(2, t=t, gate="vector", strength=1.0)
  seg = _segments(t)
  reference = jax.jit(functools.partial(linear_attention_reference, scale=SCALE))
  expected = []  # (row, lo, hi, o_doc, final state after the document)
  for row in range(2):
    ids = np.asarray(seg[row])
    starts = [0] + [i for i in range(1, t) if ids[i] != ids[i - 1]] + [t]
    for lo, hi in zip(starts[:-1], starts[1:]):
      doc = lambda x: jnp.pad(x[row:row + 1, lo:hi], ((0, 0), (0, t - hi + lo), (0, 0), (0, 0)))
      state = h0[row:row + 1] if lo == 0 else jnp.zeros_like(h0[:1])
      o_doc, s_doc = reference(doc(q), doc(k), doc(v), doc(gk), initial_state=state)
      expected.append((row, lo, hi, o_doc[:, :hi - lo], s_doc))
  return (q, k, v, gk, h0, seg), expected


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_segments_equal_separate_documents(impl, documents):
  (q, k, v, gk, h0, seg), expected = documents
  fn = _xla(32) if impl == "xla" else _pallas(32)
  o, final = fn(q, k, v, gk, scale=SCALE, initial_state=h0, segment_ids=seg)
  for row, lo, hi, o_doc, s_doc in expected:
    assert _rel_rms(o[row:row + 1, lo:hi], o_doc) < TOL, (row, lo)
    if hi == q.shape[1]:
      assert _rel_rms(final[row:row + 1], s_doc) < TOL, row


# ------------------------------------------------------------------------------------------------
# Pallas executor (interpreted on CPU): a representative subset.


@pytest.mark.parametrize("gate,strength,t,dk,dv,chunk,target", [
    (None, 1.0, 63, 60, 60, 16, None),
    ("scalar", 10.0, 100, 24, 40, 32, "gpu"),
    ("vector", 10.0, 63, 40, 24, 48, None),
    ("vector", 1.0, 40, 24, 40, 32, "gpu"),
])
def test_pallas_matches_reference(monkeypatch, gate, strength, t, dk, dv, chunk, target):
  # target "gpu": the Triton conventions (each program loops over its chunks; head dims padded to
  # powers of two) run in the interpreter; None: the chunk walked by the grid, as on TPU.
  from layers.kernels import chunk_walk
  monkeypatch.setattr(chunk_walk, "target_of", lambda interpret: target)
  inputs = _inputs(3, b=1, t=t, dk=dk, dv=dv, gate=gate, strength=strength)
  _check(_pallas(chunk, True), inputs, _segments(t)[:1])


def test_pallas_tpu_interpreter():
  inputs = _inputs(4, b=1, t=63, dk=24, dv=40, gate="vector", strength=1.0)
  _check(_pallas(32, pltpu.InterpretParams()), inputs, _segments(63)[:1])


# ------------------------------------------------------------------------------------------------
# Dtypes and argument checks.


@pytest.mark.parametrize("fn", [chunked_linear_attention, gla_pallas])
def test_bfloat16_inputs_keep_dtype(fn):
  # The kernels feed bf16 straight into their matmuls (f32 accumulation); the xla path upcasts.
  q, k, v, gk, h0 = _inputs(5, b=1, t=20, h=1, dk=16, dv=16, gate="vector")
  bf = lambda x: x.astype(jnp.bfloat16)

  @jax.jit
  def forward_and_dq(q):
    f = lambda q: fn(q, bf(k), bf(v), gk, scale=SCALE, initial_state=h0, chunk_size=16)
    (o, final), vjp = jax.vjp(f, q)
    return o, final, vjp((jnp.ones_like(o), jnp.zeros_like(final)))[0]

  o, final, dq = forward_and_dq(bf(q))
  o_ref, _ = linear_attention_reference(q, k, v, gk, scale=SCALE, initial_state=h0)
  assert o.dtype == jnp.bfloat16 and final.dtype == jnp.float32 and dq.dtype == jnp.bfloat16
  assert _rel_rms(o, o_ref) < 2e-2


@pytest.mark.parametrize("fn", [chunked_linear_attention, gla_pallas])
@pytest.mark.parametrize("kwargs,match", [
    (dict(chunk_size=0), "chunk_size=0"),
    (dict(gk=jnp.zeros((1, 8, 2, 3))), "gk shape"),
    (dict(initial_state=jnp.zeros((1, 2, 4, 5))), "initial_state shape"),
    (dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), "segment_ids shape"),
])
def test_bad_arguments_are_named(fn, kwargs, match):
  q = jnp.zeros((1, 8, 2, 4))
  with pytest.raises(ValueError, match=match):
    fn(q, q, q, scale=1.0, **kwargs)


def test_pallas_rejects_bad_interpret():
  q = jnp.zeros((1, 8, 2, 4))
  with pytest.raises(ValueError, match="interpret="):
    gla_pallas(q, q, q, scale=1.0, interpret="yes")


def _export_gla(platform, gate, with_state_and_segments, t=32768, d=128):
  """Exports the GLA kernels' forward+backward for `platform` (bf16, T = 32K, d = 128)."""
  from jax import export
  b, h = 1, 2
  x = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  g = None if gate is None else jax.ShapeDtypeStruct((b, t, h, 1 if gate == "scalar" else d),
                                                     jnp.float32)
  h0 = seg = None
  if with_state_and_segments:
    h0 = jax.ShapeDtypeStruct((b, h, d, d), jnp.float32)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def loss(q, k, v, g, h0, seg):
    o, final = gla_pallas(q, k, v, g, scale=0.1, initial_state=h0, segment_ids=seg,
                          interpret=False)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  argnums = (0, 1, 2) + ((3,) if gate else ()) + ((4,) if h0 is not None else ())
  fn = jax.jit(jax.value_and_grad(loss, argnums=argnums))
  return export.export(fn, platforms=[platform], disabled_checks=checks)(x, x, x, g, h0, seg)


@pytest.mark.parametrize("target", ["gpu", "tpu"])
def test_gla_kernels_export_for_cuda_and_tpu_at_32k(monkeypatch, tpu_chip, target):
  # Every gate form (none, per head, per key dim), with and without segment ids and an initial
  # state: the three kernels lower (Triton on GPU, Mosaic on TPU), which is what lets
  # dispatch.CANNOT_LOWER stay empty and `auto` pick them on both.
  import re
  from layers.kernels import chunk_walk
  monkeypatch.setattr(chunk_walk, "target_of", lambda interpret: target)
  platform, call = {"gpu": ("cuda", "__gpu$xla.gpu.triton"), "tpu": ("tpu", "tpu_custom_call")}[target]
  for gate in (None, "scalar", "vector"):
    for extras in (False, True):
      text = _export_gla(platform, gate, extras).mlir_module()
      kernels = set(re.findall(r"gla_(fwd|states|bwd)", text))
      assert kernels == {"fwd", "states", "bwd"}, (gate, extras, kernels)
      assert text.count(f"custom_call @{call}(") == 3, (gate, extras)
