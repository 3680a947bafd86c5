"""Per-chunk math of chunked (gated) linear attention: forward and hand-derived backward.

Every function here works on ONE chunk of ONE (batch, head): 2D arrays q [C, dk], k [C, dk],
v [C, dv], states [dk, dv]; the pure-JAX implementation (`linear_chunked.py`) vmaps them over
batch, head and chunk. The Pallas kernels (`gla_pallas.py`) compute the same formulas on ref
slices of sub-blocks (the Triton lowering has no value slices), with the state transposed. There
is no cumsum here: the driver passes `b`, the in-chunk cumulative log-gate, computed in XLA (whose
autodiff also turns db into dgk).

Conventions for one chunk of length C:
  b: None (no gate), [C, 1] (scalar gate per head) or [C, dk] (per key dim): b_t = sum of the
    log-gates up to and including t inside the chunk. Log-gates must be <= 0 (gates in (0, 1]),
    so b is non-increasing: the overflow-free factorizations below rely on it.
  seg: None, or int [C]: segment-run index relative to the run of the token before the chunk
    (0 = the segment the incoming state belongs to; runs are contiguous and counted upwards).
  s_in: the state entering the chunk; ds_out: gradient of the state leaving it.
Per chunk, with masks m_in (seg == 0), m_last (seg == seg[C-1]) and carry c = (seg[C-1] == 0):
  o     = (q e^b m_in) s_in + A v,   A_ij = [i >= j, seg_i == seg_j] sum_d q_id k_jd e^(b_id - b_jd)
  s_out = c e^(b_C) s_in + (k e^(b_C - b) m_last)^T v
"""

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32

# Diagonal sub-blocks of the per-key-dim gate use a [sub, sub, dk] tensor; 16 keeps it small.
DEFAULT_SUB_CHUNK = 16


def _dot(a, b):
  """a @ b with float32 accumulation."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def _dot_nt(a, b):
  """a @ b.T with float32 accumulation."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def _dot_tn(a, b):
  """a.T @ b with float32 accumulation."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=F32)


def sub_chunk_size(chunk: int) -> int:
  """Sub-chunk length for the per-key-dim gate: the largest power of two <= 16 dividing C."""
  sub = DEFAULT_SUB_CHUNK
  while chunk % sub:
    sub //= 2
  return sub


class ChunkMasks(NamedTuple):
  """Masks of one chunk; the segment entries are None without segment ids."""
  intra: jnp.ndarray  # bool [C, C]: causal (diagonal included) and same segment
  m_in: jnp.ndarray | None  # f32 [C, 1]: token belongs to the segment of the incoming state
  m_last: jnp.ndarray | None  # f32 [C, 1]: token belongs to the chunk's last segment
  carry: jnp.ndarray | None  # f32 [1, 1]: the incoming state survives the whole chunk


def chunk_masks(chunk: int, seg) -> ChunkMasks:
  """Builds the masks of a chunk of length `chunk` from its relative segment runs (or None)."""
  row = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  col = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  causal = row >= col
  if seg is None:
    return ChunkMasks(causal, None, None, None)
  # Everything stays 2D (no vector-to-scalar extraction), which Pallas TPU lowers more readily.
  seg_col = seg.astype(jnp.int32).reshape(chunk, 1)
  seg_row = seg_col.reshape(1, chunk)
  seg_last = seg_row[:, chunk - 1:]
  return ChunkMasks(causal & (seg_col == seg_row),
                    (seg_col == 0).astype(F32),
                    (seg_col == seg_last).astype(F32),
                    (seg_last == 0).astype(F32))


def _mul_opt(x, m):
  return x if m is None else x * m


def _last_row(x):
  return x[x.shape[0] - 1:]


# ------------------------------------------------------------------------------------------------
# The intra-chunk score matrix A and its gradient.


def _vector_pieces(b, p, sub):
  """For query sub-chunk p: the row range, its cumulative gates and the re-centering point.

  Keys before the sub-chunk are re-centred on r = b at the row before it, so q e^(b - r) and
  k e^(r - b) are both <= 1 (the naive e^-b overflows for strong gates).
  """
  lo, hi = p * sub, (p + 1) * sub
  b_p = b[lo:hi]
  r = b[lo - 1:lo] if p else jnp.zeros_like(b[:1])
  return lo, hi, b_p, r


def _diag_exp(b_p):
  """[s, s, dk] factors e^(b_i - b_j) of a diagonal sub-block, exact where i >= j.

  The exponent is clamped at 0 BEFORE exp: where i >= j it is <= 0 already, and where i < j
  (masked later) it would overflow. So every factor is finite, in [0, 1], and the masked entries
  are zeroed on the [s, s] result (or meet a zero dA), never inf * 0. A `where` on the [s, s, dk]
  exponent would do the same but stops XLA:CPU from vectorizing the fused reduction (7x slower).
  """
  return jnp.exp(jnp.minimum(b_p[:, None, :] - b_p[None, :, :], 0.0))


def intra_scores(q, k, b, mask, sub: int):
  """A [C, C]: masked intra-chunk scores with the gate decay, computed without overflow."""
  if b is None:
    return jnp.where(mask, _dot_nt(q, k), 0.0)
  chunk = q.shape[0]
  if b.shape[-1] == 1:
    # One decay per head: the [C, C] decay matrix is stable and cheap directly.
    decay = jnp.exp(jnp.where(mask, b - b.reshape(1, chunk), -jnp.inf))
    return _dot_nt(q, k) * decay
  rows = []
  for p in range(chunk // sub):
    lo, hi, b_p, r = _vector_pieces(b, p, sub)
    e_pp = _diag_exp(b_p)
    a_pp = jnp.sum(q[lo:hi][:, None, :] * k[lo:hi][None, :, :] * e_pp, axis=-1)
    a_pp = jnp.where(mask[lo:hi, lo:hi], a_pp, 0.0)
    parts = []
    if p:
      a_off = _dot_nt(q[lo:hi] * jnp.exp(b_p - r), k[:lo] * jnp.exp(r - b[:lo]))
      parts.append(jnp.where(mask[lo:hi, :lo], a_off, 0.0))
    parts.append(a_pp)
    if hi < chunk:
      parts.append(jnp.zeros((sub, chunk - hi), F32))
    rows.append(jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])
  return jnp.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]


def intra_grads(q, k, b, mask, da, sub: int):
  """(dq, dk) [C, dk] from dA (already masked), for the scores of `intra_scores`."""
  if b is None:
    return _dot(da, k), _dot_tn(da, q)
  chunk = q.shape[0]
  if b.shape[-1] == 1:
    dp = da * jnp.exp(jnp.where(mask, b - b.reshape(1, chunk), -jnp.inf))
    return _dot(dp, k), _dot_tn(dp, q)
  dq_rows, dk_diag = [], []
  dk_off = jnp.zeros_like(k)
  for p in range(chunk // sub):
    lo, hi, b_p, r = _vector_pieces(b, p, sub)
    e_pp = _diag_exp(b_p)
    da_pp = da[lo:hi, lo:hi][:, :, None]  # masked entries are 0
    dq_p = jnp.sum(da_pp * k[lo:hi][None, :, :] * e_pp, axis=1)
    dk_diag.append(jnp.sum(da_pp * q[lo:hi][:, None, :] * e_pp, axis=0))
    if p:
      q_fac = jnp.exp(b_p - r)
      k_fac = jnp.exp(r - b[:lo])
      da_off = da[lo:hi, :lo]
      dq_p = dq_p + _dot(da_off, k[:lo] * k_fac) * q_fac
      dk_prev = _dot_tn(da_off, q[lo:hi] * q_fac) * k_fac
      dk_off = dk_off + jnp.concatenate([dk_prev, jnp.zeros((chunk - lo, k.shape[1]), F32)], axis=0)
    dq_rows.append(dq_p)
  cat = lambda xs: jnp.concatenate(xs, axis=0) if len(xs) > 1 else xs[0]
  return cat(dq_rows), dk_off + cat(dk_diag)


# ------------------------------------------------------------------------------------------------
# Forward.


def chunk_state_update(k, v, b, seg):
  """The chunk's own state contribution and the decay of the incoming state.

  Returns:
    (u [dk, dv], decay): s_out = decay^T * s_in + u, decay f32 [1, dk] or [1, 1] (rows of the
    state), or None when it is identically 1 (no gate, no segment ids).
  """
  k, v = k.astype(F32), v.astype(F32)
  masks = chunk_masks(k.shape[0], seg)
  ke, decay = k, None
  if b is not None:
    b_last = _last_row(b)
    ke = k * jnp.exp(b_last - b)
    decay = jnp.exp(b_last)
  ke = _mul_opt(ke, masks.m_last)
  if masks.carry is not None:
    decay = masks.carry if decay is None else decay * masks.carry
  return _dot_tn(ke, v), decay


def chunk_output(q, k, v, b, seg, s_in, *, scale: float, sub: int):
  """o [C, dv] of one chunk given the state s_in [dk, dv] entering it."""
  q = q.astype(F32) * scale
  k, v = k.astype(F32), v.astype(F32)
  masks = chunk_masks(q.shape[0], seg)
  qe = q if b is None else q * jnp.exp(b)
  qe = _mul_opt(qe, masks.m_in)
  a = intra_scores(q, k, b, masks.intra, sub)
  return _dot(qe, s_in) + _dot(a, v)


# ------------------------------------------------------------------------------------------------
# Backward.


def chunk_state_grad(q, b, seg, do, *, scale: float):
  """w [dk, dv]: the chunk's direct contribution to the gradient of its incoming state.

  The full gradient is ds_in = w + decay^T * ds_out; the driver runs that reverse recurrence.
  """
  q = q.astype(F32) * scale
  masks = chunk_masks(q.shape[0], seg)
  qe = q if b is None else q * jnp.exp(b)
  return _dot_tn(_mul_opt(qe, masks.m_in), do.astype(F32))


def chunk_backward(q, k, v, b, seg, s_in, do, ds_out, *, scale: float, sub: int):
  """Gradients of one chunk: (dq, dk, dv, db), float32, shaped like q, k, v, b (db None if b is).

  Args:
    q, k, v, b, seg, s_in: as in `chunk_output`.
    do: [C, dv] gradient of the chunk's output.
    ds_out: [dk, dv] gradient of the state leaving the chunk.
  db is the gradient of the in-chunk cumulative log-gate; every b-dependent factor has the form
  x e^(+-b), so db = q . dq - k . dk elementwise (summed over dk for a scalar gate), plus the terms
  of b_C (the last row), which also scales the carried state and the chunk's key contributions.
  """
  q = q.astype(F32) * scale
  k, v, do = k.astype(F32), v.astype(F32), do.astype(F32)
  chunk = q.shape[0]
  masks = chunk_masks(chunk, seg)
  q_fac = None if b is None else jnp.exp(b)
  q_fac = masks.m_in if q_fac is None else _mul_opt(q_fac, masks.m_in)
  k_fac = None
  if b is not None:
    b_last = _last_row(b)
    k_fac = jnp.exp(b_last - b)
  k_fac = masks.m_last if k_fac is None else _mul_opt(k_fac, masks.m_last)

  a = intra_scores(q, k, b, masks.intra, sub)
  da = jnp.where(masks.intra, _dot_nt(do, v), 0.0)
  dq, dk = intra_grads(q, k, b, masks.intra, da, sub)
  dq = dq + _mul_opt(_dot_nt(do, s_in), q_fac)
  dk_state = _mul_opt(_dot_nt(v, ds_out), k_fac)
  dk = dk + dk_state
  dv = _dot_tn(a, do) + _dot(_mul_opt(k, k_fac), ds_out)

  db = None
  if b is not None:
    # b_C multiplies the chunk's key contributions (+) and the carried state.
    last = jnp.sum(k * dk_state, axis=0, keepdims=True)
    decay_term = jnp.exp(b_last) * jnp.sum(s_in * ds_out, axis=1)[None, :]
    if masks.carry is not None:
      decay_term = decay_term * masks.carry
    db = q * dq - k * dk
    if b.shape[-1] == 1:
      db = jnp.sum(db, axis=1, keepdims=True)
      last = jnp.sum(last, axis=1, keepdims=True)
      decay_term = jnp.sum(decay_term, axis=1, keepdims=True)
    rows = lax.broadcasted_iota(jnp.int32, db.shape, 0)
    db = db + jnp.where(rows == chunk - 1, last + decay_term, 0.0)
  return dq * scale, dk, dv, db
