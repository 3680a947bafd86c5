"""Choosing a sequence-parallel method per layer type, and running it.

`SequenceParallelConfig.method` picks a preset for a whole (hybrid) model:
  none   no sequence-parallel algorithm: a `seq` mesh axis > 1 is left to XLA's automatic
         partitioning (correct, but it gathers whatever it needs);
  ring   softmax layers: ring attention;               linear layers: LASP-2;
  lasp2  softmax layers: all-gather K, V (LASP-2H);    linear layers: LASP-2;
  zeco   softmax layers: ring attention;               linear layers: ZeCO All-Scan.
`softmax` and `linear` override the preset for one layer type. `layout` is the token layout of
every layer (sharding/layout.py): "zigzag" balances causal attention; LASP-2 and ZeCO work with it
too, so a hybrid model uses one layout throughout.

The mixers call `parallel_softmax_attention` / `parallel_linear_attention`. They run inside the
mesh context of the train/eval step (jax.set_mesh); with no mesh, or a `seq` axis of size 1, the
single-device op runs instead. Every choice is logged on "lctx.sharding" (at trace time), so a
run's log and a test's `caplog` say which method ran.
"""

import dataclasses
import math
import logging

import jax

from layers.linear_attention import linear_attention
from layers.sink_tokens import sink_token_attention
from layers.softmax_attention import softmax_attention
from layers.validation import check_fields
from sharding import specs
from sharding.allgather_attention import allgather_attention
from sharding.lasp2 import lasp2_linear_attention
from sharding.layout import LAYOUTS, SeqLayout
from sharding.ring_attention import ring_attention
from sharding.zeco import zeco_linear_attention

log = logging.getLogger("lctx.sharding")

METHODS = ("none", "ring", "lasp2", "zeco")
SOFTMAX_METHODS = ("ring", "allgather")
LINEAR_METHODS = ("lasp2", "zeco")
_PRESETS = {"none": (None, None), "ring": ("ring", "lasp2"), "lasp2": ("allgather", "lasp2"),
            "zeco": ("ring", "zeco")}


@dataclasses.dataclass(frozen=True)
class SequenceParallelConfig:
  """Sequence parallelism over the `seq` mesh axis (MeshConfig.seq sets its size).

  Attributes:
    method: preset for the whole model, one of METHODS (see the module docstring).
    softmax: override for softmax-attention layers: "ring" or "allgather" (LASP-2H).
    linear: override for linear-attention layers: "lasp2" or "zeco".
    layout: token layout, "contiguous" or "zigzag" (load-balanced causal attention).
    scan_blocks: ZeCO's All-Scan pipelines the state in this many blocks along d_k.
  """

  method: str = "none"
  softmax: str | None = None
  linear: str | None = None
  layout: str = "contiguous"
  scan_blocks: int = 4

  def __post_init__(self):
    check_fields(self)
    name = "SequenceParallelConfig"
    if self.method not in METHODS:
      raise ValueError(f"{name}.method={self.method!r} must be one of {METHODS}")
    if self.softmax not in (None,) + SOFTMAX_METHODS:
      raise ValueError(f"{name}.softmax={self.softmax!r} must be None or one of "
                       f"{SOFTMAX_METHODS}")
    if self.linear not in (None,) + LINEAR_METHODS:
      raise ValueError(f"{name}.linear={self.linear!r} must be None or one of {LINEAR_METHODS}")
    if self.layout not in LAYOUTS:
      raise ValueError(f"{name}.layout={self.layout!r} must be one of {LAYOUTS}")
    if self.scan_blocks < 1:
      raise ValueError(f"{name}.scan_blocks={self.scan_blocks} must be >= 1")

  @property
  def softmax_method(self) -> str | None:
    return self.softmax or _PRESETS[self.method][0]

  @property
  def linear_method(self) -> str | None:
    return self.linear or _PRESETS[self.method][1]

  @property
  def enabled(self) -> bool:
    return self.softmax_method is not None or self.linear_method is not None

  def layout_for(self, shards: int) -> SeqLayout:
    return SeqLayout(self.layout, shards)


def active_layout(sp: SequenceParallelConfig) -> SeqLayout | None:
  """The layout sequence-parallel layers use in the current mesh context, or None when off.

  Off means: no method chosen, no mesh in context, or a `seq` axis of size 1.
  """
  if not sp.enabled:
    return None
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or specs.SEQ_AXIS not in mesh.axis_names:
    log.info("no mesh with a 'seq' axis in context: SequenceParallelConfig.method=%r runs the "
             "single-device ops", sp.method)
    return None
  shards = specs.seq_degree(mesh)
  if shards == 1:
    log.info("MeshConfig.seq=1: SequenceParallelConfig.method=%r runs the single-device ops",
             sp.method)
    return None
  return sp.layout_for(shards)


def parallel_softmax_attention(sp: SequenceParallelConfig, q, k, v, *, window=None,
                               segment_ids=None, sinks=None, sink_tokens=None, impl="auto",
                               block_size=None, sink_tokens_setting="sink_tokens"):
  """Causal softmax attention of a layer, sequence-parallel when `sp` and the mesh say so.

  Arrays are in the active layout's order (the model permutes its inputs once). `sink_tokens` is
  None or a pair (sink keys, sink values) [n, kv_heads, d] of learnable tokens every query sees;
  they are single-device only, and an error names `sink_tokens_setting` otherwise.
  """
  layout = active_layout(sp)
  method = sp.softmax_method
  if layout is None or method is None:
    if sink_tokens is not None:
      return sink_token_attention(q, k, v, *sink_tokens, window=window, segment_ids=segment_ids,
                                  sinks=sinks, impl=impl, block_size=block_size)
    return softmax_attention(q, k, v, window=window, segment_ids=segment_ids, sinks=sinks,
                             impl=impl, block_size=block_size)
  if sink_tokens is not None:
    raise ValueError(f"{sink_tokens_setting}={sink_tokens[0].shape[0]} is not supported "
                     f"with sequence-parallel softmax attention ("
                     f"{method!r}); set sink_tokens=0 or SequenceParallelConfig.method='none'")
  log.info("softmax attention: sequence-parallel %s over %d ranks, %s layout", method,
           layout.shards, layout.kind)
  fn = ring_attention if method == "ring" else allgather_attention
  return fn(q, k, v, layout=layout, window=window, segment_ids=segment_ids, sinks=sinks,
            block_size=block_size)


def parallel_linear_attention(sp: SequenceParallelConfig, q, k, v, g=None, *, segment_ids=None,
                              impl="auto", chunk_size=64):
  """(Gated) linear attention of a layer, sequence-parallel when `sp` and the mesh say so."""
  layout = active_layout(sp)
  method = sp.linear_method
  if layout is None or method is None:
    return linear_attention(q, k, v, g, segment_ids=segment_ids, impl=impl,
                            chunk_size=chunk_size)
  log.info("linear attention: sequence-parallel %s over %d ranks, %s layout", method,
           layout.shards, layout.kind)
  kwargs = dict(layout=layout, segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)
  if method == "zeco":
    return zeco_linear_attention(q, k, v, g, scan_blocks=sp.scan_blocks, **kwargs)
  return lasp2_linear_attention(q, k, v, g, **kwargs)


def required_length_multiple(sp: SequenceParallelConfig, shards: int, chunk_sizes) -> int:
  """The sequence length must be a multiple of this (layout chunks x linear chunk sizes)."""
  if not sp.enabled or shards == 1:
    return shards
  unit = sp.layout_for(shards).num_chunks
  if sp.linear_method is not None and chunk_sizes:
    unit *= math.lcm(*chunk_sizes)
  return unit
