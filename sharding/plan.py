"""The execution plan: where and how the layers of one model run, as data.

lctx builds one `ExecutionPlan` per model from its configs and the mesh (`make_plan`) and passes
it to every mixer as a module field; the mixers hand it to the ops. Nothing inspects an ambient
mesh while tracing, so a module behaves the same whoever calls it: a plan without sequence
parallelism (or no plan) runs the single-device ops, one with a layout runs the chosen
sequence-parallel method of each layer type over `mesh`'s `seq` axis.
"""

import dataclasses
import logging

import jax

from sharding import specs
from sharding.layout import SeqLayout
from sharding.sequence import SequenceParallelConfig

log = logging.getLogger("lctx.sharding")


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
  """How the layers of a model run.

  Attributes:
    mesh: the device mesh (None: single device).
    layout: token layout of the sequence-parallel layers; None when the sequence is not split.
    softmax: sequence-parallel method of softmax layers ("ring", "allgather") or None.
    linear: sequence-parallel method of linear layers ("lasp2", "zeco") or None.
    scan_blocks: ZeCO's All-Scan pipelines the state in this many blocks along d_k.
  """

  mesh: jax.sharding.Mesh | None = None
  layout: SeqLayout | None = None
  softmax: str | None = None
  linear: str | None = None
  scan_blocks: int = 4

  @property
  def softmax_method(self) -> str | None:
    return None if self.layout is None else self.softmax

  @property
  def linear_method(self) -> str | None:
    return None if self.layout is None else self.linear


def make_plan(sp: SequenceParallelConfig, mesh=None) -> ExecutionPlan:
  """The plan of a model with sequence-parallel config `sp` on `mesh` (logged once here)."""
  if not sp.enabled:
    return ExecutionPlan(mesh)
  if mesh is None or specs.SEQ_AXIS not in mesh.axis_names:
    log.info("no mesh with a 'seq' axis: SequenceParallelConfig.method=%r runs the single-device "
             "ops", sp.method)
    return ExecutionPlan(mesh)
  shards = specs.seq_degree(mesh)
  if shards == 1:
    log.info("MeshConfig.seq=1: SequenceParallelConfig.method=%r runs the single-device ops",
             sp.method)
    return ExecutionPlan(mesh)
  return ExecutionPlan(mesh, sp.layout_for(shards), sp.softmax_method, sp.linear_method,
                       sp.scan_blocks)
