"""The one table mapping logical axis names (of parameters and activations) to mesh axes.

Mesh axes: data (pure data parallel), fsdp (data parallel with sharded parameters and optimizer
state), seq (sequence parallel), tensor (tensor parallel). A logical name missing from the table
is replicated.
"""

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "seq", "tensor")

LOGICAL_AXIS_RULES = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", "seq"),
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("experts", None),  # no expert-parallel mesh axis: each expert shards like a dense FFN
)


def logical_shardings(abstract_tree, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for a tree whose leaves may be boxed with logical axis names.

  Unboxed leaves (optimizer counts, the step) are replicated. The returned tree has the structure
  of the *unboxed* tree.
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of [b, t] input arrays: batch over data x fsdp, length over seq."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "seq"))
