"""Device meshes with the named axes (data, fsdp, seq, tensor)."""

import dataclasses

import jax
import numpy as np

from sharding.validation import check_fields
from sharding.rules import MESH_AXES


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Parallel degrees; exactly one may be -1, meaning "all remaining devices"."""

  data: int = -1
  fsdp: int = 1
  seq: int = 1
  tensor: int = 1

  def __post_init__(self):
    check_fields(self)
    dims = [self.data, self.fsdp, self.seq, self.tensor]
    if dims.count(-1) > 1 or any(d == 0 or d < -1 for d in dims):
      raise ValueError(f"MeshConfig(data, fsdp, seq, tensor)={tuple(dims)}: degrees must be "
                       "positive, with at most one -1")

  def shape(self, num_devices: int) -> tuple[int, ...]:
    dims = [self.data, self.fsdp, self.seq, self.tensor]
    known = int(np.prod([d for d in dims if d != -1]))
    if num_devices % known:
      raise ValueError(f"MeshConfig(data, fsdp, seq, tensor)={tuple(dims)} does not divide the "
                       f"{num_devices} available devices")
    dims = [num_devices // known if d == -1 else d for d in dims]
    if int(np.prod(dims)) != num_devices:
      raise ValueError(f"MeshConfig(data, fsdp, seq, tensor)={tuple(dims)} uses "
                       f"{int(np.prod(dims))} devices but {num_devices} are available")
    return tuple(dims)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = cfg.shape(len(devices))
  return jax.make_mesh(shape, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
