"""Partition specs of the activations that sequence-parallel ops pass through jax.shard_map.

Inside a sequence-parallel op the batch is split over the data-parallel axes (data, fsdp), the
length over `seq` and the heads over `tensor`; only `seq` carries collectives. Meshes built by
sharding.mesh have all four axes; a mesh with fewer (a test's ("seq",) mesh) is fine: absent
axes are left out of the specs.
"""

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

SEQ_AXIS = "seq"
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def check_seq_mesh(mesh, what: str) -> None:
  """ValueError unless `mesh` is a mesh with a `seq` axis (it is always passed explicitly: no op
  looks up an ambient mesh)."""
  if mesh is None or getattr(mesh, "empty", True) or SEQ_AXIS not in mesh.axis_names:
    raise ValueError(f"{what}: sequence parallelism needs a mesh with a 'seq' axis, got "
                     f"mesh={mesh!r} (pass mesh=; MeshConfig.seq sets its size)")


def seq_degree(mesh) -> int:
  return int(mesh.shape[SEQ_AXIS])


def _batch(mesh):
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return axes or None


def _heads(mesh):
  return HEAD_AXIS if HEAD_AXIS in mesh.axis_names else None


def _degree(mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  n = 1
  for a in axes:
    n *= int(mesh.shape[a])
  return n


def tokens_spec(mesh) -> P:
  """[b, t] arrays (segment ids, positions)."""
  return P(_batch(mesh), SEQ_AXIS)


def heads_spec(mesh) -> P:
  """[b, t, h, d] activations (q, k, v, gates, outputs)."""
  return P(_batch(mesh), SEQ_AXIS, _heads(mesh), None)


def state_spec(mesh) -> P:
  """[b, h, d_k, d_v] recurrent states: replicated over `seq`."""
  return P(_batch(mesh), _heads(mesh), None, None)


def per_head_spec(mesh) -> P:
  """[h] per-head parameters (sinks, fixed decays)."""
  return P(_heads(mesh))


def check_divisible(mesh, *, batch: int, heads: int, kv_heads: int, what: str) -> None:
  """ValueError unless the batch and head counts split over the mesh's batch and head axes."""
  nb, nh = _degree(mesh, _batch(mesh)), _degree(mesh, _heads(mesh))
  if batch % nb:
    raise ValueError(f"{what}: batch {batch} is not divisible by the data-parallel degree {nb} "
                     "(MeshConfig.data x MeshConfig.fsdp)")
  if heads % nh or kv_heads % nh:
    raise ValueError(f"{what}: heads {heads} and kv heads {kv_heads} must be divisible by "
                     f"MeshConfig.tensor={nh}")


def vary(tree, axes):
  """Marks the leaves of `tree` as varying over the manual mesh `axes` (for loop carries that
  start from constants, and for replicated inputs whose gradient must be summed by autodiff)."""

  def one(x):
    missing = tuple(sorted(set(axes) - jax.typeof(x).manual_axis_type.varying))
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(one, tree)


def axes_of(x):
  return jax.typeof(x).manual_axis_type.varying
