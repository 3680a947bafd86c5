"""Token layouts of a sequence split over the `seq` mesh axis.

A sequence of T tokens is cut into `num_chunks` equal chunks of global token order; rank r of the
P sequence shards holds `chunks_per_shard` of them, concatenated in the order `chunk_ids(r)`:
  contiguous  rank r holds chunk r of P (chunks_per_shard = 1);
  zigzag      rank r holds chunks r and 2P-1-r of 2P (dual-chunk swap): with causal masking every
              rank then has the same amount of attention work.
An array "in layout order" has its length axis permuted so that splitting it evenly over the P
ranks gives each rank its chunks: `to_layout` / `from_layout` convert from / to natural order.
Sequence-parallel ops take and return arrays in layout order; a model permutes its tokens once at
the input and un-permutes the logits once at the output, so every layer in between (attention,
recurrences, MLPs) sees the same balanced layout.
"""

import dataclasses
import logging

import jax.numpy as jnp
import numpy as np

from sharding.validation import check_fields

LAYOUTS = ("contiguous", "zigzag")
log = logging.getLogger("lctx.sharding")


@dataclasses.dataclass(frozen=True)
class SeqLayout:
  """`kind` (one of LAYOUTS) over `shards` sequence-parallel ranks."""

  kind: str = "contiguous"
  shards: int = 1

  def __post_init__(self):
    check_fields(self)
    if self.kind not in LAYOUTS:
      raise ValueError(f"SequenceParallelConfig.layout={self.kind!r} must be one of {LAYOUTS}")
    if self.shards < 1:
      raise ValueError(f"SeqLayout.shards={self.shards} must be >= 1")

  @property
  def chunks_per_shard(self) -> int:
    return 2 if self.kind == "zigzag" else 1

  @property
  def num_chunks(self) -> int:
    return self.shards * self.chunks_per_shard

  def chunk_ids(self, rank: int) -> tuple[int, ...]:
    """Global chunk indices held by `rank`, in the order they are stored locally."""
    if self.kind == "zigzag":
      return (rank, 2 * self.shards - 1 - rank)
    return (rank,)

  def chunk_table(self) -> np.ndarray:
    """int32 [shards, chunks_per_shard]: row r is chunk_ids(r)."""
    return np.array([self.chunk_ids(r) for r in range(self.shards)], np.int32)

  def check_length(self, t: int, multiple: int = 1, what: str = "sequence length") -> None:
    """Raises a ValueError naming the settings unless t splits into whole chunks.

    `multiple` is an extra granularity each chunk must respect (a linear-attention chunk size).
    """
    unit = self.num_chunks * multiple
    if t % unit:
      detail = f"{self.num_chunks} layout chunks" + (f" x {multiple}" if multiple > 1 else "")
      raise ValueError(f"{what} {t} is not divisible by {unit} ({detail}): "
                       f"SequenceParallelConfig.layout={self.kind!r} over MeshConfig.seq="
                       f"{self.shards} sequence-parallel ranks")

  def chunk_len(self, t: int) -> int:
    self.check_length(t)
    return t // self.num_chunks

  def permutation(self, t: int) -> np.ndarray:
    """perm [t]: position i of the layout order holds natural token perm[i]."""
    c = self.chunk_len(t)
    order = self.chunk_table().reshape(-1)
    return (order[:, None] * c + np.arange(c)[None, :]).reshape(-1).astype(np.int32)

  def to_layout(self, x, axis: int = 1):
    """Natural order -> layout order along `axis` (identity for contiguous)."""
    if self.kind == "contiguous":
      return x
    return jnp.take(x, self.permutation(x.shape[axis]), axis=axis)

  def from_layout(self, x, axis: int = 1):
    """Layout order -> natural order along `axis`."""
    if self.kind == "contiguous":
      return x
    return jnp.take(x, np.argsort(self.permutation(x.shape[axis])), axis=axis)

  def local_chunk_ids(self, rank):
    """int32 [chunks_per_shard] chunk ids of a (traced) rank, e.g. lax.axis_index('seq')."""
    return jnp.asarray(self.chunk_table())[rank]

  def local_positions(self, rank, local_len: int):
    """int32 [local_len]: global (natural-order) token index of each local token of `rank`."""
    c = local_len // self.chunks_per_shard
    ids = self.local_chunk_ids(rank)
    return (ids[:, None] * c + jnp.arange(c, dtype=jnp.int32)[None, :]).reshape(-1)


def chunk_start_flags(segment_ids, layout: SeqLayout):
  """bool [b, num_chunks] in layout order: the chunk's first token starts a new segment.

  `segment_ids` [b, t] are GLOBAL and in layout order. Chunk c > 0 starts a segment when its first
  id differs from the last id of chunk c - 1 (natural order); chunk 0 never does (an initial
  state enters its first segment). Computed outside the shard_map, since chunk c - 1 may live on
  another rank.
  """
  b, t = segment_ids.shape
  n = layout.num_chunks
  firsts = segment_ids.reshape(b, n, t // n)[:, :, 0]
  previous_last = previous_tail(segment_ids, layout, 1)[:, :, 0]
  return (firsts != previous_last) & jnp.asarray(layout.chunk_table().reshape(-1) > 0)[None]


def previous_tail(x, layout: SeqLayout, size: int):
  """[b, num_chunks, size, ...]: for each chunk of `x` [b, t, ...] (GLOBAL, in layout order), the
  last `size` entries of the chunk before it in natural order; zeros for global chunk 0.

  The halo of a short causal convolution over a permuted (or split) sequence: the convolution
  of chunk c continues from the end of chunk c - 1, which may live on another rank. Computed on
  the global array (XLA moves the few tokens it needs).
  """
  b, t = x.shape[:2]
  n = layout.num_chunks
  c = t // n
  if size > c:
    raise ValueError(f"a causal convolution reaching {size} tokens back needs layout chunks of "
                     f"at least {size} tokens; sequence length {t} over {n} chunks gives {c} "
                     f"(SequenceParallelConfig.layout={layout.kind!r}, MeshConfig.seq="
                     f"{layout.shards})")
  order = layout.chunk_table().reshape(-1)      # layout position -> global chunk id
  position = np.argsort(order)                  # global chunk id -> layout position
  tails = x.reshape((b, n, c) + x.shape[2:])[:, :, c - size:]
  tails = jnp.take(tails, position[np.maximum(order - 1, 0)], axis=1)
  first = jnp.asarray(order > 0).reshape((1, n) + (1,) * (tails.ndim - 2))
  return jnp.where(first, tails, jnp.zeros_like(tails))


def final_owner(layout: SeqLayout) -> tuple[int, int]:
  """(rank, local piece) holding the last global chunk, where a recurrence's final state forms."""
  rank, piece = np.argwhere(layout.chunk_table() == layout.num_chunks - 1)[0]
  return int(rank), int(piece)


def call_in_natural_order(layout: SeqLayout | None, fn, *arrays, what: str):
  """fn(*arrays) on natural-order copies of per-token arrays (length at axis 1), its
  output returned in layout order. None and arrays of fewer than 2 dims (a per-head gate) pass as
  they are.

  How a layer WITHOUT a sequence-parallel method runs on a model whose layout permutes the tokens
  (zigzag with only the other layer type's method set): the single-device op is correct only in
  natural order, and XLA partitions it, gathering what it needs. Contiguous layouts (and no
  layout) are natural order already: fn runs on the arrays as they are.
  """
  if layout is None or layout.kind == "contiguous":
    return fn(*arrays)
  log.info("%s: no sequence-parallel method for this layer type; the single-device op runs in "
           "natural order on the %s layout's tokens", what, layout.kind)
  out = fn(*(x if x is None or x.ndim < 2 else layout.from_layout(x, 1) for x in arrays))
  return layout.to_layout(out, 1)
