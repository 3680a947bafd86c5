"""The chunk bodies of the GLA Pallas kernels (`gla_pallas`): one chunk's forward and backward
on refs, with the state transposed ([dv, dk]).

The formulas are those of `linear_chunk_math` (which the pure-JAX path vmaps), computed in
sub-blocks read as ref slices with static offsets: the Triton lowering implements no value
slices, concatenations, composed ref views or 3D values, so only 2D values, iota masks,
broadcasts and row reductions appear here. `chunk_walk.Chunk` reads one chunk whether the refs
hold that chunk (a grid walk) or the whole sequence (a loop walk with a traced chunk index).

Per-key-dim gates use sub-blocks of 16 rows (fla's secondary chunking): off-diagonal sub-blocks
are matmuls of factors re-centred on one row of the chunk, so every factor is e^(x) with x <= 0;
the 16 x 16 diagonal blocks are built one key (or query) column at a time from
e^(min(b_i - b_j, 0)), exact where i >= j. The scalar gate and no gate use one sub-block (the
whole chunk) with the [C, C] decay matrix.
"""

import jax.numpy as jnp

from layers.kernels.chunk_walk import F32, NN, NT, TN, Chunk, dot, iota


def _exp_or_none(x):
  return None if x is None else jnp.exp(x)


def _mul(x, f):
  return x if f is None else x * f


def _where(mask, x):
  return x if mask is None else jnp.where(mask, x, 0.0)


def _and(a, b):
  return b if a is None else (a if b is None else a & b)


def _seg_eq(col, row):
  return None if col is None else col == row


def _column(x, j):
  """Column j of a 2D value, as [rows, 1] (a masked row reduction: no value slice)."""
  return jnp.sum(jnp.where(iota(x.shape, 1) == j, x, 0.0), axis=1, keepdims=True)


def _chunk_last(x: Chunk):
  """(b_last [1, G] or None, seg_last [1, 1] or None): the chunk's last row."""
  c = x.st.chunk
  b_last = None if x.st.gate is None else x.rows("b", c - 1, 1)
  seg_last = x.seg_row(c - 1, 1)
  return b_last, seg_last


def _chunk_decay(b_last, seg_last):
  """The factor of the carried state's columns: e^(b_C), zeroed when the state resets in the
  chunk; None when it is identically 1."""
  decay = _exp_or_none(b_last)
  if seg_last is not None:
    carry = (seg_last == 0).astype(F32)
    decay = carry if decay is None else decay * carry
  return decay


def _diag_mask(x: Chunk, lo, seg_p, *, transposed):
  """[P, P] mask of a diagonal block: query >= key in one segment (rows are keys if transposed)."""
  n = x.st.sub
  rows, cols = iota((n, n), 0), iota((n, n), 1)
  return _and(cols >= rows if transposed else rows >= cols, _seg_eq(seg_p, x.seg_row(lo, n)))


def _pair(x: Chunk, lo, j, b_p, *, transposed):
  """Row j of the block's other side and e^(min(b_query - b_key, 0)) against the block's rows:
  keys (k_j) for a query block, or scaled queries (q_j) for a key block (transposed)."""
  o_j = x.q(lo + j, 1) if transposed else x.f32("k", lo + j, 1)
  b_j = x.rows("b", lo + j, 1)
  return o_j, jnp.exp(jnp.minimum((b_j - b_p) if transposed else (b_p - b_j), 0.0))


def _diag_scores(x: Chunk, lo, q_p, b_p, seg_p, *, transposed):
  """The masked diagonal block of the intra-chunk scores, [P, P].

  A_ij = sum_d q_id k_jd e^(b_id - b_jd) for i >= j in one segment; transposed gives A^T (rows
  are keys). q_p (scaled) and b_p are the block's rows; keys are read from `x`.
  """
  st, n = x.st, x.st.sub
  k_p = x.f32("k", lo, n)
  mask = _diag_mask(x, lo, seg_p, transposed=transposed)
  if st.gate == "vector":
    acc = jnp.zeros((n, n), F32)
    rows_of = k_p if transposed else q_p
    for j in range(n):
      o_j, fac = _pair(x, lo, j, b_p, transposed=transposed)
      col = jnp.sum(rows_of * o_j * fac, axis=1, keepdims=True)
      acc = jnp.where(iota((n, n), 1) == j, col, acc)
    return jnp.where(mask, acc, 0.0)
  a = dot(st, k_p, q_p, NT) if transposed else dot(st, q_p, k_p, NT)
  if st.gate == "scalar":
    b_row = x.cols("bt", lo, n)  # [1, P]
    expo = (b_row - b_p) if transposed else (b_p - b_row)
    return a * jnp.exp(jnp.where(mask, expo, -jnp.inf))
  return jnp.where(mask, a, 0.0)


def _diag_grad(x: Chunk, lo, da, b_p, other, *, transposed):
  """sum_j dA_ij e^(b_i - b_j) other_j for the diagonal block (rows i of the block).

  Not transposed: dq_i from dA [queries, keys] and other = keys. Transposed: dk_j from dA^T
  [keys, queries] and other = queries (scaled), with the exponent e^(b_query - b_key).
  """
  st, n = x.st, x.st.sub
  if st.gate == "vector":
    acc = jnp.zeros(b_p.shape[:1] + (other.shape[1],), F32)
    for j in range(n):
      o_j, fac = _pair(x, lo, j, b_p, transposed=transposed)
      acc = acc + _column(da, j) * o_j * fac
    return acc
  if st.gate == "scalar":
    b_row = x.cols("bt", lo, n)
    expo = (b_row - b_p) if transposed else (b_p - b_row)
    da = da * jnp.exp(jnp.minimum(expo, 0.0))  # masked entries of da are 0 already
  return dot(st, da, other, NN)


def fwd_chunk(x: Chunk, s, with_output: bool):
  """One chunk forward: stores its output (if asked) and returns the state leaving it.

  s: [dv, dk] float32, the (transposed) state entering the chunk.
  """
  st = x.st
  c, n = st.chunk, st.sub
  k_all, b_all = x.f32("k", 0, c), x.gate(0, c)
  if with_output:
    v_all, seg_row_all = x.rows("v", 0, c), x.seg_row(0, c)
    for p in range(c // n):
      lo = p * n
      q_p, b_p, seg_p = x.q(lo, n), x.gate(lo, n), x.seg_col(lo, n)
      m_in = None if seg_p is None else seg_p == 0
      o = dot(st, _where(m_in, _mul(q_p, _exp_or_none(b_p))), s, NT)
      if p:
        r = x.gate(lo - 1, 1)
        q_f = _mul(q_p, _exp_or_none(None if r is None else b_p - r))
        k_f = _mul(k_all, None if r is None else jnp.exp(jnp.minimum(r - b_all, 0.0)))
        mask = _and(iota((n, c), 1) < lo, _seg_eq(seg_p, seg_row_all))
        o = o + dot(st, jnp.where(mask, dot(st, q_f, k_f, NT), 0.0), v_all, NN)
      a_pp = _diag_scores(x, lo, q_p, b_p, seg_p, transposed=False)
      o = o + dot(st, a_pp, x.rows("v", lo, n), NN)
      x.store("o", lo, o)
  b_last, seg_last = _chunk_last(x)
  k_e = _mul(k_all, None if b_last is None else jnp.exp(b_last - b_all))
  k_e = _where(_seg_eq(x.seg_col(0, c), seg_last), k_e)
  return _mul(s, _chunk_decay(b_last, seg_last)) + dot(st, x.rows("v", 0, c), k_e, TN)


def bwd_chunk(x: Chunk, s, ds):
  """One chunk backward: stores dq, dk, dv (and db); returns the state gradient entering it.

  s: [dv, dk] state entering the chunk; ds: [dv, dk] gradient of the state leaving it.
  """
  st = x.st
  c, n = st.chunk, st.sub
  b_last, seg_last = _chunk_last(x)
  v_all, do_all = x.rows("v", 0, c), x.rows("do", 0, c)
  q_all, k_all, b_all = x.q(0, c), x.f32("k", 0, c), x.gate(0, c)
  seg_row_all = x.seg_row(0, c)
  last_acc = None
  for p in range(c // n):
    lo, hi = p * n, (p + 1) * n
    q_p, k_p, b_p, seg_p = x.q(lo, n), x.f32("k", lo, n), x.gate(lo, n), x.seg_col(lo, n)
    v_p, do_p = x.rows("v", lo, n), x.rows("do", lo, n)
    # Query form: dq of the block's rows (gradient of the scaled q).
    m_in = None if seg_p is None else seg_p == 0
    dq = _where(m_in, _mul(dot(st, do_p, s, NN), _exp_or_none(b_p)))
    if p:
      r = x.gate(lo - 1, 1)
      k_f = _mul(k_all, None if r is None else jnp.exp(jnp.minimum(r - b_all, 0.0)))
      mask = _and(iota((n, c), 1) < lo, _seg_eq(seg_p, seg_row_all))
      da_off = jnp.where(mask, dot(st, do_p, v_all, NT), 0.0)
      dq = dq + _mul(dot(st, da_off, k_f, NN), _exp_or_none(None if r is None else b_p - r))
    da_pp = jnp.where(_diag_mask(x, lo, seg_p, transposed=False), dot(st, do_p, v_p, NT), 0.0)
    dq = dq + _diag_grad(x, lo, da_pp, b_p, k_p, transposed=False)
    # Key form: dk and dv of the block's rows.
    m_last = _seg_eq(seg_p, seg_last)
    k_fac = jnp.ones((n, 1), F32) if b_last is None else jnp.exp(b_last - b_p)
    k_fac = _where(m_last, k_fac)
    dk_state = dot(st, v_p, ds, NN) * k_fac
    dk = dk_state
    dv = dot(st, k_p * k_fac, ds, NT)
    if hi < c:
      r2 = x.gate(hi - 1, 1)
      q_g = _mul(q_all, None if r2 is None else jnp.exp(jnp.minimum(b_all - r2, 0.0)))
      k_scale = _exp_or_none(None if r2 is None else r2 - b_p)
      mask_t = _and(iota((n, c), 1) >= hi, _seg_eq(seg_p, seg_row_all))
      at_off = jnp.where(mask_t, dot(st, _mul(k_p, k_scale), q_g, NT), 0.0)
      dv = dv + dot(st, at_off, do_all, NN)
      dat_off = jnp.where(mask_t, dot(st, v_p, do_all, NT), 0.0)
      dk = dk + _mul(dot(st, dat_off, q_g, NN), k_scale)
    at_pp = _diag_scores(x, lo, q_p, b_p, seg_p, transposed=True)
    dv = dv + dot(st, at_pp, do_p, NN)
    dat_pp = jnp.where(_diag_mask(x, lo, seg_p, transposed=True), dot(st, v_p, do_p, NT), 0.0)
    dk = dk + _diag_grad(x, lo, dat_pp, b_p, q_p, transposed=True)
    x.store("dq", lo, dq * st.scale)
    x.store("dk", lo, dk)
    x.store("dv", lo, dv)
    if st.gate is not None:
      # Every b-dependent factor is x e^(+-b): db = q . dq - k . dk, plus the last row's terms
      # (b_C scales the chunk's key contributions and the carried state).
      db = q_p * dq - k_p * dk
      part = jnp.sum(k_p * dk_state, axis=0, keepdims=True)
      last_acc = part if last_acc is None else last_acc + part
      if st.gate == "scalar":
        db = jnp.sum(db, axis=1, keepdims=True)
      if hi == c:
        extra = last_acc + _chunk_decay(b_last, seg_last) * jnp.sum(s * ds, axis=0,
                                                                    keepdims=True)
        if st.gate == "scalar":
          extra = jnp.sum(extra, axis=1, keepdims=True)
        db = db + jnp.where(iota(db.shape, 0) == n - 1, extra, 0.0)
      x.store("db", lo, db)
  seg_all = x.seg_col(0, c)
  m_in_all = None if seg_all is None else seg_all == 0
  w = dot(st, do_all, _where(m_in_all, _mul(q_all, _exp_or_none(b_all))), TN)
  return _mul(ds, _chunk_decay(b_last, seg_last)) + w
