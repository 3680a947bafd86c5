"""Sink tokens and return_lse: every implementation against dense oracles (outputs, logsumexp and
all gradients), cached decoding, the oracle against a plain loop, and argument errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.kernels.attention_reference import softmax_attention_reference
from layers.sink_tokens import (cached_sink_token_attention, merge_sink_tokens,
                                sink_token_attention, sink_token_attention_reference)
from layers.softmax_attention import cached_attention, init_kv_cache, softmax_attention

B, T, H, HK, NS = 2, 37, 4, 2, 3
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def make_inputs(seed, d, segments=False, sinks=False, t=T):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q, k, v = normal(B, t, H, d), normal(B, t, HK, d), normal(B, t, HK, d)
  # Larger sink keys so that the sink tokens take a real share of each row's softmax.
  sink_k, sink_v = 2.0 * normal(NS, HK, d), normal(NS, HK, d)
  seg = None
  if segments:
    seg = jnp.asarray(np.sort(rng.integers(0, 4, (B, t)), axis=1), jnp.int32)
  s = normal(H) if sinks else None
  return q, k, v, sink_k, sink_v, seg, s


def close(got, want, name=""):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=ATOL, atol=ATOL,
                             err_msg=name)


# (head_dim, causal, window, segments, per-head sinks, block_size): block sizes never divide 37.
CASES = [
    (5, True, None, False, False, 16),
    (6, True, 4, True, True, (8, 16)),
    (5, False, None, True, True, 16),
]
IMPLS = ["reference", "xla", "pallas"]


def grads_of(fn, args, weights):
  """fn(*args)'s output and the gradients of a fixed projection of it in every array arg."""
  argnums = tuple(i for i, a in enumerate(args) if a is not None)

  def loss(*a):
    out = fn(*a)
    return jnp.sum(out * weights), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(*args)
  return out, grads


def sink_case(case):
  d, causal, window, segments, with_sinks, _ = case
  q, k, v, sink_k, sink_v, seg, s = make_inputs(d + (window or 0), d, segments, with_sinks)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  kw = dict(scale=0.7 * d ** -0.5, causal=causal, window=window, segment_ids=seg)
  return (q, k, v, sink_k, sink_v, s), weights, kw


@functools.lru_cache(maxsize=None)
def sink_oracle(case):
  """The oracle's output and gradients, and the output without sink tokens, once per case."""
  args, weights, kw = sink_case(case)
  out, grads = grads_of(
      lambda q, k, v, sk, sv, s: sink_token_attention_reference(q, k, v, sk, sv, sinks=s, **kw),
      args, weights)
  q, k, v, _, _, s = args
  plain = jax.jit(lambda: softmax_attention_reference(q, k, v, sinks=s, **kw))()
  return out, grads, plain


# The reference implementation differs from the oracle only in the merge: one case suffices.
SINK_RUNS = [(impl, case) for case in CASES for impl in IMPLS
             if impl != "reference" or case is CASES[1]]


@pytest.mark.parametrize("impl,case", SINK_RUNS, ids=str)
def test_sink_token_attention_matches_the_oracle(impl, case):
  args, weights, kw = sink_case(case)
  want, want_grads, plain = sink_oracle(case)
  got, got_grads = grads_of(
      lambda q, k, v, sk, sv, s: sink_token_attention(q, k, v, sk, sv, sinks=s, impl=impl,
                                                      block_size=case[-1], **kw),
      args, weights)
  q, s = args[0], args[-1]
  assert got.shape == want.shape == q.shape and got.dtype == jnp.float32
  close(got, want, "out")
  names = ("dq", "dk", "dv", "dsink_k", "dsink_v", "dsinks")
  assert len(got_grads) == (5 if s is None else 6)
  for name, g, w in zip(names, got_grads, want_grads):
    assert np.abs(np.asarray(w)).max() > 1e-3, name  # the gradient is not trivially zero
    close(g, w, name)
  # The sink tokens matter: without them the output is different.
  assert np.abs(np.asarray(plain - want)).max() > 0.1


def dense_lse(q, k, scale, causal, window, seg, sinks):
  """Logsumexp of each row's visible logits (and sink), in float64 numpy."""
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, t, h, d = qn.shape
  hk = kn.shape[2]
  logits = np.einsum("btkgd,bskd->btkgs", qn.reshape(b, t, hk, h // hk, d), kn) * scale
  pos = np.arange(t)
  visible = np.ones((b, t, t), bool)
  if causal:
    visible &= pos[None, None, :] <= pos[None, :, None]
  if window is not None:
    visible &= pos[None, :, None] - pos[None, None, :] <= window
  if seg is not None:
    seg = np.asarray(seg)
    visible &= seg[:, :, None] == seg[:, None, :]
  logits = np.where(visible[:, :, None, None, :], logits, -np.inf).reshape(b, t, h, t)
  if sinks is not None:
    sink = np.broadcast_to(np.asarray(sinks, np.float64)[None, None, :, None], (b, t, h, 1))
    logits = np.concatenate([logits, sink], axis=-1)
  m = logits.max(axis=-1, keepdims=True)
  return (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[..., 0]


def lse_case(case):
  d, causal, window, segments, with_sinks, _ = case
  q, k, v, _, _, seg, s = make_inputs(11, d, segments, with_sinks)
  rng = np.random.default_rng(2)
  w_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  w_lse = jnp.asarray(rng.normal(size=q.shape[:3]), jnp.float32)
  kw = dict(scale=d ** -0.5, causal=causal, window=window, segment_ids=seg)
  return (q, k, v, s), (w_out, w_lse), kw


def lse_run(fn, case):
  """(out, lse) of fn and two pullbacks: of (w_out, w_lse) and of (0, w_lse), lse alone."""
  args, (w_out, w_lse), kw = lse_case(case)

  def run(q, k, v, s):
    (out, lse), pull = jax.vjp(lambda q, k, v, s: fn(q, k, v, sinks=s, return_lse=True, **kw),
                               q, k, v, s)
    return out, lse, pull((w_out, w_lse)), pull((jnp.zeros_like(out), w_lse))

  return jax.jit(run)(*args)


@functools.lru_cache(maxsize=None)
def lse_oracle(case):
  return lse_run(softmax_attention_reference, case)


# The oracle here is the reference implementation itself, checked against numpy below.
@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("case", CASES[1:], ids=str)
def test_return_lse_value_and_gradient(impl, case):
  (q, k, _, s), _, kw = lse_case(case)
  impl_fn = lambda *a, **k: softmax_attention(*a, impl=impl, block_size=case[-1], **k)
  out, lse, grads, lse_grads = lse_run(impl_fn, case)
  want_out, want_lse, want_grads, want_lse_grads = lse_oracle(case)
  assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
  close(want_lse, dense_lse(q, k, kw["scale"], kw["causal"], kw["window"], kw["segment_ids"],
                            s), "reference lse")
  close(lse, want_lse, "lse")
  close(out, want_out, "out")
  names = ("dq", "dk", "dv", "dsinks")
  # The second pullback has a zero dout: the backward pass runs on lse's cotangent alone.
  for tag, got, want in (("out+lse", grads, want_grads), ("lse", lse_grads, want_lse_grads)):
    assert (got[3] is None) == (s is None)
    for name, g, w in zip(names, got, want):
      if w is None:
        continue
      # lse does not depend on v; everything else has a real gradient.
      assert (np.abs(np.asarray(w)).max() > 1e-3) == (tag == "out+lse" or name != "dv"), name
      close(g, w, f"{tag} {name}")


@pytest.mark.parametrize("window", [None, 4])
def test_cached_attention_lse_and_sink_tokens_step_by_step(window):
  """Single tokens and chunks of 7 (more than the ring) reproduce the full forward."""
  d, t = 6, 19
  q, k, v, sink_k, sink_v, _, s = make_inputs(5, d, sinks=True, t=t)
  want, want_lse = jax.jit(lambda: softmax_attention_reference(q, k, v, window=window, sinks=s,
                                                               return_lse=True))()
  want_sink = jax.jit(lambda: sink_token_attention_reference(q, k, v, sink_k, sink_v,
                                                             window=window, sinks=s))()

  @jax.jit
  def step(caches, q, k, v):
    (out, lse), cache = cached_attention(caches[0], q, k, v, window=window, sinks=s,
                                         return_lse=True)
    sink_out, sink_cache = cached_sink_token_attention(caches[1], q, k, v, sink_k, sink_v,
                                                       window=window, sinks=s)
    return (out, lse, sink_out), (cache, sink_cache)

  caches = (init_kv_cache(B, t, HK, d, window=window),) * 2
  results, start = [], 0
  for n in (1, 7, 1, 7, 1, 1, 1):
    chunk = lambda x: x[:, start:start + n]
    result, caches = step(caches, chunk(q), chunk(k), chunk(v))
    results.append(result)
    start += n
  assert start == t and int(caches[0].index) == t == int(caches[1].index)
  out, lse, sink_out = (jnp.concatenate(r, axis=1) for r in zip(*results))
  close(out, want, "out")
  close(lse, want_lse, "lse")
  close(sink_out, want_sink, "sink tokens")


def test_oracle_matches_a_loop():
  """The oracle itself: sink tokens are keys every query sees, whatever the window/segments."""
  d = 4
  q, k, v, sink_k, sink_v, _, s = make_inputs(3, d, sinks=True, t=6)
  seg = jnp.array([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]], jnp.int32)
  scale = 0.6
  got = jax.jit(lambda: sink_token_attention_reference(q, k, v, sink_k, sink_v, scale=scale,
                                                       window=0, segment_ids=seg, sinks=s))()
  qn, kn, vn, skn, svn, sn = (np.asarray(x, np.float64) for x in (q, k, v, sink_k, sink_v, s))
  want = np.zeros_like(qn)
  g = H // HK
  for b in range(B):
    for i in range(6):
      for h in range(H):
        kv = h // g
        # window=0: a query sees only itself among the sequence keys.
        keys = [skn[j, kv] for j in range(NS)] + [kn[b, i, kv]]
        vals = [svn[j, kv] for j in range(NS)] + [vn[b, i, kv]]
        logits = np.array([scale * qn[b, i, h] @ key for key in keys] + [sn[h]])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        want[b, i, h] = sum(pi * val for pi, val in zip(p[:-1], vals))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_merge_keeps_bfloat16_and_stays_close():
  q, k, v, sink_k, sink_v, seg, s = make_inputs(4, 8, segments=True, sinks=True)
  want = jax.jit(lambda: sink_token_attention_reference(q, k, v, sink_k, sink_v, window=5,
                                                        segment_ids=seg, sinks=s))()
  bf = lambda x: x.astype(jnp.bfloat16)
  got = jax.jit(lambda: sink_token_attention(bf(q), bf(k), bf(v), bf(sink_k), bf(sink_v),
                                             window=5, segment_ids=seg, sinks=s, impl="xla",
                                             block_size=16))()
  assert got.dtype == jnp.bfloat16
  rms = lambda x: float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2)))
  assert rms(got.astype(jnp.float32) - want) < 2e-2 * rms(want)


def test_bad_arguments_raise_with_the_argument_named():
  d = 4
  q, k, v, sink_k, sink_v, _, _ = make_inputs(7, d, t=8)
  attend = lambda sk, sv, **kw: sink_token_attention(q, k, v, sk, sv, **kw)
  with pytest.raises(ValueError, match=r"sink_k must hold at least one sink token"):
    attend(sink_k[:0], sink_v[:0])
  with pytest.raises(ValueError, match=r"sink_k must be 3-D"):
    attend(sink_k[0], sink_v)
  with pytest.raises(ValueError, match=r"sink_v must be floating point"):
    attend(sink_k, sink_v.astype(jnp.int32))
  with pytest.raises(ValueError, match=r"sink_v shape \(2, 2, 4\) must equal sink_k shape"):
    attend(sink_k, sink_v[:2])
  with pytest.raises(ValueError, match=r"sink_k head_dim=3 must equal the queries' head_dim=4"):
    attend(sink_k[..., :3], sink_v[..., :3])
  with pytest.raises(ValueError, match=r"sink_k has 1 kv heads but k has 2"):
    attend(sink_k[:, :1], sink_v[:, :1])
  with pytest.raises(ValueError, match=r"q heads=4 must be a multiple of sink_k kv heads=3"):
    merge_sink_tokens(q, q[..., 0], q, sink_k[:, :1].repeat(3, 1), sink_v[:, :1].repeat(3, 1),
                      scale=None)
  with pytest.raises(ValueError, match=r"lse must have shape \(2, 8, 4\)"):
    merge_sink_tokens(q, q[..., :1], q, sink_k, sink_v, scale=None)
  with pytest.raises(ValueError, match=r"out shape \(2, 8, 4, 3\) must equal q shape"):
    merge_sink_tokens(q[..., :3], q[..., 0], q, sink_k, sink_v, scale=None)
  with pytest.raises(ValueError, match=r"scale=0 must be None"):
    merge_sink_tokens(q, q[..., 0], q, sink_k, sink_v, scale=0)
  # The sequence arguments are checked as by softmax_attention, zero-length sequences included.
  with pytest.raises(ValueError, match=r"window=2 requires causal=True"):
    attend(sink_k, sink_v, causal=False, window=2)
  with pytest.raises(ValueError, match=r"must hold at least one token, got time=0"):
    sink_token_attention(q[:, :0], k[:, :0], v[:, :0], sink_k, sink_v)
  with pytest.raises(ValueError, match=r"must hold at least one token, got time=0"):
    softmax_attention(q[:, :0], k[:, :0], v[:, :0], impl="xla")
  with pytest.raises(ValueError, match=r"sink_k has 1 kv heads but k has 2"):
    cached_sink_token_attention(init_kv_cache(B, 8, HK, d), q, k, v, sink_k[:, :1],
                                sink_v[:, :1])


def test_an_empty_row_has_lse_minus_inf_and_no_weight_in_the_sink_merge():
  # Rows that see no key: the flash state's finalize, the dense oracle (a fully masked row) and
  # the tile backward all agree on lse = -inf, and the sink merge gives that row's sequence part
  # exactly zero weight: the merged row is the sink tokens' attention alone, gradients included.
  from layers.kernels import flash_common as fc
  from layers.kernels.attention_reference import dot_product_attention
  out, lse = fc.finalize(fc.init_state((2,), 4))
  assert np.all(np.asarray(out) == 0) and np.all(np.asarray(lse) == -np.inf)
  rng = np.random.default_rng(3)
  b, t, h, hk, d, n = 1, 3, 2, 1, 4, 2
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, x, d)), jnp.float32) for x in (h, hk, hk))
  sk, sv = (jnp.asarray(rng.normal(size=(n, hk, d)), jnp.float32) for _ in range(2))
  mask = jnp.asarray([[True, False, False], [False, False, False], [True, True, True]])[None, None]
  o_seq, lse_seq = dot_product_attention(q, k, v, mask, None, None, True)
  assert np.all(np.asarray(lse_seq[0, 1]) == -np.inf) and np.all(np.isfinite(lse_seq[0, ::2]))
  row = q[0, 1:2, 0]  # [1, d]: the empty row of head 0 as a one-row tile
  p, ds = fc.backward_block(row, k[0, :, 0], v[0, :, 0], row, lse_seq[0, 1:2, :1],
                            jnp.ones((1, 1)), mask[0, 0, 1:2], 1.0)
  assert np.all(np.asarray(p) == 0) and np.all(np.asarray(ds) == 0)

  def merged(q, sk, sv):
    o, lse = dot_product_attention(q, k, v, mask, None, None, True)
    return merge_sink_tokens(o, lse, q, sk, sv, scale=None)

  def sinks_only(q, sk, sv):  # the sink tokens as the only keys of every row
    keys = jnp.broadcast_to(sk[None], (b, n, hk, d))
    vals = jnp.broadcast_to(sv[None], (b, n, hk, d))
    return dot_product_attention(q, keys, vals, jnp.ones((1, 1, t, n), bool))

  w = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32).at[:, ::2].set(0.0)
  value_and_grads = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * w),
                                                         argnums=(0, 1, 2)))(q, sk, sv)
  got, want = value_and_grads(merged), value_and_grads(sinks_only)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
