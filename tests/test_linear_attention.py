"""The public linear_attention op: gate forms, GQA, decoding steps, dispatch logging, errors.

The kernels themselves are tested against the token-by-token reference in test_linear_chunked.py;
here every implementation goes through the public entry point.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.linear_attention import linear_attention, linear_attention_step

B, T, H, HK, D = 2, 37, 4, 2, 12


def inputs(seed=0, gate="vector"):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (B, T, H, D))
  k = jax.random.normal(keys[1], (B, T, HK, D))
  v = jax.random.normal(keys[2], (B, T, HK, D))
  g = {"none": None,
       "fixed": -jnp.linspace(0.0, 1.0, H),
       "scalar": jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H))),
       "vector": jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H, D)))}[gate]
  h0 = jax.random.normal(keys[4], (B, H, D, D))
  return q, k, v, g, h0


def full_gate(g):
  """Any gate form written out as the [b, t, h, d_k] GLA form."""
  if g is None:
    return jnp.zeros((B, T, H, D))
  if g.ndim == 1:
    return jnp.broadcast_to(g[None, None, :, None], (B, T, H, D))
  if g.ndim == 3:
    return jnp.broadcast_to(g[..., None], (B, T, H, D))
  return g


def rel_rms(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-30)


@pytest.mark.parametrize("gate", ["none", "fixed", "scalar", "vector"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_gate_forms_and_gqa_match_expanded_reference(gate, impl):
  """Every gate form and GQA equal the reference run on repeated heads and a full GLA gate."""
  q, k, v, g, h0 = inputs(1, gate)
  seg = jnp.asarray(np.repeat([[1, 1, 2, 3]], B, 0).repeat([10, 10, 10, 7], axis=1))

  def ours(q, k, v, g, h0):
    return linear_attention(q, k, v, g, initial_state=h0, output_final_state=True,
                            segment_ids=seg, impl=impl, chunk_size=16)

  def expanded(q, k, v, g, h0):
    rep = lambda x: jnp.repeat(x, H // HK, axis=2)
    return linear_attention(q, rep(k), rep(v), full_gate(g), initial_state=h0,
                            output_final_state=True, segment_ids=seg, impl="reference")

  args = (q, k, v, g, h0)
  (o1, s1), vjp1 = jax.vjp(ours, *args)
  (o2, s2), vjp2 = jax.vjp(expanded, *args)
  assert rel_rms(o1, o2) < 1e-5 and rel_rms(s1, s2) < 1e-5
  cot = (jax.random.normal(jax.random.key(7), o1.shape), jax.random.normal(jax.random.key(8),
                                                                           s1.shape))
  for name, a, b in zip("q k v g h0".split(), vjp1(cot), vjp2(cot)):
    if a is not None:
      assert rel_rms(a, b) < 1e-4, name


def test_default_scale_and_no_state_output():
  q, k, v, g, _ = inputs(2, "scalar")
  o = linear_attention(q, k, v, g, impl="xla")
  o_ref = linear_attention(q, k, v, g, scale=D ** -0.5, impl="reference")
  assert o.shape == (B, T, H, D) and rel_rms(o, o_ref) < 1e-5
  assert rel_rms(o, linear_attention(q, k, v, g, scale=1.0, impl="reference")) > 0.1


@pytest.mark.parametrize("gate", ["none", "fixed", "scalar", "vector"])
def test_decoding_steps_equal_chunked_output(gate):
  """Prefill a prefix with the chunked path, then one token at a time with the recurrent step."""
  q, k, v, g, h0 = inputs(3, gate)
  o_full, s_full = linear_attention(q, k, v, g, initial_state=h0, output_final_state=True,
                                    impl="xla", chunk_size=16)
  p = 20
  g_at = lambda sl: g if g is None or g.ndim == 1 else g[:, sl]
  o_pre, state = linear_attention(q[:, :p], k[:, :p], v[:, :p], g_at(slice(0, p)),
                                  initial_state=h0, output_final_state=True, impl="xla",
                                  chunk_size=16)
  outs = [o_pre]
  for t in range(p, T):
    o_t, state = linear_attention_step(q[:, t], k[:, t], v[:, t], g_at(t), state=state)
    outs.append(o_t[:, None])
  assert rel_rms(jnp.concatenate(outs, 1), o_full) < 1e-5
  assert rel_rms(state, s_full) < 1e-5


def test_auto_logs_the_chosen_implementation(caplog):
  q, k, v, g, _ = inputs(4, "vector")
  with caplog.at_level(logging.INFO, logger="lctx.kernels"):
    linear_attention(q, k, v, g, impl="auto")
  assert "linear_attention: impl=auto -> xla on cpu" in caplog.text


@pytest.mark.parametrize("change,message", [
    (dict(k=jnp.zeros((B, T, 3, D)), v=jnp.zeros((B, T, 3, D))), "not a multiple of key/value heads"),
    (dict(g=jnp.zeros((B, T, D))), "gate g has shape"),
    (dict(initial_state=jnp.zeros((B, H, D, D + 1))), "initial_state has shape"),
    (dict(segment_ids=jnp.zeros((B, T + 1), jnp.int32)), "segment_ids has shape"),
    (dict(chunk_size=20), "chunk_size=20"),
    (dict(impl="triton"), "impl='triton'"),
])
def test_bad_arguments_name_the_setting(change, message):
  q, k, v, g, _ = inputs(5, "vector")
  kwargs = dict(q=q, k=k, v=v, g=g) | change
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
    linear_attention(**kwargs)


def test_auto_avoids_kernels_that_cannot_lower_and_pallas_names_why(caplog, monkeypatch):
  from layers.kernels import dispatch
  # Every kernel lowers for cuda and tpu today (the export tests), so auto picks pallas there.
  assert dispatch.CANNOT_LOWER == {}
  for family in ("linear_attention", "softmax_attention"):
    for backend in ("gpu", "tpu"):
      assert dispatch.resolve_impl(family, "auto", backend=backend) == "pallas"
  assert dispatch.resolve_impl("linear_attention", "auto", backend="cpu") == "xla"
  # An entry (what a failing export would add) turns auto into xla with the reason logged.
  monkeypatch.setitem(dispatch.CANNOT_LOWER, ("linear_attention", "gpu"), "reason R")
  with caplog.at_level(logging.INFO, logger="lctx.kernels"):
    assert dispatch.resolve_impl("linear_attention", "auto", backend="gpu") == "xla"
    assert dispatch.resolve_impl("softmax_attention", "auto", backend="gpu") == "pallas"
  assert "linear_attention: impl=auto -> xla on gpu because reason R" in caplog.text
  with pytest.raises(ValueError, match="impl='pallas' cannot run on gpu: reason R"):
    dispatch.resolve_impl("linear_attention", "pallas", backend="gpu")
