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

How a chunk is walked on each target (a Triton loop on GPU, a sequential grid axis on TPU and
in the interpreters) is `chunk_walk`'s, shared with the delta rule's kernels. The chunk body is
`gla_kernel_math` (its sub-blocks and the ops it keeps to so that Triton and Mosaic lower it).
This module holds the custom_vjp and the public entry.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from layers.kernels import chunk_walk as cw
from layers.kernels import dispatch
from layers.kernels import gla_kernel_math as km
from layers.kernels import linear_chunk_math as cm
from layers.kernels import linear_chunked as lc

F32 = jnp.float32


# ------------------------------------------------------------------------------------------------
# The custom_vjp core on [B, H, N, C, d] arrays.


def _chunk_inputs(st, q, k, v, b, seg):
  ins = {"q": (q, "chunk"), "k": (k, "chunk"), "v": (v, "chunk")}
  if b is not None:
    ins["b"] = (b, "chunk")
    if st.gate == "scalar":
      ins["bt"] = (jnp.swapaxes(b, -1, -2), "chunk")  # [B, H, N, 1, C]
  return {**ins, **cw.segment_inputs(seg)}


def _forward(st, q, k, v, b, h0t, seg, *, with_output: bool):
  bsz, h, n, c, _ = q.shape
  dv, dk = h0t.shape[-2:]
  ins = {**_chunk_inputs(st, q, k, v, b, seg), "h0": (h0t, "state")}
  outs = {"final": (jax.ShapeDtypeStruct((bsz, h, dv, dk), F32), "state")}
  if with_output:
    outs["o"] = (jax.ShapeDtypeStruct((bsz, h, n, c, dv), q.dtype), "chunk")
  else:
    outs["s_in"] = (jax.ShapeDtypeStruct((bsz, h, n, dv, dk), F32), "states")
  body = lambda x, s: km.fwd_chunk(x, s, with_output)
  return cw.walk(st, "gla_fwd" if with_output else "gla_states", body, ins, outs, "h0", "final",
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
    return km.bwd_chunk(x, x.whole("s_in"), ds)

  g = cw.walk(st, "gla_bwd", body, ins, outs, "d_final", "dh0", n, reverse=True)
  db = g.get("db")
  return g["dq"], g["dk"], g["dv"], db, g["dh0"].astype(h0t.dtype), None


_core.defvjp(_core_fwd, _core_bwd)


# ------------------------------------------------------------------------------------------------
# Public entry.


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
  scale = lc.check_inputs("gla_pallas", q, k, v, gk, initial_state, segment_ids, chunk_size,
                          scale)
  return _gla(q, k, v, gk, initial_state, segment_ids, scale=scale, chunk=chunk_size,
              interpret=interpret, target=cw.target_of(interpret))


@functools.partial(jax.jit, static_argnames=("scale", "chunk", "interpret", "target"))
def _gla(q, k, v, gk, initial_state, segment_ids, *, scale, chunk, interpret, target):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  gate = None if gk is None else ("scalar" if gk.shape[-1] == 1 else "vector")
  # Triton wants power-of-two tiles of at least 16: zero-padded head dims change nothing (their q
  # and k are 0, so their state rows stay 0; padded v columns are sliced off).
  dkp, dvp = (cw.tile(dk), cw.tile(dv)) if target == "gpu" else (dk, dv)
  if target == "gpu":
    chunk = cw.tile(chunk)
  sub = cm.sub_chunk_size(chunk) if gate == "vector" else chunk
  n = -(-t // chunk)
  qc, kc = cw.to_chunks(q, n, chunk, dkp), cw.to_chunks(k, n, chunk, dkp)
  vc = cw.to_chunks(v, n, chunk, dvp)
  cum = None
  if gk is not None:
    g = cw.to_chunks(gk.astype(F32), n, chunk, dkp if gate == "vector" else 1)
    cum = jnp.cumsum(g, axis=3)
  h0 = (jnp.zeros((b, h, dk, dv), F32) if initial_state is None else initial_state.astype(F32))
  h0t = jnp.pad(jnp.swapaxes(h0, -1, -2), ((0, 0), (0, 0), (0, dvp - dv), (0, dkp - dk)))
  seg = None
  if segment_ids is not None:
    seg = lc.segment_runs(segment_ids, n, chunk).transpose(1, 0, 2)  # [B, N, C]
  st = cw.Static(scale, chunk, sub, gate, seg is not None, target, interpret, q.dtype)
  o, final = _core(st, qc, kc, vc, cum, h0t, seg)
  o = o.transpose(0, 2, 3, 1, 4).reshape(b, n * chunk, h, dvp)[:, :t, :, :dv]
  final = jnp.swapaxes(final, -1, -2)[:, :, :dk, :dv]
  return o.astype(q.dtype), final
