"""Choosing a sequence-parallel method per layer type.

`SequenceParallelConfig.method` picks a preset for a whole (hybrid) model:
  none   no sequence-parallel algorithm: a `seq` mesh axis > 1 is left to XLA's automatic
         partitioning (correct, but it gathers whatever it needs);
  ring   softmax layers: ring attention;               linear layers: LASP-2;
  lasp2  softmax layers: all-gather K, V (LASP-2H);    linear layers: LASP-2;
  zeco   softmax layers: ring attention;               linear layers: ZeCO All-Scan.
`softmax` and `linear` override the preset for one layer type. `layout` is the token layout of
every layer (sharding/layout.py): "zigzag" balances causal attention; LASP-2 and ZeCO work with it
too, so a hybrid model uses one layout throughout.

lctx turns this config and the mesh into the model's ExecutionPlan (sharding/plan.py), which the
mixers pass to `layers.softmax_parallel.parallel_softmax_attention` /
`layers.linear_parallel.parallel_linear_attention`; with a `seq` axis of size 1 the single-device
ops run. Every choice is logged on "lctx.sharding", so a run's log and a test's `caplog` say which
method ran.
"""

import dataclasses
import math

from sharding.layout import LAYOUTS, SeqLayout
from sharding.validation import check_fields

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


def required_length_multiple(sp: SequenceParallelConfig, shards: int, chunk_sizes) -> int:
  """The sequence length must be a multiple of this (layout chunks x linear chunk sizes)."""
  if not sp.enabled or shards == 1:
    return shards
  unit = sp.layout_for(shards).num_chunks
  if sp.linear_method is not None and chunk_sizes:
    unit *= math.lcm(*chunk_sizes)
  return unit
