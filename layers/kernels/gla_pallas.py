"""Chunked (gated) linear attention in Pallas kernels that keep the state resident.

Same semantics and signature as `linear_chunked.chunked_linear_attention` (validation, padding,
in-chunk gate cumsums and segment runs are shared with it), but the cross-chunk recurrence runs
inside the kernels, as fla's chunk kernels do: each program owns one (batch, head) and walks the
chunks in order with the [dv, dk] state in registers / VMEM, so no per-chunk state goes through
HBM in the forward. Three kernels:

  gla_fwd     forward order: the output of every chunk and the final state;
  gla_states  forward order, recomputed in the backward: the state entering every chunk (f32);
  gla_bwd     reverse order: the state gradient is carried from the last chunk to the first and
              every chunk's dq, dk, dv and d(cumulative gate) are computed next to it.

Matmul inputs stay in the inputs' dtype (bf16 on devices) with float32 accumulation; gates,
states and every exponent are float32. Kernels keep the state transposed ([dv, dk]), so a
per-key-dim decay scales columns and no value is ever transposed.

How a chunk is walked on each target (`_Static.target`):
  gpu (Triton backend): grid (batch, head); each program's blocks hold the whole sequence as
    [N, C, d] refs in global memory and a `fori_loop` reads one chunk at a time;
  tpu (Mosaic) and the interpreters: grid (batch, head, chunk) with the chunk axis "arbitrary"
    (sequential), one chunk per block, and the state in a VMEM scratch buffer that persists
    across the chunk axis.
The chunk body is the same code for both.

Inside a chunk, the per-key-dim gate is handled in sub-blocks of 16 rows (fla's secondary
chunking): off-diagonal sub-blocks are matmuls of factors re-centred on a row of the chunk, so
every factor is e^(x) with x <= 0; the 16 x 16 diagonal blocks are built one key (or query)
column at a time from e^(min(b_i - b_j, 0)), exact where i >= j. The scalar gate and no gate use
one sub-block (the whole chunk) with the [C, C] decay matrix. Only ref slices with static
offsets, 2D values, iota masks, broadcasts and row reductions are used: no value slices,
concatenations or 3D values, which the Triton lowering does not implement.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from layers.kernels import dispatch
from layers.kernels import linear_chunk_math as cm
from layers.kernels import linear_chunked as lc

F32 = jnp.float32
_SQ = pl.squeezed
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class _Static:
  """Static settings of one call (hashable: a nondiff argument of the custom_vjp)."""

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


def _target(interpret) -> str | None:
  if interpret is not False:
    return None
  backend = jax.default_backend()
  return backend if backend in ("gpu", "tpu") else None


def _dot(st, a, b, dims):
  return lax.dot_general(a.astype(st.mm_dtype), b.astype(st.mm_dtype), dims,
                         preferred_element_type=F32)


def _iota(shape, axis):
  return lax.broadcasted_iota(jnp.int32, shape, axis)


class _Chunk:
  """Reads and writes rows of one chunk: refs are [C, d] blocks (grid walk) or [N, C, d] (loop).

  `row`-layout arrays ([1, C]: transposed scalar gates, segment runs as a row) are read by
  column ranges. Every read is a ref slice with a static offset within the chunk.
  """

  def __init__(self, st: _Static, refs: dict, index):
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


def _chunk_last(x: _Chunk):
  """(b_last [1, G] or None, seg_last [1, 1] or None): the chunk's last row."""
  c = x.st.chunk
  b_last = None if x.st.gate is None else x.rows("b", c - 1, 1)
  seg_last = x.seg_row(c - 1, 1)
  return b_last, seg_last


def _diag_scores(x: _Chunk, lo, q_p, b_p, seg_p, *, transposed):
  """The masked diagonal block of the intra-chunk scores, [P, P].

  A_ij = sum_d q_id k_jd e^(b_id - b_jd) for i >= j in one segment; transposed gives A^T (rows
  are keys). q_p (scaled) and b_p are the block's rows; keys are read from `x`.
  """
  st, n = x.st, x.st.sub
  k_p = x.f32("k", lo, n)
  row_seg, col_seg = (x.seg_row(lo, n), seg_p)
  mask = (_iota((n, n), 1) >= _iota((n, n), 0)) if transposed else (
      _iota((n, n), 0) >= _iota((n, n), 1))
  mask = _and(mask, _seg_eq(col_seg, row_seg))
  if st.gate == "vector":
    acc = jnp.zeros((n, n), F32)
    rows_of = k_p if transposed else q_p
    for j in range(n):
      o_j = x.q(lo + j, 1) if transposed else x.f32("k", lo + j, 1)
      b_j = x.rows("b", lo + j, 1)
      expo = (b_j - b_p) if transposed else (b_p - b_j)
      col = jnp.sum(rows_of * o_j * jnp.exp(jnp.minimum(expo, 0.0)), axis=1, keepdims=True)
      acc = jnp.where(_iota((n, n), 1) == j, col, acc)
    return jnp.where(mask, acc, 0.0)
  a = _dot(st, k_p, q_p, _NT) if transposed else _dot(st, q_p, k_p, _NT)
  if st.gate == "scalar":
    b_row = x.cols("bt", lo, n)  # [1, P]
    expo = (b_row - b_p) if transposed else (b_p - b_row)
    return a * jnp.exp(jnp.where(mask, expo, -jnp.inf))
  return jnp.where(mask, a, 0.0)


def _diag_grad(x: _Chunk, lo, da, b_p, other, *, transposed):
  """sum_j dA_ij e^(b_i - b_j) other_j for the diagonal block (rows i of the block).

  Not transposed: dq_i from dA [queries, keys] and other = keys. Transposed: dk_j from dA^T
  [keys, queries] and other = queries (scaled), with the exponent e^(b_query - b_key).
  """
  st, n = x.st, x.st.sub
  if st.gate == "vector":
    acc = jnp.zeros(b_p.shape[:1] + (other.shape[1],), F32)
    for j in range(n):
      o_j = x.q(lo + j, 1) if transposed else x.f32("k", lo + j, 1)
      b_j = x.rows("b", lo + j, 1)
      expo = (b_j - b_p) if transposed else (b_p - b_j)
      acc = acc + _column(da, j) * o_j * jnp.exp(jnp.minimum(expo, 0.0))
    return acc
  if st.gate == "scalar":
    b_row = x.cols("bt", lo, n)
    expo = (b_row - b_p) if transposed else (b_p - b_row)
    da = da * jnp.exp(jnp.minimum(expo, 0.0))  # masked entries of da are 0 already
  return _dot(st, da, other, _NN)


def _fwd_chunk(x: _Chunk, s, with_output: bool):
  """One chunk forward: stores its output (if asked) and returns the state leaving it.

  s: [dv, dk] float32, the (transposed) state entering the chunk.
  """
  st = x.st
  c, n = st.chunk, st.sub
  if with_output:
    v_all = x.rows("v", 0, c)
    for p in range(c // n):
      lo = p * n
      q_p, b_p, seg_p = x.q(lo, n), x.gate(lo, n), x.seg_col(lo, n)
      m_in = None if seg_p is None else seg_p == 0
      o = _dot(st, _where(m_in, _mul(q_p, _exp_or_none(b_p))), s, _NT)
      if p:
        r = x.gate(lo - 1, 1)
        k_all, b_all = x.f32("k", 0, c), x.gate(0, c)
        q_f = _mul(q_p, _exp_or_none(None if r is None else b_p - r))
        k_f = _mul(k_all, None if r is None else jnp.exp(jnp.minimum(r - b_all, 0.0)))
        mask = _and(_iota((n, c), 1) < lo, _seg_eq(seg_p, x.seg_row(0, c)))
        o = o + _dot(st, jnp.where(mask, _dot(st, q_f, k_f, _NT), 0.0), v_all, _NN)
      a_pp = _diag_scores(x, lo, q_p, b_p, seg_p, transposed=False)
      o = o + _dot(st, a_pp, x.rows("v", lo, n), _NN)
      x.store("o", lo, o)
  b_last, seg_last = _chunk_last(x)
  k_all, b_all, seg_all = x.f32("k", 0, c), x.gate(0, c), x.seg_col(0, c)
  k_e = _mul(k_all, None if b_last is None else jnp.exp(b_last - b_all))
  k_e = _where(_seg_eq(seg_all, seg_last), k_e)
  decay = _exp_or_none(b_last)
  if seg_last is not None:
    carry = (seg_last == 0).astype(F32)
    decay = carry if decay is None else decay * carry
  return _mul(s, decay) + _dot(st, x.rows("v", 0, c), k_e, _TN)


def _bwd_chunk(x: _Chunk, s, ds):
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
    mask_pp = _and(_iota((n, n), 0) >= _iota((n, n), 1), _seg_eq(seg_p, x.seg_row(lo, n)))
    da_pp = jnp.where(mask_pp, _dot(st, do_p, v_p, _NT), 0.0)
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
    mask_t_pp = _and(_iota((n, n), 1) >= _iota((n, n), 0), _seg_eq(seg_p, x.seg_row(lo, n)))
    dat_pp = jnp.where(mask_t_pp, _dot(st, v_p, do_p, _NT), 0.0)
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
        extra = last_acc + _mul(jnp.exp(b_last) * jnp.sum(s * ds, axis=0, keepdims=True),
                                None if seg_last is None else (seg_last == 0).astype(F32))
        if st.gate == "scalar":
          extra = jnp.sum(extra, axis=1, keepdims=True)
        db = db + jnp.where(_iota(db.shape, 0) == n - 1, extra, 0.0)
      x.store("db", lo, db)
  seg_all = x.seg_col(0, c)
  m_in_all = None if seg_all is None else seg_all == 0
  w = _dot(st, do_all, _where(m_in_all, _mul(q_all, _exp_or_none(b_all))), _TN)
  decay = _exp_or_none(b_last)
  if seg_last is not None:
    carry = (seg_last == 0).astype(F32)
    decay = carry if decay is None else decay * carry
  return _mul(ds, decay) + w


# ------------------------------------------------------------------------------------------------
# pallas_call plumbing: the two ways to walk the chunks.


def _compiler_params(st: _Static, head_dim: int):
  if st.target == "gpu":
    return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
  if st.target == "tpu" or isinstance(st.interpret, pltpu.InterpretParams):
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
  return None


def _call(st: _Static, name, body, inputs: dict, outputs: dict, carry_in, carry_out, n,
          reverse: bool):
  """Runs `body(chunk, carry) -> carry` over the n chunks of every (batch, head).

  inputs / outputs: name -> (array or ShapeDtypeStruct, kind) with kind "chunk" ([B, H, N, C, d]
    arrays), "seg" ([B, N, C, d], shared by the heads) or "state" ([B, H, dv, dk], read once (in)
    or written after the last chunk (out)). carry_in names the initial-carry input; carry_out the
    output that receives the final carry. Outputs whose kind is "states" ([B, H, N, dv, dk]) get
    the carry entering each chunk.
  """
  names_in, names_out = list(inputs), list(outputs)
  b, h = inputs["k"][0].shape[:2]
  dv, dk = inputs[carry_in][0].shape[-2:]

  if st.loop:
    grid = (b, h)
    def spec(kind, shape):
      full = tuple(shape[2:]) if kind in ("chunk", "states", "state") else tuple(shape[1:])
      if kind == "seg":
        return pl.BlockSpec((_SQ,) + full, lambda i, j: (i,) + (0,) * len(full))
      return pl.BlockSpec((_SQ, _SQ) + full, lambda i, j: (i, j) + (0,) * len(full))
  else:
    grid = (b, h, n)
    chunk_of = (lambda c: n - 1 - c) if reverse else (lambda c: c)
    def spec(kind, shape):
      tail = tuple(shape[-2:])
      if kind == "seg":
        return pl.BlockSpec((_SQ, _SQ) + tail, lambda i, j, c: (i, chunk_of(c), 0, 0))
      if kind == "state":
        return pl.BlockSpec((_SQ, _SQ) + tail, lambda i, j, c: (i, j, 0, 0))
      return pl.BlockSpec((_SQ, _SQ, _SQ) + tail, lambda i, j, c: (i, j, chunk_of(c), 0, 0))

  in_specs = [spec(inputs[k][1], inputs[k][0].shape) for k in names_in]
  out_specs = [spec(outputs[k][1], outputs[k][0].shape) for k in names_out]
  out_shape = [jax.ShapeDtypeStruct(outputs[k][0].shape, outputs[k][0].dtype) for k in names_out]
  scratch = [] if st.loop else [pltpu.VMEM((dv, dk), F32)]

  def kernel(*refs):
    refs_in = dict(zip(names_in, refs[:len(names_in)]))
    refs_out = dict(zip(names_out, refs[len(names_in):len(names_in) + len(names_out)]))
    everything = {**refs_in, **refs_out}
    states_out = [k for k in names_out if outputs[k][1] == "states"]

    def step(index, carry):
      for k in states_out:
        if index is None:
          refs_out[k][...] = carry
        else:
          refs_out[k][index] = carry
      return body(_Chunk(st, everything, index), carry)

    if st.loop:
      init = refs_in[carry_in][...].astype(F32)
      order = (lambda i: n - 1 - i) if reverse else (lambda i: i)
      final = lax.fori_loop(0, n, lambda i, c: step(order(i), c), init)
      refs_out[carry_out][...] = final.astype(refs_out[carry_out].dtype)
    else:
      acc = refs[-1]
      c = pl.program_id(2)

      @pl.when(c == 0)
      def _():
        acc[...] = refs_in[carry_in][...].astype(F32)

      acc[...] = step(None, acc[...])

      @pl.when(c == n - 1)
      def _():
        refs_out[carry_out][...] = acc[...].astype(refs_out[carry_out].dtype)

  call = pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, scratch_shapes=scratch, interpret=st.interpret,
                        compiler_params=_compiler_params(st, dk), name=name)
  outs = call(*(inputs[k][0] for k in names_in))
  return dict(zip(names_out, outs))


# ------------------------------------------------------------------------------------------------
# The custom_vjp core on [B, H, N, C, d] arrays.


def _chunk_inputs(st, q, k, v, b, seg):
  ins = {"q": (q, "chunk"), "k": (k, "chunk"), "v": (v, "chunk")}
  if b is not None:
    ins["b"] = (b, "chunk")
    if st.gate == "scalar":
      ins["bt"] = (jnp.swapaxes(b, -1, -2), "chunk")  # [B, H, N, 1, C]
  if seg is not None:
    ins["seg_col"] = (seg[..., None], "seg")  # [B, N, C, 1]
    ins["seg_row"] = (seg[..., None, :], "seg")  # [B, N, 1, C]
  return ins


def _forward(st, q, k, v, b, h0t, seg, *, with_output: bool):
  bsz, h, n, c, _ = q.shape
  dv, dk = h0t.shape[-2:]
  ins = {**_chunk_inputs(st, q, k, v, b, seg), "h0": (h0t, "state")}
  outs = {"final": (jax.ShapeDtypeStruct((bsz, h, dv, dk), F32), "state")}
  if with_output:
    outs["o"] = (jax.ShapeDtypeStruct((bsz, h, n, c, dv), q.dtype), "chunk")
  else:
    outs["s_in"] = (jax.ShapeDtypeStruct((bsz, h, n, dv, dk), F32), "states")
  body = lambda x, s: _fwd_chunk(x, s, with_output)
  return _call(st, "gla_fwd" if with_output else "gla_states", body, ins, outs, "h0", "final",
               n, reverse=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st, q, k, v, b, h0t, seg):
  outs = _forward(st, q, k, v, b, h0t, seg, with_output=True)
  return outs["o"], outs["final"]


def _core_fwd(st, q, k, v, b, h0t, seg):
  # The chunk states are recomputed in the backward (gla_states): stored, they would be twice
  # the size of q for C = 64 and d = 128.
  return _core(st, q, k, v, b, h0t, seg), (q, k, v, b, h0t, seg)


def _core_bwd(st, res, cts):
  q, k, v, b, h0t, seg = res
  do, d_final = cts
  bsz, h, n, c, dk = q.shape
  dv = v.shape[-1]
  s_in = _forward(st, q, k, v, b, h0t, seg, with_output=False)["s_in"]
  ins = {**_chunk_inputs(st, q, k, v, b, seg), "do": (do.astype(q.dtype), "chunk"),
         "s_in": (s_in, "chunk"), "d_final": (d_final.astype(F32), "state")}
  shape = lambda d: (bsz, h, n, c, d)
  outs = {"dq": (jax.ShapeDtypeStruct(shape(dk), q.dtype), "chunk"),
          "dk": (jax.ShapeDtypeStruct(shape(dk), k.dtype), "chunk"),
          "dv": (jax.ShapeDtypeStruct(shape(dv), v.dtype), "chunk"),
          "dh0": (jax.ShapeDtypeStruct((bsz, h, dv, dk), F32), "state")}
  if b is not None:
    outs["db"] = (jax.ShapeDtypeStruct(shape(b.shape[-1]), F32), "chunk")

  def body(x, ds):
    return _bwd_chunk(x, x.whole("s_in"), ds)

  g = _call(st, "gla_bwd", body, ins, outs, "d_final", "dh0", n, reverse=True)
  db = g.get("db")
  return g["dq"], g["dk"], g["dv"], db, g["dh0"].astype(h0t.dtype), None


_core.defvjp(_core_fwd, _core_bwd)


# ------------------------------------------------------------------------------------------------
# Public entry.


def _pow2(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def _to_chunks(x, n, chunk, width=None):
  """[B, T, H, d] -> [B, H, N, C, width], zero-padding T to n * chunk and d to width."""
  b, t, h, d = x.shape
  width = width or d
  x = jnp.pad(x, ((0, 0), (0, n * chunk - t), (0, 0), (0, width - d)))
  return x.reshape(b, n, chunk, h, width).transpose(0, 3, 1, 2, 4)


def gla_pallas(q, k, v, gk=None, *, scale: float, initial_state=None, segment_ids=None,
               chunk_size: int = 64, interpret=None):
  """Chunked (gated) linear attention with Pallas kernels; semantics of the reference.

  Args:
    q, k: [b, t, h, dk]; v: [b, t, h, dv] (heads already matched).
    gk: None, or log-gates (<= 0) [b, t, h, dk] (per key dim) or [b, t, h, 1] (per head).
    scale: multiplies q.
    initial_state: [b, h, dk, dv] or None (zeros).
    segment_ids: [b, t] int or None; the state resets where the id changes.
    chunk_size: tokens per chunk; t need not be a multiple. Under the per-key-dim gate it must be
      a multiple of 16 or a power of two (the sub-block size divides it); on GPU it is rounded up
      to a power of two >= 16.
    interpret: None (interpret exactly where `dispatch.pallas_interpret()` says: on CPU), a bool,
      or a `jax.experimental.pallas.tpu.InterpretParams` for the TPU interpreter.
  Returns:
    (o [b, t, h, dv] in q's dtype, final_state [b, h, dk, dv] float32), differentiable in q, k,
    v, gk and initial_state.
  """
  if interpret is None:
    interpret = dispatch.pallas_interpret()
  elif not isinstance(interpret, (bool, pltpu.InterpretParams)):
    raise ValueError(f"gla_pallas: interpret={interpret!r} must be None, a bool or a "
                     "pltpu.InterpretParams")
  try:
    scale = float(scale)
  except (TypeError, ValueError) as e:
    raise ValueError(f"gla_pallas: scale={scale!r} must be a Python number (it is static)") from e
  lc.check_inputs("gla_pallas", q, k, v, gk, initial_state, segment_ids, chunk_size)
  return _gla(q, k, v, gk, initial_state, segment_ids, scale=scale, chunk=chunk_size,
              interpret=interpret, target=_target(interpret))


@functools.partial(jax.jit, static_argnames=("scale", "chunk", "interpret", "target"))
def _gla(q, k, v, gk, initial_state, segment_ids, *, scale, chunk, interpret, target):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  gate = None if gk is None else ("scalar" if gk.shape[-1] == 1 else "vector")
  # Triton wants power-of-two tiles of at least 16: zero-padded head dims change nothing (their q
  # and k are 0, so their state rows stay 0; padded v columns are sliced off).
  dkp, dvp = (_pow2(dk), _pow2(dv)) if target == "gpu" else (dk, dv)
  if target == "gpu":
    chunk = _pow2(chunk)
  sub = cm.sub_chunk_size(chunk) if gate == "vector" else chunk
  n = -(-t // chunk)
  qc, kc = _to_chunks(q, n, chunk, dkp), _to_chunks(k, n, chunk, dkp)
  vc = _to_chunks(v, n, chunk, dvp)
  cum = None
  if gk is not None:
    g = _to_chunks(gk.astype(F32), n, chunk, dkp if gate == "vector" else 1)
    cum = jnp.cumsum(g, axis=3)
  h0 = (jnp.zeros((b, h, dk, dv), F32) if initial_state is None else initial_state.astype(F32))
  h0t = jnp.pad(jnp.swapaxes(h0, -1, -2), ((0, 0), (0, 0), (0, dvp - dv), (0, dkp - dk)))
  seg = None
  if segment_ids is not None:
    seg = lc.segment_runs(segment_ids, n, chunk).transpose(1, 0, 2)  # [B, N, C]
  st = _Static(scale, chunk, sub, gate, seg is not None, target, interpret, q.dtype)
  o, final = _core(st, qc, kc, vc, cum, h0t, seg)
  o = o.transpose(0, 2, 3, 1, 4).reshape(b, n * chunk, h, dvp)[:, :t, :, :dv]
  final = jnp.swapaxes(final, -1, -2)[:, :, :dk, :dv]
  return o.astype(q.dtype), final
