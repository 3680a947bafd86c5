"""The chunk bodies of the GLA Pallas kernels (`gla_pallas`): one chunk's forward and backward
on refs, with the state transposed ([dv, dk]).

The formulas are those of `linear_chunk_math` (which the pure-JAX path vmaps), computed in
sub-blocks read as ref slices with static offsets: the Triton lowering implements no value
slices, concatenations, composed ref views or 3D values, so only 2D values, iota masks,
broadcasts and row reductions appear here. `Chunk` reads one chunk whether the refs hold that
chunk (a grid walk) or the whole sequence (a loop walk with a traced chunk index).

Per-key-dim gates use sub-blocks of 16 rows (fla's secondary chunking): off-diagonal sub-blocks
are matmuls of factors re-centred on one row of the chunk, so every factor is e^(x) with x <= 0;
the 16 x 16 diagonal blocks are built one key (or query) column at a time from
e^(min(b_i - b_j, 0)), exact where i >= j. The scalar gate and no gate use one sub-block (the
whole chunk) with the [C, C] decay matrix.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class Static:
  """Static settings of one call (hashable: a nondiff argument of gla_pallas's custom_vjp)."""

  scale: float
  chunk: int
  sub: int  # sub-block rows: linear_chunk_math.sub_chunk_size under the per-key-dim gate (16
  #   for chunks that are multiples of 16), else the whole chunk
  gate: str | None  # None, "scalar" or "vector"
  has_seg: bool
  target: str | None  # "gpu" or "tpu" when compiled, None when interpreted
  interpret: Any
  mm_dtype: Any  # matmul input dtype (the inputs' dtype)

  @property
  def loop(self) -> bool:
    """True where a program walks all chunks itself (Triton); else the grid's chunk axis does."""
    return self.target == "gpu"


def _dot(st, a, b, dims):
  return lax.dot_general(a.astype(st.mm_dtype), b.astype(st.mm_dtype), dims,
                         preferred_element_type=F32)


def _iota(shape, axis):
  return lax.broadcasted_iota(jnp.int32, shape, axis)


class Chunk:
  """Reads and writes rows of one chunk: refs are [C, d] blocks (grid walk) or [N, C, d] (loop).

  `row`-layout arrays ([1, C]: transposed scalar gates, segment runs as a row) are read by
  column ranges. Every read is a ref slice with a static offset within the chunk.
  """

  def __init__(self, st: Static, refs: dict, index):
    self.st, self.refs, self.index = st, refs, index

  def _idx(self, *tail):
    # One indexer per access (Triton lowers no composed ref views): the chunk, then the rows.
    return tail if self.index is None else (self.index,) + tail

  def rows(self, name, lo, n):
    return self.refs[name][self._idx(pl.ds(lo, n), slice(None))]

  def cols(self, name, lo, n):
    return self.refs[name][self._idx(slice(None), pl.ds(lo, n))]

  def whole(self, name):
    ref = self.refs[name]
    return ref[...] if self.index is None else ref[self.index]

  def store(self, name, lo, value):
    ref = self.refs[name]
    ref[self._idx(pl.ds(lo, value.shape[0]), slice(None))] = value.astype(ref.dtype)

  def q(self, lo, n):  # scaled, float32
    return self.rows("q", lo, n).astype(F32) * self.st.scale

  def f32(self, name, lo, n):
    return self.rows(name, lo, n).astype(F32)

  def gate(self, lo, n):
    return None if self.st.gate is None else self.rows("b", lo, n)

  def seg_col(self, lo, n):
    return None if not self.st.has_seg else self.rows("seg_col", lo, n)

  def seg_row(self, lo, n):
    return None if not self.st.has_seg else self.cols("seg_row", lo, n)


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
  return jnp.sum(jnp.where(_iota(x.shape, 1) == j, x, 0.0), axis=1, keepdims=True)


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
  rows, cols = _iota((n, n), 0), _iota((n, n), 1)
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
      acc = jnp.where(_iota((n, n), 1) == j, col, acc)
    return jnp.where(mask, acc, 0.0)
  a = _dot(st, k_p, q_p, _NT) if transposed else _dot(st, q_p, k_p, _NT)
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
  return _dot(st, da, other, _NN)


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
      o = _dot(st, _where(m_in, _mul(q_p, _exp_or_none(b_p))), s, _NT)
      if p:
        r = x.gate(lo - 1, 1)
        q_f = _mul(q_p, _exp_or_none(None if r is None else b_p - r))
        k_f = _mul(k_all, None if r is None else jnp.exp(jnp.minimum(r - b_all, 0.0)))
        mask = _and(_iota((n, c), 1) < lo, _seg_eq(seg_p, seg_row_all))
        o = o + _dot(st, jnp.where(mask, _dot(st, q_f, k_f, _NT), 0.0), v_all, _NN)
      a_pp = _diag_scores(x, lo, q_p, b_p, seg_p, transposed=False)
      o = o + _dot(st, a_pp, x.rows("v", lo, n), _NN)
      x.store("o", lo, o)
  b_last, seg_last = _chunk_last(x)
  k_e = _mul(k_all, None if b_last is None else jnp.exp(b_last - b_all))
  k_e = _where(_seg_eq(x.seg_col(0, c), seg_last), k_e)
  return _mul(s, _chunk_decay(b_last, seg_last)) + _dot(st, x.rows("v", 0, c), k_e, _TN)


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
    dq = _where(m_in, _mul(_dot(st, do_p, s, _NN), _exp_or_none(b_p)))
    if p:
      r = x.gate(lo - 1, 1)
      k_f = _mul(k_all, None if r is None else jnp.exp(jnp.minimum(r - b_all, 0.0)))
      mask = _and(_iota((n, c), 1) < lo, _seg_eq(seg_p, seg_row_all))
      da_off = jnp.where(mask, _dot(st, do_p, v_all, _NT), 0.0)
      dq = dq + _mul(_dot(st, da_off, k_f, _NN), _exp_or_none(None if r is None else b_p - r))
    da_pp = jnp.where(_diag_mask(x, lo, seg_p, transposed=False), _dot(st, do_p, v_p, _NT), 0.0)
    dq = dq + _diag_grad(x, lo, da_pp, b_p, k_p, transposed=False)
    # Key form: dk and dv of the block's rows.
    m_last = _seg_eq(seg_p, seg_last)
    k_fac = jnp.ones((n, 1), F32) if b_last is None else jnp.exp(b_last - b_p)
    k_fac = _where(m_last, k_fac)
    dk_state = _dot(st, v_p, ds, _NN) * k_fac
    dk = dk_state
    dv = _dot(st, k_p * k_fac, ds, _NT)
    if hi < c:
      r2 = x.gate(hi - 1, 1)
      q_g = _mul(q_all, None if r2 is None else jnp.exp(jnp.minimum(b_all - r2, 0.0)))
      k_scale = _exp_or_none(None if r2 is None else r2 - b_p)
      mask_t = _and(_iota((n, c), 1) >= hi, _seg_eq(seg_p, seg_row_all))
      at_off = jnp.where(mask_t, _dot(st, _mul(k_p, k_scale), q_g, _NT), 0.0)
      dv = dv + _dot(st, at_off, do_all, _NN)
      dat_off = jnp.where(mask_t, _dot(st, v_p, do_all, _NT), 0.0)
      dk = dk + _mul(_dot(st, dat_off, q_g, _NN), k_scale)
    at_pp = _diag_scores(x, lo, q_p, b_p, seg_p, transposed=True)
    dv = dv + _dot(st, at_pp, do_p, _NN)
    dat_pp = jnp.where(_diag_mask(x, lo, seg_p, transposed=True), _dot(st, v_p, do_p, _NT), 0.0)
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
        db = db + jnp.where(_iota(db.shape, 0) == n - 1, extra, 0.0)
      x.store("db", lo, db)
  seg_all = x.seg_col(0, c)
  m_in_all = None if seg_all is None else seg_all == 0
  w = _dot(st, do_all, _where(m_in_all, _mul(q_all, _exp_or_none(b_all))), _TN)
  return _mul(ds, _chunk_decay(b_last, seg_last)) + w
