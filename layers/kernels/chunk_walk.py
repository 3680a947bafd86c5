"""The Pallas plumbing shared by the chunked recurrent kernels (GLA, the delta rule).

A chunked recurrent kernel walks the chunks of every (batch, head) in order with its state
resident, as fla's chunk kernels do; `walk` runs a chunk body `body(chunk, carry) -> carry` so:
  gpu (Triton backend): grid (batch, head); each program's blocks hold the whole sequence as
    [N, C, d] refs in global memory and a `fori_loop` reads one chunk at a time;
  tpu (Mosaic) and the interpreters: grid (batch, head, chunk) with the chunk axis "arbitrary"
    (sequential), one chunk per block, and the state in a VMEM scratch buffer that persists
    across the chunk axis.
`Static` holds a call's static settings and `Chunk` reads and writes the rows of one chunk in
either walk, with ref slices at static offsets only: the Triton lowering implements no value
slices, concatenations, composed ref views or 3D values, so chunk bodies keep to 2D values, iota
masks, broadcasts, row reductions and 2D dots.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from layers.kernels.linear_chunked import split_chunks

F32 = jnp.float32
_SQ = pl.squeezed
NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def target_of(interpret) -> str | None:
  """"gpu" or "tpu" where the kernels compile for that device; None where they are interpreted."""
  if interpret is not False:
    return None
  backend = jax.default_backend()
  return backend if backend in ("gpu", "tpu") else None


def tile(n: int) -> int:
  """The power of two >= max(n, 16) (Triton's tiles)."""
  return max(16, 1 << (n - 1).bit_length())


def to_chunks(x, n, chunk, width=None):
  """[B, T, H, d] -> [B, H, N, C, width], zero-padding T to n * chunk and d to width."""
  return split_chunks(x, n, chunk, width).transpose(0, 3, 1, 2, 4)


def segment_inputs(seg) -> dict:
  """The walk inputs of the chunks' segment runs [B, N, C] (shared by the heads): as a column
  [C, 1] and as a row [1, C] of each chunk; none without segment ids."""
  if seg is None:
    return {}
  return {"seg_col": (seg[..., None], "seg"), "seg_row": (seg[..., None, :], "seg")}


@dataclasses.dataclass(frozen=True)
class Static:
  """Static settings of one call (hashable: a nondiff argument of the kernels' custom_vjp)."""

  scale: float
  chunk: int
  sub: int  # sub-block rows (GLA: linear_chunk_math.sub_chunk_size under the per-key-dim gate,
  #   16 for chunks that are multiples of 16, else the whole chunk; the delta rule: 16)
  gate: str | None  # None, "scalar" or "vector"
  has_seg: bool
  target: str | None  # "gpu" or "tpu" when compiled, None when interpreted
  interpret: Any
  mm_dtype: Any  # matmul input dtype (the inputs' dtype)

  @property
  def loop(self) -> bool:
    """True where a program walks all chunks itself (Triton); else the grid's chunk axis does."""
    return self.target == "gpu"


def dot(st, a, b, dims):
  return lax.dot_general(a.astype(st.mm_dtype), b.astype(st.mm_dtype), dims,
                         preferred_element_type=F32)


def iota(shape, axis):
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


def compiler_params(st: Static, head_dim: int):
  if st.target == "gpu":
    return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
  if st.target == "tpu" or isinstance(st.interpret, pltpu.InterpretParams):
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
  return None


def walk(st: Static, name, body, inputs: dict, outputs: dict, carry_in, carry_out, n,
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
      return body(Chunk(st, everything, index), carry)

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
                        compiler_params=compiler_params(st, dk), name=name)
  outs = call(*(inputs[k][0] for k in names_in))
  return dict(zip(names_out, outs))


