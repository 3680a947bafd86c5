"""Parameter creation with logical axis names.

Every parameter of lctx carries logical axis names (see sharding/rules.py for the table that maps
them onto mesh axes). Layers create parameters only through `param` so that the names are never
forgotten.
"""

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp


def param(module: nn.Module, name: str, init: Callable, shape: Sequence[int],
          logical_axes: Sequence[str | None], dtype=jnp.float32):
  """Creates `module`'s parameter `name` boxed with its logical axis names; returns its value."""
  if len(shape) != len(logical_axes):
    raise ValueError(f"{name}: shape {tuple(shape)} and logical axes {tuple(logical_axes)} differ")
  boxed_init = nn.with_logical_partitioning(init, tuple(logical_axes))
  return module.param(name, boxed_init, tuple(shape), dtype)


def dense_init(fan_in: int) -> Callable:
  """Truncated-normal init with std 1/sqrt(fan_in) (fan_in taken explicitly: kernels are N-D)."""
  return nn.initializers.truncated_normal(stddev=fan_in ** -0.5)
