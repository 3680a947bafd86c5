"""Name -> mixer registry.

A mixer is a Flax Linen module class with the constructor fields
`config` (its own frozen config dataclass, default `cls.Config()`), `d_model`, `layer_index`,
`num_layers` (depth-dependent schedules use both), `dtype`, `param_dtype`, `plan` (the model's
sharding.plan.ExecutionPlan, or None for single-device ops), `spiking` (a
layers.spiking.SpikeConfig, or None: which projection inputs spike and which weights are INT8
fake-quantized), and the call signature
`__call__(x_bte, *, positions_bt, segment_ids_bt, decode=False) -> y_bte`.
With `decode=True` the mixer keeps whatever it needs for incremental decoding in the Flax
"cache" collection and treats `positions_bt` as absolute positions of the new tokens; decoding is
never sequence-parallel. Without decode, the arrays are in the plan's token layout (the model
permutes its inputs once; see sharding/layout.py). A mixer may also take part in the recorded
context of layers/context_cache.py (record its keys and values; answer queries at absolute
positions from a record); the softmax and linear-family mixers do.
"""

import importlib
from typing import Any, Callable, TypeVar

import flax.linen as nn
import jax.numpy as jnp

_MIXERS: dict[str, type] = {}

# Modules whose import registers the built-in mixers; loaded on the first lookup.
BUILTIN_MODULES = ("layers.attention", "layers.linear_mixers", "layers.gated_deltanet")

T = TypeVar("T", bound=type)


class Mixer(nn.Module):
  """Base class carrying the constructor fields every mixer takes (see the module docstring).

  Subclasses narrow `config`'s annotation to their own Config class and define `__call__`.
  """

  config: Any
  d_model: int
  layer_index: int = 0
  num_layers: int = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  plan: Any = None
  spiking: Any = None


def register_mixer(name: str) -> Callable[[T], T]:
  """Class decorator registering a mixer class under `name`."""

  def wrap(cls: T) -> T:
    if name in _MIXERS and _MIXERS[name] is not cls:
      raise ValueError(f"mixer name {name!r} is already registered to {_MIXERS[name].__name__}")
    if not hasattr(cls, "Config"):
      raise TypeError(f"mixer {cls.__name__} must define a nested `Config` dataclass")
    _MIXERS[name] = cls
    return cls

  return wrap


def get_mixer(name: str) -> type:
  """Returns the mixer class registered as `name` (ValueError listing the names otherwise)."""
  _load_builtins()
  try:
    return _MIXERS[name]
  except KeyError:
    raise ValueError(f"unknown mixer {name!r}; registered mixers: {available_mixers()}") from None


def available_mixers() -> list[str]:
  _load_builtins()
  return sorted(_MIXERS)


def _load_builtins() -> None:
  for module in BUILTIN_MODULES:
    importlib.import_module(module)
