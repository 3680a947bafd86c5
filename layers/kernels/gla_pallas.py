"""Chunked (gated) linear attention with the chunk-local work in Pallas kernels.

Same semantics and signature as `linear_chunked.chunked_linear_attention`, and the same driver
(validation, padding, gate cumsums, segment runs, the custom_vjp and the cheap cross-chunk [dk, dv]
scans in XLA). Only `map_chunks` differs: each per-chunk step (state contribution, output, state
gradient, backward) is one `pl.pallas_call` over a parallel (batch, head, chunk) grid whose kernel
loads one chunk of one head and calls the shared math of `linear_chunk_math` on it.

Four kernels run per forward+backward: state_update and chunk_out in the forward; state_update
again (states are recomputed, not stored), state_grad and chunk_bwd in the backward.

Status: tested only under the interpreters (generic, and the TPU one via `pltpu.InterpretParams`)
on CPU. Lowering to Mosaic TPU or to the GPU backends is unverified: the per-key-dim gate path
uses [16, 16, dk] values, static value slices and concatenations, and GPU lowering also wants
power-of-two block shapes (chunk and head dims).
"""

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from layers.kernels import dispatch
from layers.kernels.linear_chunked import run_chunked

_SQ = pl.Squeezed()


def _chunk_block(shape):
  """BlockSpec taking one [N, B, H, ...] array's block for grid point (batch, head, chunk)."""
  rest = tuple(shape[3:])
  zeros = (0,) * len(rest)
  return pl.BlockSpec((_SQ, _SQ, _SQ) + rest, lambda b, h, n: (n, b, h) + zeros)


def _seg_block(chunk):
  """BlockSpec of the [N, B, C] segment runs: shared by all heads."""
  return pl.BlockSpec((_SQ, _SQ, chunk), lambda b, h, n: (n, b, 0))


def _compiler_params(interpret):
  # Mosaic parameters only where Mosaic (or its interpreter) runs; the GPU lowering wants none.
  if isinstance(interpret, pltpu.InterpretParams) or (
      interpret is False and jax.default_backend() == "tpu"):
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
  return None


@functools.lru_cache(maxsize=None)
def make_pallas_map(interpret):
  """Returns the Pallas `map_chunks`: one pallas_call per per-chunk step.

  Cached, so that equal `interpret` settings give the same function and `run_chunked`'s jit cache
  hits.

  Args:
    interpret: False (compile for the device), True (generic interpreter) or a
      `pltpu.InterpretParams` (the TPU interpreter: TPU memory semantics on CPU; it does not
      check that Mosaic can lower the kernel).
  """
  params = _compiler_params(interpret)

  def pallas_map(fn, args, seg, out_specs):
    present = [a for a in args if a is not None]
    n, b, h = present[0].shape[:3]
    inputs = present + ([] if seg is None else [seg])
    in_specs = [_chunk_block(a.shape) for a in present]
    if seg is not None:
      in_specs.append(_seg_block(seg.shape[-1]))
    out_shape = [jax.ShapeDtypeStruct((n, b, h) + tuple(shape), dtype)
                 for shape, dtype in out_specs]
    out_block = [_chunk_block(s.shape) for s in out_shape]

    def kernel(*refs):
      in_refs, out_refs = refs[:len(inputs)], refs[len(inputs):]
      loaded = iter(r[...] for r in in_refs[:len(present)])
      blocks = [None if a is None else next(loaded) for a in args]
      seg_block = None if seg is None else in_refs[-1][...]
      outs = fn(*blocks, seg=seg_block)
      for ref, val in zip(out_refs, outs):
        ref[...] = val.astype(ref.dtype)

    call = pl.pallas_call(kernel, out_shape=out_shape, grid=(b, h, n), in_specs=in_specs,
                          out_specs=out_block, interpret=interpret, compiler_params=params,
                          name=f"gla_{fn.__name__}")
    return tuple(call(*inputs))

  return pallas_map


def gla_pallas(q, k, v, gk=None, *, scale: float, initial_state=None, segment_ids=None,
               chunk_size: int = 64, interpret=None):
  """Chunked (gated) linear attention with Pallas kernels; semantics of the reference.

  Args:
    q, k: [b, t, h, dk]; v: [b, t, h, dv] (heads already matched).
    gk: None, or log-gates (<= 0) [b, t, h, dk] (per key dim) or [b, t, h, 1] (per head).
    scale: multiplies q.
    initial_state: [b, h, dk, dv] or None (zeros).
    segment_ids: [b, t] int or None; the state resets where the id changes.
    chunk_size: tokens per chunk (one kernel block); t need not be a multiple.
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
  return run_chunked(make_pallas_map(interpret), "gla_pallas", q, k, v, gk, scale=scale,
                     initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size)
