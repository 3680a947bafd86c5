"""Chunked (gated) delta rule in Pallas kernels that keep the state resident.

Same semantics as `delta_chunked.chunked_delta_rule` (and the token-by-token oracle), walked by
`chunk_walk` like the GLA kernels: each program owns one (batch, head) and carries the [d_k, d_v]
state through the chunks in order (a Triton loop on GPU, a sequential grid axis with a VMEM state
on TPU and in the interpreters). Three kernels:

  delta_fwd     forward order: every chunk's output and the final state;
  delta_states  forward order, recomputed in the backward: the state entering every chunk;
  delta_bwd     reverse order: the state gradient is carried from the last chunk to the first,
                and every chunk's dq, dk, dv, dbeta and d(cumulative gate) are computed next to it.

The chunk math, per chunk with the entering state S, the in-chunk cumulative log-gates b, the
segment runs of the chunk (run 0 continues from S) and sub-blocks of 16 rows:
  gamma_i = e^(b_i) [run_i = 0],  Gamma_ij = e^(b_i - b_j) [same run, i >= j],
  Gamma^C_j = e^(b_C - b_j) [run_j = run_C],  gamma_C = e^(b_C) [run_C = 0];
  A_ij = beta_i (k_i . k_j) Gamma_ij (i > j);  (I + A) U = diag(beta) (V - diag(gamma) K S)
  O = diag(gamma) Q S + (Q K^T o Gamma) U;     S' = gamma_C S + (diag(Gamma^C) K)^T U.
The unit lower-triangular solve runs by blocks: each 16 x 16 diagonal block is inverted as the
finite product (I - A)(I + A^2)(I + A^4)(I + A^8) (A is nilpotent: A^16 = 0), the blocks below
it are substituted forward (and backward, transposed, in the backward pass). Only 2D values,
static ref slices, iota masks, row reductions and 2D dots appear (what Triton and Mosaic lower;
see `chunk_walk`). Every matmul runs in float32 at full precision (the triangular solve needs
it); states, gates and exponents are float32.

The backward (`_bwd_chunk`) is derived by hand from these lines: with dU = (Q K^T o Gamma)^T dO +
diag(Gamma^C) K dS', the solve's adjoint dR = (I + A)^-T dU and dA = -dR U^T (strictly lower),
every other gradient is a product of known blocks; the log-gate enters only through
e^(+-b) factors, so db is a signed sum of the terms they scale, and autodiff of the in-chunk
cumulative sum outside the kernel turns db into dg.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

from layers.kernels import chunk_walk as cw
from layers.kernels import dispatch
from layers.kernels import linear_chunked as lc
from layers.kernels.chunk_walk import NN, NT, TN, iota

F32 = jnp.float32
SUB = 16  # sub-block rows


def _dot(a, b, dims):
  return lax.dot_general(a.astype(F32), b.astype(F32), dims, precision=lax.Precision.HIGHEST,
                         preferred_element_type=F32)


def _eye(n):
  return jnp.where(iota((n, n), 0) == iota((n, n), 1), 1.0, 0.0).astype(F32)


def _unit_lower_inverse(a):
  """(I + a)^-1 of a strictly lower-triangular [n, n] block: sum_m (-a)^m as a product."""
  n = a.shape[0]
  x = -a
  t = _eye(n) + x
  power = x
  for _ in range(max(n.bit_length() - 2, 0)):  # n = 16: X^2, X^4, X^8
    power = _dot(power, power, NN)
    t = t + _dot(t, power, NN)
  return t


class _Terms:
  """The per-sub-block factors of one chunk (read from the chunk's refs on demand)."""

  def __init__(self, x: cw.Chunk):
    self.x, self.st = x, x.st
    c = x.st.chunk
    self.n = x.st.sub
    self.blocks = c // self.n
    self.gated = x.st.gate is not None
    self.b_last = x.rows("b", c - 1, 1) if self.gated else None     # [1, 1]
    self.seg_last = x.seg_row(c - 1, 1)                              # [1, 1] or None

  def lo(self, p):
    return p * self.n

  def k(self, p):
    return self.x.f32("k", self.lo(p), self.n)

  def q(self, p):
    return self.x.q(self.lo(p), self.n)

  def v(self, p):
    return self.x.f32("v", self.lo(p), self.n)

  def beta(self, p):
    return self.x.f32("beta", self.lo(p), self.n)

  def gamma(self, p):
    """[n, 1] e^(b_i), zero after the chunk's first reset."""
    n = self.n
    g = jnp.exp(self.x.rows("b", self.lo(p), n)) if self.gated else jnp.ones((n, 1), F32)
    seg = self.x.seg_col(self.lo(p), n)
    return g if seg is None else jnp.where(seg == 0, g, 0.0)

  def to_end(self, p):
    """[n, 1] e^(b_C - b_j) for the tokens of the chunk's last run, else 0."""
    n = self.n
    g = (jnp.exp(self.b_last - self.x.rows("b", self.lo(p), n)) if self.gated
         else jnp.ones((n, 1), F32))
    seg = self.x.seg_col(self.lo(p), n)
    return g if seg is None else jnp.where(seg == self.seg_last, g, 0.0)

  def decay(self):
    """gamma_C as [1, 1] (or None when it is identically 1)."""
    d = jnp.exp(self.b_last) if self.gated else None
    if self.seg_last is not None:
      keep = (self.seg_last == 0).astype(F32)
      d = keep if d is None else d * keep
    return d

  def ratio(self, p, q, strict: bool):
    """[n, n] Gamma between query block p and key block q (q <= p), masked."""
    n, x = self.n, self.x
    mask = None
    if p == q:
      rows, cols = iota((n, n), 0), iota((n, n), 1)
      mask = rows > cols if strict else rows >= cols
    seg_p = x.seg_col(self.lo(p), n)
    if seg_p is not None:
      same = seg_p == x.seg_row(self.lo(q), n)
      mask = same if mask is None else mask & same
    if self.gated:
      expo = x.rows("b", self.lo(p), n) - x.cols("bt", self.lo(q), n)
      value = jnp.exp(jnp.minimum(expo, 0.0))
    else:
      value = jnp.ones((n, n), F32)
    return value if mask is None else jnp.where(mask, value, 0.0)

  def a_block(self, p, q):
    """A_pq = beta_p (k_p k_q^T) o Gamma (strict on the diagonal)."""
    return self.beta(p) * _dot(self.k(p), self.k(q), NT) * self.ratio(p, q, strict=p == q)

  def solve(self, s):
    """(U blocks, inverted diagonal blocks, residuals w = V - diag(gamma) K S) from the state."""
    us, inverses, ws = [], [], []
    for p in range(self.blocks):
      w = self.v(p) - self.gamma(p) * _dot(self.k(p), s, NN)
      r = self.beta(p) * w
      for q in range(p):
        r = r - _dot(self.a_block(p, q), us[q], NN)
      t = _unit_lower_inverse(self.a_block(p, p))
      us.append(_dot(t, r, NN))
      inverses.append(t)
      ws.append(w)
    return us, inverses, ws


def _fwd_chunk(x: cw.Chunk, s, with_output: bool):
  """One chunk forward: stores its output (if asked); returns the state leaving it."""
  tm = _Terms(x)
  us, _, _ = tm.solve(s)
  decay = tm.decay()
  s_out = s if decay is None else decay * s
  for p in range(tm.blocks):
    if with_output:
      q_p = tm.q(p)
      o = _dot(q_p * tm.gamma(p), s, NN)
      for q in range(p + 1):
        o = o + _dot(_dot(q_p, tm.k(q), NT) * tm.ratio(p, q, strict=False), us[q], NN)
      x.store("o", tm.lo(p), o)
    s_out = s_out + _dot(tm.k(p) * tm.to_end(p), us[p], TN)
  return s_out


def _bwd_chunk(x: cw.Chunk, s, ds):
  """One chunk backward: stores dq, dk, dv, dbeta (and db); returns dS entering the chunk."""
  tm = _Terms(x)
  nb, n = tm.blocks, tm.n
  us, inverses, ws = tm.solve(s)
  do = [x.f32("do", tm.lo(p), n) for p in range(nb)]
  # dU_p = sum_{q >= p} (Q_q K_p^T o Gamma_qp)^T dO_q + diag(Gamma^C_p) K_p dS'.
  du = []
  for p in range(nb):
    acc = tm.to_end(p) * _dot(tm.k(p), ds, NN)
    for q in range(p, nb):
      acc = acc + _dot(_dot(tm.q(q), tm.k(p), NT) * tm.ratio(q, p, strict=False), do[q], TN)
    du.append(acc)
  # dR = (I + A)^-T dU by back substitution over the blocks.
  dr = [None] * nb
  for p in reversed(range(nb)):
    y = du[p]
    for q in range(p + 1, nb):
      y = y - _dot(tm.a_block(q, p), dr[q], TN)
    dr[p] = _dot(inverses[p], y, TN)
  decay = tm.decay()
  ds_in = ds if decay is None else decay * ds
  ones = jnp.ones((n, 1), F32)
  last_extra = None if decay is None else jnp.sum(decay * s * ds, keepdims=True)  # [1, 1]
  db = [jnp.zeros((n, 1), F32) for _ in range(nb)]
  dk = [None] * nb
  for p in range(nb):
    q_p, k_p, beta_p, gamma_p, end_p = tm.q(p), tm.k(p), tm.beta(p), tm.gamma(p), tm.to_end(p)
    ds_in = ds_in + _dot(q_p * gamma_p, do[p], TN) - _dot(k_p * (beta_p * gamma_p), dr[p], TN)
    dq = gamma_p * _dot(do[p], s, NT)
    dk_p = end_p * _dot(us[p], ds, NT) - (beta_p * gamma_p) * _dot(dr[p], s, NT)
    dbeta = jnp.sum(dr[p] * ws[p], axis=1, keepdims=True)
    ks_p = _dot(k_p, ds, NN)
    y_end = end_p * jnp.sum(ks_p * us[p], axis=1, keepdims=True)            # [n, 1]
    if tm.gated:
      qs = jnp.sum(do[p] * _dot(q_p, s, NN), axis=1, keepdims=True)
      kss = jnp.sum(dr[p] * _dot(k_p, s, NN), axis=1, keepdims=True)
      db[p] = db[p] + gamma_p * (qs - beta_p * kss) - y_end
      part = jnp.sum(y_end, keepdims=True)
      last_extra = part if last_extra is None else last_extra + part
    for q in range(p + 1):  # pairs (query block p, key block q <= p)
      k_q = tm.k(q)
      ratio = tm.ratio(p, q, strict=False)
      dp = _dot(do[p], us[q], NT) * ratio                                   # dP o Gamma
      dq = dq + _dot(dp, k_q, NN)
      kk = _dot(k_p, k_q, NT)
      strict = tm.ratio(p, q, strict=True) if p == q else ratio
      da = -_dot(dr[p], us[q], NT) * strict                                 # dA o Gamma
      dbeta = dbeta + jnp.sum(da * kk, axis=1, keepdims=True)
      da = da * beta_p                                                      # dA o Gamma o beta
      dk_p = dk_p + _dot(da, k_q, NN)
      contrib_q = _dot(dp, q_p, TN) + _dot(da, k_p, TN)                      # rows of block q
      dk[q] = contrib_q if dk[q] is None else dk[q] + contrib_q
      if tm.gated:
        z = dp * _dot(q_p, k_q, NT) + da * kk                               # dGamma o Gamma
        db[p] = db[p] + jnp.sum(z, axis=1, keepdims=True)
        db[q] = db[q] - _dot(z, ones, TN)
    dk[p] = dk_p if dk[p] is None else dk[p] + dk_p
    x.store("dq", tm.lo(p), dq * tm.st.scale)
    x.store("dv", tm.lo(p), beta_p * dr[p])
    x.store("dbeta", tm.lo(p), dbeta)
  for p in range(nb):
    x.store("dk", tm.lo(p), dk[p])
    if tm.gated:
      last = db[p]
      if p == nb - 1:
        last = last + jnp.where(iota((n, 1), 0) == n - 1, last_extra, 0.0)
      x.store("db", tm.lo(p), last)
  return ds_in


# ------------------------------------------------------------------------------------------------
# The custom_vjp core on [B, H, N, C, d] arrays.


def _chunk_inputs(q, k, v, beta, b, seg):
  ins = {"q": (q, "chunk"), "k": (k, "chunk"), "v": (v, "chunk"), "beta": (beta, "chunk")}
  if b is not None:
    ins["b"] = (b, "chunk")
    ins["bt"] = (jnp.swapaxes(b, -1, -2), "chunk")  # [B, H, N, 1, C]
  return {**ins, **cw.segment_inputs(seg)}


def _forward(st, q, k, v, beta, b, h0, seg, *, with_output: bool):
  bsz, h, n, c, _ = q.shape
  dk, dv = h0.shape[-2:]
  ins = {**_chunk_inputs(q, k, v, beta, b, seg), "h0": (h0, "state")}
  outs = {"final": (jax.ShapeDtypeStruct((bsz, h, dk, dv), F32), "state")}
  if with_output:
    outs["o"] = (jax.ShapeDtypeStruct((bsz, h, n, c, dv), q.dtype), "chunk")
  else:
    outs["s_in"] = (jax.ShapeDtypeStruct((bsz, h, n, dk, dv), F32), "states")
  body = lambda x, s: _fwd_chunk(x, s, with_output)
  return cw.walk(st, "delta_fwd" if with_output else "delta_states", body, ins, outs, "h0",
                 "final", n, reverse=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st, q, k, v, beta, b, h0, seg):
  outs = _forward(st, q, k, v, beta, b, h0, seg, with_output=True)
  return outs["o"], outs["final"]


def _core_fwd(st, q, k, v, beta, b, h0, seg):
  # The chunk states are recomputed in the backward (delta_states), as in the GLA kernels.
  return _core(st, q, k, v, beta, b, h0, seg), (q, k, v, beta, b, h0, seg)


def _core_bwd(st, res, cts):
  q, k, v, beta, b, h0, seg = res
  do, d_final = cts
  bsz, h, n, c, dk = q.shape
  dv = v.shape[-1]
  s_in = _forward(st, q, k, v, beta, b, h0, seg, with_output=False)["s_in"]
  ins = {**_chunk_inputs(q, k, v, beta, b, seg), "do": (do.astype(q.dtype), "chunk"),
         "s_in": (s_in, "chunk"), "d_final": (d_final.astype(F32), "state")}
  shape = lambda d: (bsz, h, n, c, d)
  outs = {"dq": (jax.ShapeDtypeStruct(shape(dk), q.dtype), "chunk"),
          "dk": (jax.ShapeDtypeStruct(shape(dk), k.dtype), "chunk"),
          "dv": (jax.ShapeDtypeStruct(shape(dv), v.dtype), "chunk"),
          "dbeta": (jax.ShapeDtypeStruct(shape(1), F32), "chunk"),
          "dh0": (jax.ShapeDtypeStruct((bsz, h, dk, dv), F32), "state")}
  if b is not None:
    outs["db"] = (jax.ShapeDtypeStruct(shape(1), F32), "chunk")
  body = lambda x, ds: _bwd_chunk(x, x.whole("s_in"), ds)
  g = cw.walk(st, "delta_bwd", body, ins, outs, "d_final", "dh0", n, reverse=True)
  return (g["dq"], g["dk"], g["dv"], g["dbeta"].astype(beta.dtype), g.get("db"),
          g["dh0"].astype(h0.dtype), None)


_core.defvjp(_core_fwd, _core_bwd)


# ------------------------------------------------------------------------------------------------
# Public entry.


def delta_pallas(q, k, v, beta, g=None, *, scale: float, initial_state=None, segment_ids=None,
                 chunk_size: int = 64, interpret=None):
  """Chunked (gated) delta rule with Pallas kernels; semantics of `delta_rule_reference`.

  Args:
    q, k: [b, t, h, dk]; v: [b, t, h, dv] (heads already matched); beta: [b, t, h].
    g: None (DeltaNet) or log-gates [b, t, h] (Gated DeltaNet).
    scale: multiplies q.
    initial_state: [b, h, dk, dv] or None (zeros).
    segment_ids: [b, t] int or None; the state resets where the id changes.
    chunk_size: tokens per chunk, a multiple of 16 (the sub-block rows); on GPU rounded up to a
      power of two. t need not be a multiple.
    interpret: None (interpret exactly where `dispatch.pallas_interpret()` says: on CPU), a bool,
      or a `jax.experimental.pallas.tpu.InterpretParams`.
  Returns:
    (o [b, t, h, dv] in q's dtype, final_state [b, h, dk, dv] float32), differentiable in q, k,
    v, beta, g and initial_state.
  """
  if interpret is None:
    interpret = dispatch.pallas_interpret()
  elif not isinstance(interpret, (bool, pltpu.InterpretParams)):
    raise ValueError(f"delta_pallas: interpret={interpret!r} must be None, a bool or a "
                     "pltpu.InterpretParams")
  if chunk_size < SUB or chunk_size % SUB:
    raise ValueError(f"delta_pallas: chunk_size={chunk_size} must be a positive multiple of {SUB}")
  return _delta(q, k, v, beta, g, initial_state, segment_ids, scale=float(scale),
                chunk=chunk_size, interpret=interpret, target=cw.target_of(interpret))


@functools.partial(jax.jit, static_argnames=("scale", "chunk", "interpret", "target"))
def _delta(q, k, v, beta, g, initial_state, segment_ids, *, scale, chunk, interpret, target):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  # Triton wants power-of-two tiles of at least 16: zero-padded key dims keep their state rows
  # zero (their k and q are 0), zero-padded value columns stay zero and are sliced off.
  dkp, dvp = (cw.tile(dk), cw.tile(dv)) if target == "gpu" else (dk, dv)
  if target == "gpu":
    chunk = cw.tile(chunk)
  n = -(-t // chunk)
  qc, kc = cw.to_chunks(q, n, chunk, dkp), cw.to_chunks(k, n, chunk, dkp)
  vc = cw.to_chunks(v, n, chunk, dvp)
  # Padded tokens have beta = 0 and gate 0: they leave the state unchanged.
  betac = cw.to_chunks(beta[..., None].astype(F32), n, chunk)
  cum = None
  if g is not None:
    cum = jnp.cumsum(cw.to_chunks(g[..., None].astype(F32), n, chunk), axis=3)
  h0 = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else initial_state.astype(F32)
  h0 = jnp.pad(h0, ((0, 0), (0, 0), (0, dkp - dk), (0, dvp - dv)))
  seg = None
  if segment_ids is not None:
    seg = lc.segment_runs(segment_ids, n, chunk).transpose(1, 0, 2)  # [B, N, C]
  st = cw.Static(scale, chunk, SUB, None if g is None else "scalar", seg is not None, target,
                 interpret, q.dtype)
  o, final = _core(st, qc, kc, vc, betac, cum, h0, seg)
  o = o.transpose(0, 2, 3, 1, 4).reshape(b, n * chunk, h, dvp)[:, :t, :, :dv]
  return o.astype(q.dtype), final[:, :, :dk, :dv]
