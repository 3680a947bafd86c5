"""Chunked (gated) delta rule in pure JAX (the "xla" implementation).

The sequence is cut into chunks of C tokens. Within a chunk, with the state S_in entering it,
gamma_i the product of the gates a = exp(g) of the chunk's tokens up to i and
Gamma_ij = gamma_i / gamma_j (i >= j), the recurrence S_i = a_i S_{i-1} + k_i u_i^T with
u_i = beta_i (v_i - a_i S_{i-1}^T k_i) unrolls into the WY / UT representation:
  (I + A) U = diag(beta) V - diag(beta gamma) K S_in,  A_ij = beta_i Gamma_ij k_i . k_j  (i > j),
so with T = (I + A)^-1 (`unit_lower_inverse`), U' = T diag(beta) V and
W = T diag(beta gamma) K, the chunk's pseudo-values are u = U' - W S_in and
  o   = scale * [(Q * gamma) S_in + tril(Q K^T * Gamma) u]
  S_out = gamma_C S_in + (K * Gamma_C.)^T u.
Everything but the last three lines is chunk-local and runs for all chunks at once; the state
passes from chunk to chunk in an XLA scan (one [d_k, d_v] product pair per chunk and head).
Gates enter as in-chunk sums of log-gates over (j, i], each summed directly rather than as a
difference of cumulative sums (so the small gates after one strongly decaying token keep their
precision), and every exponent is <= 0 (no overflow at any gate strength). KDA's per-key-dim gate
(the state's rows decay apart: S_i = (I - beta_i k_i k_i^T) diag(a_i) S_{i-1} + beta_i k_i v_i^T)
replaces the ratios by per-channel ones inside the key products, A_ij = beta_i sum_d k_id k_jd
Gamma_ij,d and (Q K^T o Gamma)_ij = sum_d q_id k_jd Gamma_ij,d, computed by the GLA chunk math's
re-centred sub-blocks, with gamma, Gamma_C. and the state's decay per channel. A segment reset at
token i is a gate of exactly zero there: the ratios that span it are masked to 0 (never an exp of
-inf - -inf). The backward is JAX's autodiff of this program (the block inversion and the scan
included).
"""

import jax
import jax.numpy as jnp
from jax import lax

from layers.kernels.linear_chunk_math import intra_scores, sub_chunk_size
from layers.kernels.linear_reference import segment_resets

F32 = jnp.float32


def _to_chunks(x, n: int, c: int):
  """[b, n * c, h, ...] -> [n, b, h, c, ...]."""
  b, _, h = x.shape[:3]
  x = x.reshape((b, n, c, h) + x.shape[3:])
  return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)


def _from_chunks(x):
  """[n, b, h, c, d] -> [b, n * c, h, d]."""
  n, b, h, c, d = x.shape
  return jnp.moveaxis(x, 0, 2).reshape(b, h, n * c, d).swapaxes(1, 2)


def _dot(a, b):
  return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


def unit_lower_inverse(a):
  """(I + a)^-1 for strictly lower-triangular a [..., c, c], by doubling diagonal blocks:
  with the inverses T11, T22 of two adjacent diagonal blocks known, the inverse of the block
  they form has T22 and T11 on its diagonal and -T22 a21 T11 below. log2(c) levels of batched
  matmuls, no LAPACK call (XLA:CPU's triangular-solve and LU custom calls deadlocked its
  runtime in jitted gated backward passes run back to back), autodiff through plain dots."""
  c = a.shape[-1]
  size = 1 << max(c - 1, 0).bit_length()
  if size != c:  # the identity completion of a power-of-two block keeps the top-left inverse
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, size - c), (0, size - c)])
  lead = a.shape[:-2]
  t = jnp.ones(lead + (size, 1, 1), a.dtype)
  s = 1
  while s < size:
    nb = size // (2 * s)
    blocks = a.reshape(lead + (nb, 2 * s, nb, 2 * s))
    diag = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [.., nb, 2s, 2s]
    t = t.reshape(lead + (nb, 2, s, s))
    t11, t22 = t[..., 0, :, :], t[..., 1, :, :]
    below = -_dot(_dot(t22, diag[..., s:, :s]), t11)
    t = jnp.concatenate([jnp.concatenate([t11, jnp.zeros_like(t11)], -1),
                         jnp.concatenate([below, t22], -1)], -2)
    s *= 2
  return t[..., 0, :c, :c]


def _channel_scores(x, k, b, mask):
  """[.., c, c] masked sum_d x_id k_jd e^(b_id - b_jd) of every chunk (per-key-dim gates), by the
  GLA chunk math's overflow-free sub-blocks (linear_chunk_math.intra_scores)."""
  lead, (c, d) = x.shape[:-2], x.shape[-2:]
  flat = lambda y: y.reshape((-1,) + y.shape[len(lead):])
  mask = jnp.broadcast_to(mask, lead + (c, c))
  scores = jax.vmap(lambda a, kk, bb, m: intra_scores(a, kk, bb, m, sub_chunk_size(c)))(
      flat(x), flat(k), flat(b), flat(mask))
  return scores.reshape(lead + (c, c))


def chunk_terms(q, k, v, beta, g, reset):
  """The chunk-local terms of every chunk at once.

  Args:
    q, k: [n, b, h, c, dk] float32 (q already scaled); v: [n, b, h, c, dv].
    beta: [n, b, h, c]; g: [n, b, h, c] or [n, b, h, c, dk] log-gates, or None; reset: [n, b, c]
      bool (a reset at token i zeroes the state before i).
  Returns:
    (u_prime [.., c, dv], w [.., c, dk], q_gamma [.., c, dk], attn [.., c, c], k_end [.., c, dk],
     gamma_end [n, b, h, 1 or dk, 1]).
  """
  c = q.shape[-2]
  runs = jnp.cumsum(reset.astype(jnp.int32), axis=-1)[:, :, None, :]  # resets up to and incl. i
  runs = jnp.broadcast_to(runs, beta.shape)
  lower = jnp.tril(jnp.ones((c, c), bool))
  same = (runs[..., :, None] == runs[..., None, :]) & lower
  strict = jnp.tril(jnp.ones((c, c), bool), -1)
  first = (runs == 0)[..., None]               # [.., c, 1]: the state entering the chunk reaches i
  in_last = (runs == runs[..., -1:])[..., None]  # [.., c, 1]: i is in the chunk's last run
  if g is not None and g.ndim == q.ndim:
    # Per-key-dim gates (KDA): the decays between tokens differ per channel, so they enter the
    # scores as sum_d x_id k_jd e^(b_id - b_jd) over the in-chunk cumulative log-gates b.
    b = jnp.cumsum(g, axis=-2)
    b_end = b[..., -1:, :]
    gamma = jnp.where(first, jnp.exp(b), 0.0)                          # [.., c, dk]
    k_end = jnp.where(in_last, jnp.exp(b_end - b), 0.0) * k
    gamma_end = jnp.where(first[..., -1:, :], jnp.exp(b_end), 0.0)      # [.., 1, dk]
    kk = _channel_scores(k, k, b, same & strict)
    attn = _channel_scores(q, k, b, same)
    a = beta[..., :, None] * kk
    rhs = jnp.concatenate([beta[..., None] * v, beta[..., None] * gamma * k], axis=-1)
    solved = _dot(unit_lower_inverse(a), rhs)
    dv = v.shape[-1]
    return (solved[..., :dv], solved[..., dv:], gamma * q, attn, k_end,
            jnp.swapaxes(gamma_end, -1, -2))
  if g is None:
    ratio = same.astype(F32)
    gamma = (runs == 0).astype(F32)
  else:
    # log Gamma_ij = the sum of g over (j, i], summed directly (a 0/1 matmul at full precision),
    # not as cumsum_i - cumsum_j: after one strongly decaying token the cumulative sums are
    # large, and their difference would lose the small gates between i and j.
    s_idx = jnp.arange(c)
    between = ((s_idx[None, None, :] > s_idx[None, :, None])
               & (s_idx[None, None, :] <= s_idx[:, None, None])).astype(F32)  # [i, j, s]
    pair_sums = jnp.einsum("ijs,...s->...ij", between, g, precision=lax.Precision.HIGHEST)
    ratio = jnp.exp(jnp.where(same, pair_sums, -jnp.inf))  # Gamma_ij
    gamma = jnp.where(runs == 0, jnp.exp(jnp.cumsum(g, axis=-1)), 0.0)  # from the chunk start
  last = ratio[..., -1, :]  # Gamma_{C-1, j}: decay from token j to the chunk end
  gamma_end = gamma[..., -1][..., None, None]
  kk = jnp.einsum("...id,...jd->...ij", k, k)
  a = jnp.where(strict, beta[..., :, None] * kk * ratio, 0.0)
  rhs = jnp.concatenate([beta[..., None] * v, (beta * gamma)[..., None] * k], axis=-1)
  solved = _dot(unit_lower_inverse(a), rhs)
  dv = v.shape[-1]
  u_prime, w = solved[..., :dv], solved[..., dv:]
  attn = jnp.einsum("...id,...jd->...ij", q, k) * ratio
  return u_prime, w, gamma[..., None] * q, attn, last[..., None] * k, gamma_end


def chunked_delta_rule(q, k, v, beta, g=None, *, scale: float, initial_state=None,
                       segment_ids=None, chunk_size: int = 64):
  """Chunked delta rule; arguments and result as `delta_rule_reference`, plus chunk_size."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  c = chunk_size
  n = -(-t // c)
  pad = n * c - t
  f32 = lambda x: x.astype(F32)
  reset = segment_resets(segment_ids, b, t)
  gates = None if g is None else f32(g)
  # Padded tokens (at the end) have k = 0, beta = 0 and gate 0: they leave the state unchanged.
  padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
  qs, ks, vs = padt(f32(q) * scale), padt(f32(k)), padt(f32(v))
  betas = padt(f32(beta))
  gates = None if gates is None else padt(gates)
  reset = padt(reset)
  to_c = lambda x: _to_chunks(x[..., None], n, c)[..., 0]  # [b, T, h] -> [n, b, h, c]
  gate_chunks = None
  if gates is not None:
    gate_chunks = _to_chunks(gates, n, c) if gates.ndim == 4 else to_c(gates)
  terms = chunk_terms(_to_chunks(qs, n, c), _to_chunks(ks, n, c), _to_chunks(vs, n, c),
                      to_c(betas), gate_chunks, jnp.moveaxis(reset.reshape(b, n, c), 1, 0))
  state0 = (jnp.zeros((b, h, dk, dv), F32) if initial_state is None else f32(initial_state))

  def body(state, x):
    u_prime, w, q_gamma, attn, k_end, gamma_end = x
    u = u_prime - jnp.einsum("bhck,bhkv->bhcv", w, state)
    o = jnp.einsum("bhck,bhkv->bhcv", q_gamma, state) + jnp.einsum("bhij,bhjv->bhiv", attn, u)
    state = gamma_end * state + jnp.einsum("bhck,bhcv->bhkv", k_end, u)
    return state, o

  final, o = lax.scan(body, state0, terms)
  o = _from_chunks(o)[:, :t]
  return o.astype(q.dtype), final
