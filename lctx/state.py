"""Building the model, its sharded train state and the jitted steps on a mesh.

Parameters are born sharded: init is jitted with out_shardings derived from the parameters'
logical axis names through sharding/rules.py.
"""

import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import PartitionSpec

from lctx.config import ModelConfig
from lctx.model import DecoderLM
from sharding import hosts
from sharding.rules import LOGICAL_AXIS_RULES, batch_sharding, logical_shardings
from sharding.plan import make_plan


@dataclasses.dataclass
class ModelOnMesh:
  """A model, its optimizer and mesh, with the shardings of the state and the batches."""

  model: DecoderLM
  mesh: jax.sharding.Mesh
  tx: object
  state_shardings: dict
  abstract_state: dict  # ShapeDtypeStructs carrying shardings (for restoring checkpoints)
  _init: object

  @property
  def batch_sharding(self):
    return batch_sharding(self.mesh)

  @property
  def abstract_params(self):
    return self.abstract_state["params"]

  def process_rows(self, rows: int, length: int) -> tuple[int, int]:
    """[start, stop) of the rows of a [rows, length] batch that this process's devices hold."""
    return hosts.process_rows(self.batch_sharding, (rows, length))

  def put_rows(self, local: dict, rows: int) -> dict:
    """Global [rows, length] arrays from this process's rows (`process_rows`) of a batch."""
    return hosts.to_global(self.batch_sharding, local, rows)

  def put_batch(self, batch: dict) -> dict:
    """Global arrays from a batch that every process holds whole (evaluation data)."""
    rows, length = np.shape(batch["tokens"])
    start, stop = self.process_rows(rows, length)
    return self.put_rows({k: np.asarray(v)[start:stop] for k, v in batch.items()}, rows)

  def init_state(self, seed: int):
    with self.context():
      return self._init(jax.random.key(seed))

  def context(self):
    """Mesh + logical-rules context in which the model's steps are traced."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(LOGICAL_AXIS_RULES))
    return stack

  def jit(self, fn, *, in_shardings, out_shardings, donate_argnums=()):
    """jax.jit of `fn`, traced inside this model's mesh/rules context on every call."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=donate_argnums)

    def call(*args):
      with self.context():
        return jitted(*args)

    return call


# The setting behind each logical parameter axis, for error messages.
AXIS_SETTINGS = {"embed": "ModelConfig.d_model", "mlp": "ModelConfig.d_ff (or MoEConfig.d_expert)",
                 "vocab": "ModelConfig.vocab_size", "heads": "the mixers' num_heads",
                 "kv_heads": "the mixers' num_kv_heads"}


def check_divisible(abstract_boxed_params, shardings, mesh: jax.sharding.Mesh) -> None:
  """Every sharded parameter dimension must divide by its mesh axes (checked before tracing)."""
  is_spec = lambda x: isinstance(x, PartitionSpec)
  logical = jax.tree.leaves(nn.get_partition_spec(abstract_boxed_params), is_leaf=is_spec)
  leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_boxed_params))[0]
  for (path, leaf), names, sharding in zip(leaves, logical, jax.tree.leaves(shardings)):
    for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      degree = 1
      for a in axes:
        degree *= mesh.shape[a]
      if degree > 1 and size % degree:
        name = names[dim] if dim < len(names) else None
        setting = AXIS_SETTINGS.get(name, f"the size of logical axis {name!r}")
        mesh_axes = " x ".join(f"MeshConfig.{a}={mesh.shape[a]}" for a in axes)
        raise ValueError(f"parameter {jax.tree_util.keystr(path, simple=True, separator='/')}: "
                         f"dimension {dim} has size {size} ({setting}), which does not divide "
                         f"by {mesh_axes}; choose sizes divisible by the mesh axes or other "
                         f"MeshConfig degrees")


def build(model_cfg: ModelConfig, mesh: jax.sharding.Mesh, tx) -> ModelOnMesh:
  model = DecoderLM(model_cfg, make_plan(model_cfg.sequence_parallel, mesh))
  # Parameters do not depend on the execution plan; initializing without one lets a 2-token
  # dummy input stand in for any sequence length.
  init_model = DecoderLM(model_cfg)

  def init_boxed(rng):
    params = init_model.init(rng, jnp.zeros((1, 2), jnp.int32))["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    abstract_boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    shardings = logical_shardings(abstract_boxed, mesh)
  check_divisible(abstract_boxed["params"], shardings["params"], mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(abstract_boxed), shardings)
  init = jax.jit(lambda rng: nn.unbox(init_boxed(rng)), out_shardings=shardings)
  return ModelOnMesh(model, mesh, tx, shardings, abstract, init)
